"""Creating images from files written under import/.

A unified image is streamed to LXD while it is written: the writer's bytes go
through a small bounded queue into the body of `POST /1.0/images`, so nothing
is held whole in memory nor copied to local disk. A split image (a folder of
two files) cannot be streamed, as LXD wants the metadata part first and the
user may write either first: its parts are spooled, then sent as one
multipart upload.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from requests_toolbelt import MultipartEncoder

from lxdimagefs.errors import ImportFailed, LXDError
from lxdimagefs.names import METADATA, is_fingerprint
from lxdimagefs.servers.protocol import ImageServer

log = logging.getLogger(__name__)

SNIFF_BYTES = 512
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


def sniff(head: bytes) -> str | None:
    """The image format these first bytes start, or None for anything else (JSON, text, …)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def _failure(e: BaseException) -> ImportFailed:
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

    def __init__(self, client: ImageServer, name: str, opener_pid: int) -> None:
        self.client = client
        self.name = name
        self.opener_pid = opener_pid
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
            self.fingerprint = self.client.create_image(self._body(), self.client.upload_headers(self.name))
        except BaseException as e:
            self.error = _failure(e)
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


class FolderImport:
    """A folder under import/: the two parts of a split image, or a copied image folder.

    Parts are spooled to local files; the image is created once two image
    files are written and closed. A folder named by a fingerprint is a copy
    of an image folder (`cp -r MOUNT/by-fingerprint/<fp> import/`): it is
    created once its export file(s) and its metadata.json are closed, with
    the `public` flag and `properties` of that record.
    """

    def __init__(self, client: ImageServer, name: str, spool: Path) -> None:
        self.client = client
        self.name = name
        self.spool = spool
        self.files: dict[str, int] = {}  # name -> size written
        self.open_files: set[str] = set()
        self.fingerprint: str | None = None
        self.lock = threading.Lock()
        self.finishing = False  # one close, of however many at once, finishes the folder

    def path(self, name: str) -> Path:
        return self.spool / name

    def ready(self) -> bool:
        closed = [n for n in self.files if n not in self.open_files]
        images = [n for n in closed if n != METADATA]
        if is_fingerprint(self.name):  # a copied image folder: its record comes with it
            expected = 2 if any(n.startswith("meta-") for n in self.files) else 1
            return METADATA in closed and len(images) >= expected
        return len(images) >= 2

    def commit(self) -> str:
        parts = [n for n in self.files if n != METADATA]
        kinds = {}
        for n in parts:
            with open(self.path(n), "rb") as f:
                kinds[n] = sniff(f.read(SNIFF_BYTES))
            if kinds[n] is None:
                raise ImportFailed(errno.EINVAL, f"{self.name}/{n} is not an image file")
        public, properties = False, None
        if METADATA in self.files:
            public, properties = _copied_record(self.name, self.path(METADATA).read_bytes())
        headers = self.client.upload_headers(self.name, public, properties)
        try:
            if len(parts) == 1:
                with open(self.path(parts[0]), "rb") as f:
                    self.fingerprint = self.client.create_image(f, headers)
                return self.fingerprint
            rootfs = [n for n in parts if kinds[n] in ("squashfs", "qcow2")]
            meta = [n for n in parts if n not in rootfs]
            if len(rootfs) != 1 or len(meta) != 1:
                raise ImportFailed(errno.EINVAL, f"{self.name}: a split image is one metadata tarball "
                                                 "and one squashfs or qcow2 rootfs")
            with open(self.path(meta[0]), "rb") as m, open(self.path(rootfs[0]), "rb") as r:
                field = "rootfs.img" if kinds[rootfs[0]] == "qcow2" else "rootfs"
                form = MultipartEncoder(fields={
                    "metadata": (meta[0], m, "application/octet-stream"),
                    field: (rootfs[0], r, "application/octet-stream")})
                headers["Content-Type"] = form.content_type
                self.fingerprint = self.client.create_image(form, headers)
            return self.fingerprint
        except LXDError as e:
            raise _failure(e) from e

    def remove_spool(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)


def _copied_record(folder: str, data: bytes) -> tuple[bool, dict[str, str] | None]:
    """The public flag and properties of a copied image folder's metadata.json, checked as LXD would."""
    try:
        record = json.loads(data)
    except ValueError as e:
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json is not JSON: {e}") from None
    if not isinstance(record, dict):
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json: json: cannot unmarshal "
                                         f"{type(record).__name__} into an image record")
    properties = record.get("properties") or None
    if properties is not None and (not isinstance(properties, dict)
                                   or not all(isinstance(v, str) for v in properties.values())):
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json: properties must be an object "
                                         "of strings")
    return bool(record.get("public")), properties
