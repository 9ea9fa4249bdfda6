"""Which FUSE binding the daemon runs on.

mfusepy on libfuse 3 is the default (see docs/PERFORMANCE.md for the
measurement behind it); `LXDIMAGEFS_FUSE=fusepy` selects fusepy on
libfuse 2, `LXDIMAGEFS_FUSE=mfusepy2` mfusepy on libfuse 2.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

BINDING = os.environ.get("LXDIMAGEFS_FUSE", "mfusepy")

if BINDING == "fusepy":
    from fuse import FUSE, Operations, fuse_get_context  # type: ignore[import-untyped]

    LIBFUSE = 2
else:
    if BINDING == "mfusepy":
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy
    from mfusepy import FUSE, Operations, fuse_get_context

    LIBFUSE = mfusepy.fuse_version_major

# libfuse 3 keeps at most 10 worker threads unless told otherwise (and mfusepy's call of
# fuse_main_real passes an unset idle count that 3.14 rejects with "Ignoring invalid max threads
# value 4294967295"). A read waiting on a stalled server holds its worker for up to the timeout, so
# ten such reads used to leave no thread for a `stat` (23 s measured). 200 blocked threads cost
# about 5 MiB of RSS (docs/RELIABILITY.md); idle ones beyond 16 exit.
MAX_THREADS = 256
MAX_IDLE_THREADS = 16


def worker_options() -> dict[str, object]:
    """The FUSE options that size libfuse's worker pool, where the binding takes them."""
    if LIBFUSE != 3 or BINDING == "fusepy":
        return {}  # libfuse 2 takes neither option
    return {"max_threads": MAX_THREADS, "max_idle_threads": MAX_IDLE_THREADS}


def path_invalidator() -> Callable[[str], None] | None:
    """A function that drops the kernel's cached entry and attributes of a path.

    Only libfuse 3's high-level API has it (`fuse_invalidate_path`); it must be
    called from inside a FUSE callback first (to learn the session), and the
    returned function must not be called from a callback that holds the
    path's directory (it would wait on the kernel, which waits on us).
    """
    if LIBFUSE != 3 or BINDING == "fusepy":
        return None
    lib = mfusepy._libfuse
    fuse = lib.fuse_get_context().contents.fuse
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def invalidate(path: str) -> None:
        lib.fuse_invalidate_path(fuse, path.encode("utf-8", "surrogateescape"))

    return invalidate


__all__ = ["BINDING", "FUSE", "LIBFUSE", "Operations", "fuse_get_context", "path_invalidator",
           "worker_options"]
