"""Blocks written to files past the page cache, on a thread of their own.

A buffered write copies every byte into freshly allocated page-cache pages,
on the writer's thread: keeping each fetched block in the disk cache that
way cost the fetch thread 0.4-1.1 CPU-s/GiB (this Firecracker VM makes first
touches of memory dear). With O_DIRECT the disk takes the bytes from one
aligned buffer: the block itself if it is page-aligned (fetched blocks are,
blocks.new_block), else one buffer of our own, reused for every block. All
of it on a thread that is not the fetch's. At most DEPTH blocks wait; a caller past
that waits, as dirty-page throttling would make it. What O_DIRECT cannot
take (a file system without it, a length that is not a multiple of ALIGN)
is written buffered.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import threading

from lxdimagefs.private import moved
from lxdimagefs.threadname import name_this_thread

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
ALIGN = 4096  # O_DIRECT offsets and lengths; the buffer itself is page-aligned (an mmap)


class DirectWriter:
    DEPTH = 4

    def __init__(self, size: int) -> None:
        self.size = size  # the longest block; longer ones are written buffered
        self._queue: queue.Queue[tuple[str, int, Buffer]] = queue.Queue(self.DEPTH)
        self._lock = threading.Lock()  # the open file: used by the thread, forgotten by others
        self._path: str | None = None
        self._fd = -1
        self._direct = True  # off for good once the file system refuses O_DIRECT
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._view: memoryview | None = None
        self._done = threading.Condition()
        self._queued = self._written = 0  # blocks, counted: a flush waits for those before it

    def write(self, path: str, offset: int, data: Buffer) -> None:
        """Write `data` at `offset` of the existing file `path`, soon (a file gone by then: skipped)."""
        with self._start_lock:
            if self._thread is None:  # made on first use: the daemon forks after start-up
                self._view = memoryview(mmap.mmap(-1, self.size))
                self._thread = threading.Thread(target=self._run, name="diskwrite", daemon=True)
                self._thread.start()
            self._queued += 1
            self._queue.put((path, offset, data))

    def flush(self) -> None:
        """Wait until every block queued before this call is written (or given up)."""
        with self._start_lock:
            mark = self._queued
        with self._done:
            self._done.wait_for(lambda: self._written >= mark)

    def forget(self, path: str) -> None:
        """The file is being removed: no queued block goes to it, nor to a new file of that name
        through the old descriptor."""
        with self._lock:
            if self._path == path:
                self._close()

    def _run(self) -> None:
        name_this_thread()
        while True:
            path, offset, data = self._queue.get()
            try:
                with self._lock:
                    self._write(path, offset, memoryview(data).cast("B"))
            except OSError as e:
                if e.errno != errno.ENOENT:  # gone meanwhile (dropped): nothing to keep
                    log.warning("disk cache: cannot write %s at %d: %s", path, offset, e.strerror)
            except Exception:  # the thread must live on: flushes wait for it
                log.exception("disk cache: writing %s at %d", path, offset)
            finally:
                with self._done:
                    self._written += 1
                    self._done.notify_all()

    def _write(self, path: str, offset: int, data: memoryview) -> None:
        n = data.nbytes
        if self._direct and n <= self.size and n % ALIGN == 0 and offset % ALIGN == 0:
            assert self._view is not None
            try:
                if self._path != path or moved(self._fd, path):  # or evicted by another daemon
                    self._close()
                    self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
                    self._path = path
                if _aligned(data):  # a block made by new_block: written as it is
                    _whole(os.pwrite(self._fd, data, offset), n)
                else:
                    self._view[:n] = data
                    _whole(os.pwrite(self._fd, self._view[:n], offset), n)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system has no O_DIRECT (tmpfs before 6.6): buffered
                self._close()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _whole(os.pwrite(fd, data, offset), n)
        finally:
            os.close(fd)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._path, self._fd = None, -1


def _whole(written: int, wanted: int) -> None:
    """A short write (a full disk) leaves a hole the manifest would refuse: said like an error."""
    if written != wanted:
        raise OSError(errno.ENOSPC, f"wrote {written} of {wanted} bytes")


def _aligned(data: memoryview) -> bool:
    """Whether O_DIRECT can take these bytes from where they are (a writable buffer at a page)."""
    if data.readonly or not data.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) % mmap.PAGESIZE == 0
