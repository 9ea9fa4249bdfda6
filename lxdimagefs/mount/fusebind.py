"""Which FUSE binding the daemon runs on.

mfusepy on libfuse 3 is the default (see docs/PERFORMANCE.md for the
measurement behind it); `LXDIMAGEFS_FUSE=fusepy` selects fusepy on
libfuse 2, `LXDIMAGEFS_FUSE=mfusepy2` mfusepy on libfuse 2.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache

from lxdimagefs.keys import Sha256
from lxdimagefs.mount.threadstates import KEPT
from lxdimagefs.tree.images import FP_DIR

log = logging.getLogger(__name__)

BINDING = os.environ.get("LXDIMAGEFS_FUSE", "mfusepy")
# A listing as libfuse's filler takes it: names encoded, their stats (an array of struct stat), which
# stats are whole (FILL_DIR_PLUS), each row's offset.
Filled = tuple[list[bytes], Any, bytearray, list[int]]
LISTED_ROWS = 8192  # rows of folders inside images kept filled, across them (about 200 bytes each)

if BINDING == "fusepy":
    from fuse import FUSE, Operations, fuse_get_context

    LIBFUSE = 2
else:
    if BINDING == "mfusepy":
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy
    from mfusepy import Operations, fuse_get_context

    LIBFUSE = mfusepy.fuse_version_major

    class FUSE(mfusepy.FUSE):  # type: ignore[no-redef]  # the fusepy branch binds the name too
        """mfusepy, but a write's bytes come as a view of libfuse's buffer instead of a copy.

        The view is valid only during the call: every handle sends or copies
        what it is given before returning (an import's 1 GiB is not copied
        once more in Python: docs/PERFORMANCE.md, issue 16).
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._listed: LRUCache[str, Filled] = LRUCache(LISTED_ROWS, getsizeof=lambda f: len(f[0]))
            self._listed_lock = threading.Lock()
            super().__init__(*args, **kwargs)  # serves the mount until it ends

        def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            KEPT.keep()
            return super()._wrapper(func, *args, **kwargs)

        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            name, data, fh = self._call(path, buf, size, fip)
            written: int = self.operations.write(name, data, offset, fh)
            return written

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            """Reads land straight in libfuse's buffer: `readinto` fills a view of it (no copy in
            Python, no buffer of our own per request: docs/PERFORMANCE.md, a new mount)."""
            name, view, fh = self._call(path, buf, size, fip)
            got: int = self.operations.readinto(name, view, offset, fh)
            return got

        def _call(self, path: bytes | None, buf: Any, size: int,
                  fip: Any) -> tuple[str | None, memoryview, Any]:
            """A call's path, a view of libfuse's buffer (valid during the call only), its handle."""
            address = ctypes.cast(buf, ctypes.c_void_p).value or 0
            view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
            fh = fip.contents if self.raw_fi else fip.contents.fh
            return None if path is None else path.decode(self.encoding, self.errors), view, fh

        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                           flags: int) -> int:
            """A listing with offsets, from `offset` on: libfuse then sends each reply as we fill it,
            and a READDIRPLUS reply carries the attributes of the names the tree can vouch for, so
            the kernel looks none of them up (at offset 0, libfuse 3.14 sends none: its list mode)."""
            name = None if path is None else path.decode(self.encoding, self.errors)
            rows = self.operations.readdir_from(name, fip.contents.fh, offset)
            if not rows:
                return 0
            if flags & READDIR_PLUS and name is not None and self.operations.tree.inside_image(name):
                filled, first = self._filled(name, rows, offset)
            else:
                filled, first = self._fill(name, rows, False), 0
            names, stats, plused, offsets = filled
            for i in range(first, len(names)):
                if filler(buf, names[i], stats[i], offsets[i], plused[i]) != 0:
                    break  # the kernel's buffer is full: it asks again from this row's offset
            return 0

        def _filled(self, name: str, rows: list[tuple[str, int, int]], offset: int) -> tuple[Filled, int]:
            """A folder inside an image as the filler takes it, and where `offset` is in it: made
            once and kept, for what is inside an image never changes and the kernel asks for every
            name's attributes again at each listing's start. Kept only under an image's full
            fingerprint (a short one may name another image later) and if not too long."""
            parts = name.split("/")
            whole = FP_DIR in parts[:-1] and Sha256.parse(parts[parts.index(FP_DIR) + 1]) is not None
            with self._listed_lock:
                kept = self._listed.get(name) if whole else None
            if kept is not None:
                return kept, offset
            filled = self._fill(name, rows, True)
            if whole and offset == 0 and len(rows) <= LISTED_ROWS // 4:  # the whole listing
                with self._listed_lock:
                    self._listed[name] = filled
            return filled, 0

        def _fill(self, name: str | None, rows: list[tuple[str, int, int]], plus: bool) -> Filled:
            """Each name encoded with its stat as a LOOKUP would answer (with `plus`, where the tree
            vouches for it), else its type alone (the kernel asks for the rest)."""
            stats = (mfusepy.c_stat * len(rows))()
            plused = bytearray(len(rows))
            for i, (entry, kind, _) in enumerate(rows):
                attrs = self._attributes(f"{name}/{entry}") if plus and entry not in (".", "..") else None
                if attrs is None:
                    stats[i].st_ino, stats[i].st_mode = UNKNOWN_INO, kind
                else:
                    mfusepy.set_st_attrs(stats[i], attrs, use_ns=self.use_ns)
                    plused[i] = FILL_DIR_PLUS
            names = [entry.encode(self.encoding, self.errors) for entry, _, _ in rows]
            return names, stats, plused, [after for _, _, after in rows]

        def _attributes(self, path: str) -> dict[str, int] | None:
            """A name's stat as its LOOKUP would answer; None (the kernel then asks) if that fails."""
            try:  # the undecorated call: the stats count the kernel's own getattr calls alone
                attrs: dict[str, int] = self.operations.getattr.__wrapped__(self.operations, path)
            except Exception:
                return None
            return attrs

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            """`ftruncate` on an open file reaches its handle (mfusepy 3.1 drops libfuse 3's file
            info here: an open metadata.json truncated in place kept its old bytes)."""
            fh = (fip.contents if self.raw_fi else fip.contents.fh) if fip else None
            name = None if path is None else path.decode(self.encoding, self.errors)
            done: int = self.operations.truncate(name, length, fh)
            return done



