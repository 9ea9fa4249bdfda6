"""Getting export blocks from LXD: streams of Range requests, resumed through outages.

A `Stream` is one request that serves a run of blocks in order. A
sequential reader keeps one open-ended stream (`bytes=N-`) and claims
more of it as it advances, so LXD's fixed cost per request (about 4 ms
for LXD 5.0) is paid once per sequential pass instead of once per
window; a random read makes a bounded stream for just the blocks it
needs. Bytes go from the socket with `readinto` straight into the block's
own buffer. A stream that drops is reopened at the very byte it reached,
with backoff, for as long as the timeout allows since it last made
progress.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lxdimagefs import stats
from lxdimagefs.data.blocks import BLOCK, Block, BlockCache, last_block
from lxdimagefs.data.diskcache import DiskCache
from lxdimagefs.data.verify import Verification
from lxdimagefs.errors import IntegrityError, LXDError, LXDUnreachable
from lxdimagefs.servers.localfiles import LocalImages
from lxdimagefs.servers.protocol import ImageSource
from lxdimagefs.threadname import name_this_thread
from lxdimagefs.wire.transport import Backoff, ExportStream

log = logging.getLogger(__name__)


class Stream:
    """One request's worth of blocks [next, claimed) of one export, fetched in order."""

    def __init__(self, fp: str, total: int, first: int, open_ended: bool) -> None:
        self.fp, self.total = fp, total
        self.next = self.claimed = first
        self.consumer = first  # the block its reader reached: what is claimed past it is read-ahead
        self.open_ended = open_ended
        self.closing = False  # claims no more; closes once its claimed blocks are in
        self.dead = False
        self.running = False
        self.conn: ExportStream | None = None
        self.lock = threading.Lock()

    @property
    def last_block(self) -> int:
        return last_block(self.total)

    def ahead(self) -> int:
        return max(0, self.claimed - self.consumer)


