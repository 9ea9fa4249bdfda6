"""What every top-level subtree of a mount is, and what they share.

The root (tree.py) gives each top-level name its own `Node`, and hands it
the path components below that name. A node owns its state and its lock;
what it does not accept, the defaults here refuse with the errno
docs/SEMANTICS.md lists.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import Handle
from lxdimagefs.names import fits, valid

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Attr:
    mode: int
    size: int
    mtime: float
    atime: float
    ctime: float
    nlink: int = 1
    blksize: int = 4096
    uid: int | None = None  # None: the user who mounted
    gid: int | None = None
    rdev: int = 0
    ino: int | None = None  # None: a number made from the path (inode_number)
    mtime_ns: int | None = None  # mtime to the ns, which a float cannot hold (atime, ctime too when equal)


class Listing(list[str]):
    """A folder's names, and the file type of those whose type is known from the listing itself
    (given to the kernel with the names, so that find, du and diff need not stat each)."""

    def __init__(self, names: list[str], kinds: dict[str, int]) -> None:
        super().__init__(names)
        self.kinds = kinds


def inode_number(*key: object) -> int:
    """A file's inode number, made from what identifies it: the same in every mount, never 0 or 1.

    The mount reports its own numbers (FUSE's use_ino), so that the names of one file inside an
    image (a hard link) share one, as tar, du and rsync -H expect.
    """
    digest = hashlib.blake2b("\0".join(map(str, key)).encode("utf-8", "surrogateescape"), digest_size=8)
    return (int.from_bytes(digest.digest(), "big") >> 1) | 2


@dataclass(frozen=True)
class Ownership:
    """-o uid=,gid=,file_mode=,dir_mode=: the owner and modes of the mount's own entries (never of
    what is inside an image, whose entries carry their own). A private image keeps its other bits
    clear; with a gid, its group bits are the file_mode's and dir_mode's, so that group reads it."""

    uid: int | None = None  # None: the user who mounted
    gid: int | None = None
    file_mode: int = 0o644
    dir_mode: int = 0o755

    def bits(self, mode: int, public: bool) -> int:
        return mode if public else mode & (0o700 if self.gid is None else 0o770)


@dataclass
class Context:
    """The mount's settings, the refusals every node words alike, and change notices."""

    readonly: bool = True
    allow_delete: bool = False  # -o allow_delete: rm -r and rmdir of an image folder delete the image
    mountpoint: str = ""
    own: Ownership = field(default_factory=Ownership)
    started: float = field(default_factory=time.time)
    # Told of paths that changed behind the caller's back; wait=True where no directory lock
    # can be held (close), so the caller sees the change when its call returns; entry=False
    # keeps the name (attributes only), which is all a caller that may hold its folder's lock
    # (a rename) may wait for: dropping a name takes that lock.
    on_change: Callable[..., None] = lambda path, wait=False, entry=True: None

    def dir(self, mtime: float, nlink: int = 2, writable: bool = False) -> Attr:
        mode = self.own.dir_mode if writable and not self.readonly else self.own.dir_mode & ~0o222
        return Attr(stat.S_IFDIR | mode, 0, mtime, mtime, mtime, nlink)

    def mode(self, mode: int, public: bool) -> int:
        return self.own.bits(mode & ~0o222 if self.readonly else mode, public)

    def dir_mode(self, public: bool) -> int:
        """An image's folder: everyone's to enter if the image is public, else the mounter's alone."""
        return stat.S_IFDIR | self.mode(self.own.dir_mode, public)

    def file_mode(self, public: bool) -> int:
        """An image's file: readable by all if public, else by the mounter alone.

        Writable by the mounter on a read-write mount, as the kernel's checks
        (default_permissions) want for setxattr; writes themselves are the node's to refuse.
        """
        return self.mode(self.own.file_mode, public)

    def writable(self, path: str, op: str) -> None:
        if self.readonly:
            log.warning("refused %s %s: read-only mount", op, path)
            raise fs_error(errno.EROFS, path)

    @staticmethod
    def refuse(code: int, op: str, path: str, why: str) -> OSError:
        log.warning("refused %s %s: %s", op, path, why)
        return fs_error(code, path, why)

    def refusal(self, op: str, path: str, why: str) -> OSError:
        """The error for a change the tree never makes: EROFS under -o ro, else EPERM."""
        return self.refuse(errno.EROFS if self.readonly else errno.EPERM, op, path, why)


