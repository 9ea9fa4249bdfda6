"""Everything that reads exports, behind one object the tree holds.

Unified exports: one block cache for the daemon, fetches and streams
from LXD, the whole-read check, and a read-ahead policy per open file.
Split exports: the local spool.
"""

from __future__ import annotations

from pathlib import Path

from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.fetch import Fetcher
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.errors import IntegrityError
from lxdimagefs.servers.protocol import ImageSource


class Exports:
    def __init__(self, client: ImageSource, spool_dir: Path, capacity: int = 32 << 20,
                 cache: BlockCache | None = None) -> None:
        self.cache = cache or BlockCache(capacity)  # the projects of one server share theirs
        self.fetcher = Fetcher(client, self.cache)
        self.spool = SplitSpool(client, spool_dir)
        self.server = self.spool.server  # the server of every key this reader makes

    @property
    def verification(self):
        return self.fetcher.verification

    def unified(self, fp: str, size: int, max_window: int | None = None) -> Prefetcher:
        """A reader for one open unified export; refused if the image already failed its check."""
        if self.verification.failed(fp):
            raise IntegrityError(fp)
        window = self.cache.capacity // 4
        return Prefetcher(self.fetcher, fp, size, max_window=min(window, max_window or window))

    def close(self) -> None:
        self.fetcher.close()
        self.spool.remove()
