"""The kernel's caches of the mount: what it may keep for the mount's life, what it must drop.

What is inside an image never changes (it is addressed by its fingerprint), so the kernel may
keep a folder's listing there (FOPEN_CACHE_DIR with FOPEN_KEEP_CACHE: getdents then answered
from its own pages, no request to us). What can change (an image landed or deleted, an alias
moved) is dropped by name when it does, off the request threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from lxdimagefs.mount.libfuse.threadstates import KEPT

log = logging.getLogger(__name__)

# struct fuse_session of libfuse 3.14 and 3.15 (lib/fuse_i.h): mountpoint, exited, fd, io, mo,
# debug, deny_others, then its struct fuse_lowlevel_ops, whose 21st entry is opendir.
_FD_AT, _OPS_AT, _OPENDIR = 12, 40, 20
_OpenDir = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)


class KeptListings:
    """Folders whose listing the kernel may keep: `keep(fi)` from the filesystem's opendir.

    libfuse's high-level API passes an opendir's cache_readdir and keep_cache on from 3.16
    (libfuse#822); 3.14 and 3.15 answer with a copy of the file info the filesystem never sees.
    There the session's opendir entry is wrapped: the wrapper notes this request's own file info
    for its thread, libfuse's opendir calls ours, which sets the two bits in it, and libfuse
    answers with them. The session's layout is checked first (its mountpoint and descriptor
    where those versions have them); any other libfuse: listings are asked for each time.
    """

    def __init__(self) -> None:
        self._mine = threading.local()
        self._wrapper: Any = None  # libfuse calls it as long as the session lives
        self._own_fi = False  # libfuse >= 3.16 passes the bits of the file info we are given

    def install(self, lib: Any, fuse: int, mountpoint: str, fi_type: type) -> bool:
        """Called in the filesystem's init, before the kernel sends anything else (so nothing
        here may touch the mount: `mountpoint` is its real path, found before it was mounted)."""
        lib.fuse_version.restype, version = ctypes.c_int, lib.fuse_version()
        if version >= 316:
            self._own_fi = True
            return True
        lib.fuse_get_session.argtypes, lib.fuse_get_session.restype = [ctypes.c_void_p], ctypes.c_void_p
        lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
        session = lib.fuse_get_session(fuse)
        if version not in (314, 315) or not session or not self._laid_out(lib, session, mountpoint):
            log.info("libfuse %d.%d: the kernel asks for listings inside images each time",
                     version // 100, version % 100)
            return False
        slot = ctypes.c_void_p.from_address(session + _OPS_AT + _OPENDIR * ctypes.sizeof(ctypes.c_void_p))
        if not slot.value:
            return False
        original, fi_p = _OpenDir(slot.value), ctypes.POINTER(fi_type)  # type: ignore[var-annotated]

        def opendir(req: int, ino: int, fi: int) -> None:
            KEPT.keep()
            self._mine.fi = ctypes.cast(fi, fi_p).contents
            try:
                original(req, ino, fi)  # libfuse's: calls the filesystem's opendir, then answers
            finally:
                self._mine.fi = None

        self._wrapper = _OpenDir(opendir)
        slot.value = ctypes.cast(self._wrapper, ctypes.c_void_p).value
        return True

    @staticmethod
    def _laid_out(lib: Any, session: int, mountpoint: str) -> bool:
        named = ctypes.c_char_p.from_address(session).value
        fd = ctypes.c_int.from_address(session + _FD_AT).value
        return named == os.fsencode(mountpoint) and fd == lib.fuse_session_fd(session)

    def keep(self, fi: Any) -> None:
        """The folder being opened (`fi`: its file info as the filesystem got it) never changes."""
        answered = fi if self._own_fi else getattr(self._mine, "fi", None)  # 3.14/3.15: libfuse's own
        if answered is not None:
            answered.cache_readdir = answered.keep_cache = 1


def path_invalidator(lib: Any, mountpoint: str = "") -> Callable[[str, bool], None]:
    """A function that drops the kernel's cached attributes of a path (its pages, a folder's
    listing) and, if asked, its name: `invalidate(path, entry)`.

    `fuse_invalidate_path` (libfuse 3's high-level API) must be called from inside a FUSE
    callback first (to learn the session). A name needs its folder's node id, which only the
    kernel tells a high-level file system: it is read from a file handle of the folder
    (`name_to_handle_at` under `mountpoint`). Never call it from a callback that holds the
    path's folder (it would wait on the kernel, which waits on us).
    """
    fuse = lib.fuse_get_context().contents.fuse
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_get_session.argtypes, lib.fuse_get_session.restype = [ctypes.c_void_p], ctypes.c_void_p
    lib.fuse_lowlevel_notify_inval_entry.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p,
                                                      ctypes.c_size_t]
    session = lib.fuse_get_session(fuse)
    ours: list[int] = []  # the mount's own mount id: a folder reached through a link to another
    # mount (contents/, mount/inside.py) has a node id of that mount's, never this session's

    def invalidate(path: str, entry: bool = False) -> None:
        raw = path.encode("utf-8", "surrogateescape")
        lib.fuse_invalidate_path(fuse, raw)  # ENOENT: the kernel does not hold it
        folder, _, name = raw.rpartition(b"/")
        if entry and name and mountpoint:
            if not ours:
                ours.append(_node_id(os.fsencode(mountpoint))[1])
            node, mount = (1, ours[0]) if not folder else _node_id(os.fsencode(mountpoint) + folder)
            if node is not None and mount == ours[0]:  # ENOENT: the kernel does not hold it
                lib.fuse_lowlevel_notify_inval_entry(session, node, name, len(name))

    return invalidate


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_uint32 * 8)]


_FILEID_INO64_GEN = 0x81  # what FUSE's encode_fh gives: the node id's two halves, the generation


def _node_id(path: bytes) -> tuple[int | None, int]:
    """The FUSE node id the kernel gave `path` (a folder of a FUSE mount), from its file handle, and
    the id of the mount it is on."""
    handle, mount_id = _FileHandle(handle_bytes=ctypes.sizeof(ctypes.c_uint32 * 8)), ctypes.c_int(-1)
    at_fdcwd = -100  # and no flags: a link is not followed
    if _libc.name_to_handle_at(at_fdcwd, path, ctypes.byref(handle), ctypes.byref(mount_id),
                               0) != 0 or handle.handle_type != _FILEID_INO64_GEN:
        return None, mount_id.value
    return int(handle.f_handle[0]) << 32 | int(handle.f_handle[1]), mount_id.value


_libc = ctypes.CDLL(None, use_errno=True)


def kernel_forgetter(lib: Any, mountpoint: str = "") -> Callable[..., None]:
    """What the tree calls when a path changes without a call of the kernel's (an import that
    landed, an image LXD deleted, an alias retargeted elsewhere): `on_change(path, wait=False,
    entry=True)`. Its attributes are dropped, and its name unless `entry` is false (a folder
    whose listing changed keeps its name): the kernel keeps names for an hour where events
    are followed. Done off the request threads, since the kernel may hold their folder.
    `lib`: libfuse 3 (None: libfuse 2, which cannot tell the kernel; nothing is done)."""
    if lib is None:
        return lambda path, wait=False, entry=True: None
    invalidate = path_invalidator(lib, mountpoint)
    changed: queue.Queue[tuple[str, bool, threading.Event]] = queue.Queue()

    def on_change(path: str, wait: bool = False, entry: bool = True) -> None:
        done = threading.Event()
        changed.put((path, entry, done))
        if wait and not done.wait(5):  # a caller holding the folder a dropped name is in
            log.warning("the kernel's caches: %s not dropped within 5 s; going on", path)

    threading.Thread(target=_drain, args=(changed, invalidate), daemon=True, name="invalidate").start()
    return on_change


def _drain(changed: queue.Queue[tuple[str, bool, threading.Event]],
           invalidate: Callable[[str, bool], None]) -> None:
    while True:
        path, entry, done = changed.get()
        invalidate(path, entry)
        done.set()
