"""lxdimagefs's own -o options: how they are read, what --help says of them, and the typed
record the mount is built from. Every other -o goes to FUSE; mount(8)'s and fstab's own are
dropped, so an fstab line mounts as it reads.
"""

from __future__ import annotations

import grp
import math
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from lxdimagefs.fs.node import Ownership


class UsageError(Exception):
    pass


def parse_size(value: str) -> int:
    """`10G`, `512M`, `4096K` or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = value.strip().upper().removesuffix("IB").removesuffix("B")
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


# MiB of export blocks in memory by default: read-ahead and the hash's window. Re-reads of
# verified files come from the page cache and the disk cache (16 MiB kept the soak's RSS at
# 84-88 MiB against 106-112 with 32, first reads no slower: docs/PERFORMANCE.md).
CACHE_SIZE = 16


@dataclass(frozen=True)
class MountOptions:
    """The -o options lxdimagefs reads itself, each with its default."""

    metadata_ttl: float = 3.0  # seconds a listing of LXD's images is trusted
    cache_size: int = CACHE_SIZE  # MiB of export blocks held in memory, for the whole daemon
    timeout: float = 30.0  # seconds to wait for LXD before a call fails with EIO
    cache_max: int | None = None  # bytes of verified exports kept on disk; 0: none; None: no limit
    no_events: bool = False  # do not listen to LXD's events: rely on metadata_ttl alone
    nocontents: bool = False  # leave out contents/, e.g. for backups of the whole mount
    allow_delete: bool = False  # rm -r / rmdir of by-fingerprint/<fp> deletes the image (else EPERM)
    nolocal: bool = False  # never read a local server's own image files: always its socket
    own: Ownership = field(default_factory=Ownership)  # uid=, gid=, file_mode=, dir_mode=
    metrics: str | None = None  # the stats socket (default: one per mount point, mount/metrics.py)

    @property
    def cache_bytes(self) -> int:
        return self.cache_size << 20


# The options with a value, and how to read it.
OWN_OPTIONS: dict[str, Callable[[str], float]] = {
    "metadata_ttl": float, "cache_size": int, "timeout": float, "cache_max": parse_size,
}
# The flags: the record's yes-or-no fields.
OWN_FLAGS = {f.name for f in fields(MountOptions) if f.type == "bool"}

# Options fstab and systemd give mount(8), which mount.fuse3 hands on and libfuse would refuse.
MOUNT_ONLY = {"_netdev", "nofail", "user", "users", "nouser", "auto", "noauto", "defaults"}


def _owner(key: str, val: str) -> int:
    """A user or group by name or number."""
    try:
        if val.isdigit():
            return int(val)
        return pwd.getpwnam(val).pw_uid if key == "uid" else grp.getgrnam(val).gr_gid
    except KeyError:
        raise UsageError(f"option {key}: no {'user' if key == 'uid' else 'group'} named {val!r}") from None


def _mode(key: str, val: str) -> int:
    try:
        mode = int(val, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise UsageError(f"option {key} needs an octal mode such as 0644, not {val!r}")
    return mode


# Ownership and modes: read here, never given to libfuse, whose own uid=, gid= and umask= would
# overwrite every entry's, the owners inside images (contents/) too.
OWNERSHIP: dict[str, Callable[[str, str], int]] = {"uid": _owner, "gid": _owner, "file_mode": _mode,
                                                   "dir_mode": _mode}


def parse_options(values: list[str]) -> tuple[MountOptions, dict[str, object]]:
    """Split `-o a,b=c` lists into (lxdimagefs options, FUSE options)."""
    own: dict[str, Any] = {}
    owner: dict[str, int] = {}
    fuse: dict[str, object] = {}
    for value in values:
        for item in filter(None, value.split(",")):
            key, sep, val = item.partition("=")
            if key in MOUNT_ONLY or key.startswith("x-"):
                continue
            if key == "umask":
                raise UsageError("option umask: give file_mode= and dir_mode= instead")
            if key == "metrics" and val:
                own["metrics"] = val
            elif key in OWNERSHIP:
                owner[key] = OWNERSHIP[key](key, val)
            elif key in OWN_FLAGS and not sep:
                own[key] = True
            elif key in OWN_OPTIONS:
                own[key] = _number(key, val)
            else:
                fuse[key] = val if sep else True
    return MountOptions(**own, own=Ownership(**owner)), fuse


def _number(key: str, val: str) -> float:
    try:
        number = OWN_OPTIONS[key](val)
    except ValueError:
        raise UsageError(f"option {key} needs a number, not {val!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and key != "cache_max"):
        raise UsageError(f"option {key} must be positive")
    return number


# The -o section of `lxdimagefs --help`.
OPTIONS_HELP = """\
options for -o (besides FUSE's own: ro, allow_other, default_permissions, ...):
  metadata_ttl=SECONDS  how long a listing of images is trusted (default 3)
  cache_size=MiB        export blocks held in memory, per server (and per project
                        with --all-projects; default 16)
  cache_max=SIZE        verified exports kept on disk (K, M, G; default: no
                        limit but 5% of that filesystem kept free; 0: none).
                        They live in --cache-dir/lxdimagefs-cache-UID, else
                        $XDG_CACHE_HOME/lxdimagefs (~/.cache/lxdimagefs), or
                        /var/cache/lxdimagefs for root: a new mount, another
                        server or contents/ never fetch them again. Every
                        block is checked against the image's manifest when
                        it is read back; the folder is private (0700)
  timeout=SECONDS       how long to ride out an unreachable server before
                        a call fails with EIO (default 30)
  no_events             do not follow the server's event stream
  nocontents            leave out contents/ (backups of the whole mount)
  allow_delete          let rm -r (or rmdir) of by-fingerprint/<fp> delete the
                        image; without it deleting an image is refused (EPERM)
  uid=USER, gid=GROUP   owner of by-fingerprint/, by-alias/, import/ and their
                        entries (default: the mounter); never of what is inside
                        an image (contents/ keeps the image's own owners)
  file_mode=MODE        their files' and folders' modes (octal; default 0644
  dir_mode=MODE         and 0755): a private image keeps only the owner's bits,
                        and the group's too when gid= is given (with allow_other,
                        that group reads private images)
  metrics=PATH          the unix socket `lxdimagefs stats` and a Prometheus
                        scraper read (default: one per mount point in
                        /run/lxdimagefs, or $XDG_RUNTIME_DIR for a user)
  nolocal               read exports only through the socket; by default, as root
                        beside a local server, its own image files are read in
                        place (checked like its exports)
  _netdev, nofail, user, users, auto, noauto, defaults, x-*
                        fstab's and systemd's: accepted and ignored

"""
