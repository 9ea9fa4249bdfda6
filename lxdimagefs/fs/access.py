"""Who may do what: the kernel's mode check (`default_permissions`), made again by the daemon.

With `allow_other` the mount asks the kernel to check modes, and a private
image's files are the mounter's alone (0600, folders 0700). Should the
kernel not check (a mount made without the option), the daemon refuses the
same calls: a caller other than the mounter and root needs search (x) on
every folder above a path, and read or write on the path itself.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from lxdimagefs.errors import fs_error
from lxdimagefs.fs.node import Attr

R, W, X = os.R_OK, os.W_OK, os.X_OK


def groups(pid: int, gid: int) -> set[int]:
    """The caller's groups: its primary one, and the supplementary ones the kernel lists."""
    found = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    found.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return found


def grants(attr: Attr, uid: int, gids: set[int], owner: tuple[int, int], want: int) -> bool:
    """Whether the mode bits give `want` (R, W, X) to this caller, as the kernel reads them."""
    st_uid = owner[0] if attr.uid is None else attr.uid
    st_gid = owner[1] if attr.gid is None else attr.gid
    mode = stat.S_IMODE(attr.mode)
    bits = mode >> 6 if uid == st_uid else mode >> 3 if st_gid in gids else mode
    return bits & want == want


def check(getattr: Callable[[str], Attr], path: str, uid: int, gids: set[int], owner: tuple[int, int],
          want: int) -> None:
    """EACCES unless the caller may search every folder above `path` and do `want` on it (0: nothing)."""
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts) + 1):
        at = "/" + "/".join(parts[:depth])
        need = want if depth == len(parts) else X
        if need and not grants(getattr(at), uid, gids, owner, need):
            raise fs_error(errno.EACCES, path, "the mode bits do not allow it")


def may(getattr: Callable[[str], Attr], path: str, caller: tuple[int, int, int], owner: tuple[int, int],
        want: int) -> None:
    """The mode check for a caller (uid, gid, pid) other than the mounter and root, who pass."""
    uid, gid, pid = caller
    if uid not in (0, owner[0]):
        check(getattr, path, uid, groups(pid, gid), owner, want)


def may_change(getattr: Callable[[str], Attr], path: str, caller: tuple[int, int, int],
               owner: tuple[int, int]) -> None:
    """Whether the caller may add or remove the name `path` in its folder: write and search there."""
    may(getattr, path.rsplit("/", 1)[0] or "/", caller, owner, W | X)
