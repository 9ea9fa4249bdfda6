"""Whole files on local disk: a split image's parts, read block by block against their
manifests (`CheckedPart`, which contents/ also reads decoded tarballs through), and unified
exports kept whole (`.tar.zst`, `.tar.lzma`, for contents/), checked once per daemon.

LXD serves a split export only whole, so its verified parts are kept whole
(hard-linked from the mount's spool when on the same filesystem). Nothing
about them is trusted: every read of a part, wherever the file is (the
spool, the disk cache, the server's own images folder), is served from
blocks checked against the part's sealed manifest (`CheckedPart`), so a
later mount needs no pass over the whole part before its first read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lxdimagefs.data.blocks import BLOCK, Block, BlockCache, cut
from lxdimagefs.data.manifest import BlockSums, Manifest, digest
from lxdimagefs.errors import IntegrityError
from lxdimagefs.private import Temporary

if TYPE_CHECKING:
    from lxdimagefs.data.diskcache import DiskCache

log = logging.getLogger(__name__)


class CheckedPart:
    """One split part read from a local file, each 1 MiB block checked against the part's
    manifest before any of it is served, and kept checked in the daemon's block cache.

    A block that does not match is `EIO` for that read, never its bytes; `on_bad` drops the
    copy it came from, so the next open reads another."""

    def __init__(self, path: Path, manifest: Manifest, cache: BlockCache, name: str,
                 on_bad: Callable[[], None]) -> None:
        self.manifest, self.cache, self.name, self.on_bad = manifest, cache, name, on_bad
        self.total = manifest.total
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def block(self, index: int) -> Block:
        found = self.cache.get((self.name, index))
        if found is not None:
            return found
        # An evicted block's buffer when one is free (its pages already in memory): a new 1 MiB
        # buffer for each block read, mapped and faulted in afresh, cost a `tar -c` of a decoded
        # tarball 0.2 s (docs/PERFORMANCE.md).
        data = self.cache.new_block(min(BLOCK, self.total - index * BLOCK))
        if os.preadv(self.fd, [data], index * BLOCK) != len(data) or not self.manifest.admit(index, data):
            log.error("split image part %s: block %d does not match its manifest (the file was changed "
                      "or damaged); EIO, and that copy is not used again", self.name, index)
            self.on_bad()
            raise IntegrityError(f"{self.manifest.fp} part block {index}")
        self.cache.publish(self.name, index, data)
        return data

    def read(self, offset: int, size: int) -> memoryview | bytes:
        end = min(offset + size, self.total)
        if offset >= end:
            return b""
        return cut([self.block(i) for i in range(offset // BLOCK, (end - 1) // BLOCK + 1)], offset, end)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def hash_parts(fp: str, paths: list[Path], what: str) -> list[Manifest] | None:
    """Both parts read whole: their manifests if the sha256 of both, in order, is `fp`; else None."""
    log.debug("hashing both parts of %s whole (%s)", fp[:12], what)
    digest_, sums = hashlib.sha256(), [BlockSums() for _ in paths]
    buf = bytearray(PartWriter.BATCH)  # large updates: hashlib lets go of the GIL for each
    try:
        for path, part in zip(paths, sums, strict=True):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    digest_.update(memoryview(buf)[:n])
                    part.update(memoryview(buf)[:n])
        sizes = [p.stat().st_size for p in paths]
    except OSError as e:
        log.warning("%s of %s unreadable (%s): not used", what, fp[:12], e.strerror)
        return None
    if digest_.hexdigest() != fp:
        log.error("%s of %s do not hash to its fingerprint: not used", what, fp)
        return None
    return [s.manifest(fp, n) for s, n in zip(sums, sizes, strict=True)]


def kept(cache: DiskCache, fp: str) -> list[Path] | None:
    """Both parts, if kept (marked used); their blocks are checked as they are read."""
    paths = [cache.part(fp, 0), cache.part(fp, 1)]
    if not all(p.exists() for p in paths):
        return None
    for p in paths:
        with contextlib.suppress(OSError):
            os.utime(p)
    return paths


def keep(cache: DiskCache, fp: str, verified: list[Path], first: int = 0) -> None:
    """Link (or copy) parts in, numbered from `first` (their manifests are sealed by the caller)."""
    try:
        for index, src in enumerate(verified, first):
            dst = cache.part(fp, index)
            with Temporary.of(dst, src) as tmp:  # the spool's file itself, when on the same filesystem
                os.replace(tmp.path, dst)  # (a copy cut short, ENOSPC: removed by the exit)
    except OSError as e:
        log.warning("disk cache: cannot keep the parts of %s: %s", fp, e.strerror)


def whole(cache: DiskCache, fp: str, size: int) -> Path | None:
    """A unified export kept whole, if its manifest is sealed and every block matches it."""
    path = cache.export(fp)
    if fp in cache.intact:
        if _identity(path, size) == cache.intact[fp]:
            return path
        del cache.intact[fp]  # another daemon evicted it (and wrote it again?): checked anew
    manifest = cache.manifest(fp, size)
    if manifest is None:
        return None
    buf = bytearray(BLOCK)
    try:
        with open(path, "rb", buffering=0) as f:
            for index in range(manifest.blocks):
                n = f.readinto(buf)
                if n != min(BLOCK, size - index * BLOCK) or not manifest.admit(index, memoryview(buf)[:n]):
                    return None  # a block missing (never fetched) or not matching: not whole
    except OSError:
        return None
    if (found := _identity(path, size)) is not None:
        cache.intact[fp] = found
    return path


def _identity(path: Path, size: int) -> tuple[int, int] | None:
    """The file this daemon checked whole, as long as it is that one: its inode, if the file is
    `size` bytes long without a hole (an inode freed by another daemon's eviction may be given
    to a file it writes block by block: a hole, or too short)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        whole = st.st_size == size and (size == 0 or os.lseek(fd, 0, os.SEEK_HOLE) >= size)
        return (st.st_dev, st.st_ino) if whole else None
    except OSError:
        return None
    finally:
        os.close(fd)


