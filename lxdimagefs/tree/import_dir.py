"""import/: files and folders being written into images, and why LXD refused the ones it did."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path

from lxdimagefs.data.uploads import FolderImport, Upload
from lxdimagefs.errors import ImportFailed, LXDError, fs_error
from lxdimagefs.fs.handles import BytesHandle, FileHandle, Handle, UploadHandle
from lxdimagefs.fs.node import Attr, Context, Fading, Node, check_name
from lxdimagefs.names import filename_to_alias, is_fingerprint
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.pull import Source, from_url

log = logging.getLogger(__name__)

IMPORT_DIR = "import"
ERROR_SUFFIX = ".error"


class ImportsNode(Node):
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
        if len(rest) == 1:
            if upload is not None:
                return Attr(stat.S_IFREG | 0o644, upload.size, now, now, now)
            if error is not None:
                return Attr(stat.S_IFREG | 0o444, len(error), now, now, now)
            if folder is not None:
                return self.ctx.dir(now, writable=True)
        if len(rest) == 2 and folder is not None and rest[1] in folder.files:
            return Attr(stat.S_IFREG | 0o644, folder.files[rest[1]], now, now, now)
        raise fs_error(errno.ENOENT, self.path(rest))

    def readdir(self, rest: list[str]) -> list[str]:
        with self._lock:
            if not rest:
                return sorted([*self._uploads, *self._errors, *self._folders])
            if len(rest) == 1 and rest[0] in self._folders:
                return sorted(self._folders[rest[0]].files)
        self.getattr(rest)
        raise fs_error(errno.ENOTDIR, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        with self._lock:
            folder = self._folders.get(rest[0])
            error = self._errors.get(rest[0]) if len(rest) == 1 else None
            busy = len(rest) == 1 and rest[0] in self._uploads
        if len(rest) == 2 and folder is not None:
            mode = os.O_RDWR | (flags & os.O_TRUNC) if writing else os.O_RDONLY
            return self._folder_file(folder, rest[1], mode, pid)
        if busy and writing:
            raise self.ctx.refuse(errno.EBUSY, "open", self.path(rest),
                                  "this import is being written already")
        if error is not None and not writing:
            return BytesHandle(error, opener=pid)
        if writing:
            raise self.ctx.refuse(errno.EACCES, "write", self.path(rest), "read-only file")
        raise fs_error(errno.EACCES, self.path(rest), "an import in progress cannot be read")

    def create(self, rest: list[str], flags: int, pid: int) -> Handle:
        check_name(rest[-1], self.path(rest))
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

    def _folder_file(self, folder: FolderImport, name: str, flags: int, pid: int) -> FileHandle:
        if not flags & (os.O_RDWR | os.O_WRONLY):
            return FileHandle(str(folder.path(name)), opener=pid)
        with folder.lock:
            folder.open_files.add(name)

        def closed() -> None:
            with folder.lock:
                folder.files[name] = folder.path(name).stat().st_size
                folder.open_files.discard(name)
                go = not folder.finishing and folder.ready()
                folder.finishing |= go
            if go:
                self._finish_folder(folder)
        return FileHandle(str(folder.path(name)), flags, on_close=closed, opener=pid)

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

    def unlink(self, rest: list[str]) -> None:
        with self._lock:
            if len(rest) == 1 and self._pulled.discard(rest[0]):
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

    def mkdir(self, rest: list[str]) -> None:
        if len(rest) != 1:
            super().mkdir(rest)
        path = self.path(rest)
        check_name(rest[0], path)
        with self._lock:
            if rest[0] in self._folders or rest[0] in self._uploads or rest[0] in self._errors:
                raise fs_error(errno.EEXIST, path)
            spool = self.spool_dir / "import" / rest[0]
            spool.mkdir(parents=True, mode=0o700)
            self._folders[rest[0]] = FolderImport(self.client, rest[0], spool)

    def rmdir(self, rest: list[str]) -> None:
        with self._lock:
            folder = self._folders.get(rest[0]) if len(rest) == 1 else None
            if folder is not None:
                if folder.files:
                    raise fs_error(errno.ENOTEMPTY, self.path(rest))
                del self._folders[rest[0]]
        if folder is None:
            super().rmdir(rest)
        folder.remove_spool()

    def rename(self, src: list[str], dst: list[str], pid: int) -> None:
        with self._lock:
            if len(src) == len(dst) == 1 and src[0] in self._errors:
                self._errors[dst[0]] = self._errors.pop(src[0])
                return
        super().rename(src, dst, pid)

    def accepts_attributes(self, rest: list[str]) -> bool:
        return True  # what is being imported: `cp -p` and `touch` must work

    # -- server-side creation: ln -s -------------------------------------------------------

    def symlink(self, rest: list[str], target: str) -> None:
        """`ln -s https://… import/NAME`: the server fetches the image from the URL itself."""
        if len(rest) != 1 or not target.startswith("https://"):
            raise self.ctx.refuse(errno.EINVAL, "symlink", self.path(rest),
                                  "link an https:// URL, or an image folder of another remote in the mount")
        self.pull(rest, from_url(target))

    def pull(self, rest: list[str], source: Source) -> None:
        """Have the server hold `source`'s image; NAME, unless a fingerprint, becomes its alias."""
        path = self.path(rest)
        if len(rest) != 1:
            raise self.ctx.refuse(errno.EPERM, "symlink", path, "links go straight under import/")
        name = rest[0]
        check_name(name, path)
        with self._lock:
            if name in self._uploads or name in self._folders:
                raise fs_error(errno.EEXIST, path)
            self._errors.pop(name + ERROR_SUFFIX, None)
        aliases = [] if is_fingerprint(name, 12) else [filename_to_alias(name)]
        try:
            # LXD makes the image before it adds the alias: a taken name would leave an image behind.
            if aliases and self.client.alias_exists(aliases[0]):
                raise LXDError(f"Alias already exists: {aliases[0]}", 409)
            fp = source.create(self.client, aliases)
        except LXDError as e:
            failure = ImportFailed(e.errno if e.status else errno.EIO, e.message)
            self._failed(name, failure)
            raise fs_error(failure.errno, path, e.message) from None
        finally:
            self.catalog.invalidate()
        log.info("%s: the server now holds %s as %s", path, source.describe, fp)
        self._pulled.add(name, source.describe)  # gone once looked up, as a closed upload's file is

    def _pulled_link(self, rest: list[str]) -> str | None:
        return self._pulled.get(rest[0]) if len(rest) == 1 else None  # type: ignore[return-value]

    def readlink(self, rest: list[str]) -> str:
        pulled = self._pulled_link(rest)
        if pulled is None:
            return super().readlink(rest)
        return pulled

    # -- finishing --------------------------------------------------------------------

    def _finish_upload(self, upload: Upload) -> None:
        try:
            upload.commit()
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

    def _finish_folder(self, folder: FolderImport) -> None:
        try:
            folder.fingerprint = folder.commit()
            log.info("imported folder %s as %s", folder.name, folder.fingerprint)
        except ImportFailed as e:
            self._failed(folder.name, e)
            raise
        finally:
            if folder.fingerprint is not None or folder.name + ERROR_SUFFIX in self._errors:
                folder.remove_spool()
                with self._lock:
                    self._folders.pop(folder.name, None)
                for name in folder.files:
                    self.ctx.on_change(self.path([folder.name, name]), wait=True)
                self.ctx.on_change(self.path([folder.name]), wait=True)
        self.catalog.invalidate()

    def _failed(self, name: str, e: ImportFailed) -> None:
        log.warning("import %s failed: %s", name, e.message)
        with self._lock:
            self._errors[name + ERROR_SUFFIX] = (e.message.rstrip() + "\n").encode()
