"""The directory tree of a mount, as plain Python: paths in, attributes,
listings, link targets and bytes out. It knows nothing of FUSE; refusals
are OSErrors carrying the errno the system call should return.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .catalog import Catalog
from .client import ExportPart, Image
from .names import fits
from .reader import BLOCK, BlockCache, IntegrityError, SplitSpool

FP_DIR = "by-fingerprint"
ALIAS_DIR = "by-alias"
IMPORT_DIR = "import"
METADATA = "metadata.json"


@dataclass(frozen=True)
class Attr:
    mode: int
    size: int
    mtime: float
    atime: float
    ctime: float
    nlink: int = 1
    blksize: int = 4096


class Handle(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...
    def close(self) -> None: ...


def render_metadata(image: Image) -> bytes:
    """The image record: pretty-printed, stable key order, trailing newline."""
    return (json.dumps(image.record, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class _BytesHandle:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]

    def close(self) -> None:
        pass


class _UnifiedHandle:
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

    def close(self) -> None:
        pass


class _SpoolHandle:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class Tree:
    def __init__(self, catalog: Catalog, blocks: BlockCache, spool: SplitSpool,
                 uid: int | None = None, gid: int | None = None) -> None:
        self.catalog = catalog
        self.blocks = blocks
        self.spool = spool
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.started = time.time()
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        self._lock = threading.Lock()

    # -- lookups ------------------------------------------------------------

    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _image(self, name: str, path: str) -> Image:
        try:
            return self.catalog.resolve(name)
        except OSError as e:
            raise _err(e.errno or errno.ENOENT, path) from None

    def _part(self, image: Image, name: str, path: str) -> tuple[int, ExportPart]:
        layout = self.catalog.layout(image.fingerprint)
        for i, part in enumerate(layout.parts):
            if part.name == name:
                return i, part
        raise _err(errno.ENOENT, path)

    def _dir(self, mtime: float, nlink: int = 2) -> Attr:
        return Attr(stat.S_IFDIR | 0o555, 0, mtime, mtime, mtime, nlink)

    def getattr(self, path: str) -> Attr:
        parts = self.split(path)
        if not parts:
            return self._dir(self.started, 5)
        top, rest = parts[0], parts[1:]
        if top in (ALIAS_DIR, IMPORT_DIR) and not rest:
            return self._dir(self.started)
        if top == FP_DIR:
            snap = self.catalog.snapshot()
            if not rest:
                newest = max((i.uploaded_at for i in snap.images.values()), default=self.started)
                return self._dir(newest, 2 + len(snap.images))
            image = self._image(rest[0], path)
            up = image.uploaded_at
            used = image.last_used_at or up
            if len(rest) == 1:
                return Attr(stat.S_IFDIR | 0o555, 0, up, used, up, 2)
            if len(rest) == 2:
                if rest[1] == METADATA:
                    return Attr(stat.S_IFREG | 0o444, len(render_metadata(image)), up, used, up)
                _, part = self._part(image, rest[1], path)
                return Attr(stat.S_IFREG | 0o444, part.size, up, used, up, blksize=BLOCK)
        if top == ALIAS_DIR and len(rest) == 1:
            target = self.readlink(path)
            return Attr(stat.S_IFLNK | 0o777, len(target.encode()), self.started, self.started, self.started)
        raise _err(errno.ENOENT, path)

    def readdir(self, path: str) -> list[str]:
        parts = self.split(path)
        if not parts:
            return [FP_DIR, ALIAS_DIR, IMPORT_DIR]
        if parts == [FP_DIR]:
            return sorted(self.catalog.snapshot().images)
        if parts == [ALIAS_DIR]:
            return sorted(self.catalog.snapshot().aliases)
        if parts == [IMPORT_DIR]:
            return []
        if parts[0] == FP_DIR and len(parts) == 2:
            image = self._image(parts[1], path)
            return [METADATA] + [p.name for p in self.catalog.layout(image.fingerprint).parts]
        attr = self.getattr(path)  # ENOENT for what is not there, ENOTDIR for the rest
        raise _err(errno.ENOTDIR if not stat.S_ISDIR(attr.mode) else errno.ENOENT, path)

    def readlink(self, path: str) -> str:
        parts = self.split(path)
        if len(parts) == 2 and parts[0] == ALIAS_DIR and fits(parts[1]):
            fp = self.catalog.snapshot().aliases.get(parts[1])
            if fp is not None:
                return f"../{FP_DIR}/{fp}"
            raise _err(errno.ENOENT, path)
        self.getattr(path)
        raise _err(errno.EINVAL, path)

    # -- reading --------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            self.getattr(path)
            raise _err(errno.EROFS, path)
        parts = self.split(path)
        if len(parts) != 3 or parts[0] != FP_DIR:
            attr = self.getattr(path)
            raise _err(errno.EISDIR if stat.S_ISDIR(attr.mode) else errno.EINVAL, path)
        image = self._image(parts[1], path)
        if image.fingerprint in self.blocks.corrupt and parts[2] != METADATA:
            raise IntegrityError(image.fingerprint)
        handle: Handle
        if parts[2] == METADATA:
            handle = _BytesHandle(render_metadata(image))
        else:
            index, part = self._part(image, parts[2], path)
            if self.catalog.layout(image.fingerprint).split:
                handle = _SpoolHandle(str(self.spool.paths(image.fingerprint)[index]))
            else:
                handle = _UnifiedHandle(self.blocks, image.fingerprint, part.size)
        fh = next(self._next_fh)
        with self._lock:
            self._handles[fh] = handle
        return fh

    def is_export(self, path: str) -> bool:
        parts = self.split(path)
        return len(parts) == 3 and parts[0] == FP_DIR and parts[2] != METADATA

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise _err(errno.EBADF, str(fh))
        return handle.read(offset, size)

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    def statfs(self) -> dict[str, int]:
        snap = self.catalog.snapshot()
        used = sum(i.size for i in snap.images.values())
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": (used + BLOCK - 1) // BLOCK,
                "f_bfree": 0, "f_bavail": 0, "f_files": len(snap.images), "f_ffree": 0,
                "f_namemax": 255}
