"""Everything that reads exports, behind one object the tree holds.

Unified exports: one block cache for the daemon, fetches and streams
from LXD, the whole-read check, and a read-ahead policy per open file.
Split exports: their parts' local files, read checked (the spool); and
compressed unified ones that contents/ reads as plain tarballs, decoded
once (kept in the disk cache) and read the same way.
"""

from __future__ import annotations

import bz2
import errno
import functools
import gzip
import hashlib
import io
import logging
import lzma
import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxdimagefs.data.blocks import BLOCK, BlockCache
from lxdimagefs.data.diskcache import DECODED, KEEP_FREE, DiskCache, decoded_key, drop_unsealed
from lxdimagefs.data.diskparts import CheckedPart, too_full
from lxdimagefs.data.fetch import Fetcher
from lxdimagefs.data.manifest import BlockSums, Manifest
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.data.verify import Verification
from lxdimagefs.errors import IntegrityError
from lxdimagefs.private import Temporary, private_folder
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
        self._decoding = threading.Lock()  # guards the two dicts
        self._decode_locks: dict[str, threading.Lock] = {}
        self._too_large: dict[str, str] = {}  # images whose decode stopped at its bound, and why
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

    def decoded(self, fp: str, size: int, compression: str, decode: bool = True) -> CheckedPart | None:
        """A compressed unified export (`compression`: see `decoder_of`) as a plain tarball, every
        block of it checked; None if `decode` is false and it was not decoded before.

        Decoded once, with a manifest made as it is written, and kept in the disk cache beside
        that manifest for later mounts (in the mount's spool only, without one). A block
        changed or damaged since is `EIO`, and the file is deleted: the image is decoded again
        when contents/ next opens it (a later mount; this one's archive holds the old file
        until it leaves contents/'s open archives).
        """
        with self._decode_lock(fp):
            if fp in self._too_large:  # remembered for the mount: a bomb is not set off per lookup
                raise DecodeBound(errno.EIO, self._too_large[fp])
            path, manifest = self._decoded.get(fp) or (None, None)
            if path is None or manifest is None or not path.exists():
                found = self._kept_decoded(fp) or (self._decode(fp, size, compression) if decode else None)
                if found is None:
                    return None
                path, manifest = self._decoded[fp] = found
            forget = functools.partial(self._forget, fp, path)
            return CheckedPart(path, manifest, self.cache, f"{fp}.decoded", forget)  # opened before a forget

    def _kept_decoded(self, fp: str) -> tuple[Path, Manifest] | None:
        """The tarball an earlier mount decoded, if kept with its sealed manifest."""
        if self.disk is None:
            return None
        path = self.disk.part(fp, DECODED)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        manifest = self.disk.manifest(fp, size, decoded_key(fp))
        return None if manifest is None else (path, manifest)

    def _decode(self, fp: str, size: int, compression: str) -> tuple[Path, Manifest]:
        path = self.spool.named(fp, "tar")
        private_folder(self.spool.directory)
        cap = self.disk.max_bytes if self.disk is not None else None
        local = self.fetcher.local.opened(fp, size) if self.fetcher.local is not None else None
        try:
            if local is not None:  # the server's own file: nothing to download
                manifest = decode(Path(f"/proc/self/fd/{local}"), path, fp, compression, cap)
            else:
                manifest = self._decode_kept(fp, size, path, compression, cap)
        except DecodeBound as e:
            why = self._too_large[fp] = str(e.strerror)
            log.error("contents/ of %s: %s; its contents/ is EIO until the mount ends", fp[:12], why)
            raise
        finally:
            if local is not None:
                os.close(local)
        log.debug("decoded %s for contents/ (%d bytes)", fp, manifest.total)
        if self.disk is not None:
            self.disk.keep_parts(fp, [path], first=DECODED)
            if self.disk.part(fp, DECODED).exists():
                self.disk.seal(manifest, decoded_key(fp))
        return path, manifest

    def _decode_kept(self, fp: str, size: int, path: Path, compression: str, cap: int | None) -> Manifest:
        """Decoded from the export downloaded into the spool, or kept whole in the disk cache."""
        source = self.spool.unified(fp, size)
        try:
            return decode(source, path, fp, compression, cap)
        except IntegrityError:  # changed since its check: that copy goes, the next look fetches
            log.error("the export of %s changed after its check: not decoded, not kept", fp)
            if self.disk is not None:
                self.disk.drop(fp)
            if source.parent == self.spool.directory:
                source.unlink(missing_ok=True)
            raise

    def _decode_lock(self, fp: str) -> threading.Lock:
        """One image's decoding at a time; other images' go on meanwhile."""
        with self._decoding:
            return self._decode_locks.setdefault(fp, threading.Lock())

    def _forget(self, fp: str, path: Path) -> None:
        """A block of a decoded tarball failed its check: the file goes, the next open decodes anew."""
        with self._decoding:
            if self._decoded.get(fp, (None,))[0] == path:
                del self._decoded[fp]
                path.unlink(missing_ok=True)
                if self.disk is not None:  # the spool's file may be the kept one, linked
                    self.disk.part(fp, DECODED).unlink(missing_ok=True)

    def close(self) -> None:
        self.fetcher.close()
        self.spool.remove()


