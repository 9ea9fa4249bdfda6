"""The thin layer between FUSE and the tree: translates calls, and maps
every exception to an errno in one place.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from lxdimagefs import stats
from lxdimagefs.compose.forest import Forest
from lxdimagefs.compose.root import Attr, Tree
from lxdimagefs.errors import LXDError
from lxdimagefs.fs import access
from lxdimagefs.fs.commit import process_of
from lxdimagefs.fs.handles import Caching
from lxdimagefs.fs.node import Listing, inode_number
from lxdimagefs.mount import tuning
from lxdimagefs.mount.fusebind import NOFLUSH, Operations, fuse_get_context, kernel_forgetter, listed
from lxdimagefs.servers.events import EventWatcher

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


# Refusals that are the ordinary answer to a question, not worth a warning.
_QUIET = {errno.ENOENT, errno.ENODATA, errno.ENOTSUP}


def to_errno(op: str, args: tuple, exc: BaseException) -> int:
    """The one place an exception becomes an errno (logged with both, for --log-format json)."""
    number = exc.errno if isinstance(exc, (LXDError, OSError)) and exc.errno else errno.EIO
    fields = {"operation": op, "errno": errno.errorcode.get(number, number)}
    if isinstance(exc, LXDError):
        log.warning("%s %s: LXD: %s", op, args[:1], exc.message, extra=fields)
    elif isinstance(exc, OSError) and exc.errno:
        (log.debug if number in _QUIET else log.warning)("%s %s: %s", op, args[:1], exc.strerror,
                                                         extra=fields)
    else:
        log.exception("%s %s failed unexpectedly", op, args[:1], extra=fields)
    return number


def translated(func: F) -> F:
    # readinto is the read(2) a user sees, readdir_from a listing, for the stats
    op = func.__name__.removesuffix("into").removesuffix("_from")

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return func(self, *args)
        except Exception as exc:
            raise OSError(to_errno(func.__name__, args, exc), "") from None
        finally:
            stats.timed(op, time.perf_counter() - started)
    return cast(F, wrapper)


def _stat(attr: Attr, uid: int, gid: int, path: str) -> dict[str, int]:
    ns = 1_000_000_000
    return {
        "st_mode": attr.mode, "st_size": attr.size, "st_nlink": attr.nlink, "st_rdev": attr.rdev,
        "st_ino": inode_number(path) if attr.ino is None else attr.ino,
        "st_uid": uid if attr.uid is None else attr.uid, "st_gid": gid if attr.gid is None else attr.gid,
        "st_blksize": attr.blksize,
        "st_blocks": (attr.size + 511) // 512,
        "st_mtime": exact if (exact := attr.mtime_ns) is not None else int(attr.mtime * ns),
        "st_atime": exact if exact is not None and attr.atime == attr.mtime else int(attr.atime * ns),
        "st_ctime": exact if exact is not None and attr.ctime == attr.mtime else int(attr.ctime * ns),
    }


class LXDImageOps(Operations):
    use_ns = True

    def __init__(self, tree: Tree | Forest, events: list[EventWatcher] | None = None,
                 mountpoint: str = "") -> None:
        self.tree, self.events, self.mountpoint = tree, events or [], mountpoint
        self.served = False  # set once the kernel has the mount
        self._listings: dict[int, list[tuple[str, int, int]]] = {}  # open folders' rows, by handle
        self.on_init: list[Callable[[], None]] = []
        self.told: list[Callable[..., None]] = []  # told of every path that changed, as the kernel is

    def init(self, path: str) -> None:
        self.served = True
        for watcher in self.events:
            watcher.start()  # threads start here: the daemon has forked by now
        tuning.start(self.mountpoint)
        self.tree.started(kernel_forgetter(self.mountpoint, self.told))
        for hook in self.on_init:  # the metrics socket: threads start after the fork
            hook()

    @translated
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return _stat(self.tree.getattr(path), self.tree.uid, self.tree.gid, path)

    @translated
    def readdir(self, path: str, fh: Any) -> list[tuple[str, dict[str, int], int]]:
        _may(self.tree, path, access.R)
        names = self.tree.readdir(path)
        return listed([".", "..", *names], names.kinds if isinstance(names, Listing) else {})

    @translated
    def readdir_from(self, path: str, fh: int, offset: int) -> list[tuple[str, int, int]]:
        """A listing's (name, d_type, next offset) from `offset` on: made at 0, kept until releasedir."""
        rows = None if offset == 0 else self._listings.get(fh)
        if rows is None:  # readdir undecorated: one listing is one call in the stats
            rows = self._listings[fh] = [(n, st["st_mode"], i) for i, (n, st, _) in enumerate(
                LXDImageOps.readdir.__wrapped__(self, path, fh), 1)]  # type: ignore[attr-defined]
        return rows[offset:]

    @translated
    def readlink(self, path: str) -> str:
        return self.tree.readlink(path)

    @translated
    def open(self, path: str, fi: Any) -> int:
        _may(self.tree, path, access.W if fi.flags & (os.O_WRONLY | os.O_RDWR) else access.R)
        fi.fh = self.tree.open(path, fi.flags, _pid(self.tree, path))
        # Proven bytes keep the kernel's pages; bytes being checked: emptied at open; the rest: direct_io.
        caching = self.tree.caching(fi.fh)
        fi.keep_cache = int(caching is Caching.KEEP)
        fi.direct_io = int(caching is Caching.DIRECT)
        if NOFLUSH:  # a close commits only what its writer wrote: one opened to read needs no FLUSH
            fi.noflush = int(not fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        return 0

    @translated
    def read(self, path: str, size: int, offset: int, fi: Any) -> Any:
        data = self.tree.read(fi.fh, offset, size)
        if isinstance(data, memoryview) and data.nbytes and not data.readonly:
            # A view of a cached block: handed to the binding's memmove without a copy.
            return (ctypes.c_char * data.nbytes).from_buffer(data)
        return data

    @translated
    def readinto(self, path: str, buf: memoryview, offset: int, fi: Any) -> int:
        return self.tree.readinto(fi.fh, offset, buf)

    @translated
    def release(self, path: str, fi: Any) -> int:
        self.tree.release(fi.fh)
        return 0

    @translated
    def statfs(self, path: str) -> dict[str, int]:
        return self.tree.statfs(path)

    @translated
    def access(self, path: str, amode: int) -> int:
        self.tree.getattr(path)
        if amode & os.W_OK and self.tree.readonly:
            raise OSError(errno.EROFS, "read-only")
        return 0

    def destroy(self, path: str) -> None:
        for watcher in self.events:
            watcher.stop()
        self.tree.close()

    # Changes: the tree decides; here only the caller's pid is looked up.

    @translated
    def create(self, path: str, mode: int, fi: Any) -> int:
        _may_change(self.tree, path)
        fi.fh = self.tree.create(path, fi.flags, _pid(self.tree))
        fi.direct_io = 1  # what is written here is ours, not a cache's
        return 0

    @translated
    def write(self, path: str, data: bytes | memoryview, offset: int, fi: Any) -> int:
        return self.tree.write(fi.fh, offset, data)

    @translated
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if fh is None:
            _may(self.tree, path, access.W)
        self.tree.truncate(path, length, getattr(fh, "fh", None))
        return 0

    @translated
    def flush(self, path: str, fi: Any) -> int:
        self.tree.flush(fi.fh, _pid(self.tree))
        return 0

    @translated
    def mkdir(self, path: str, mode: int) -> int:
        _may_change(self.tree, path)
        self.tree.mkdir(path)
        return 0

    @translated
    def rmdir(self, path: str) -> int:
        _may_change(self.tree, path)
        self.tree.rmdir(path)
        return 0

    @translated
    def unlink(self, path: str) -> int:
        _may_change(self.tree, path)
        self.tree.unlink(path, _pid(self.tree))
        return 0

    @translated
    def opendir(self, path: str) -> int:
        return self.tree.opendir(path, _pid(self.tree, path))

    @translated
    def releasedir(self, path: str, fh: int) -> int:
        self._listings.pop(fh, None)
        self.tree.release(fh)
        return 0

    @translated
    def symlink(self, target: str, source: str) -> int:
        # fusepy's names: `target` is the new link's path, `source` what it points to.
        _may_change(self.tree, target)
        self.tree.symlink(target, source)
        return 0

    @translated
    def rename(self, old: str, new: str) -> int:
        _may_change(self.tree, old)
        _may_change(self.tree, new)
        self.tree.rename(old, new, _pid(self.tree))
        return 0

    @translated
    def utimens(self, path: str, times: Any = None) -> int:
        self.tree.set_attributes(path, "utimens")
        return 0

    @translated
    def chmod(self, path: str, mode: int) -> int:
        self.tree.set_attributes(path, "chmod")
        return 0

    @translated
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.tree.set_attributes(path, "chown")
        return 0

    @translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        _may(self.tree, path, access.R)
        return self.tree.getxattr(path, name)

    @translated
    def listxattr(self, path: str) -> list[str]:
        _may(self.tree, path, access.R)
        return list(self.tree.listxattrs(path))

    @translated
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        _may(self.tree, path, access.W)
        self.tree.setxattr(path, name, bytes(value), options)
        return 0

    @translated
    def removexattr(self, path: str, name: str) -> int:
        _may(self.tree, path, access.W)
        self.tree.setxattr(path, name, None)
        return 0

    @translated
    def link(self, target: str, source: str) -> int:
        raise self.tree.refusal("link", target, "hard links are not supported")

    @translated
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise self.tree.refusal("mknod", path, "only regular files can be made, under import/")


def _may(tree: Tree | Forest, path: str, want: int) -> None:
    """The mode check, for callers other than the mounter and root (see fs/access.py)."""
    access.may(tree.getattr, path, fuse_get_context(), (tree.uid, tree.gid), want)


def _may_change(tree: Tree | Forest, path: str) -> None:
    access.may_change(tree.getattr, path, fuse_get_context(), (tree.uid, tree.gid))


def _pid(tree: Tree | Forest, path: str = "") -> int:
    """The calling process: FUSE tells the thread, and a process's threads are one writer. Inside
    an image nothing is written, and no one is told who opened what: not looked up (a /proc read)."""
    return 0 if tree.inside_image(path) else process_of(fuse_get_context()[2])
