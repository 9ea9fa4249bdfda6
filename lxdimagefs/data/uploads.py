"""Creating images from files written under import/ (folders of parts: folders.py).

A unified image is streamed to LXD while it is written: the writer's bytes go
through a small bounded queue into the body of `POST /1.0/images`, so nothing
is held whole in memory nor copied to local disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import re
import threading
from collections.abc import Iterator

from lxdimagefs.errors import ImportFailed, LXDError
from lxdimagefs.servers.lxd import LXDClient

log = logging.getLogger(__name__)

SNIFF_BYTES = 512
ROOTFS_KINDS = ("squashfs", "qcow2")  # a split image's second part
_BREAK = object()  # a queue item that is never data

# First bytes of what LXD accepts as an image file (or part of one).
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
    (b"hsqs", "squashfs"),
    (b"QFI\xfb", "qcow2"),
)


_RSYNC_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9]{6}")  # rsync writes NAME as .NAME.XXXXXX


def final_name(name: str) -> str:
    """The file name LXD records for an upload: rsync's NAME for its temporary .NAME.XXXXXX."""
    m = _RSYNC_TEMPORARY.fullmatch(name)
    return m.group(1) if m else name


def sniff(head: bytes) -> str | None:
    """The image format these first bytes start, or None for anything else (JSON, text, …)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def already_held(e: BaseException) -> bool:
    """LXD's refusal of an image it holds already: for an import, nothing left to do."""
    return isinstance(e, LXDError) and "same fingerprint already exists" in e.message.lower()


def failure(e: BaseException) -> ImportFailed:
    if isinstance(e, ImportFailed):
        return e
    if isinstance(e, LXDError):
        code = e.errno if e.status else errno.EIO
        if code == errno.ENOENT:  # LXD looked for something in the upload that is not there
            code = errno.EINVAL
        return ImportFailed(code, e.message)
    return ImportFailed(errno.EIO, str(e))


class Upload:
    """One file being written under import/, streamed to LXD as it arrives."""

    QUEUE_CHUNKS = 8

    def __init__(self, client: LXDClient, name: str, writer: int) -> None:
        self.client = client
        self.name = name
        self.writer = writer  # the process that opened it (fs/commit.py)
        self.size = 0
        self.fingerprint: str | None = None
        self.error: ImportFailed | None = None
        self._head = bytearray()
        self._queue: queue.Queue[bytes | object | None] = queue.Queue(self.QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> int:
        written = len(data)
        with self._lock:
            if self.error:
                raise self.error
            if offset != self.size:
                self._break(ImportFailed(errno.ESPIPE, f"{self.name}: imports are written once, in "
                                                       f"order (write at {offset}, expected {self.size})"))
                raise self.error  # type: ignore[misc]
            self.size += len(data)
            if self._thread is None:
                self._head += data
                if len(self._head) < SNIFF_BYTES:
                    return written
                self._start()
                data = bytes(self._head)
                self._head.clear()
            self._put(data)
            return written

    def _start(self) -> None:
        kind = sniff(bytes(self._head))
        if kind is None:
            self.error = ImportFailed(errno.EINVAL, f"{self.name} is not an image: it starts with "
                                                    f"{bytes(self._head[:16])!r}, not a tarball, "
                                                    "squashfs or qcow2")
            raise self.error
        self._thread = threading.Thread(target=self._send, name=f"upload {self.name}", daemon=True)
        self._thread.start()

    def _put(self, data: bytes) -> None:
        while True:
            if self.error:
                raise self.error
            try:
                self._queue.put(data, timeout=0.5)
                return
            except queue.Full:
                if self._done.is_set():  # LXD stopped reading: its answer says why
                    raise self.error or ImportFailed(errno.EIO, "LXD stopped reading the upload") from None

    def _body(self) -> Iterator[bytes]:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if chunk is _BREAK:  # cut the body short: LXD sees a broken upload and creates nothing
                raise self.error or ImportFailed(errno.EIO, "upload broken off")
            yield chunk

    def _send(self) -> None:
        try:
            headers = self.client.upload_headers(final_name(self.name))
            self.fingerprint = self.client.create_image(self._body(), headers)
        except BaseException as e:
            if already_held(e):
                log.info("%s: LXD holds this image already: nothing to do", self.name)
            else:
                self.error = failure(e)
        finally:
            self._done.set()

    def commit(self) -> str:
        """Finish the upload and wait for LXD's verdict; returns the fingerprint."""
        with self._lock:
            if self.error:
                raise self.error
            if self._thread is None:
                self._start()  # short file: sniff what there is
                if self._head:
                    self._put(bytes(self._head))
            self._put_end()
        self._done.wait()
        if self.error:
            raise self.error
        if self.fingerprint:
            log.info("imported %s as %s", self.name, self.fingerprint)
        return self.fingerprint or ""

    def _put_end(self) -> None:
        while not self._done.is_set():
            try:
                self._queue.put(None, timeout=0.5)
                return
            except queue.Full:
                continue

    def abort(self, reason: str) -> None:
        """Stop sending: LXD sees a truncated body and creates nothing."""
        with self._lock:
            self._break(ImportFailed(errno.EIO, reason))
        self._done.wait(self.client.conn.timeout[1])

    def _break(self, error: ImportFailed) -> None:
        if self.error is None:
            self.error = error
        if self._thread is None:
            self._done.set()
            return
        while not self._done.is_set():
            try:
                self._queue.put(_BREAK, timeout=0.1)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()  # make room: these bytes will never be sent