# libfuse 3 keeps at most 10 worker threads unless told otherwise (and mfusepy's call of
# fuse_main_real passes an unset idle count that 3.14 rejects with "Ignoring invalid max threads
# value 4294967295"). A read waiting on a stalled server holds its worker for up to the timeout, so
# ten such reads used to leave no thread for a `stat` (23 s measured). 200 blocked threads cost
# about 5 MiB of RSS (docs/RELIABILITY.md); idle ones beyond 16 exit.
MAX_THREADS = 256
UNKNOWN_INO = 0xFFFFFFFF  # FUSE_UNKNOWN_INO
MAX_IDLE_THREADS = 16
# FOPEN_NOFLUSH (libfuse >= 3.11, kernel >= 5.16): the kernel sends no FLUSH at a close of the file.
NOFLUSH = BINDING == "mfusepy" and LIBFUSE == 3 and hasattr(mfusepy.fuse_file_info, "noflush")
READDIR_PLUS = 1  # enum fuse_readdir_flags: the kernel asked for attributes with the names
FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags: this name's attributes are given, whole


def worker_options() -> dict[str, object]:
    """The FUSE options that size libfuse's worker pool, where the binding takes them."""
    if LIBFUSE != 3 or BINDING == "fusepy":
        return {}  # libfuse 2 takes neither option
    return {"max_threads": MAX_THREADS, "max_idle_threads": MAX_IDLE_THREADS}


