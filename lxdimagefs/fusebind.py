"""Which FUSE binding the daemon runs on.

mfusepy on libfuse 3 is the default (see docs/PERFORMANCE.md for the
measurement behind it); `LXDIMAGEFS_FUSE=fusepy` selects fusepy on
libfuse 2, `LXDIMAGEFS_FUSE=mfusepy2` mfusepy on libfuse 2.
"""

from __future__ import annotations

import os

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

__all__ = ["BINDING", "FUSE", "LIBFUSE", "Operations", "fuse_get_context"]
