"""Everything that reads exports, behind one object the tree holds.

Unified exports: one block cache for the daemon, fetches and streams
from LXD, the whole-read check, and a read-ahead policy per open file.
Split exports: their parts' local files, read checked (the spool).
"""

from __future__ import annotations

import functools
from pathlib import Path

from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.diskcache import DiskCache, drop_unsealed
from lxdimagefs.data.fetch import Fetcher
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.data.verify import Verification
from lxdimagefs.errors import IntegrityError
from lxdimagefs.servers.protocol import ImageSource


class Exports:
    def __init__(self, client: ImageSource, spool_dir: Path, capacity: int = 16 << 20,
                 disk: DiskCache | None = None,
                 images: Path | None = None) -> None:
        """`images`: a local server's images folder, whose files are read in place where they can be."""
        self.cache = BlockCache(capacity)
        self.disk = disk
        self.fetcher = Fetcher(client, self.cache, disk=disk, images=images)
        self.spool = SplitSpool(client, spool_dir, disk, images=images, cache=self.cache)
        self.server = self.spool.server  # the server of every key this reader makes
        if disk is not None:
            self.verification.on_verdict = disk.seal
            self.verification.on_corrupt.append(functools.partial(drop_unsealed, disk))

    @property
    def verification(self) -> Verification:
        return self.fetcher.verification

    def unified(self, fp: str, size: int, max_window: int | None = None) -> Prefetcher:
        """A reader for one open unified export; refused if the image already failed its check."""
        if self.verification.failed(fp):
            raise IntegrityError(fp)
        if self.disk is not None and fp not in self.verification.verified:
            manifest = self.disk.manifest(fp, size)  # an earlier mount's verdict
            if manifest is not None:
                self.verification.known(manifest)
        window = self.cache.capacity // 4
        return Prefetcher(self.fetcher, fp, size, max_window=min(window, max_window or window))

    def close(self) -> None:
        self.fetcher.close()
        self.spool.remove()
