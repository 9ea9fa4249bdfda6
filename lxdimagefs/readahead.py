"""Asking the disk for what a sequential reader of a local file will want next, off its thread.

A new mount reading a verified image reads it from a local file (the disk
cache's, or the server's own), one 1 MiB block per FUSE request, two or
three requests at a time. The kernel's own readahead on that file is too
short to keep the disk busy, and `posix_fadvise(WILLNEED)` on the request's
thread puts the page allocations for the window on the reader's path: a
thread of its own asks instead, a window ahead, so the requests find their
pages in memory (docs/PERFORMANCE.md, a new mount).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIB = 1 << 20
LEAD = 16 * MIB  # how far ahead of a sequential reader the disk is asked
STEP = 4 * MIB  # asked at a time, at least
SLACK = 4 * MIB  # how far a read may land from the last and still count as sequential (the
# kernel's readahead requests arrive out of order)
FILES = 64  # files followed at once


class ReadAhead:
    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int]] = {}  # key -> (where the last read ended, asked up to)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def note(self, key: str, fd: int, offset: int, size: int, total: int) -> None:
        """A read of [offset, offset + size) of the file `fd` (of `total` bytes) was made."""
        end = offset + size
        with self._lock:
            last, asked = self._files.pop(key, (0, 0))
            if abs(offset - last) > SLACK:  # not sequential: no window, and start over
                self._files[key] = (end, end)
                return
            start, stop = max(asked, end), min(total, end + LEAD)
            if stop - start < STEP and stop < total:
                start = stop  # not enough missing yet: ask in larger pieces
            self._files[key] = (max(last, end), max(asked, stop if start < stop else asked))
            while len(self._files) > FILES:
                del self._files[next(iter(self._files))]
            if start >= stop:
                return
            if self._pool is None:  # made on first use: the daemon forks after start-up
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="readahead")
            pool = self._pool
        pool.submit(_advise, os.dup(fd), start, stop - start)


def _advise(fd: int, offset: int, length: int) -> None:
    """WILLNEED, a piece at a time: the kernel reads at most the device's largest I/O per call."""
    try:
        with contextlib.suppress(OSError):
            for at in range(offset, offset + length, STEP):
                os.posix_fadvise(fd, at, min(STEP, offset + length - at), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
