"""Creating images from files written under import/ (folders of parts: folders.py).

A unified image is streamed to LXD while it is written: each write goes
straight into the chunked body of `POST /1.0/images` (servers/chunked.py),
so nothing is held whole in memory nor copied to local disk.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
from typing import Any

from lxdimagefs import stats
from lxdimagefs.errors import ImportFailed, LXDError
from lxdimagefs.servers.protocol import ImageServer
from lxdimagefs.upload.ending import ending
from lxdimagefs.wire.chunked import ChunkedPost

log = logging.getLogger(__name__)

SNIFF_BYTES = 512
ROOTFS_KINDS = ("squashfs", "qcow2")  # a split image's second part

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
    """One file being written under import/, streamed to LXD as it arrives.

    Each write is sent before it returns, from the writer's own FUSE
    thread: the socket's send buffer is the only queue (sized by
    servers/chunked.py), so a chunk is never copied again nor handed to
    another thread, and a writer faster than LXD waits in its write.
    """

    def __init__(self, client: ImageServer, name: str, writer: int) -> None:
        self.client = client
        self.name = name
        self.writer = writer  # the process that opened it (fs/commit.py)
        self.size = 0
        self.fingerprint: str | None = None
        self.error: ImportFailed | None = None
        self._head = bytearray()
        self._post: ChunkedPost | None = None
        self._end: Any = None  # what checks the bytes end as the image they start ends (ending.py)
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes | memoryview) -> int:
        written = len(data)
        with self._lock:
            if self.error:
                raise self.error
            if offset != self.size:
                raise self._break(ImportFailed(errno.ESPIPE, f"{self.name}: imports are written once, "
                                                             f"in order (write at {offset}, expected "
                                                             f"{self.size})"))
            self.size += len(data)
            if self._post is None:
                self._head += data
                if len(self._head) < SNIFF_BYTES:
                    return written
                self._start()
                data = bytes(self._head)
                self._head.clear()
            self._send(data)
            return written

    def _start(self) -> None:
        """Check the first bytes are an image's, then open the request (nothing sent otherwise)."""
        kind = sniff(bytes(self._head))
        if kind is None:
            self.error = ImportFailed(errno.EINVAL, f"{self.name} is not an image: it starts with "
                                                    f"{bytes(self._head[:16])!r}, not a tarball, "
                                                    "squashfs or qcow2")
            raise self.error
        self._end = ending(kind)
        try:
            self._post = self.client.start_upload(self.client.upload_headers(final_name(self.name)))
        except BaseException as e:
            raise self._break(failure(e)) from None
        if self.error:  # broken off (abort takes no lock) while the request was being opened
            raise self._break(self.error)

    def _send(self, data: bytes | memoryview) -> None:
        assert self._post is not None  # sent only after _start
        self._end.feed(data)
        try:
            self._post.send(data)
        except BaseException as e:
            raise self._break(failure(e)) from None

    def commit(self) -> str:
        """Finish the upload and wait for LXD's verdict; returns the fingerprint."""
        with self._lock:
            if self.error:
                raise self._break(self.error)  # and the request, if one is open, is closed
            if self._post is None:
                self._start()  # short file: sniff what there is
                if self._head:
                    self._send(bytes(self._head))
            post = self._post
            assert post is not None
            early = self._end.ended_early(self.size)
            if early:  # a writer that failed part-way and closed: LXD would take a cut tarball
                log.warning("%s: %s: broken off, nothing created", self.name, early)
                raise self._break(ImportFailed(errno.EINVAL, f"{self.name}: {early}: not a whole "
                                                             "image, nothing was created"))
            try:
                with stats.underway("import", self.name):  # LXD unpacks and checks it
                    self.fingerprint = self.client.finish_upload(post)
            except BaseException as e:
                if not already_held(e):
                    stats.add("imports", result="failed")
                    raise self._break(failure(e)) from None
                log.info("%s: LXD holds this image already: nothing to do", self.name)
            finally:
                post.close()
        stats.add("imports", result="created" if self.fingerprint else "held already")
        if self.fingerprint:
            log.info("imported %s as %s", self.name, self.fingerprint)
        return self.fingerprint or ""

    def abort(self, reason: str) -> None:
        """Stop sending: LXD sees a truncated body and creates nothing.

        Not under the lock: a write blocked on a full socket ends at once (EPIPE) when the
        connection closes.
        """
        self._break(ImportFailed(errno.EIO, reason))

    def _break(self, error: ImportFailed) -> ImportFailed:
        """Close the request (LXD sees a cut body); the error in force, the first one given."""
        if self.error is None:
            self.error = error
        if self._post is not None:
            self._post.close()
        return self.error