class Fading:
    """Names that still answer a lookup for a moment after they are gone.

    The kernel looks an entry up once the call that made or changed it
    returns (libfuse replies to symlink and utimens with the entry's
    attributes): a link in import/ that became an image, or an image folder
    a refresh replaced, must answer that one lookup, then be gone.
    """

    SHOWN = 1.0  # seconds: about the kernel's entry lifetime

    def __init__(self) -> None:
        self._until: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, value: object) -> None:
        with self._lock:
            self._until[name] = (value, time.monotonic() + self.SHOWN)

    def get(self, name: str) -> object | None:
        with self._lock:
            value, until = self._until.get(name, (None, 0.0))
            if until and time.monotonic() >= until:
                del self._until[name]
                return None
        return value

    def discard(self, name: str) -> bool:
        with self._lock:
            return self._until.pop(name, None) is not None


def check_name(name: str, path: str) -> None:
    """A new entry's name: one LXD can hold (EINVAL), and a directory entry too (ENAMETOOLONG)."""
    if not valid(name):
        raise fs_error(errno.EINVAL, path, "names must be UTF-8, without control characters")
    if not fits(name):
        raise fs_error(errno.ENAMETOOLONG, path)


class Node:
    """One subtree. `rest` is the list of path components below the node's own name."""

    read_only = False  # True: every change is EROFS, whatever the mount's options

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.name = name

    def path(self, rest: list[str]) -> str:
        return "/" + "/".join([self.name, *rest])

    # -- reading --------------------------------------------------------------

    def getattr(self, rest: list[str]) -> Attr:
        raise NotImplementedError

    def readdir(self, rest: list[str]) -> list[str]:
        raise NotImplementedError

    def readlink(self, rest: list[str]) -> str:
        self.getattr(rest)
        raise fs_error(errno.EINVAL, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        raise NotImplementedError

    def xattrs(self, rest: list[str]) -> dict[str, bytes]:
        """Extended attributes, by full name: none but on images."""
        self.getattr(rest)
        return {}

    # -- changes: refused unless the node accepts them ---------------------------

    def create(self, rest: list[str], flags: int, pid: int) -> Handle:
        raise self.ctx.refuse(errno.EPERM, "create", self.path(rest),
                              "files can be created only under import/")

    def mkdir(self, rest: list[str]) -> None:
        raise self.ctx.refuse(errno.EPERM, "mkdir", self.path(rest), "folders can be made only under import/")

    def rmdir(self, rest: list[str]) -> None:
        raise self.ctx.refuse(errno.EPERM if rest else errno.EBUSY, "rmdir", self.path(rest),
                              "only image folders and import folders can be removed")

    def unlink(self, rest: list[str], pid: int = 0) -> None:
        raise self.ctx.refuse(errno.EPERM, "unlink", self.path(rest), "this cannot be removed")

    def opendir(self, rest: list[str], pid: int) -> Handle:
        """A folder opened by process `pid`, to be listed (or emptied, by `rm -r`)."""
        return Handle(pid)

    def symlink(self, rest: list[str], target: str) -> None:
        raise self.ctx.refuse(errno.EPERM, "symlink", self.path(rest),
                              "symlinks can be made only under by-alias/")

    def rename(self, src: list[str], dst: list[str], pid: int) -> None:
        raise self.ctx.refuse(errno.EPERM, "rename", self.path(src), f"cannot move it to {self.path(dst)}")

    def truncate(self, rest: list[str], length: int) -> None:
        raise self.ctx.refuse(errno.EPERM, "truncate", self.path(rest), "cannot change this file's size")

    def set_xattr(self, rest: list[str], name: str, value: bytes | None, flags: int) -> bool:
        """Save an extended attribute (None: remove it); False where this node keeps none."""
        return False

    def touch(self, rest: list[str]) -> bool:
        """`touch` (utimensat) as a request, where the node takes it as one (refresh)."""
        return False

    def accepts_attributes(self, rest: list[str]) -> bool:
        """Whether chmod, chown, utimensat and xattrs are taken (and ignored) here: files being written."""
        return False
