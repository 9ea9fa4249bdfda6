"""Open files of a mount: what each kind of file does with reads, writes and close."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
from collections.abc import Callable

from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.data.uploads import Upload
from lxdimagefs.errors import fs_error

MAX_EDIT = 1 << 20  # bytes a metadata.json (or an editor's temporary file) may hold


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
            handle.close()


class OpenFiles:
    """What a root does with open files: hand each call to its handle (the tree's and the forest's)."""

    handles: HandleTable

    def read(self, fh: int, offset: int, size: int) -> memoryview | bytes:
        return self.handles.get(fh).read(offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self.handles.get(fh).write(offset, data)

    def flush(self, fh: int, pid: int) -> None:
        self.handles.get(fh).flush(pid)

    def release(self, fh: int) -> None:
        self.handles.release(fh)

    def page_cache(self, fh: int) -> bool:
        return self.handles.get(fh).page_cache()


class Handle:
    """An open file. Subclasses implement what their file allows."""

    def __init__(self, opener: int = 0) -> None:
        self.opener = opener  # pid of the process that opened it: its flush commits

    def read(self, offset: int, size: int) -> memoryview | bytes:
        raise fs_error(errno.EBADF, "read")

    def write(self, offset: int, data: bytes) -> int:
        raise fs_error(errno.EBADF, "write")

    def truncate(self, length: int) -> None:
        raise fs_error(errno.EINVAL, "truncate")

    def flush(self, pid: int) -> None:
        pass

    def close(self) -> None:
        pass

    def page_cache(self) -> bool:
        """Whether the kernel may keep this file's pages: only for bytes already proven."""
        return False


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

    def close(self) -> None:
        self.prefetcher.close()

    def page_cache(self) -> bool:
        return self.prefetcher.verified


class FileHandle(Handle):
    """A local file: a split image's spooled part, or a part being written into an import folder."""

    def __init__(self, path: str, flags: int = os.O_RDONLY, on_close: Callable[[], None] | None = None,
                 opener: int = 0, verified: bool = False) -> None:
        super().__init__(opener)
        self.fd = os.open(path, flags, 0o600)
        self._on_close = on_close
        self.verified = verified  # a spooled part, checked against the fingerprint before use

    def page_cache(self) -> bool:
        return self.verified

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        return os.pwrite(self.fd, data, offset)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def flush(self, pid: int) -> None:
        if pid == self.opener and self._on_close:
            on_close, self._on_close = self._on_close, None
            on_close()

    def close(self) -> None:
        os.close(self.fd)
        if self._on_close:
            self._on_close()


class UploadHandle(Handle):
    def __init__(self, upload: Upload, finish: Callable[[Upload], None]) -> None:
        super().__init__(upload.opener_pid)
        self.upload, self.finish = upload, finish
        self.done = False

    def write(self, offset: int, data: bytes) -> int:
        return self.upload.write(offset, data)

    def truncate(self, length: int) -> None:
        if length != self.upload.size:
            raise fs_error(errno.ESPIPE, self.upload.name, "an import cannot be truncated once written")

    def flush(self, pid: int) -> None:
        if pid == self.opener and not self.done:
            self.done = True
            self.finish(self.upload)

    def close(self) -> None:
        if not self.done:  # the opener never closed it: no telling whether it is whole
            self.done = True
            self.upload.abort(f"{self.upload.name} was released without its writer closing it")
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

    def write(self, offset: int, data: bytes) -> int:
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

    def flush(self, pid: int) -> None:
        if pid == self.opener and self.dirty and self.on_commit:
            self.dirty = False
            self.on_commit(bytes(self.data))
