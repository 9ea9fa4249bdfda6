"""import/: files and folders being written into images, and why LXD refused the ones it did."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path

from lxdimagefs.errors import ImportFailed, fs_error
from lxdimagefs.fs.handles import BytesHandle, Handle, UploadHandle
from lxdimagefs.fs.node import Attr, Context, Fading, check_name
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.tree.import_folders import FolderImports
from lxdimagefs.tree.import_links import ERROR_SUFFIX, IMPORT_DIR
from lxdimagefs.tree.landed import Landed, Landing
from lxdimagefs.upload.folders import FolderImport
from lxdimagefs.upload.streamed import Upload

log = logging.getLogger(__name__)

__all__ = ["ERROR_SUFFIX", "IMPORT_DIR", "ImportsNode"]
# st_blksize of a file being written here: cp sizes its buffer by it (the larger of it and 128 KiB), so a
# 1 GiB import is 1,024 FUSE writes instead of 8,192 (the kernel's max_write is 1 MiB already).
WRITE_BLOCK = 1 << 20


class ImportsNode(FolderImports):
    """Single files written into images, and the .error notes; folders and links in its bases."""

    def __init__(self, ctx: Context, catalog: Catalog, spool_dir: Path) -> None:
        super().__init__(ctx, IMPORT_DIR)
        self.catalog = catalog
        self.client = catalog.server
        self.spool_dir = spool_dir
        self._lock = threading.Lock()
        self._uploads: dict[str, Upload] = {}
        self._errors: dict[str, bytes] = {}  # <name>.error -> LXD's message
        self._folders: dict[str, FolderImport] = {}
        self._pulled = Fading()  # links that became images: name -> what they named
        self._landed = Landed()  # files and folders that became images, for the tools that wrote them

    def getattr(self, rest: list[str]) -> Attr:
        now = time.time()
        pulled = self._pulled_link(rest)
        if pulled is not None:
            return Attr(stat.S_IFLNK | 0o777, len(pulled.encode()), now, now, now)
        if not rest:
            return self.ctx.dir(self.ctx.started, 2 + len(self._folders), writable=True)
        name = rest[0]
        with self._lock:
            upload, error, folder = self._uploads.get(name), self._errors.get(name), self._folders.get(name)
        # What is being imported, and why LXD refused it, is the mounter's alone.
        if len(rest) == 1:
            if upload is not None:
                return Attr(stat.S_IFREG | 0o600, upload.size, now, now, now, blksize=WRITE_BLOCK)
            if error is not None:
                return Attr(stat.S_IFREG | 0o400, len(error), now, now, now)
            if folder is not None:
                return Attr(stat.S_IFDIR | 0o700, 0, now, now, now, 2)
        if len(rest) == 2 and folder is not None and rest[1] in folder.files:
            return Attr(stat.S_IFREG | 0o600, folder.files[rest[1]], now, now, now, blksize=WRITE_BLOCK)
        landed = self._landed.attr(rest) if folder is None else None
        if landed is not None:
            return landed
        raise fs_error(errno.ENOENT, self.path(rest))

    def readdir(self, rest: list[str]) -> list[str]:
        with self._lock:
            if not rest:
                return sorted([*self._uploads, *self._errors, *self._folders])
            if len(rest) == 1 and rest[0] in self._folders:
                return sorted(self._folders[rest[0]].files)
        landing = self._landed.get(rest[0]) if len(rest) == 1 else None
        if landing is not None and landing.files is not None:
            return sorted(landing.files)
        self.getattr(rest)
        raise fs_error(errno.ENOTDIR, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        with self._lock:
            folder = self._folders.get(rest[0])
            error = self._errors.get(rest[0]) if len(rest) == 1 else None
            busy = len(rest) == 1 and rest[0] in self._uploads
        if len(rest) == 2 and folder is not None:
            mode = os.O_RDWR | os.O_CREAT | (flags & os.O_TRUNC) if writing else os.O_RDONLY
            return self._folder_file(folder, rest[1], mode, pid)
        if busy and writing:
            raise self.ctx.refuse(errno.EBUSY, "open", self.path(rest),
                                  "this import is being written already")
        if writing and folder is None and error is None and self._landed.get(rest[0]) is not None:
            return self.create(rest, flags, pid)  # written again: a new import
        if error is not None and not writing:
            return BytesHandle(error, opener=pid)
        if writing:
            raise self.ctx.refuse(errno.EACCES, "write", self.path(rest), "read-only file")
        raise fs_error(errno.EACCES, self.path(rest), "an import in progress cannot be read")

    def create(self, rest: list[str], flags: int, pid: int) -> Handle:
        check_name(rest[-1], self.path(rest))
        if self._landed.discard(rest[:1]) and len(rest) == 2:
            self.mkdir(rest[:1])  # a folder that became an image, copied again: a new import
        if len(rest) == 1:
            with self._lock:
                self._errors.pop(rest[0] + ERROR_SUFFIX, None)
                upload = self._uploads[rest[0]] = Upload(self.client, rest[0], pid)
            return UploadHandle(upload, self._finish_upload)
        with self._lock:
            folder = self._folders.get(rest[0]) if len(rest) == 2 else None
        if folder is None:
            return super().create(rest, flags, pid)
        with folder.lock:
            folder.files[rest[1]] = 0
        return self._folder_file(folder, rest[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, pid)

    def _move(self, old: str, new: str) -> bool:
        """Rename an .error file, an upload or a folder in progress (the lock held)."""
        if old != new and any(new in live for live in (self._errors, self._uploads, self._folders)) \
                and any(old in live for live in (self._errors, self._uploads, self._folders)):
            raise fs_error(errno.EEXIST, self.path([new]))
        if old in self._errors:
            self._errors[new] = self._errors.pop(old)
        elif old in self._uploads:
            upload = self._uploads[new] = self._uploads.pop(old)
            upload.name = new
        elif old in self._folders:
            folder = self._folders[new] = self._folders.pop(old)
            folder.name = new
        else:
            return False
        self._landed.discard([new])
        return True

    def truncate(self, rest: list[str], length: int) -> None:
        with self._lock:
            upload = self._uploads.get(rest[0]) if len(rest) == 1 else None
            folder = self._folders.get(rest[0]) if len(rest) == 2 else None
        if length == 0 and upload is not None and upload.size == 0:
            return
        if length == 0 and folder is not None and rest[1] in folder.files:
            os.truncate(folder.path(rest[1]), 0)
            return
        super().truncate(rest, length)

    def unlink(self, rest: list[str], pid: int = 0) -> None:
        with self._lock:
            if len(rest) == 1 and self._pulled.discard(rest[0]):
                return
            if rest[0] not in self._folders and self._landed.discard(rest):
                return
            if len(rest) == 2:
                folder = self._folders[rest[0]]
            elif self._errors.pop(rest[0], None) is not None:
                return
            else:
                upload = self._uploads.pop(rest[0])
        if len(rest) == 2:
            with folder.lock:
                folder.files.pop(rest[1], None)
            folder.path(rest[1]).unlink(missing_ok=True)
            return
        upload.abort(f"{rest[0]} was removed while being written")

    def rename(self, src: list[str], dst: list[str], pid: int) -> None:
        """Into place: an .error file, an import (or one that became an image), a part in a folder."""
        check_name(dst[-1], self.path(dst))
        with self._lock:
            folder = self._folders.get(src[0]) if len(src) == len(dst) == 2 and src[0] == dst[0] else None
            if len(src) == len(dst) == 1 and self._move(src[0], dst[0]):
                return
        if folder is not None and src[1] in folder.files:
            if src[1] in folder.open_files:
                raise self.ctx.refuse(errno.EBUSY, "rename", self.path(src), "it is still being written")
            folder.rename(src[1], dst[1])
            self._folder_changed(folder)
            return
        if self._landed.rename(src, dst):
            return
        super().rename(src, dst, pid)

    def accepts_attributes(self, rest: list[str]) -> bool:
        return True  # what is being imported: `cp -p` and `touch` must work

    # -- finishing --------------------------------------------------------------------

    def _finish_upload(self, upload: Upload) -> None:
        try:
            upload.commit()
            self._landed.add(upload.name, Landing(upload.size))
        except ImportFailed as e:
            with self._lock:
                removed = self._uploads.get(upload.name) is not upload
            if not removed:  # an import the user removed needs no note of why it failed
                self._failed(upload.name, e)
            raise
        finally:
            with self._lock:
                if self._uploads.get(upload.name) is upload:
                    del self._uploads[upload.name]
            self.ctx.on_change(self.path([upload.name]), wait=True)
        self.catalog.invalidate()

    def _failed(self, name: str, e: ImportFailed) -> None:
        log.warning("import %s failed: %s", name, e.message)
        with self._lock:
            self._errors[name + ERROR_SUFFIX] = (e.message.rstrip() + "\n").encode()
