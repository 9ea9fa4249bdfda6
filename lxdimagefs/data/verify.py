"""The whole-read check: every byte handed out, in any order, hashes to the fingerprint.

Blocks are hashed in file order on one daemon-wide hashing thread, as
they arrive from LXD. A block that arrives ahead of the hash is not held:
it is only in the block cache, like any other, and the hash takes it from
there when it gets that far, or fetches it again if the cache dropped it.
So memory stays within the cache's bound however many images are read,
in whatever order. Readers' coverage is recorded per byte range; the read
that completes a file's coverage (and every read after it) waits for the
verdict, so no reader gets the last of a file before it is checked, and a
file that fails is `EIO` for good (the kernel retries failed reads).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable

from lxdimagefs import stats
from lxdimagefs.data.blocks import BLOCK, Block, BlockCache
from lxdimagefs.data.manifest import Manifest
from lxdimagefs.errors import IntegrityError
from lxdimagefs.keys import ObjectKey, Sha256
from lxdimagefs.threadname import name_this_thread

log = logging.getLogger(__name__)

HASH_BATCH = 4 * BLOCK  # bytes per sha256 update (see Verifier.update)


class Coverage:
    """The byte ranges of a file of `total` bytes given to readers so far, in O(log n) a read.

    Readers choose the ranges (with `allow_other`, any user), so one read must cost the same
    however scattered the earlier ones were: sorted, disjoint, non-touching intervals found with
    `bisect`, and a count of the bytes covered says when the file is complete. Neighbours merge
    as they meet, so memory is proportional to the gaps, not to the reads.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.blocks = max(1, (total + BLOCK - 1) // BLOCK)
        self._starts: list[int] = []
        self._ends: list[int] = []  # interval k is [_starts[k], _ends[k]); both lists ascending
        self._covered = 0
        self._touched = False

    @property
    def complete(self) -> bool:
        return self._touched and self._covered >= self.total

    @property
    def intervals(self) -> int:
        """How many separate ranges are held (the gaps between them are what is left)."""
        return len(self._starts)

    def add(self, offset: int, end: int) -> None:
        """Record bytes [offset, end) as given: two bisections and one slice replacement."""
        self._touched = True
        lo, hi = max(offset, 0), min(end, self.total)
        if lo >= hi:
            return
        first = bisect_left(self._ends, lo)  # the first interval ending at or after lo
        after = bisect_right(self._starts, hi)  # the intervals [first, after) meet [lo, hi)
        if first < after:
            lo = min(lo, self._starts[first])
            hi = max(hi, self._ends[after - 1])
            self._covered -= sum(b - a for a, b in zip(self._starts[first:after],
                                                       self._ends[first:after], strict=True))
        self._starts[first:after] = [lo]
        self._ends[first:after] = [hi]
        self._covered += hi - lo


class Verifier:
    """One file's hash in progress and what readers have seen of it."""

    def __init__(self, fp: str, total: int) -> None:
        self.fp, self.total = fp, total
        self.coverage = Coverage(total)
        self.queued = 0  # blocks [0, queued) are hashed or on their way to the hashing thread
        self.state = "reading"  # then "ok" or "mismatch", set by the hashing thread alone
        self.done = threading.Event()
        self.lock = threading.Lock()  # orders `queued`; never held by the hashing thread
        self.finish = threading.Lock()  # one catch-up pass at a time
        self._hash = hashlib.sha256()

    def update(self, blocks: list[Block], last: bool) -> None:
        # Consecutive blocks waiting in the queue are hashed in one update: hashlib lets go of the
        # GIL for each update, and getting it back beside busy Python threads costs up to a
        # switch interval (5 ms) every time. Nothing is held back for a batch: memory stays
        # within the queue's bound.
        self._hash.update(blocks[0] if len(blocks) == 1 else b"".join(blocks))
        if last:  # `done` is set once the verdict is recorded (Verification._conclude)
            self.state = "ok" if self._hash.hexdigest() == self.fp else "mismatch"


class Verification:
    """Every unified image's check, for the whole daemon."""

    QUEUE_BLOCKS = 8  # blocks waiting for the hashing thread, at most

    def __init__(self, cache: BlockCache, fetch: Callable[[str, int, int], Block],
                 server: str = "") -> None:
        self.cache = cache
        self.fetch = fetch  # (fp, total, index) -> the block, from the cache or LXD
        self.server = server
        self.verified: set[str] = set()
        self.corrupt: set[str] = set()
        self.manifests: dict[str, Manifest] = {}  # every image read, checked or being checked
        self.on_verdict: Callable[[Manifest], None] = lambda manifest: None  # the disk cache keeps it
        self.remote = ""  # the remote's name, for the stats (mount/assemble.py names it)
        # Told of every image that fails: the disk cache drops what it has of it, the tree has the
        # kernel drop its pages.
        self.on_corrupt: list[Callable[[str], None]] = []
        self._verifiers: dict[str, Verifier] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Verifier, Block, bool]] = queue.Queue(self.QUEUE_BLOCKS)
        self._thread: threading.Thread | None = None

    def key(self, digest: str) -> ObjectKey:
        """What a verdict on these bytes is named by (BadKey for what is not a sha256). A verdict is
        this server's: each server's reader has its own Verification, so a digest one server
        claims falsely never stands against another's bytes."""
        return ObjectKey(Sha256(digest), "export", self.server)

    def failed(self, digest: str) -> bool:
        return self.key(digest).digest in self.corrupt

    def _verifier(self, fp: str, total: int) -> Verifier:
        with self._lock:
            v = self._verifiers.get(fp)
            if v is None:
                if fp in self.corrupt:  # concluded between the caller's look and this one
                    raise IntegrityError(fp)
                self.key(fp)  # a check begins only for a real sha256 (BadKey otherwise)
                v = self._verifiers[fp] = Verifier(fp, total)
            if self._thread is None:  # made on first use: the daemon forks after start-up
                self._thread = threading.Thread(target=self._hash_loop, name="hash", daemon=True)
                self._thread.start()
            return v

    def manifest(self, fp: str, total: int) -> Manifest:
        with self._lock:
            found = self.manifests.get(fp)
            if found is None:
                self.key(fp)
                found = self.manifests[fp] = Manifest(fp, total)
            return found

    def known(self, manifest: Manifest) -> None:
        """A manifest an earlier verdict sealed (from the disk cache): the image is verified.
        Not over a check this daemon began: what it handed out before is proven by that check
        alone (another mount's seal says nothing of the bytes this one was sent)."""
        with self._lock:
            if manifest.fp not in self.corrupt and manifest.fp not in self.manifests:
                self.manifests[manifest.fp] = manifest
                self.verified.add(manifest.fp)

    def admit(self, fp: str, total: int, index: int, data: Block) -> bool:
        """Whether a copy of a block that just arrived may be served (see manifest.py).

        Before the verdict a copy that differs from the first one means a reader may
        have been handed bytes the hash will not see: the image is `EIO` for good.
        After it, only that copy is refused.
        """
        if fp in self.corrupt:
            return False
        manifest = self.manifest(fp, total)
        if manifest.admit(index, data):
            return True
        if manifest.verified:
            log.error("image %s: block %d from the server differs from the verified one; refused",
                      fp, index)
        else:
            log.error("image %s: block %d arrived twice with different bytes before the check ended; "
                      "it reads as EIO from now on", fp, index)
            with self._lock:
                self.corrupt.add(fp)
            self.cache.forget(fp)
            self._tell_corrupt(fp)
        return False

    def published(self, fp: str, total: int, index: int, data: Block) -> None:
        """A block arrived from LXD: hash it now if the hash has got that far."""
        if fp in self.verified or fp in self.corrupt:
            return
        v = self._verifier(fp, total)
        with v.lock:
            if index != v.queued:
                return
            self._enqueue(v, data)
            # Blocks read earlier out of order may follow it straight from the cache.
            while v.queued < v.coverage.blocks:
                following = self.cache.get((fp, v.queued))
                if following is None:
                    break
                self._enqueue(v, following)

    def _enqueue(self, v: Verifier, data: Block) -> None:
        v.queued += 1
        self._queue.put((v, data, v.queued == v.coverage.blocks))

    def served(self, fp: str, total: int, offset: int, end: int) -> None:
        """Bytes [offset, end) are about to go to a reader; raises IntegrityError if they must not."""
        if fp in self.verified:
            return
        if fp in self.corrupt:
            raise IntegrityError(fp)
        v = self._verifier(fp, total)
        with v.lock:
            v.coverage.add(offset, end)
            complete = v.coverage.complete
        if v.state == "mismatch" or complete:
            self._verdict(v)

    def _verdict(self, v: Verifier) -> None:
        """Hash whatever the hash has not reached yet, then wait for the verdict."""
        with v.finish:
            while not v.done.is_set():
                with v.lock:
                    index = v.queued
                if index >= v.coverage.blocks:
                    break
                data = self.cache.get((v.fp, index)) or self.fetch(v.fp, v.total, index)
                with v.lock:
                    if v.queued == index:
                        self._enqueue(v, data)
        v.done.wait()
        if v.state == "mismatch":
            raise IntegrityError(v.fp)

    def _hash_loop(self) -> None:
        name_this_thread()
        item = None
        while True:
            v, data, last = item or self._queue.get()
            item, blocks = None, [data]
            while not last and len(blocks) * BLOCK < HASH_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] is not v:
                    break
                blocks.append(item[1])
                last, item = item[2], None
            v.update(blocks, last)
            if last:
                self._conclude(v)

    def _conclude(self, v: Verifier) -> None:
        with self._lock:
            self._verifiers.pop(v.fp, None)
            twice = v.fp in self.corrupt  # a block arrived twice, differently, while it was hashed
            if twice:
                v.state = "mismatch"
            (self.verified if v.state == "ok" else self.corrupt).add(v.fp)
            manifest = self.manifests.get(v.fp)
            if v.state == "ok" and manifest is not None:
                manifest.verified = True
            if v.state != "ok":
                self.manifests.pop(v.fp, None)
        v.done.set()
        stats.add("images_checked", verdict="verified" if v.state == "ok" else "failed", remote=self.remote)
        if v.state == "ok" and manifest is not None:
            self.on_verdict(manifest)
        if v.state == "mismatch" and not twice:
            log.error("image %s: the bytes LXD sent do not hash to its fingerprint; it reads as EIO "
                      "from now on", v.fp)
            self.cache.forget(v.fp)
            self._tell_corrupt(v.fp)

    def _tell_corrupt(self, fp: str) -> None:
        for listener in self.on_corrupt:
            listener(fp)
