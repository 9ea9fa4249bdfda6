"""Open files of a mount: what each kind of file does with reads, writes and close."""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import os
import threading
from collections.abc import Callable

from lxdimagefs.data.diskparts import CheckedPart
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.commit import CommitOnClose
from lxdimagefs.upload.streamed import Upload

log = logging.getLogger(__name__)

MAX_EDIT = 1 << 20  # bytes a metadata.json (or an editor's temporary file) may hold


class Caching(enum.Enum):
    """How the kernel may cache an open file's pages (docs/SEMANTICS.md, "The page cache")."""

    DIRECT = "direct_io"  # every read(2) reaches the daemon: files whose bytes may change
    FRESH = "page cache, emptied at open"  # bytes being checked: no page of an earlier open kept
    KEEP = "page cache, kept"  # proven bytes: what the kernel holds stays valid


class HandleTable:
    """Open files by the number FUSE knows them by."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, handle: Handle) -> int:
        fh = next(self._next)
        with self._lock:
            self._handles[fh] = handle
        return fh

    def has(self, fh: int) -> bool:
        return fh in self._handles

    def get(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise fs_error(errno.EBADF, str(fh))
        return handle

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            try:
                handle.release()
            finally:
                handle.close()


class OpenFiles:
    """What a root does with open files: hand each call to its handle (the tree's and the forest's)."""

    handles: HandleTable

    def read(self, fh: int, offset: int, size: int) -> memoryview | bytes:
        return self.handles.get(fh).read(offset, size)

    def readinto(self, fh: int, offset: int, buf: memoryview) -> int:
        return self.handles.get(fh).readinto(offset, buf)

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        handle = self.handles.get(fh)
        handle.written = True
        return handle.write(offset, data)

    def flush(self, fh: int, pid: int) -> None:
        self.handles.get(fh).flush(pid)

    def release(self, fh: int) -> None:
        self.handles.release(fh)

    def caching(self, fh: int) -> Caching:
        return self.handles.get(fh).caching()


class Handle(CommitOnClose):
    """An open file. Subclasses implement what their file allows; commit.py, what its close means."""

    def __init__(self, opener: int = 0) -> None:
        super().__init__(opener)

    def read(self, offset: int, size: int) -> memoryview | bytes:
        raise fs_error(errno.EBADF, "read")

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset`; the bytes filled (a handle that can, reads straight into it)."""
        data = self.read(offset, len(buf))
        buf[:len(data)] = data
        return len(data)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        raise fs_error(errno.EBADF, "write")

    def truncate(self, length: int) -> None:
        raise fs_error(errno.EINVAL, "truncate")

    def close(self) -> None:
        """Free what the handle holds, once it is released."""

    def caching(self) -> Caching:
        return Caching.DIRECT


class DirHandle(Handle):
    """An open folder: what is told when it is closed."""

    def __init__(self, opener: int, on_close: Callable[[], None]) -> None:
        super().__init__(opener)
        self._on_close = on_close

    def close(self) -> None:
        self._on_close()


class BytesHandle(Handle):
    def __init__(self, data: bytes, opener: int = 0) -> None:
        super().__init__(opener)
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


class UnifiedHandle(Handle):
    """One open unified export, read through its own read-ahead."""

    def __init__(self, prefetcher: Prefetcher, opener: int = 0) -> None:
        super().__init__(opener)
        self.prefetcher = prefetcher

    def read(self, offset: int, size: int) -> memoryview | bytes:
        return self.prefetcher.read(offset, size)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.prefetcher.readinto(offset, buf)

    def close(self) -> None:
        self.prefetcher.close()

    def caching(self) -> Caching:
        # Unchecked bytes may enter the page cache too: every page the kernel fills is a read the
        # check counts, a failed check is EIO for every later read, and the kernel drops what it
        # holds of the file then (ImagesNode.forget_corrupt).
        return Caching.KEEP if self.prefetcher.verified else Caching.FRESH