class Fetcher:
    def __init__(self, client: ImageSource, cache: BlockCache, workers: int = 8,
                 disk: DiskCache | None = None, images: Path | None = None) -> None:
        self.client = client
        self.cache = cache
        self.disk = disk
        self.verification = Verification(cache, self.block, client.conn.identity())
        # A local server's images folder: its files are read in place (by fetch workers and readers).
        self.local = LocalImages(images) if images is not None else None
        self.requests = 0  # export requests made, for tests and benchmarks
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._streams: set[Stream] = set()
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        # Made on first use: the daemon forks after start-up, and threads do not survive a fork.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fetch",
                                            initializer=name_this_thread)
        return self._pool

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what readers call ----------------------------------------------------

    def block(self, fp: str, total: int, index: int) -> Block:
        """One block, from the cache, a fetch under way, or a new bounded fetch."""
        while True:
            found = self.cache.lookup((fp, index))
            if isinstance(found, Future):
                return found.result()
            if found is not None:
                count(self, "memory", len(found))
                return found
            self.fetch(fp, total, index, index)

    def fetch(self, fp: str, total: int, first: int, last: int) -> None:
        """Fetch the missing blocks of [first, last], each run in one bounded request."""
        for a, b in self.cache.claim(fp, first, min(last, last_block(total))):
            stream = Stream(fp, total, a, open_ended=False)
            stream.claimed = b + 1
            self._start(stream)

    def stream(self, fp: str, total: int, first: int) -> Stream:
        """An open-ended stream from block `first`, claiming nothing yet (see `extend`)."""
        stream = Stream(fp, total, first, open_ended=True)
        with self._lock:
            self._streams.add(stream)
        return stream

    def extend(self, stream: Stream, last: int) -> bool:
        """Claim blocks up to `last` for the stream; False if it cannot serve them (start anew)."""
        with stream.lock:
            if stream.dead or stream.closing:
                return False
            last = min(last, stream.last_block)
            if last >= stream.claimed:
                runs = self.cache.claim(stream.fp, stream.claimed, last, stop_at_present=True)
                if runs:
                    stream.claimed = runs[0][1] + 1
                elif stream.claimed == stream.next:  # the next block is someone else's: nothing to read
                    stream.closing = True
                    self._finish(stream)
                    return False
            if not stream.running and stream.next < stream.claimed:
                self._start(stream)
        return True

    def room(self, stream: Stream) -> int:
        """Blocks this stream may claim ahead of its reader: half the cache, shared by all streams."""
        with self._lock:
            others = sum(s.ahead() for s in self._streams if s is not stream)
        return max(1, self.cache.capacity // BLOCK // 2 - others)

    def drop(self, stream: Stream) -> None:
        """The reader went elsewhere: claim no more, close once what is claimed is in."""
        with stream.lock:
            stream.closing = True
            if not stream.running:
                self._finish(stream)

    # -- the fetching itself ------------------------------------------------------

    def _start(self, stream: Stream) -> None:
        """Drain the stream on a worker (called with its lock held, or before anyone shares it)."""
        stream.running = True
        self._executor().submit(self._drain, stream)

    def _finish(self, stream: Stream) -> None:
        """Called with the stream's lock held, when nothing runs on it."""
        if stream.conn is not None:
            stream.conn.close()
            stream.conn = None
        with self._lock:
            self._streams.discard(stream)

    def _drain(self, stream: Stream) -> None:
        try:
            while True:
                with stream.lock:
                    index = stream.next
                    if index >= stream.claimed:
                        stream.running = False
                        if stream.closing or not stream.open_ended or index > stream.last_block:
                            self._finish(stream)
                        return
                data = self.from_disk(stream.fp, stream.total, index)
                if data is not None:
                    if stream.conn is not None:  # it skipped a block: reopen where the next is
                        stream.conn.close()
                        stream.conn = None
                    self.cache.publish(stream.fp, index, data)
                    self.verification.published(stream.fp, stream.total, index, data)
                elif (data := self._from_file(stream, index)) is not None:
                    self._arrived(stream.fp, stream.total, index, data, keep=False)
                else:
                    data = self._read_block(stream, index)
                    log.debug("block %d of %s in (%d bytes)", index, stream.fp, len(data))
                    self._arrived(stream.fp, stream.total, index, data)
                with stream.lock:
                    stream.next = index + 1
        except BaseException as e:  # every waiter must hear of the failure
            err = e if isinstance(e, LXDError) else LXDUnreachable(f"reading image {stream.fp[:12]}: {e}")
            with stream.lock:
                stream.dead = True
                stream.running = False
                self.cache.fail(stream.fp, range(stream.next, stream.claimed), err)
                self._finish(stream)
            if not isinstance(e, Exception):
                raise

    def _arrived(self, fp: str, total: int, index: int, data: Block, keep: bool = True) -> None:
        """A block from the server, if its manifest admits it (`keep` False: its own file, not kept)."""
        count(self, "server" if keep else "local", len(data))
        if not self.verification.admit(fp, total, index, data):
            self.cache.fail(fp, range(index, index + 1), IntegrityError(f"{fp} block {index}"))
            return
        if keep and self.disk is not None:  # queued before the hash can seal the image without it
            self.disk.put(fp, index, data, total)
        self.cache.publish(fp, index, data)
        self.verification.published(fp, total, index, data)

    def _from_file(self, stream: Stream, index: int) -> Block | None:
        """A block from the server's own file, or None: then the socket."""
        if self.local is None:
            return None
        buf = self.cache.new_block(min(BLOCK, stream.total - index * BLOCK))
        return buf if self.local.readinto(stream.fp, stream.total, index * BLOCK, buf) else None

    def from_disk(self, fp: str, total: int, index: int) -> Block | None:
        """A block from the disk cache if it matches the manifest: the verified one, or before the verdict
        the copy recorded on arrival (a block that left memory is not asked of the server again)."""
        manifest = self.verification.manifests.get(fp)
        if self.disk is None or manifest is None or not (manifest.verified or manifest.has(index)):
            return None
        data = self.disk.get(fp, index, min(BLOCK, total - index * BLOCK), total)
        if data is None:
            return None
        if not manifest.admit(index, data):
            self.damaged(fp, index)
            return None
        self.disk.hits += 1
        count(self, "disk", len(data))
        return data

    def damaged(self, fp: str, index: int) -> None:
        """A block read back from the disk cache did not match the manifest."""
        if self.disk is not None and self.disk.written(fp, index):
            log.warning("disk cache: block %d of %s does not match its manifest (damaged or edited); "
                        "fetched again", index, fp)

    def _read_block(self, stream: Stream, index: int) -> Block:
        start = index * BLOCK
        buf = view = self.cache.new_block(min(BLOCK, stream.total - start))
        got = 0
        backoff = Backoff(self.client.patience)
        while got < len(buf):
            if stream.conn is None:
                end = None if stream.open_ended else min(stream.claimed * BLOCK, stream.total)
                self.requests += 1
                stream.conn = self.client.open_export(stream.fp, start + got, end, backoff)
            before = stream.conn.pos
            try:
                stream.conn.readinto(view[got:])
                got = len(buf)
            except LXDUnreachable as e:
                moved = stream.conn.pos - before
                got += moved
                stream.conn.close()
                stream.conn = None
                if moved:  # it had made progress: a new outage, with a budget of its own
                    backoff = Backoff(self.client.patience)
                log.warning("export %s dropped at offset %d: %s", stream.fp[:12], start + got, e.message)
                backoff.pause(e, f"resuming export {stream.fp[:12]} at offset {start + got}")
        return buf


_KEYS: dict[tuple[str, str], stats.Key] = {}


def count(fetcher: Fetcher, source: str, size: int) -> None:
    """Bytes a reader or the hash got, by where they came from (stats.py): once a block, its key
    made once."""
    remote = fetcher.verification.remote
    counter = _KEYS.get((source, remote))
    if counter is None:
        counter = _KEYS[source, remote] = stats.key("bytes", source=source, remote=remote)
    stats.add_to(counter, size)
