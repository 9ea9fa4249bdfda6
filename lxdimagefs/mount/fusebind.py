"""Which FUSE binding the daemon runs on.

mfusepy on libfuse 3 is the default (see docs/PERFORMANCE.md for the
measurement behind it); `LXDIMAGEFS_FUSE=fusepy` selects fusepy on
libfuse 2, `LXDIMAGEFS_FUSE=mfusepy2` mfusepy on libfuse 2.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

from lxdimagefs.fs.handles import Caching
from lxdimagefs.mount.libfuse import kernelcache
from lxdimagefs.mount.libfuse.threadstates import KEPT

log = logging.getLogger(__name__)

BINDING = os.environ.get("LXDIMAGEFS_FUSE", "mfusepy")
LISTINGS = kernelcache.KeptListings()

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

        def __init__(self, operations: Any, mountpoint: str, *args: Any, **kwargs: Any) -> None:
            self._mountpoint = os.path.realpath(mountpoint)  # not once mounted: we would ask ourselves
            super().__init__(operations, mountpoint, *args, **kwargs)  # serves the mount until it ends

        def init_fuse_3(self, conn: Any, config: Any) -> None:
            """Before the kernel sends anything else: listings inside images may be kept."""
            try:
                LISTINGS.install(mfusepy._libfuse, mfusepy._libfuse.fuse_get_context().contents.fuse,
                                 self._mountpoint, mfusepy.fuse_file_info)
            except Exception:  # never into libfuse's init: the listings are then asked each time
                log.exception("the kernel's listing cache could not be set up")
            if getattr(self.operations, "cache_symlinks", False):
                conn.contents.want |= conn.contents.capable & CACHE_SYMLINKS
            super().init_fuse_3(conn, config)

        def opendir(self, path: bytes, fip: Any) -> int:
            """A folder the tree says never changes (inside an image, from checked bytes: its
            handle's caching is KEEP): the kernel may keep its listing for the mount's life (an
            image deleted: its name is dropped, kernel_forgetter; an OPENDIR still asks the tree)."""
            fh = fip.contents.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
            if self.operations.tree.caching(fh) is Caching.KEEP:
                LISTINGS.keep(fip.contents)
            return 0

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
            plus = bool(flags & READDIR_PLUS) and name is not None and self.operations.tree.inside_image(name)
            st = mfusepy.c_stat()
            for entry, kind, after in rows:
                ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))  # libfuse copies it per name
                attrs = self._attributes(f"{name}/{entry}") if plus and entry not in (".", "..") else None
                if attrs is None:  # its type alone: the kernel asks for the rest
                    st.st_ino, st.st_mode, whole = UNKNOWN_INO, kind, 0
                else:  # its stat as a LOOKUP would answer, where the tree vouches for it
                    mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
                    whole = FILL_DIR_PLUS
                if filler(buf, entry.encode(self.encoding, self.errors), st, after, whole) != 0:
                    break  # the kernel's buffer is full: it asks again from this row's offset
            return 0

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
CACHE_SYMLINKS = 1 << 23  # FUSE_CAP_CACHE_SYMLINKS: a link's target kept as its page
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


def kernel_forgetter(mountpoint: str = "", also: list[Callable[..., None]] | None = None
                     ) -> Callable[..., None]:
    """kernelcache.kernel_forgetter on this binding's libfuse (libfuse 2 cannot tell the kernel),
    telling `also` of each change too: `on_change(path, wait=False, entry=True)`."""
    libfuse3 = mfusepy._libfuse if LIBFUSE == 3 and BINDING != "fusepy" else None
    forget = kernelcache.kernel_forgetter(libfuse3, mountpoint)
    told = [forget, *(also or [])]

    def on_change(path: str, wait: bool = False, entry: bool = True) -> None:
        for tell in told:
            tell(path, wait, entry)
    return on_change


__all__ = ["BINDING", "FUSE", "LIBFUSE", "NOFLUSH", "Operations", "fuse_get_context", "kernel_forgetter",
           "listed", "worker_options"]