def keep_whole(cache: DiskCache, fp: str, verified: Path) -> None:
    """Keep an export just checked against the fingerprint: the file, then its manifest."""
    size = verified.stat().st_size
    sums = bytearray()
    buf = bytearray(BLOCK)
    dst = cache.export(fp)
    try:
        with open(verified, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                sums += digest(memoryview(buf)[:n])
        cache.intact[fp] = (-1, -1)  # no block is put from now on: it would land in the verified file
        cache.flush()  # and those put before land in the file it replaces
        with Temporary.of(dst, verified) as tmp:
            cache.forget_fd(fp)
            os.replace(tmp.path, dst)
        cache.intact[fp] = _identity(dst, size) or (-1, -1)  # (-1, -1): checked anew on use
        cache.seal(Manifest(fp, size, bytes(sums)))
    except OSError as e:
        log.warning("disk cache: cannot keep the export of %s: %s", fp, e.strerror)
        cache.intact.pop(fp, None)


class PartWriter:
    """Writes a split export's parts to their files and hashes them, on a thread of its own.

    The multipart parser hands over small pieces; they are gathered into
    4 MiB batches, and each batch is written and hashed while the next is
    received, so the download runs close to the socket's speed.
    """

    BATCH = 4 << 20

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.sums: list[BlockSums] = []  # each part's block digests, made by the same pass
        self._pieces: list[memoryview] = []
        self._size = 0
        self._fd: int | None = None
        self._queue: queue.Queue[tuple[int, bytes, BlockSums] | None] = queue.Queue(4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, data, sums = item
            if self._error is None:
                try:
                    self.hash.update(data)
                    sums.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as e:
                    self._error = e

    def start(self, fd: int) -> None:
        self.flush()
        self._fd = fd
        self.sums.append(BlockSums())

    def add(self, piece: memoryview) -> None:
        self._pieces.append(piece)
        self._size += len(piece)
        if self._size >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pieces and self._fd is not None:
            self._queue.put((self._fd, b"".join(self._pieces), self.sums[-1]))
        self._pieces, self._size = [], 0

    def finish(self) -> str:
        """Waits for every write; returns the sha256 of all parts, in order."""
        self.flush()
        self.close()
        if self._error is not None:
            raise self._error
        return self.hash.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def too_full(folder: Path, more: int, keep_free: float) -> bool:
    """Whether `more` bytes written in `folder` would leave under `keep_free` of its filesystem free."""
    fs = os.statvfs(folder)
    return fs.f_bavail * fs.f_frsize < keep_free * fs.f_blocks * fs.f_frsize + more
