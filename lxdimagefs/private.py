"""Files and folders of this user's inside shared folders ($TMPDIR, the cache folder).

Another local user may have made a name there first: a folder they own (to read what is
written into it), a symlink (to redirect a write), a FIFO (to stall an open for good). Each
is refused here, before anything is read or written through it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_folder(path: Path) -> Path:
    """`path` made if missing (0700), and refused unless it is a folder, not a link, this user's
    alone: PermissionError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path} is not a folder only this user can use")
    return path


def open_own(path: Path | str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of a regular file of this user's: never follows a link, never waits (a FIFO
    or a device answers at once, refused), and a file another user owns is refused:
    PermissionError. `flags` as for os.open (O_CREAT to make it, 0600)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a regular file of this user's")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def alive(pid: int) -> bool:
    """Whether the process that claimed a folder here (its pid in it) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