def listed(names: list[str], kinds: dict[str, int]) -> list[tuple[str, dict[str, int], int]]:
    """readdir's rows: each name with the file type the listing knows (d_type; 0: unknown).

    Under use_ino a bare name would list with inode number 0, which tar and fts skip as a deleted
    entry: each gets libfuse's "unknown" instead, as without use_ino (stat has the number). Both
    fields are always given: mfusepy keeps one stat buffer for all names, and sets only what it is given.
    """
    return [(name, {"st_ino": UNKNOWN_INO, "st_mode": kinds.get(name, 0)}, 0) for name in names]


def path_invalidator(mountpoint: str = "") -> Callable[[str, bool], None] | None:
    """A function that drops the kernel's cached attributes of a path (its pages, a folder's
    listing) and, if asked, its name: `invalidate(path, entry)`.

    Only libfuse 3's high-level API has the first (`fuse_invalidate_path`); it must be called
    from inside a FUSE callback first (to learn the session). A name needs its folder's node
    id, which only the kernel tells a high-level file system: it is read from a file handle of
    the folder (`name_to_handle_at` under `mountpoint`). Never call it from a callback that
    holds the path's folder (it would wait on the kernel, which waits on us).
    """
    if LIBFUSE != 3 or BINDING == "fusepy":
        return None
    lib = mfusepy._libfuse
    fuse = lib.fuse_get_context().contents.fuse
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_get_session.argtypes, lib.fuse_get_session.restype = [ctypes.c_void_p], ctypes.c_void_p
    lib.fuse_lowlevel_notify_inval_entry.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p,
                                                      ctypes.c_size_t]
    session = lib.fuse_get_session(fuse)

    def invalidate(path: str, entry: bool = False) -> None:
        raw = path.encode("utf-8", "surrogateescape")
        lib.fuse_invalidate_path(fuse, raw)  # ENOENT: the kernel does not hold it
        folder, _, name = raw.rpartition(b"/")
        if entry and name and mountpoint:
            node = 1 if not folder else _node_id(os.fsencode(mountpoint) + folder)
            if node is not None:  # ENOENT: the kernel does not hold it
                lib.fuse_lowlevel_notify_inval_entry(session, node, name, len(name))

    return invalidate


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_uint32 * 8)]


_FILEID_INO64_GEN = 0x81  # what FUSE's encode_fh gives: the node id's two halves, the generation


def _node_id(path: bytes) -> int | None:
    """The FUSE node id the kernel gave `path` (a folder of this mount), from its file handle."""
    handle, mount_id = _FileHandle(handle_bytes=ctypes.sizeof(ctypes.c_uint32 * 8)), ctypes.c_int()
    at_fdcwd = -100  # and no flags: a link is not followed
    if _libc.name_to_handle_at(at_fdcwd, path, ctypes.byref(handle), ctypes.byref(mount_id),
                               0) != 0 or handle.handle_type != _FILEID_INO64_GEN:
        return None
    return int(handle.f_handle[0]) << 32 | int(handle.f_handle[1])


_libc = ctypes.CDLL(None, use_errno=True)


def kernel_forgetter(mountpoint: str = "") -> Callable[..., None]:
    """What the tree calls when a path changes without a call of the kernel's (an import that
    landed, an image LXD deleted, an alias retargeted elsewhere): `on_change(path, wait=False,
    entry=True)`. Its attributes are dropped, and its name unless `entry` is false (a folder
    whose listing changed keeps its name): the kernel keeps names for an hour where events
    are followed. Done off the request threads, since the kernel may hold their folder."""
    invalidate = path_invalidator(mountpoint)
    if invalidate is None:
        return lambda path, wait=False, entry=True: None
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


__all__ = ["BINDING", "FUSE", "LIBFUSE", "NOFLUSH", "Operations", "fuse_get_context", "kernel_forgetter",
           "listed", "path_invalidator", "worker_options"]
