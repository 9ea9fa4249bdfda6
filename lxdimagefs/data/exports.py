"""Everything that reads exports, behind one object the tree holds.

Unified exports: one block cache for the daemon, fetches and streams
from LXD, the whole-read check, and a read-ahead policy per open file.
Split exports: their parts' local files, read checked (the spool); and
compressed unified ones that contents/ reads as plain tarballs, decoded
once per mount into the spool and read the same way.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.diskcache import DiskCache, drop_unsealed
from lxdimagefs.data.diskparts import CheckedPart, decode
from lxdimagefs.data.fetch import Fetcher
from lxdimagefs.data.manifest import Manifest
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.data.verify import Verification
from lxdimagefs.errors import IntegrityError
from lxdimagefs.keys import ObjectKey, Sha256
from lxdimagefs.servers.protocol import ImageSource

log = logging.getLogger(__name__)


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
        self._decoded: dict[str, tuple[Path, Manifest]] = {}  # this mount's decoded tarballs
        self._decoding = threading.Lock()
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

    def decoded(self, fp: str, size: int, compression: str) -> CheckedPart:
        """A `.tar.zst` or `.tar.lzma` export as a plain tarball, every block of it checked.

        Decoded once per mount into the mount's spool (the compressed export comes from the
        disk cache when kept there), with a manifest made as it is written: a decoded file
        changed or damaged while the mount lives is `EIO`, then decoded again at the next open.
        """
        with self._decoding:
            path, manifest = self._decoded.get(fp) or (None, None)
            if path is None or manifest is None or not path.exists():
                path = self.spool.directory / f"{ObjectKey(Sha256(fp), 'spool', self.server).filename}.tar"
                self.spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                source = self.spool.unified(fp, size)
                try:
                    manifest = decode(source, path, fp, compression)
                except IntegrityError:  # changed since its check: that copy goes, the next look fetches
                    log.error("the export of %s changed after its check: not decoded, not kept", fp)
                    if self.disk is not None:
                        self.disk.drop(fp)
                    if source.parent == self.spool.directory:
                        source.unlink(missing_ok=True)
                    raise
                self._decoded[fp] = path, manifest
        forget = functools.partial(self._forget, fp, path)
        return CheckedPart(path, manifest, self.cache, f"{fp}.decoded", forget)

    def _forget(self, fp: str, path: Path) -> None:
        """A block of a decoded tarball failed its check: the file goes, the next open decodes anew."""
        with self._decoding:
            if self._decoded.get(fp, (None,))[0] == path:
                del self._decoded[fp]
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self.fetcher.close()
        self.spool.remove()