def decoder_of(raw: Any, compression: str) -> Any:
    """A reader of what `raw` decodes to: `zst` (across frames), `gz` (across members), `bz2`,
    or `lzma`/`xz` (either container)."""
    import zstandard

    if compression == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw)
    return lzma.LZMAFile(raw)


class DecodeBound(OSError):
    """A decode stopped at its bound: a decompression bomb, or an image the disk cannot hold."""


MAX_RATIO = 200  # a tarball decodes to at most this many times its size (real rootfs: 2-5x; gzip ~1000x)


def _bound(folder: Path, written: int, more: int, caps: list[tuple[int, str]]) -> str | None:
    """Why `more` bytes after `written` may not be decoded into `folder` (None: they may): past
    one of `caps` (bytes, what it is), or leaving under KEEP_FREE of the filesystem free."""
    for cap, what in caps:
        if written + more > cap:
            return f"decoding stopped at {written} bytes: {what} is {cap} bytes"
    if too_full(folder, more, KEEP_FREE):
        return (f"decoding stopped at {written} bytes: more would leave under {KEEP_FREE:.0%} "
                f"of {folder}'s filesystem free")
    return None


def decode(source: Path, out: Path, fp: str, compression: str, cap: int | None = None) -> Manifest:
    """A compressed tarball (see `decoder_of`) decoded into `out`, and the manifest of what was
    written, made as it was written. The compressed bytes are hashed as the decoder reads them:
    if they are not the image's (sha256 = `fp`), nothing is kept and IntegrityError is raised.
    Bounded (DecodeBound) by `cap` bytes (the disk cache's bound), MAX_RATIO times the source's
    size and the free space `out`'s filesystem must keep: what a few KiB decode to is not known
    until decoded. The temporary file is a private.Temporary (0600, made anew, never through a
    link)."""
    import zstandard

    # 1 MiB at a time: with 4 MiB (a part's write batch) the buffer, the read-ahead and each piece
    # the decoder returns held 12 MiB while the first look's reads ran beside it.
    sums, written, buf = BlockSums(), 0, bytearray(BLOCK)
    caps = [(MAX_RATIO * os.stat(source).st_size, f"{MAX_RATIO} times the export's size")]
    caps += [(cap, "the disk cache's bound (-o cache_max)")] if cap is not None else []
    with Temporary(out) as tmp, open(source, "rb", buffering=0) as raw, \
            open(tmp.fd, "wb", closefd=False) as dst:
        hashed = _Hashing(raw)
        src = io.BufferedReader(hashed, BLOCK)
        try:
            with decoder_of(src, compression) as decoder:
                while n := decoder.readinto(buf):
                    if why := _bound(tmp.path.parent, written, n, caps):
                        raise DecodeBound(errno.EIO, why)
                    try:
                        dst.write(memoryview(buf)[:n])
                    except OSError as e:
                        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        why = f"decoding stopped at {written} bytes: {e.strerror}"
                        raise DecodeBound(errno.EIO, why) from e
                    sums.update(memoryview(buf)[:n])
                    written += n
        except DecodeBound:
            raise
        except (zstandard.ZstdError, lzma.LZMAError, zlib.error, EOFError, OSError):  # bz2, gzip: OSError
            hashed.finish(buf, fp)  # a copy changed since its check, or the image's own fault?
            raise
        hashed.finish(buf, fp)
        fd = raw.fileno()
        if compression == "zst" and not whole_frames(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size):
            # LXD reads only metadata.yaml: it takes an image whose export is cut short
            raise ValueError(f"{fp}: its export ends inside a zstd frame")
        dst.flush()
        os.replace(tmp.path, out)
    return sums.manifest(fp, written)


def whole_frames(pread: Callable[[int, int], bytes | memoryview], size: int) -> bool:
    """Whether a zstd file of `size` bytes (read by `pread(offset, n)`) ends where its last frame
    does (zstandard's reader gives what it has, and ends quietly)."""
    import zstandard

    pos = 0
    while pos < size:
        head = bytes(pread(pos, 18))
        if int.from_bytes(head[:4], "little") & ~0xF == 0x184D2A50:  # a skippable frame
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        try:
            pos += zstandard.frame_header_size(head)
            checksum, last = 4 if zstandard.get_frame_parameters(head).has_checksum else 0, 0
        except zstandard.ZstdError:
            return False
        while not last and len(block := bytes(pread(pos, 3))) == 3:  # 3-byte headers, to the last
            n = int.from_bytes(block, "little")
            last, pos = n & 1, pos + 3 + (1 if (n >> 1) & 3 == 1 else n >> 3)
        pos += checksum if last else size
    return pos == size


class _Hashing(io.RawIOBase):
    """A file read through, every byte handed out hashed (the decoder reads what is checked)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__()
        self.raw, self.sha256 = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer) or 0
        self.sha256.update(memoryview(buffer)[:n])
        return n

    def finish(self, buf: bytearray, fp: str) -> None:
        """Hash the rest (what follows the compressed stream is the image's too); IntegrityError
        unless all of it hashed to the fingerprint."""
        while self.readinto(buf):
            pass
        if self.sha256.hexdigest() != fp:
            raise IntegrityError(f"{fp}: the export read to be decoded")