class PartHandle(Handle):
    """One open part of a split image: every block it serves is checked against the part's
    manifest (verified), so the kernel may keep its pages."""

    def __init__(self, part: CheckedPart, opener: int = 0) -> None:
        super().__init__(opener)
        self.part = part

    def read(self, offset: int, size: int) -> memoryview | bytes:
        return self.part.read(offset, size)

    def close(self) -> None:
        self.part.close()

    def caching(self) -> Caching:
        return Caching.KEEP


class FileHandle(Handle):
    """A local file: a part being written into an import folder."""

    def __init__(self, path: str, flags: int = os.O_RDONLY, on_close: Callable[[], None] | None = None,
                 opener: int = 0, on_abandon: Callable[[str], None] | None = None) -> None:
        super().__init__(opener)
        self.fd = os.open(path, flags, 0o600)
        self._on_close, self._on_abandon = on_close, on_abandon
        self._committed = False  # an import's part its writer's close made part of the image

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        self._not_committed()
        return os.pwrite(self.fd, data, offset)

    def truncate(self, length: int) -> None:
        self._not_committed()
        os.ftruncate(self.fd, length)

    def _not_committed(self) -> None:
        """A change after the writer's close took the part would be lost without a word: EIO."""
        if self._committed:
            raise fs_error(errno.EIO, "import part", "changed after its writer's close took it")

    def pending(self) -> bool:
        return self._on_close is not None

    def commit(self) -> None:
        on_close, self._on_close = self._on_close, None
        self._committed = on_close is not None
        if on_close:
            on_close()

    def abandon(self, why: str) -> None:
        self._on_close = None
        if self._on_abandon:
            self._on_abandon(why)

    def close(self) -> None:
        os.close(self.fd)


class UploadHandle(Handle):
    def __init__(self, upload: Upload, finish: Callable[[Upload], None]) -> None:
        super().__init__(upload.writer)
        self.upload, self.finish = upload, finish
        self.done = False

    def write(self, offset: int, data: bytes | memoryview) -> int:
        return self.upload.write(offset, data)

    def truncate(self, length: int) -> None:
        if length != self.upload.size:
            raise fs_error(errno.ESPIPE, self.upload.name, "an import cannot be truncated once written")

    def pending(self) -> bool:
        return not self.done

    def commit(self) -> None:
        self.done = True
        self.finish(self.upload)

    def abandon(self, why: str) -> None:
        self.done = True
        self.upload.abort(f"{self.upload.name}: {why}")
        with contextlib.suppress(OSError):  # recorded in the .error file
            self.finish(self.upload)


class EditHandle(Handle):
    """metadata.json opened for writing, or an editor's temporary file beside it."""

    def __init__(self, data: bytearray, on_commit: Callable[[bytes], None] | None = None,
                 opener: int = 0) -> None:
        super().__init__(opener)
        self.data = data
        self.on_commit = on_commit
        self.dirty = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if offset + len(data) > MAX_EDIT:
            self.on_commit = None  # what was written is not the whole record: never save it
            raise fs_error(errno.EFBIG, "metadata.json", f"more than {MAX_EDIT} bytes")
        if offset > len(self.data):
            self.data.extend(b"\0" * (offset - len(self.data)))
        self.data[offset:offset + len(data)] = data
        self.dirty = True
        return len(data)

    def truncate(self, length: int) -> None:
        if length > MAX_EDIT:
            raise fs_error(errno.EFBIG, "metadata.json")
        del self.data[length:]
        self.data.extend(b"\0" * (length - len(self.data)))
        self.dirty = True

    def pending(self) -> bool:
        return self.dirty and self.on_commit is not None

    def commit(self) -> None:
        self.dirty = False
        if self.on_commit:
            self.on_commit(bytes(self.data))

    def abandon(self, why: str) -> None:
        self.dirty = False
        log.warning("an edit of metadata.json was not saved: %s", why)
