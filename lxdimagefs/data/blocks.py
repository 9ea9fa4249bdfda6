"""Export blocks held in memory: one LRU for the whole daemon, bounded in bytes.

A block being fetched is *claimed*: it has a Future that every reader who
wants it waits on, so concurrent readers share one fetch.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections import deque
from concurrent.futures import Future

from cachetools import LRUCache

BLOCK = 1 << 20

Key = tuple[str, int]  # (fingerprint, block index)
Block = bytearray | memoryview  # fetched blocks are page-aligned views (see new_block)
SPARES = 8  # buffers of evicted blocks kept for new ones


def new_block(size: int) -> memoryview:
    """A buffer for a block to be read into, page-aligned: the disk cache writes it to disk as it is,
    with O_DIRECT and without a copy (data/directwrite.py). The bytearray under it cannot move: it is
    exported to the view for as long as the view lives."""
    return _aligned(bytearray(size + mmap.PAGESIZE), size)


def _aligned(raw: bytearray, size: int) -> memoryview:
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % mmap.PAGESIZE
    return memoryview(raw)[skip:skip + size]


def _alone() -> int:
    """What sys.getrefcount says of a buffer taken from a deque and held by one local name only
    (measured, not assumed: interpreters count their own references differently)."""
    spares = deque([bytearray(1)])
    raw = spares.popleft()
    return sys.getrefcount(raw)


_UNREFERENCED = _alone()  # a spare at this count has no view of it left anywhere


def cut(blocks: list[Block], offset: int, end: int) -> memoryview | bytes:
    """Bytes [offset, end) of consecutive blocks, the first holding `offset`: a view of it when
    it holds them all (handed to FUSE without a copy), else the parts of each joined (not the
    blocks whole: a read of a few KiB across two blocks copied 2 MiB)."""
    lo = offset % BLOCK
    if len(blocks) == 1:
        return memoryview(blocks[0])[lo:lo + end - offset]
    parts, need = [], end - offset
    for block in blocks:
        parts.append(memoryview(block)[lo:lo + need])
        need -= len(parts[-1])
        lo = 0
    return b"".join(parts)


def last_block(total: int) -> int:
    """The index of a file's last block."""
    return (total - 1) // BLOCK


class _Recycling(LRUCache[Key, Block]):
    """The LRU, keeping the buffers of the fetched blocks it evicts (the last SPARES of them)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(maxsize=capacity, getsizeof=len)
        self.spares: deque[bytearray] = deque(maxlen=SPARES)

    def popitem(self) -> tuple[Key, Block]:
        key, block = super().popitem()
        raw = block.obj if isinstance(block, memoryview) else None
        if isinstance(raw, bytearray) and len(raw) == BLOCK + mmap.PAGESIZE:  # made by new_block
            self.spares.append(raw)
        return key, block


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru = _Recycling(capacity)
        self._pending: dict[Key, Future[Block]] = {}
        self._lock = threading.Lock()

    def new_block(self, size: int) -> memoryview:
        """A buffer for a block to be read into: an evicted block's once nothing refers to it any
        more, else a new one. A view of a block (a reader's, the hash's, the disk writer's) holds
        its bytearray, so a spare whose only reference is ours has none left: reusing it skips
        zeroing 1 MiB of memory, often fresh, for every block."""
        if size == BLOCK:
            with self._lock:
                spares = self._lru.spares
                for _ in range(len(spares)):
                    raw = spares.popleft()
                    if sys.getrefcount(raw) == _UNREFERENCED:
                        return _aligned(raw, size)
                    spares.append(raw)  # still seen by someone: later
        return new_block(size)

    def get(self, key: Key) -> Block | None:
        with self._lock:
            return self._lru.get(key)

    def lookup(self, key: Key) -> Block | Future[Block] | None:
        """The block, the Future of its fetch, or None if nobody has it."""
        with self._lock:
            found = self._lru.get(key)
            return found if found is not None else self._pending.get(key)

    def missing(self, key: Key) -> bool:
        with self._lock:
            return key not in self._lru and key not in self._pending

    def claim(self, fp: str, first: int, last: int, stop_at_present: bool = False) -> list[tuple[int, int]]:
        """Claim the missing blocks of [first, last] for fetching; returns the runs claimed.

        With `stop_at_present`, claiming ends at the first block someone else
        holds or fetches (a stream cannot skip bytes, so it stops there).
        """
        runs: list[tuple[int, int]] = []
        with self._lock:
            start = None
            for index in range(first, last + 1):
                key = (fp, index)
                if key not in self._lru and key not in self._pending:
                    self._pending[key] = Future()
                    start = index if start is None else start
                    continue
                if start is not None:
                    runs.append((start, index - 1))
                    start = None
                if stop_at_present:
                    break
            if start is not None:
                runs.append((start, last))
        return runs

    def publish(self, fp: str, index: int, data: Block) -> None:
        with self._lock:
            fut = self._pending.pop((fp, index), None)
            self._lru[(fp, index)] = data
        if fut is not None:
            fut.set_result(data)

    def fail(self, fp: str, indices: range, err: BaseException) -> None:
        """Every waiter on these claimed blocks hears of the failure; the claims are dropped."""
        with self._lock:
            futs = [self._pending.pop((fp, i), None) for i in indices]
        for fut in futs:
            if fut is not None:
                fut.set_exception(err)

    def forget(self, fp: str) -> None:
        with self._lock:
            for key in [k for k in self._lru if k[0] == fp]:
                del self._lru[key]
