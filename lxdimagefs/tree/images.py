"""by-fingerprint/: one folder per image, its record and its export file(s).

Changes accepted here: metadata.json edits (directly, or through an
editor's scratch file renamed over it); deleting and refreshing an image
(tree/delete_refresh.py): under `-o allow_delete`, `rmdir`, or `rm -r`, whose
unlinks of the files in the folder it holds open only hide them until its
`rmdir`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import Counter

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import BytesHandle, Caching, EditHandle, Handle, PartHandle, UnifiedHandle
from lxdimagefs.fs.node import Attr, Context, Fading, check_name
from lxdimagefs.names import METADATA
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.records import ExportPart, Image
from lxdimagefs.tree import xattrs
from lxdimagefs.tree.delete_refresh import FP_DIR, DeleteAndRefresh
from lxdimagefs.tree.metadata import Records, render

log = logging.getLogger(__name__)


def is_public(image: Image) -> bool:
    """LXD's rule: a public image is anyone's to read; a private one, its owner's (the mounter's)."""
    return image.record.get("public") is True


class UnifiedOpens:
    """Opens of unified exports, and the paths opened before their check ended: if it fails, the
    kernel drops the pages it was handed, so a reader that keeps the file open gets EIO again."""

    def __init__(self, ctx: Context, exports: Exports) -> None:
        self.ctx, self.exports = ctx, exports
        self._checking: dict[str, set[str]] = {}  # export key -> paths opened before its verdict
        self._lock = threading.Lock()
        exports.verification.on_corrupt.append(self.corrupt)

    def open(self, key: str, size: int, path: str, pid: int) -> UnifiedHandle:
        handle = UnifiedHandle(self.exports.unified(key, size), opener=pid)
        with self._lock:
            if handle.caching() is Caching.FRESH:
                self._checking.setdefault(key, set()).add(path)
            else:
                self._checking.pop(key, None)
        return handle

    def corrupt(self, key: str) -> None:
        with self._lock:
            paths = self._checking.pop(key, set())
        for path in paths:
            self.ctx.on_change(path)


class ImagesNode(DeleteAndRefresh):
    """Shows the folders, opens their files, edits their records; tree/delete_refresh.py deletes."""

    def __init__(self, ctx: Context, catalog: Catalog, exports: Exports) -> None:
        super().__init__(ctx, FP_DIR)
        self.catalog = catalog
        self.exports = exports
        self.records = Records(catalog, ctx)
        self._lock = threading.Lock()
        self._scratch: dict[tuple[str, str], bytearray] = {}  # editors' temporary files
        self._hidden: set[tuple[str, str]] = set()  # files unlinked by `rm -r` before its rmdir
        self._open_dirs: Counter[tuple[str, int]] = Counter()  # (fp, pid): image folders held open
        self._replaced = Fading()  # image folders a refresh just replaced
        self._unified = UnifiedOpens(ctx, exports)

    # -- lookups ----------------------------------------------------------------

    def image(self, name: str, path: str) -> Image:
        try:
            return self.catalog.resolve(name)
        except OSError as e:
            raise fs_error(e.errno or errno.ENOENT, path) from None

    def _part(self, image: Image, name: str, path: str) -> tuple[int, ExportPart]:
        if (image.fingerprint, name) not in self._hidden:
            for i, part in enumerate(self.catalog.layout(image.fingerprint).parts):
                if part.name == name:
                    return i, part
        raise fs_error(errno.ENOENT, path)

    def getattr(self, rest: list[str]) -> Attr:
        snap = self.catalog.snapshot()
        if not rest:
            newest = max((i.uploaded_at for i in snap.images.values()), default=self.ctx.started)
            # Writable by the mounter: rmdir of an image folder needs it under default_permissions.
            return self.ctx.dir(newest, 2 + len(snap.images), writable=True)
        if len(rest) == 1 and rest[0] not in snap.images and self._replaced.get(rest[0]):
            return self.ctx.dir(time.time())
        image = self.image(rest[0], self.path(rest))
        up = image.uploaded_at
        used = image.last_used_at or up
        public = is_public(image)
        if len(rest) == 1:
            return Attr(self.ctx.dir_mode(public), 0, up, used, up, 2)
        if len(rest) != 2:
            raise fs_error(errno.ENOENT, self.path(rest))
        key = (image.fingerprint, rest[1])
        with self._lock:
            scratch = self._scratch.get(key)
            hidden = key in self._hidden
        if scratch is not None:
            return Attr(stat.S_IFREG | 0o600, len(scratch), time.time(), used, up)
        if rest[1] == METADATA and not hidden:
            return Attr(stat.S_IFREG | self.ctx.file_mode(public), len(render(image)), up, used, up)
        _, part = self._part(image, rest[1], self.path(rest))
        return Attr(stat.S_IFREG | self.ctx.file_mode(public), part.size, up, used, up, blksize=BLOCK)

    def readdir(self, rest: list[str]) -> list[str]:
        if not rest:
            return sorted(self.catalog.listing().images)
        if len(rest) != 1:
            self.getattr(rest)
            raise fs_error(errno.ENOTDIR, self.path(rest))
        fp = self.image(rest[0], self.path(rest)).fingerprint
        names = [METADATA] + [p.name for p in self.catalog.layout(fp).parts]
        with self._lock:
            return [n for n in names if (fp, n) not in self._hidden] + sorted(
                name for key, name in self._scratch if key == fp)

    def _is_scratch(self, rest: list[str]) -> bool:
        with self._lock:
            return len(rest) == 2 and any(k[1] == rest[1] and k[0].startswith(rest[0]) for k in self._scratch)

    # -- reading ------------------------------------------------------------------

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            return self._open_for_writing(rest, flags, pid)
        path = self.path(rest)
        image = self.image(rest[0], path)
        with self._lock:
            scratch = self._scratch.get((image.fingerprint, rest[1]))
        if scratch is not None:
            return EditHandle(scratch, opener=pid)
        if rest[1] == METADATA:
            return BytesHandle(self.records.read(image, pid), opener=pid)
        index, part = self._part(image, rest[1], path)
        if part.key is not None:  # a file read on its own, checked against its own sha256
            return self._unified.open(part.key, part.size, path, pid)
        if self.catalog.layout(image.fingerprint).split:
            sizes = tuple(p.size for p in self.catalog.layout(image.fingerprint).parts)
            return PartHandle(self.exports.spool.open(image.fingerprint, sizes, index), opener=pid)
        return self._unified.open(image.fingerprint, part.size, path, pid)

    def _open_for_writing(self, rest: list[str], flags: int, pid: int) -> Handle:
        path = self.path(rest)
        image = self.image(rest[0], path)
        key = (image.fingerprint, rest[1])
        with self._lock:
            scratch = self._scratch.get(key)
            if scratch is not None and flags & os.O_TRUNC:
                scratch.clear()
        if scratch is not None:
            return EditHandle(scratch, opener=pid)
        if rest[1] != METADATA:
            raise self.ctx.refuse(errno.EACCES, "write", path, "an export's bytes are LXD's: read-only")
        # The base for detecting others' changes stays the record this process last read.
        data = bytearray() if flags & os.O_TRUNC else bytearray(render(image))
        self.records.opened_for_writing(image, pid)
        fp = image.fingerprint

        def save(new: bytes) -> None:
            self._save(fp, new, pid)
        handle = EditHandle(data, save, opener=pid)
        handle.dirty = bool(flags & os.O_TRUNC)
        return handle

    # -- changes --------------------------------------------------------------------

    def create(self, rest: list[str], flags: int, pid: int) -> Handle:
        if len(rest) != 2:
            return super().create(rest, flags, pid)
        check_name(rest[1], self.path(rest))
        fp = self.image(rest[0], self.path(rest)).fingerprint
        with self._lock:
            data = self._scratch[(fp, rest[1])] = bytearray()
        return EditHandle(data, opener=pid)

    def truncate(self, rest: list[str], length: int) -> None:
        path = self.path(rest)
        self.getattr(rest)
        if len(rest) == 2:
            key = (self.image(rest[0], path).fingerprint, rest[1])
            with self._lock:
                scratch = self._scratch.get(key)
            if scratch is not None:
                EditHandle(scratch).truncate(length)
                return
            if rest[1] == METADATA and length == 0:
                return  # `> metadata.json`: the write that follows carries the new record
        raise self.ctx.refuse(errno.EACCES, "truncate", path, "cannot change this file's size")

    def rename(self, src: list[str], dst: list[str], pid: int) -> None:
        if len(src) == len(dst) == 2:
            fp = self.image(src[0], self.path(src)).fingerprint
            same = self.image(dst[0], self.path(dst)).fingerprint == fp
            with self._lock:
                scratch = self._scratch.get((fp, src[1])) if same else None
                if scratch is not None and dst[1] != METADATA:
                    self._scratch[(fp, dst[1])] = self._scratch.pop((fp, src[1]))
                    return
            if scratch is not None:  # how sed -i and many editors save: write a copy, rename it over
                self._save(fp, bytes(scratch), pid)
                with self._lock:
                    self._scratch.pop((fp, src[1]), None)
                return
        super().rename(src, dst, pid)

    # -- extended attributes: the record, on the image's folder and files -------------------

    def xattrs(self, rest: list[str]) -> dict[str, bytes]:
        self.getattr(rest)
        if not rest or self._is_scratch(rest):
            return {}
        return xattrs.attributes(self.image(rest[0], self.path(rest)))

    def set_xattr(self, rest: list[str], name: str, value: bytes | None, flags: int) -> bool:
        if not rest or self._is_scratch(rest):
            return False  # an editor's scratch file takes (and drops) what its editor copies
        path = self.path(rest)
        image = self.image(rest[0], path)
        try:
            self.records.update(image.fingerprint, xattrs.change(image, name, value, flags, path), name)
        except OSError as e:
            log.log(logging.DEBUG if e.errno == errno.ENODATA else logging.WARNING,
                    "refused %s %s on %s: %s", "setxattr" if value is not None else "removexattr",
                    name, path, e.strerror)
            raise
        finally:
            self.catalog.invalidate()
        self.ctx.on_change(f"/{FP_DIR}/{image.fingerprint}/{METADATA}")
        return True

    def accepts_attributes(self, rest: list[str]) -> bool:
        return len(rest) == 2 and (rest[1] == METADATA or self._is_scratch(rest))

    def _save(self, fp: str, data: bytes, pid: int) -> None:
        try:
            self.records.save(fp, data, pid)
        finally:
            self.catalog.invalidate()
        self.ctx.on_change(f"/{FP_DIR}/{fp}/{METADATA}")
