"""Reading exports: lazy Range reads for unified images, a verified local
spool for split ones, and the whole-read fingerprint check.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cachetools import LRUCache

from .client import LXDClient, LXDError, LXDUnreachable
from .multipart import PartStream

log = logging.getLogger(__name__)

BLOCK = 1 << 20


class IntegrityError(OSError):
    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, f"bytes read do not match the fingerprint: {what}")


class BlockCache:
    """Export blocks of unified images, shared by every reader of the daemon.

    One LRU bounded in bytes holds fetched blocks; a block being fetched
    has a Future that every reader wanting it waits on, so concurrent
    readers share fetches. Fetches run on a small pool, each one Range
    request for a run of blocks, resumed from its offset when the
    connection drops.

    Fetched blocks are hashed in order, per image, on the fetch threads:
    when an image has been fetched from its first byte to its last, the
    sha256 is checked against the fingerprint before the last block is
    handed to anyone, and an image that fails is refused from then on.
    """

    def __init__(self, client: LXDClient, capacity: int = 64 << 20, workers: int = 8,
                 retries: int = 3) -> None:
        self.client = client
        self.capacity = capacity
        self.max_run = max(1, capacity // 4 // BLOCK)
        self.retries = retries
        self._lru: LRUCache[tuple[str, int], bytes] = LRUCache(maxsize=capacity, getsizeof=len)
        self._pending: dict[tuple[str, int], Future[bytes]] = {}
        self._lock = threading.Lock()
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._verifiers: dict[str, Verifier] = {}
        self._hash_pool: ThreadPoolExecutor | None = None
        self._hash_slots = threading.BoundedSemaphore(8)  # blocks queued for hashing, at most
        self.verified: set[str] = set()
        self.corrupt: set[str] = set()
        self.requests = 0  # Range requests made, for tests and benchmarks

    def _executor(self) -> ThreadPoolExecutor:
        # Made on first use: the daemon forks after start-up, and threads do not survive a fork.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fetch")
        return self._pool

    def forget(self, fp: str) -> None:
        """Drop an image's blocks, after they failed the fingerprint check."""
        with self._lock:
            for key in [k for k in self._lru if k[0] == fp]:
                del self._lru[key]

    def close(self) -> None:
        for pool in (self._pool, self._hash_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def read(self, fp: str, total: int, offset: int, size: int, ahead: int = 0) -> bytes:
        """Bytes [offset, offset+size) of the export; `ahead` blocks past them are prefetched."""
        if fp in self.corrupt:
            raise IntegrityError(fp)
        end = min(offset + size, total)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        nblocks = (total + BLOCK - 1) // BLOCK
        self._schedule(fp, total, first, last)
        if ahead:
            self._prefetch(fp, total, last + 1, min(last + ahead, nblocks - 1))
        pieces = []
        for index in range(first, last + 1):
            block = self._block(fp, total, index)
            lo = offset - index * BLOCK if index == first else 0
            hi = end - index * BLOCK if index == last else len(block)
            if lo == 0 and hi == len(block) and first == last:
                return block  # a whole, aligned block: no copy
            pieces.append(memoryview(block)[lo:hi])
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    def _block(self, fp: str, total: int, index: int) -> bytes:
        key = (fp, index)
        while True:
            with self._lock:
                data = self._lru.get(key)
                if data is not None:
                    return data
                fut = self._pending.get(key)
            if fut is None:
                self._schedule(fp, total, index, index)
                continue
            return fut.result()

    def _prefetch(self, fp: str, total: int, first: int, last: int) -> None:
        """Refill the window [first, last] in one request once half of it is used up.

        Topping it up block by block as the reader advances would make a
        request per block.
        """
        with self._lock:
            frontier = next((i for i in range(first, last + 1)
                             if (fp, i) not in self._pending and (fp, i) not in self._lru), None)
        if frontier is not None and frontier - first <= (last - first) // 2:
            self._schedule(fp, total, frontier, last + (frontier - first))

    def _schedule(self, fp: str, total: int, first: int, last: int) -> None:
        last = min(last, (total - 1) // BLOCK)
        runs: list[tuple[int, int]] = []
        with self._lock:
            start = None
            for index in range(first, last + 1):
                key = (fp, index)
                missing = key not in self._pending and key not in self._lru
                if missing and start is None:
                    start = index
                if start is not None and (not missing or index - start >= self.max_run):
                    runs.append((start, index - 1))
                    start = index if missing else None
            if start is not None:
                runs.append((start, last))
            for a, b in runs:
                for index in range(a, b + 1):
                    self._pending[(fp, index)] = Future()
        for a, b in runs:
            self._executor().submit(self._fetch, fp, total, a, b)

    def _check(self, fp: str, total: int, index: int, data: bytes) -> None:
        """Feed the image's in-order hash; raises IntegrityError on a mismatch."""
        if fp in self.verified:
            return
        with self._lock:
            verifier = self._verifiers.get(fp)
            if verifier is None or (index == 0 and verifier.state == "unchecked"):
                verifier = self._verifiers[fp] = Verifier(fp, total, window=self.capacity // 2)
        # Hashing runs on its own thread, overlapping the next block's download; only
        # the last block waits for the verdict, so no reader gets it before the check.
        self._hash_slots.acquire()
        job = self._hasher().submit(self._feed, verifier, index * BLOCK, data)
        if (index + 1) * BLOCK < total:
            return
        try:
            job.result()
        except IntegrityError:
            self.corrupt.add(fp)
            self.forget(fp)
            raise
        if verifier.state == "ok":
            self.verified.add(fp)
            with self._lock:
                self._verifiers.pop(fp, None)

    def _feed(self, verifier: Verifier, offset: int, data: bytes) -> None:
        try:
            verifier.feed(offset, data)
        finally:
            self._hash_slots.release()

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="hash")
        return self._hash_pool

    def _publish(self, fp: str, index: int, data: bytes) -> None:
        with self._lock:
            fut = self._pending.pop((fp, index), None)
            self._lru[(fp, index)] = data
        if fut is not None:
            fut.set_result(data)

    def _fetch(self, fp: str, total: int, a: int, b: int) -> None:
        index, failures = a, 0
        got: list[bytes] = []  # what arrived of block `index` before a drop
        try:
            while index <= b:
                pos = index * BLOCK + sum(map(len, got))
                progressed = False
                try:
                    self.requests += 1
                    with self.client.export_range(fp, pos, min((b + 1) * BLOCK, total)) as resp:
                        while index <= b:
                            want = min((index + 1) * BLOCK, total) - index * BLOCK
                            progressed |= _read_into(resp.raw, got, want)
                            data = got[0] if len(got) == 1 else b"".join(got)
                            got.clear()
                            self._check(fp, total, index, data)
                            self._publish(fp, index, data)
                            index += 1
                except LXDUnreachable as e:
                    # Resume a stream that dropped after making progress, from the byte it
                    # reached; a server that gives nothing fails at once, so a dead LXD costs
                    # one timeout, not several.
                    failures += 1
                    if not (progressed or got) or failures > self.retries:
                        raise
                    log.warning("resuming export %s at offset %d after: %s", fp[:12],
                                index * BLOCK + sum(map(len, got)), e)
        except BaseException as e:  # every waiter must hear of the failure
            err = e if isinstance(e, (LXDError, IntegrityError)) else LXDUnreachable(str(e))
            with self._lock:
                futs = [self._pending.pop((fp, i), None) for i in range(index, b + 1)]
            for fut in futs:
                if fut is not None:
                    fut.set_exception(err)


def _read_into(raw, got: list[bytes], want: int) -> bool:
    """Read until `got` holds `want` bytes; True if anything arrived."""
    have = sum(map(len, got))
    start = have
    try:
        while have < want:
            chunk = raw.read(want - have, decode_content=False)
            if not chunk:
                raise LXDUnreachable(f"the export stream ended {want - have} bytes early")
            got.append(chunk)
            have += len(chunk)
    except LXDUnreachable:
        raise
    except Exception as e:  # urllib3/http.client errors on a dropped connection
        raise LXDUnreachable(f"the connection to LXD dropped: {e}") from e
    return have > start


class Verifier:
    """Checks that a whole read of a file hashes to the expected sha256.

    The kernel's readahead may deliver reads out of order, so reads past
    the hashed prefix wait in a bounded buffer. A read that never covers
    the file from start to end is simply not checked.
    """

    def __init__(self, expected: str, total: int, window: int = 32 << 20) -> None:
        self.expected = expected
        self.total = total
        self.window = window
        self._hash = hashlib.sha256()
        self._next = 0
        self._held: dict[int, bytes] = {}
        self._held_bytes = 0
        self._lock = threading.Lock()
        self.state = "reading"  # then "ok", "mismatch" or "unchecked"

    def feed(self, offset: int, data: bytes) -> None:
        """Raises IntegrityError on the read that completes a mismatching file."""
        with self._lock:
            if self.state == "mismatch":  # sticky: the kernel retries reads that failed
                raise IntegrityError(self.expected)
            if self.state != "reading" or not data:
                return
            end = offset + len(data)
            if end <= self._next:
                return
            if offset > self._next:
                if self._held_bytes + len(data) > self.window:
                    self.state = "unchecked"
                    self._held.clear()
                    return
                self._held[offset] = data
                self._held_bytes += len(data)
                return
            self._advance(data[self._next - offset:])
            while self._next in self._held:
                held = self._held.pop(self._next)
                self._held_bytes -= len(held)
                self._advance(held)
            if self._next >= self.total:
                self.state = "ok" if self._hash.hexdigest() == self.expected else "mismatch"
            if self.state == "mismatch":
                raise IntegrityError(self.expected)

    def _advance(self, data: bytes) -> None:
        self._hash.update(data)
        self._next += len(data)


class SplitSpool:
    """Split exports, downloaded once to local files and shared by all readers.

    LXD serves a split export only as one multipart stream, without ranges
    or part sizes, so random access needs a local copy. The download is
    verified against the fingerprint before anyone reads it. The spool is
    private to this mount and removed when it ends.
    """

    def __init__(self, client: LXDClient, directory: Path) -> None:
        self.client = client
        self.directory = directory
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.downloads = 0

    def paths(self, fp: str) -> list[Path]:
        """The local files of both parts, downloading them first if needed."""
        final = [self.directory / f"{fp}.{i}" for i in range(2)]
        if all(p.exists() for p in final):
            return final
        with self._lock:
            lock = self._locks.setdefault(fp, threading.Lock())
        with lock:
            if not all(p.exists() for p in final):
                self._download(fp, final)
        return final

    def _download(self, fp: str, final: list[Path]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = [p.with_suffix(p.suffix + ".part") for p in final]
        digest = hashlib.sha256()
        files: list = []

        def begin(_name: str) -> None:
            if len(files) >= 2:
                raise LXDError(f"LXD's split export of {fp} holds more than two parts")
            files.append(open(tmp[len(files)], "wb"))  # noqa: SIM115 - closed in finally

        def data(chunk: memoryview) -> None:
            digest.update(chunk)
            files[-1].write(chunk)

        self.downloads += 1
        try:
            resp = self.client.export_stream(fp)
            with resp:
                PartStream(resp.headers.get("Content-Type", ""), begin, data,
                           lambda: files[-1].flush()).feed(LXDClient.iter_chunks(resp))
            for f in files:
                f.close()
            if len(files) != 2:
                raise LXDError(f"LXD's split export of {fp} did not hold two parts")
            if digest.hexdigest() != fp:
                raise IntegrityError(fp)
            for t, f in zip(tmp, final, strict=True):
                os.replace(t, f)
        finally:
            for f in files:
                f.close()
            for t in tmp:
                t.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    PREFIX = "lxdimagefs-spool-"

    def claim(self) -> None:
        """Mark the spool as this (daemonized) process's, for `sweep` to know it is alive."""
        (self.directory / "pid").write_text(str(os.getpid()))

    @classmethod
    def sweep(cls, root: Path, grace: float = 60.0) -> list[Path]:
        """Remove the spools of daemons that died without unmounting (killed, crashed)."""
        removed = []
        for path in root.glob(cls.PREFIX + "*"):
            try:
                if path.stat().st_uid != os.getuid():
                    continue
                pid = int((path / "pid").read_text())
            except FileNotFoundError:  # never claimed: a start-up that failed, unless brand new
                pid = 0
                if time.time() - path.stat().st_mtime < grace:
                    continue
            except (OSError, ValueError):
                continue
            if pid and _alive(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
