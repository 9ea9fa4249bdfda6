"""Read-ahead for one open export: the whole policy, in one place.

A reader is sequential while each read starts where the last ended, or a
little off (the kernel's readahead may run reads slightly out of order).
Then it owns one open-ended stream and claims blocks of it ahead of its
reads, the window doubling from one block up to a daemon-wide share of
half the block cache; so memory for read-ahead is capped for the whole
daemon, not per file. A read elsewhere drops the stream (what it claimed
is still fetched and cached) and fetches just the blocks it needs.

A verified image needs none of that where this host holds its blocks
(memory, the disk cache, the server's own file): they are read in the
reader's own thread (the kernel's readahead asks for several at once), a
whole block straight into libfuse's buffer and checked against the
manifest there (docs/PERFORMANCE.md, "a new mount").
"""

from __future__ import annotations

import threading

from lxdimagefs.data.blocks import BLOCK, Block, cut, last_block
from lxdimagefs.data.fetch import Fetcher, Stream, count

SLACK = 4 * BLOCK  # how far a read may land from the last one and still count as sequential


class Prefetcher:
    def __init__(self, fetcher: Fetcher, fp: str, total: int, max_window: int) -> None:
        self.fetcher, self.fp, self.total = fetcher, fp, total
        self.max_window = max(1, max_window // BLOCK)
        self._next = 0  # where the next sequential read would start
        self._window = 0  # blocks claimed ahead of the last block read; 0 while reads are random
        self._stream: Stream | None = None
        self._lock = threading.Lock()

    @property
    def verified(self) -> bool:
        return self.fp in self.fetcher.verification.verified

    def read(self, offset: int, size: int) -> memoryview | bytes:
        end = min(offset + size, self.total)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        blocks = self._kept(first, last) if self.verified else None
        if blocks is None:
            with self._lock:
                self._plan(offset, end, first, last)
            blocks = [self.fetcher.block(self.fp, self.total, i) for i in range(first, last + 1)]
            self.fetcher.verification.served(self.fp, self.total, offset, end)
        return cut(blocks, offset, end)

    def readinto(self, offset: int, buf: memoryview) -> int:
        """`read`, into the caller's buffer (libfuse's): a whole block of a verified image is read
        straight into it and checked there, so no buffer of ours is allocated or copied."""
        if self.verified and offset % BLOCK == 0 and offset < self.total:
            got = self._kept_into(offset // BLOCK, buf)
            if got:
                return got
        data = self.read(offset, len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self.fetcher.drop(self._stream)
                self._stream = None

    def _plan(self, offset: int, end: int, first: int, last: int) -> None:
        sequential = offset == self._next or (self._next and abs(offset - self._next) <= SLACK)
        self._next = max(self._next, end) if sequential else end
        if not sequential:
            self._window = 0
            if self._stream is not None:
                self.fetcher.drop(self._stream)
                self._stream = None
            self.fetcher.fetch(self.fp, self.total, first, last)
            return
        stream = self._stream
        if stream is not None:
            stream.consumer = last
        self._window = min(max(1, self._window * 2), self.max_window,
                           self.fetcher.room(stream) if stream else self.max_window)
        target = last + self._window
        if stream is not None and stream.claimed >= first and self.fetcher.extend(stream, target):
            return
        if stream is not None:
            self.fetcher.drop(stream)
        self._stream = None
        start = next((i for i in range(first, min(target, last_block(self.total)) + 1)
                      if self.fetcher.cache.missing((self.fp, i))), None)
        if start is None:
            return  # all there or on its way: another reader's stream is ahead of this one
        stream = self._stream = self.fetcher.stream(self.fp, self.total, start)
        stream.consumer = last
        if not self.fetcher.extend(stream, target):
            self._stream = None

    # -- a verified image, from what this host holds, in the reader's thread ----------------

    def _kept(self, first: int, last: int) -> list[Block] | None:
        """Blocks from memory or the disk cache; None if one is not there (then: fetched)."""
        fetcher = self.fetcher
        if fetcher.disk is None:
            return None
        blocks: list[Block] = []
        for index in range(first, last + 1):
            data = fetcher.cache.get((self.fp, index))
            if data is not None:
                count(fetcher, "memory", len(data))
            elif (data := fetcher.from_disk(self.fp, self.total, index)) is None:  # counted there
                return None
            blocks.append(data)
        return blocks

    def _kept_into(self, index: int, buf: memoryview) -> int:
        """Block `index` into the start of `buf` from memory, the disk cache or the server's own
        file, checked against the manifest there; its length, or 0 (then: the usual way)."""
        fetcher, fp, offset = self.fetcher, self.fp, index * BLOCK
        length = min(BLOCK, self.total - offset)
        manifest = fetcher.verification.manifests.get(fp)
        if len(buf) != length or manifest is None or not manifest.verified:
            return 0  # a request of more than a block: the usual way (a short reply would be EOF)
        view = buf[:length]
        data = fetcher.cache.get((fp, index))
        if data is not None:  # checked when it arrived
            view[:] = data
            count(fetcher, "memory", length)
            return length
        if fetcher.disk is not None and fetcher.disk.readinto(fp, index, view, self.total):
            if manifest.admit(index, view):
                fetcher.disk.hits += 1
                count(fetcher, "disk", length)
                return length
            fetcher.damaged(fp, index)
        local = fetcher.local
        if local is not None and local.readinto(fp, self.total, offset, view) and manifest.admit(index, view):
            count(fetcher, "local", length)
            return length
        return 0
