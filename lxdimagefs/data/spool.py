"""Split exports: their parts' local files (the server's own, the disk cache's, or downloaded once
to a private spool), verified before use and checked block by block on every read."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from stat import S_ISDIR

from lxdimagefs.data import diskparts
from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.diskcache import DiskCache
from lxdimagefs.data.diskparts import CheckedPart, PartWriter, hash_parts
from lxdimagefs.data.manifest import Manifest
from lxdimagefs.errors import IntegrityError, LXDError
from lxdimagefs.keys import ObjectKey, Sha256
from lxdimagefs.private import alive, open_own, private_folder
from lxdimagefs.servers.localfiles import LocalImage, open_image
from lxdimagefs.servers.protocol import ImageSource
from lxdimagefs.wire.multipart import PartStream
from lxdimagefs.wire.rest import RestSession

log = logging.getLogger(__name__)


Ready = tuple[list[Path], list[Manifest]]  # a split image's two part files, and their manifests


class Spool:
    """Exports downloaded whole into a private folder of this mount (removed when it ends), each
    verified against its fingerprint before anyone reads it."""

    def __init__(self, client: ImageSource, directory: Path, disk: DiskCache | None = None) -> None:
        self.client, self.directory, self.server = client, directory, client.conn.identity()
        self.disk = disk  # where verified exports are kept for later mounts
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.downloads = 0

    def _lock_of(self, fp: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(fp, threading.Lock())

    def named(self, fp: str, suffix: str) -> Path:
        """A spool file, named by its key (server and fingerprint), never by what a server sent."""
        return self.directory / f"{ObjectKey(Sha256(fp), 'spool', self.server).filename}.{suffix}"

    def unified(self, fp: str, size: int) -> Path:
        """A unified export as a local file, for readers that need a file descriptor of their own."""
        final = self.named(fp, "whole")
        with self._lock_of(fp):
            kept = diskparts.whole(self.disk, fp, size) if self.disk is not None else None
            if kept is not None:
                return kept
            if not final.exists():
                self._download_unified(fp, size, final)
                if self.disk is not None:
                    self.disk.keep_whole(fp, final)
        return final

    def _download_unified(self, fp: str, size: int, final: Path) -> None:
        private_folder(self.directory)  # made again if it went (a cleaner of $TMPDIR): if still ours
        tmp = final.with_suffix(".part")
        writer = PartWriter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.downloads += 1
        try:
            writer.start(fd)
            with self.client.open_export(fp, 0, size) as stream:
                while stream.pos < size:
                    chunk = bytearray(min(PartWriter.BATCH, size - stream.pos))
                    stream.readinto(memoryview(chunk))
                    writer.add(memoryview(bytes(chunk)))
            if writer.finish() != fp:
                raise IntegrityError(fp)
            os.replace(tmp, final)
            log.debug("spooled %s (%d bytes)", fp, size)
        finally:
            writer.close()
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def _download(self, fp: str, final: list[Path], sizes: tuple[int, ...]) -> list[Manifest]:
        """Both parts from LXD's multipart stream into `final`, hashed on the way: their manifests."""
        size = sum(sizes)
        private_folder(self.directory)  # made again if it went (a cleaner of $TMPDIR): if still ours
        tmp = [p.with_suffix(p.suffix + ".part") for p in final]
        writer = PartWriter()
        fds: list[int] = []

        def begin(_name: str) -> None:
            if len(fds) >= 2:
                raise LXDError(f"LXD's split export of {fp} holds more than two parts")
            fds.append(os.open(tmp[len(fds)], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            writer.start(fds[-1])

        got = 0

        def add(piece: memoryview) -> None:  # a server that sends more than the record says: refused
            nonlocal got
            got += len(piece)
            if got > size:
                raise LXDError(f"LXD's split export of {fp} is larger than the {size} bytes its record gives")
            writer.add(piece)

        self.downloads += 1
        try:
            with self.client.export_stream(fp) as resp:
                PartStream(resp.headers.get("Content-Type", ""), begin, add,
                           writer.flush).feed(RestSession.iter_chunks(resp))
            digest = writer.finish()
            if len(fds) != 2:
                raise LXDError(f"LXD's split export of {fp} did not hold two parts")
            if digest != fp or [os.fstat(fd).st_size for fd in fds] != list(sizes):  # where part 1 starts
                raise IntegrityError(fp)
            for t, f in zip(tmp, final, strict=True):
                os.replace(t, f)
            log.debug("spooled %s (%d bytes)", fp, size)
            return [writer.sums[i].manifest(fp, sizes[i]) for i in range(2)]
        finally:
            writer.close()
            for fd in fds:
                os.close(fd)
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
            st = None
            try:  # never through a link, never another user's, never a read that waits (a FIFO)
                st = os.lstat(path)
                if not S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                    continue
                with os.fdopen(open_own(path / "pid", os.O_RDONLY), "rb") as f:
                    pid = int(f.read(32))
            except FileNotFoundError:  # never claimed: a start-up that failed, unless brand new
                pid = -1 if st is None or time.time() - st.st_mtime < grace else 0
            except (OSError, ValueError):
                continue
            if pid < 0 or (pid and alive(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed


class SplitSpool(Spool):
    """Split exports' parts as local files, each read checked block by block against its manifest.

    LXD serves a split export only as one multipart stream, without ranges
    or part sizes, so random access needs a local copy: the server's own
    files where the daemon can read them, else the disk cache's copy, else a
    download into this mount's private spool (removed when it ends). The first
    use of a copy with no sealed manifest for this server hashes both parts
    whole (sha256 = fingerprint) and records their manifests; later mounts
    read at once, every block checked (diskparts.CheckedPart).
    """

    def __init__(self, client: ImageSource, directory: Path, disk: DiskCache | None = None,
                 images: Path | None = None, cache: BlockCache | None = None) -> None:
        super().__init__(client, directory, disk)
        self.images = images  # a local server's images folder: its split images' parts, in place
        self.cache = cache or BlockCache(16 << 20)  # checked blocks (the daemon's, in a mount)
        self._local: dict[str, LocalImage] = {}  # held open for the mount's life
        self._bad_local: set[str] = set()  # images whose own files failed a block's check
        self._ready: dict[tuple[str, tuple[int, ...]], Ready] = {}
        self.hashed = 0  # passes over both parts whole (no sealed manifests yet), for tests

    def open(self, fp: str, sizes: tuple[int, ...], index: int) -> CheckedPart:
        """A reader of one part, every block checked against the part's manifest."""
        while True:
            paths, manifests = ready = self._resolve(fp, sizes)
            try:
                return CheckedPart(paths[index], manifests[index], self.cache, f"{fp}.{index}",
                                   functools.partial(self._bad, (fp, sizes), ready))
            except FileNotFoundError:  # the disk cache's copy, evicted since: find another
                self._bad((fp, sizes), ready, evicted=True)

    def paths(self, fp: str, sizes: tuple[int, ...]) -> list[Path]:
        """The local files of both parts (see `_resolve`); read them through `open`."""
        return self._resolve(fp, sizes)[0]

    def _resolve(self, fp: str, sizes: tuple[int, ...]) -> Ready:
        """Both parts' files and manifests: the server's own, the disk cache's, or downloaded now.
        `sizes`: as this server's layout gives them. The fingerprint proves both parts' bytes
        together, not where one ends: parts split elsewhere (a download past the total, a kept
        or local copy of other sizes) are never served as this server's."""
        key = (fp, sizes)
        if (ready := self._ready.get(key)) is not None:
            return ready
        with self._lock_of(fp):
            if (ready := self._ready.get(key)) is not None:
                return ready
            sealed = self._sealed(fp, sizes)
            ready = self._open_local(fp, sizes, sealed) or self._kept(fp, sizes, sealed)
            if ready is None:
                final = [self.named(fp, str(i)) for i in range(2)]
                ready = final, self._download(fp, final, sizes)
                self._seal(fp, ready[1])
                if self.disk is not None:
                    self.disk.keep_parts(fp, final)
            self._ready[key] = ready
        return ready

    def _key(self, fp: str, part: int) -> ObjectKey:
        return ObjectKey(Sha256(fp), "manifest", self.server, part)

    def _sealed(self, fp: str, sizes: tuple[int, ...]) -> list[Manifest] | None:
        """Both parts' manifests, if an earlier verdict on this server's parts sealed them."""
        disk = self.disk
        found = [disk.manifest(fp, n, self._key(fp, i)) for i, n in enumerate(sizes)] if disk else [None]
        return [m for m in found if m is not None] if all(found) else None

    def _seal(self, fp: str, manifests: list[Manifest]) -> None:
        if self.disk is not None:
            for i, manifest in enumerate(manifests):
                self.disk.seal(manifest, self._key(fp, i))

    def _hashed(self, fp: str, paths: list[Path], what: str) -> list[Manifest] | None:
        """Both parts hashed whole: their manifests (sealed) if their sha256 is the fingerprint."""
        self.hashed += 1
        if (manifests := hash_parts(fp, paths, what)) is not None:
            self._seal(fp, manifests)
        return manifests

    def _open_local(self, fp: str, sizes: tuple[int, ...], sealed: list[Manifest] | None) -> Ready | None:
        """The server's own two files of a split image, served through the descriptors opened here
        (/proc/self/fd), so a file the server replaces later is not read in its place; nothing
        is copied. Hashed whole first unless this server's parts have sealed manifests."""
        if self.images is None or fp in self._bad_local:
            return None
        local = self._local.get(fp) or open_image(self.images, fp, size=sum(sizes))
        if local is None or [os.fstat(p.fd).st_size for p in local.parts] != list(sizes):
            if local is not None:  # unified, or parts divided elsewhere than this server's layout
                local.close()
            return None
        paths = [Path(f"/proc/self/fd/{p.fd}") for p in local.parts]
        manifests = sealed or self._hashed(fp, paths, "image files")
        if manifests is None:
            local.close()
            return None
        self._local[fp] = local
        log.debug("split image %s read from the server's own files", fp[:12])
        return paths, manifests

    def _kept(self, fp: str, sizes: tuple[int, ...], sealed: list[Manifest] | None) -> Ready | None:
        """The disk cache's copy of both parts (hashed whole first if no manifest is sealed)."""
        kept = diskparts.kept(self.disk, fp) if self.disk is not None else None
        if self.disk is None or kept is None or [p.stat().st_size for p in kept] != list(sizes):
            return None
        manifests = sealed or self._hashed(fp, kept, "the kept parts")
        if manifests is None:
            self.disk.drop_parts(fp)
            return None
        return kept, manifests

    def _bad(self, key: tuple[str, tuple[int, ...]], ready: Ready, evicted: bool = False) -> None:
        """A block of `ready` failed its check: that copy is not used again (the server's own
        files by this daemon; a spooled or kept copy is deleted), the next open finds another."""
        with self._lock:
            if self._ready.get(key) is not ready:
                return  # dropped already
            if ready[0][0].parent == Path("/proc/self/fd"):
                self._bad_local.add(key[0])
            elif not evicted:
                for path in ready[0]:
                    path.unlink(missing_ok=True)
                if self.disk is not None:
                    self.disk.drop_parts(key[0])  # the spool's files are linked there
            del self._ready[key]

    def remove(self) -> None:
        for local in self._local.values():
            local.close()
        super().remove()

