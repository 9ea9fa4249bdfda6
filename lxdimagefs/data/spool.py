"""Split exports, downloaded once to a private local spool and verified before use."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

from lxdimagefs.data.diskcache import DiskCache
from lxdimagefs.errors import IntegrityError, LXDError
from lxdimagefs.keys import ObjectKey, Sha256
from lxdimagefs.servers.localfiles import LocalImage, open_image
from lxdimagefs.servers.protocol import ImageSource
from lxdimagefs.wire.multipart import PartStream
from lxdimagefs.wire.rest import RestSession

log = logging.getLogger(__name__)


class SplitSpool:
    """Split exports, downloaded once to local files and shared by all readers.

    LXD serves a split export only as one multipart stream, without ranges
    or part sizes, so random access needs a local copy. The download is
    verified against the fingerprint before anyone reads it. The spool is
    private to this mount and removed when it ends.
    """

    def __init__(self, client: ImageSource, directory: Path, disk: DiskCache | None = None,
                 images: Path | None = None) -> None:
        self.client = client
        self.directory = directory
        self.server = client.conn.identity()
        self.disk = disk  # where verified parts are kept for later mounts
        self.images = images  # a local server's images folder: its split images' parts, in place
        self._local: dict[str, LocalImage] = {}  # verified, held open for the mount's life
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.downloads = 0

    def _named(self, fp: str, suffix: str) -> Path:
        """A spool file, named by its key (server and fingerprint), never by what a server sent."""
        return self.directory / f"{ObjectKey(Sha256(fp), 'spool', self.server).filename}.{suffix}"

    def paths(self, fp: str, sizes: tuple[int, ...]) -> list[Path]:
        """The local files of both parts: this mount's spool, the disk cache's, or downloaded now.

        `sizes`: the parts' sizes as this server's layout gives them. The fingerprint proves both
        parts' bytes together, not where one ends: parts split elsewhere (a download past the
        total, a kept or local copy of other sizes) are never served as this server's."""
        final = [self._named(fp, str(i)) for i in range(2)]
        if all(p.exists() for p in final):
            return final
        with self._lock:
            lock = self._locks.setdefault(fp, threading.Lock())
        with lock:
            local = self._local.get(fp) or self._open_local(fp, sizes)
            if local is not None:
                return [Path(f"/proc/self/fd/{p.fd}") for p in local.parts]
            kept = self.disk.parts(fp) if self.disk is not None else None
            if kept is not None and [p.stat().st_size for p in kept] == list(sizes):
                return kept
            if not all(p.exists() for p in final):
                self._download(fp, final, sizes)
                if self.disk is not None:
                    self.disk.keep_parts(fp, final)
        return final

    def _open_local(self, fp: str, sizes: tuple[int, ...]) -> LocalImage | None:
        """The server's own two files of a split image, if their sha256 (part 0, then part 1) is the
        fingerprint. They are served through the descriptors checked here (/proc/self/fd), so a
        file the server replaces later is not read in its place; nothing is copied."""
        if self.images is None:
            return None
        local = open_image(self.images, fp, size=sum(sizes))
        if local is None or [os.fstat(p.fd).st_size for p in local.parts] != list(sizes):
            if local is not None:  # unified, or parts divided elsewhere than this server's layout
                local.close()
            return None
        digest = hashlib.sha256()
        buf = bytearray(PartWriter.BATCH)
        try:
            for part, f in enumerate(local.parts):
                for offset in range(0, f.size, len(buf)):
                    n = local.readinto(offset, buf, part)
                    digest.update(memoryview(buf)[:n])
        except OSError as e:
            log.warning("image files of %s unreadable (%s): downloading its export", fp[:12], e.strerror)
            local.close()
            return None
        if digest.hexdigest() != fp:
            log.error("image files of %s do not hash to its fingerprint: downloading its export", fp)
            local.close()
            return None
        self._local[fp] = local
        log.debug("split image %s read from the server's own files", fp[:12])
        return local

    def unified(self, fp: str, size: int) -> Path:
        """A unified export as a local file, for readers that need a file descriptor of their own."""
        final = self._named(fp, "whole")
        with self._lock:
            lock = self._locks.setdefault(fp, threading.Lock())
        with lock:
            kept = self.disk.whole(fp, size) if self.disk is not None else None
            if kept is not None:
                return kept
            if not final.exists():
                self._download_unified(fp, size, final)
                if self.disk is not None:
                    self.disk.keep_whole(fp, final)
        return final

    def _download_unified(self, fp: str, size: int, final: Path) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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

    def _download(self, fp: str, final: list[Path], sizes: tuple[int, ...]) -> None:
        size, first = sum(sizes), sizes[0]
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            if digest != fp or os.fstat(fds[0]).st_size != first:  # the bytes, and where part 1 starts
                raise IntegrityError(fp)
            for t, f in zip(tmp, final, strict=True):
                os.replace(t, f)
            log.debug("spooled %s (%d bytes)", fp, sum(f.stat().st_size for f in final))
        finally:
            writer.close()
            for fd in fds:
                os.close(fd)
            for t in tmp:
                t.unlink(missing_ok=True)

    def remove(self) -> None:
        for local in self._local.values():
            local.close()
        self._local.clear()
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


class PartWriter:
    """Writes a split export's parts to their files and hashes them, on a thread of its own.

    The multipart parser hands over small pieces; they are gathered into
    4 MiB batches, and each batch is written and hashed while the next is
    received, so the download runs close to the socket's speed.
    """

    BATCH = 4 << 20

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self._pieces: list[memoryview] = []
        self._size = 0
        self._fd: int | None = None
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, data = item
            if self._error is None:
                try:
                    self.hash.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as e:
                    self._error = e

    def start(self, fd: int) -> None:
        self.flush()
        self._fd = fd

    def add(self, piece: memoryview) -> None:
        self._pieces.append(piece)
        self._size += len(piece)
        if self._size >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pieces and self._fd is not None:
            self._queue.put((self._fd, b"".join(self._pieces)))
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
