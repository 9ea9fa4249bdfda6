"""Open files of a mount: what each kind of file does with reads, writes and close."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

from .importer import Upload
from .reader import BLOCK, BlockCache

MAX_EDIT = 1 << 20  # bytes a metadata.json (or an editor's temporary file) may hold


def fs_error(code: int, what: str, message: str | None = None) -> OSError:
    """An OSError carrying the errno the system call should return."""
    return OSError(code, message or os.strerror(code), what)


class Handle:
    """An open file. Subclasses implement what their file allows."""

    opener = 0  # pid of the process that opened it: its flush commits

    def read(self, offset: int, size: int) -> bytes:
        raise fs_error(errno.EBADF, "read")

    def write(self, offset: int, data: bytes) -> int:
        raise fs_error(errno.EBADF, "write")

    def truncate(self, length: int) -> None:
        raise fs_error(errno.EINVAL, "truncate")

    def flush(self, pid: int) -> None:
        pass

    def close(self) -> None:
        pass


class BytesHandle(Handle):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


class UnifiedHandle(Handle):
    """One open unified export: grows its prefetch window while reads are sequential."""

    MAX_AHEAD_BYTES = 16 << 20

    def __init__(self, blocks: BlockCache, fp: str, size: int) -> None:
        self.blocks, self.fp, self.size = blocks, fp, size
        self._next = 0
        self._ahead = 0
        self._max_ahead = max(1, min(self.MAX_AHEAD_BYTES, blocks.capacity // 4) // BLOCK)

    def read(self, offset: int, size: int) -> bytes:
        # The kernel's readahead may skip a little ahead of the reader: still sequential.
        if offset == self._next or (self._next and 0 < offset - self._next <= 4 * BLOCK):
            self._ahead = min(max(1, self._ahead * 2), self._max_ahead)
        else:
            self._ahead = 0
        data = self.blocks.read(self.fp, self.size, offset, size, self._ahead)
        self._next = max(self._next, offset + len(data))
        return data


class FileHandle(Handle):
    """A local file: a split image's spooled part, or a part being written into an import folder."""

    def __init__(self, path: str, flags: int = os.O_RDONLY, on_close=None) -> None:
        self.fd = os.open(path, flags, 0o600)
        self._on_close = on_close

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
        self.upload, self.finish = upload, finish
        self.opener = upload.opener_pid
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

    def __init__(self, data: bytearray, on_commit=None) -> None:
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
