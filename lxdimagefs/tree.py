"""The directory tree of a mount, as plain Python: paths in, attributes,
listings, link targets and bytes out, and every change a user can make.
It knows nothing of FUSE; refusals are OSErrors carrying the errno the
system call should return.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import posixpath
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from .blocks import BLOCK
from .catalog import Catalog
from .client import ExportPart, Image
from .errors import ImportFailed, LXDError, fs_error
from .handles import BytesHandle, EditHandle, FileHandle, Handle, UnifiedHandle, UploadHandle
from .importer import FolderImport, Upload
from .names import alias_to_filename, filename_to_alias, fits, valid
from .reader import Exports

log = logging.getLogger(__name__)

FP_DIR = "by-fingerprint"
ALIAS_DIR = "by-alias"
IMPORT_DIR = "import"
METADATA = "metadata.json"
ERROR_SUFFIX = ".error"
EDITABLE = ("auto_update", "expires_at", "profiles", "properties", "public")


@dataclass(frozen=True)
class Attr:
    mode: int
    size: int
    mtime: float
    atime: float
    ctime: float
    nlink: int = 1
    blksize: int = 4096


def render_metadata(image: Image) -> bytes:
    """The image record: pretty-printed, stable key order, trailing newline."""
    return (json.dumps(image.record, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


class Tree:
    def __init__(self, catalog: Catalog, exports: Exports,
                 uid: int | None = None, gid: int | None = None, readonly: bool = True,
                 mountpoint: str = "") -> None:
        self.catalog = catalog
        self.client = catalog.client
        self.exports = exports
        self.spool = exports.spool
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.readonly = readonly
        self.mountpoint = mountpoint.rstrip("/")
        self.started = time.time()
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        self._lock = threading.Lock()
        # What writes under import/ and inside image folders hold while they last.
        self.uploads: dict[str, Upload] = {}
        self.errors: dict[str, bytes] = {}  # import/<name>.error -> LXD's message
        self.folders: dict[str, FolderImport] = {}
        self.scratch: dict[tuple[str, str], bytearray] = {}  # editors' temporary files
        self.hidden: set[tuple[str, str]] = set()  # files unlinked by `rm -r` before its rmdir
        # The record each process last read, per image: the base its save is compared with.
        self.read_records: LRUCache[tuple[str, int], dict] = LRUCache(maxsize=4096)
        # Told of paths that changed behind the caller's back; wait=True where no directory lock
        # can be held (close), so the caller sees the change when its call returns.
        self.on_change: Callable[..., None] = lambda path, wait=False: None

    # -- lookups ------------------------------------------------------------

    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _image(self, name: str, path: str) -> Image:
        try:
            return self.catalog.resolve(name)
        except OSError as e:
            raise fs_error(e.errno or errno.ENOENT, path) from None

    def _part(self, image: Image, name: str, path: str) -> tuple[int, ExportPart]:
        if (image.fingerprint, name) not in self.hidden:
            for i, part in enumerate(self.catalog.layout(image.fingerprint).parts):
                if part.name == name:
                    return i, part
        raise fs_error(errno.ENOENT, path)

    def _mode(self, writable: int, readonly: int) -> int:
        return readonly if self.readonly else writable

    def _dir(self, mtime: float, nlink: int = 2, writable: bool = False) -> Attr:
        mode = 0o755 if writable and not self.readonly else 0o555
        return Attr(stat.S_IFDIR | mode, 0, mtime, mtime, mtime, nlink)

    def getattr(self, path: str) -> Attr:
        parts = self.split(path)
        if not parts:
            return self._dir(self.started, 5)
        top, rest = parts[0], parts[1:]
        if top == ALIAS_DIR and not rest:
            return self._dir(self.started, writable=True)
        if top == IMPORT_DIR:
            return self._import_attr(rest, path)
        if top == FP_DIR:
            snap = self.catalog.snapshot()
            if not rest:
                newest = max((i.uploaded_at for i in snap.images.values()), default=self.started)
                return self._dir(newest, 2 + len(snap.images))
            image = self._image(rest[0], path)
            up = image.uploaded_at
            used = image.last_used_at or up
            if len(rest) == 1:
                return Attr(stat.S_IFDIR | self._mode(0o755, 0o555), 0, up, used, up, 2)
            if len(rest) == 2:
                key = (image.fingerprint, rest[1])
                if key in self.scratch:
                    return Attr(stat.S_IFREG | 0o644, len(self.scratch[key]), time.time(), used, up)
                if rest[1] == METADATA and key not in self.hidden:
                    return Attr(stat.S_IFREG | self._mode(0o644, 0o444), len(render_metadata(image)),
                                up, used, up)
                _, part = self._part(image, rest[1], path)
                return Attr(stat.S_IFREG | 0o444, part.size, up, used, up, blksize=BLOCK)
        if top == ALIAS_DIR and len(rest) == 1 and fits(rest[0]) and valid(rest[0]):
            target = self.readlink(path)
            return Attr(stat.S_IFLNK | 0o777, len(target.encode()), self.started, self.started, self.started)
        raise fs_error(errno.ENOENT, path)

    def _import_attr(self, rest: list[str], path: str) -> Attr:
        now = time.time()
        if not rest:
            return self._dir(self.started, 2 + len(self.folders), writable=True)
        name = rest[0]
        if len(rest) == 1:
            if name in self.uploads:
                return Attr(stat.S_IFREG | 0o644, self.uploads[name].size, now, now, now)
            if name in self.errors:
                return Attr(stat.S_IFREG | 0o444, len(self.errors[name]), now, now, now)
            if name in self.folders:
                return self._dir(now, writable=True)
        if len(rest) == 2 and name in self.folders and rest[1] in self.folders[name].files:
            return Attr(stat.S_IFREG | 0o644, self.folders[name].files[rest[1]], now, now, now)
        raise fs_error(errno.ENOENT, path)

    def readdir(self, path: str) -> list[str]:
        parts = self.split(path)
        if not parts:
            return [FP_DIR, ALIAS_DIR, IMPORT_DIR]
        if parts == [FP_DIR]:
            return sorted(self.catalog.snapshot().images)
        if parts == [ALIAS_DIR]:
            return sorted(self.catalog.snapshot().aliases)
        if parts == [IMPORT_DIR]:
            return sorted([*self.uploads, *self.errors, *self.folders])
        if parts[0] == IMPORT_DIR and len(parts) == 2 and parts[1] in self.folders:
            return sorted(self.folders[parts[1]].files)
        if parts[0] == FP_DIR and len(parts) == 2:
            fp = self._image(parts[1], path).fingerprint
            names = [METADATA] + [p.name for p in self.catalog.layout(fp).parts]
            return [n for n in names if (fp, n) not in self.hidden] + sorted(
                name for key, name in self.scratch if key == fp)
        attr = self.getattr(path)  # ENOENT for what is not there, ENOTDIR for the rest
        raise fs_error(errno.ENOTDIR if not stat.S_ISDIR(attr.mode) else errno.ENOENT, path)

    def readlink(self, path: str) -> str:
        parts = self.split(path)
        if len(parts) == 2 and parts[0] == ALIAS_DIR and fits(parts[1]) and valid(parts[1]):
            fp = self.catalog.alias_target(parts[1])
            if fp is not None:
                return f"../{FP_DIR}/{fp}"
            raise fs_error(errno.ENOENT, path)
        self.getattr(path)
        raise fs_error(errno.EINVAL, path)

    def changed_elsewhere(self, event: dict) -> None:
        """An LXD event: drop the listing, and the kernel's entries for what the event names."""
        source = urllib.parse.urlsplit((event.get("metadata") or {}).get("source", "")).path
        before = self.catalog.cached()
        self.catalog.invalidate()
        paths = []
        if source.startswith("/1.0/images/aliases/"):
            name = urllib.parse.unquote(source.removeprefix("/1.0/images/aliases/"))
            paths.append(f"/{ALIAS_DIR}/{alias_to_filename(name)}")
        elif source.startswith("/1.0/images/"):
            fp = source.removeprefix("/1.0/images/")
            paths += [f"/{FP_DIR}/{fp}/{METADATA}", f"/{FP_DIR}/{fp}"]
            image = before.images.get(fp) if before else None
            paths += [f"/{ALIAS_DIR}/{alias_to_filename(a)}" for a in (image.aliases if image else ())]
        for path in paths:
            self.on_change(path)

    # -- opening and reading ------------------------------------------------

    def _add(self, handle: Handle, pid: int) -> int:
        handle.opener = pid
        fh = next(self._next_fh)
        with self._lock:
            self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise fs_error(errno.EBADF, str(fh))
        return handle

    def open(self, path: str, flags: int, pid: int = 0) -> int:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        attr = self.getattr(path)
        if stat.S_ISDIR(attr.mode):
            raise fs_error(errno.EISDIR, path)
        if writing:
            self._writable(path, "open for writing")
            return self._add(self._open_for_writing(path, flags, pid), pid)
        parts = self.split(path)
        if parts[0] == IMPORT_DIR:
            return self._add(self._open_import_for_reading(parts, path), pid)
        image = self._image(parts[1], path)
        key = (image.fingerprint, parts[2])
        if key in self.scratch:
            return self._add(EditHandle(self.scratch[key]), pid)
        if parts[2] == METADATA:
            return self._add(BytesHandle(self._read_record(image, pid)), pid)
        index, part = self._part(image, parts[2], path)
        if self.catalog.layout(image.fingerprint).split:
            return self._add(FileHandle(str(self.spool.paths(image.fingerprint)[index])), pid)
        return self._add(UnifiedHandle(self.exports.unified(image.fingerprint, part.size)), pid)

    def _read_record(self, image: Image, pid: int) -> bytes:
        """The record as listed; remembered, so that a later save detects a change made since."""
        if not self.readonly:
            with self._lock:
                self.read_records[(image.fingerprint, pid)] = image.record
        return render_metadata(image)

    def _open_import_for_reading(self, parts: list[str], path: str) -> Handle:
        if len(parts) == 2 and parts[1] in self.errors:
            return BytesHandle(self.errors[parts[1]])
        if len(parts) == 3 and parts[1] in self.folders:
            return FileHandle(str(self.folders[parts[1]].path(parts[2])))
        raise fs_error(errno.EACCES, path, "an import in progress cannot be read")

    def is_scratch(self, path: str) -> bool:
        parts = self.split(path)
        return len(parts) == 3 and parts[0] == FP_DIR and any(
            key[1] == parts[2] and key[0].startswith(parts[1]) for key in self.scratch)

    def is_export(self, path: str) -> bool:
        parts = self.split(path)
        return (len(parts) == 3 and parts[0] == FP_DIR and parts[2] != METADATA
                and not self.is_scratch(path))

    def read(self, fh: int, offset: int, size: int) -> memoryview | bytes:
        return self._handle(fh).read(offset, size)

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

    # -- writing --------------------------------------------------------------

    def _writable(self, path: str, op: str) -> None:
        if self.readonly:
            log.warning("refused %s %s: read-only mount", op, path)
            raise fs_error(errno.EROFS, path)

    def _refuse(self, code: int, op: str, path: str, why: str) -> OSError:
        log.warning("refused %s %s: %s", op, path, why)
        return fs_error(code, path, why)

    def refusal(self, op: str, path: str, why: str) -> OSError:
        """The error for a change the tree never makes: EROFS under -o ro, else EPERM."""
        return self._refuse(errno.EROFS if self.readonly else errno.EPERM, op, path, why)

    def set_attributes(self, op: str, path: str) -> None:
        """chmod, chown, utimensat, setxattr: modes and times here are LXD's, not the user's.

        Accepted and ignored on what is being written (imports, editors' scratch
        files, metadata.json) so that `cp -p`, `touch`, `sed -i` and vim work;
        refused everywhere else.
        """
        self.getattr(path)
        parts = self.split(path)
        if not self.readonly and (parts[0] == IMPORT_DIR or self.is_scratch(path) or
                                  (parts[0] == FP_DIR and parts[-1] == METADATA)):
            return
        raise self.refusal(op, path, "modes, owners, times and attributes are LXD's")

    @staticmethod
    def _valid_name(name: str, path: str) -> None:
        if not valid(name):
            raise fs_error(errno.EINVAL, path, "names must be UTF-8, without control characters")

    def create(self, path: str, flags: int, pid: int = 0) -> int:
        self._writable(path, "create")
        parts = self.split(path)
        self._valid_name(parts[-1], path)
        try:
            self.getattr(path)
            exists = True
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            exists = False
        if exists:
            if flags & os.O_EXCL:
                raise fs_error(errno.EEXIST, path)
            return self.open(path, flags | os.O_WRONLY, pid)
        if not fits(parts[-1]):
            raise fs_error(errno.ENAMETOOLONG, path)
        if parts[0] == IMPORT_DIR and len(parts) == 2:
            self.errors.pop(parts[1] + ERROR_SUFFIX, None)
            upload = self.uploads[parts[1]] = Upload(self.client, parts[1], pid)
            return self._add(UploadHandle(upload, self._finish_upload), pid)
        if parts[0] == IMPORT_DIR and len(parts) == 3 and parts[1] in self.folders:
            folder = self.folders[parts[1]]
            folder.files[parts[2]] = 0
            return self._add(self._folder_file(folder, parts[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC), pid)
        if parts[0] == FP_DIR and len(parts) == 3:
            fp = self._image(parts[1], path).fingerprint
            data = self.scratch[(fp, parts[2])] = bytearray()
            return self._add(EditHandle(data), pid)
        raise self._refuse(errno.EPERM, "create", path, "files can be created only under import/")

    def _folder_file(self, folder: FolderImport, name: str, flags: int) -> FileHandle:
        folder.open_files.add(name)

        def closed() -> None:
            with folder.lock:
                folder.files[name] = folder.path(name).stat().st_size
                folder.open_files.discard(name)
                go = not folder.finishing and folder.ready()
                folder.finishing |= go
            if go:
                self._finish_folder(folder)
        return FileHandle(str(folder.path(name)), flags, on_close=closed)

    def _open_for_writing(self, path: str, flags: int, pid: int) -> Handle:
        parts = self.split(path)
        if parts[0] == FP_DIR and len(parts) == 3:
            image = self._image(parts[1], path)
            key = (image.fingerprint, parts[2])
            if key in self.scratch:
                if flags & os.O_TRUNC:
                    self.scratch[key].clear()
                return EditHandle(self.scratch[key])
            if parts[2] == METADATA:
                # The base for detecting others' changes stays the record the user last read.
                data = bytearray() if flags & os.O_TRUNC else bytearray(render_metadata(image))
                with self._lock:
                    self.read_records.setdefault((image.fingerprint, pid), image.record)
                handle = EditHandle(data, lambda new, fp=image.fingerprint: self.save_record(fp, new, pid))
                handle.dirty = bool(flags & os.O_TRUNC)
                return handle
            raise self._refuse(errno.EACCES, "write", path, "an export's bytes are LXD's: read-only")
        if parts[0] == IMPORT_DIR and len(parts) == 3 and parts[1] in self.folders:
            return self._folder_file(self.folders[parts[1]], parts[2], os.O_RDWR | (flags & os.O_TRUNC))
        if parts[0] == IMPORT_DIR and len(parts) == 2 and parts[1] in self.uploads:
            raise self._refuse(errno.EBUSY, "open", path, "this import is being written already")
        raise self._refuse(errno.EACCES, "write", path, "read-only file")

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self._handle(fh).write(offset, data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._writable(path, "truncate")
        if fh is not None and fh in self._handles:
            self._handle(fh).truncate(length)
            return
        parts = self.split(path)
        self.getattr(path)
        if parts[0] == FP_DIR and len(parts) == 3:
            key = (self._image(parts[1], path).fingerprint, parts[2])
            if key in self.scratch:
                EditHandle(self.scratch[key]).truncate(length)
                return
            if parts[2] == METADATA and length == 0:
                return  # `> metadata.json`: the write that follows carries the new record
        if parts[0] == IMPORT_DIR and length == 0 and (
                (len(parts) == 2 and parts[1] in self.uploads and self.uploads[parts[1]].size == 0)
                or (len(parts) == 3 and parts[1] in self.folders)):
            if len(parts) == 3:
                os.truncate(self.folders[parts[1]].path(parts[2]), 0)
            return
        raise self._refuse(errno.EACCES if parts[0] == FP_DIR else errno.EPERM, "truncate", path,
                           "cannot change this file's size")

    def flush(self, fh: int, pid: int) -> None:
        self._handle(fh).flush(pid)

    # -- imports --------------------------------------------------------------

    def _finish_upload(self, upload: Upload) -> None:
        try:
            upload.commit()
        except ImportFailed as e:
            self._failed(upload.name, e)
            raise
        finally:
            if self.uploads.get(upload.name) is upload:
                del self.uploads[upload.name]
            self.on_change(f"/{IMPORT_DIR}/{upload.name}", wait=True)
        self.catalog.invalidate()

    def _finish_folder(self, folder: FolderImport) -> None:
        try:
            folder.fingerprint = folder.commit()
            log.info("imported folder %s as %s", folder.name, folder.fingerprint)
        except ImportFailed as e:
            self._failed(folder.name, e)
            raise
        finally:
            if folder.fingerprint is not None or folder.name + ERROR_SUFFIX in self.errors:
                folder.remove_spool()
                self.folders.pop(folder.name, None)
                for name in folder.files:
                    self.on_change(f"/{IMPORT_DIR}/{folder.name}/{name}", wait=True)
                self.on_change(f"/{IMPORT_DIR}/{folder.name}", wait=True)
        self.catalog.invalidate()

    def _failed(self, name: str, e: ImportFailed) -> None:
        log.warning("import %s failed: %s", name, e.message)
        self.errors[name + ERROR_SUFFIX] = (e.message.rstrip() + "\n").encode()

    def mkdir(self, path: str) -> None:
        self._writable(path, "mkdir")
        parts = self.split(path)
        if parts[0] == IMPORT_DIR and len(parts) == 2:
            self._valid_name(parts[1], path)
            if parts[1] in self.folders or parts[1] in self.uploads or parts[1] in self.errors:
                raise fs_error(errno.EEXIST, path)
            if not fits(parts[1]):
                raise fs_error(errno.ENAMETOOLONG, path)
            spool = Path(self.spool.directory) / "import" / parts[1]
            spool.mkdir(parents=True, mode=0o700)
            self.folders[parts[1]] = FolderImport(self.client, parts[1], spool)
            return
        raise self._refuse(errno.EPERM, "mkdir", path, "folders can be made only under import/")

    # -- aliases --------------------------------------------------------------

    def _alias_target(self, content: str, path: str) -> str:
        """The fingerprint a symlink's content names: an image folder, a prefix or an alias."""
        if content.startswith("/"):
            if not self.mountpoint or not content.startswith(self.mountpoint + "/"):
                raise self._refuse(errno.EINVAL, "symlink", path, f"target {content} is outside the mount")
            rel = "/" + content[len(self.mountpoint) + 1:]
        else:
            rel = posixpath.join("/" + ALIAS_DIR, content)
        parts = self.split(posixpath.normpath(rel))
        if len(parts) == 2 and parts[0] == FP_DIR:
            return self._image(parts[1], path).fingerprint
        if len(parts) == 2 and parts[0] == ALIAS_DIR:
            fp = self.catalog.snapshot().aliases.get(parts[1])
            if fp is not None:
                return fp
            if "/" not in content:  # `ln -s <fingerprint> by-alias/NAME`
                return self._image(content, path).fingerprint
            raise fs_error(errno.ENOENT, path, f"no alias {parts[1]}")
        raise self._refuse(errno.EINVAL, "symlink", path, f"target {content} is not an image of the mount")

    def symlink(self, path: str, content: str) -> None:
        self._writable(path, "symlink")
        parts = self.split(path)
        if len(parts) != 2 or parts[0] != ALIAS_DIR:
            raise self._refuse(errno.EPERM, "symlink", path, "symlinks can be made only under by-alias/")
        self._valid_name(parts[1], path)
        if not fits(parts[1]):
            raise fs_error(errno.ENAMETOOLONG, path)
        self.catalog.invalidate()
        fp = self._alias_target(content, path)
        if parts[1] in self.catalog.snapshot().aliases:
            raise fs_error(errno.EEXIST, path)
        self.client.add_alias(filename_to_alias(parts[1]), fp)
        self.catalog.invalidate()

    # -- removing and renaming ----------------------------------------------------

    def unlink(self, path: str) -> None:
        self._writable(path, "unlink")
        parts = self.split(path)
        attr = self.getattr(path)
        if stat.S_ISDIR(attr.mode):
            raise fs_error(errno.EISDIR, path)
        if parts[0] == ALIAS_DIR:
            self.client.delete_alias(filename_to_alias(parts[1]))
            self.catalog.invalidate()
        elif parts[0] == IMPORT_DIR and len(parts) == 2:
            if parts[1] in self.errors:
                del self.errors[parts[1]]
            else:
                upload = self.uploads.pop(parts[1])
                upload.abort(f"{parts[1]} was removed while being written")
        elif parts[0] == IMPORT_DIR:
            folder = self.folders[parts[1]]
            folder.files.pop(parts[2], None)
            folder.path(parts[2]).unlink(missing_ok=True)
        else:  # inside an image folder
            fp = self._image(parts[1], path).fingerprint
            if self.scratch.pop((fp, parts[2]), None) is None:
                # `rm -r` empties a folder before its rmdir: the image goes then, not now.
                with self._lock:
                    self.hidden.add((fp, parts[2]))

    def rmdir(self, path: str) -> None:
        self._writable(path, "rmdir")
        parts = self.split(path)
        self.getattr(path)
        if parts[0] == FP_DIR and len(parts) == 2:
            image = self._image(parts[1], path)
            fp = image.fingerprint
            self.client.delete_image(fp)
            for alias in image.aliases:  # LXD removes them with the image
                self.on_change(f"/{ALIAS_DIR}/{alias_to_filename(alias)}")
            self.on_change(f"/{FP_DIR}/{fp}")
            log.info("deleted image %s", fp)
            with self._lock:
                self.hidden.difference_update([k for k in self.hidden if k[0] == fp])
            self.catalog.invalidate()
            return
        if parts[0] == IMPORT_DIR and len(parts) == 2 and parts[1] in self.folders:
            folder = self.folders[parts[1]]
            if folder.files:
                raise fs_error(errno.ENOTEMPTY, path)
            folder.remove_spool()
            del self.folders[parts[1]]
            return
        raise self._refuse(errno.EPERM if len(parts) > 1 else errno.EBUSY, "rmdir", path,
                           "only image folders and import folders can be removed")

    def rename(self, old: str, new: str, pid: int = 0) -> None:
        self._writable(old, "rename")
        src, dst = self.split(old), self.split(new)
        self.getattr(old)
        if src[0] == ALIAS_DIR and dst[0] == ALIAS_DIR and len(src) == len(dst) == 2:
            self._rename_alias(src[1], dst[1], new)
            return
        if src[0] == FP_DIR and dst[0] == FP_DIR and len(src) == len(dst) == 3:
            fp = self._image(src[1], old).fingerprint
            if self._image(dst[1], new).fingerprint == fp and (fp, src[2]) in self.scratch:
                if dst[2] == METADATA:  # how sed -i and many editors save: write a copy, rename it over
                    self.save_record(fp, bytes(self.scratch[(fp, src[2])]), pid)
                    del self.scratch[(fp, src[2])]
                else:
                    self.scratch[(fp, dst[2])] = self.scratch.pop((fp, src[2]))
                return
        if src[0] == dst[0] == IMPORT_DIR and len(src) == len(dst) == 2 and src[1] in self.errors:
            self.errors[dst[1]] = self.errors.pop(src[1])
            return
        code = errno.EXDEV if src[0] != dst[0] else errno.EPERM
        raise self._refuse(code, "rename", old, f"cannot move it to {new}")

    def _rename_alias(self, old_name: str, new_name: str, path: str) -> None:
        self._valid_name(new_name, path)
        if not fits(new_name):
            raise fs_error(errno.ENAMETOOLONG, path)
        self.catalog.invalidate()
        aliases = self.catalog.snapshot().aliases
        old_alias, new_alias = filename_to_alias(old_name), filename_to_alias(new_name)
        if old_name not in aliases:
            raise fs_error(errno.ENOENT, path)
        if new_name in aliases:  # `mv a b` onto an existing b, and `ln -sfn`: b now points where a did
            self.client.retarget_alias(new_alias, aliases[old_name])
            self.client.delete_alias(old_alias)
        else:
            self.client.rename_alias(old_alias, new_alias)
        self.catalog.invalidate()

    # -- attributes ---------------------------------------------------------------

    def save_record(self, fp: str, data: bytes, pid: int = 0) -> None:
        """Save metadata.json's editable fields, unless LXD's changed since the user read them.

        The user's copy is compared with the record they read (no request per
        read), and the save itself carries LXD's ETag, so a change made while
        it is in flight is refused by LXD too.
        """
        try:
            new = json.loads(data)
        except ValueError as e:
            raise self._refuse(errno.EINVAL, "write", f"{fp}/{METADATA}", f"not valid JSON: {e}") from None
        if not isinstance(new, dict):
            raise self._refuse(errno.EINVAL, "write", f"{fp}/{METADATA}", "not a JSON object")
        current, etag = self.client.image_with_etag(fp)
        record = current.record
        with self._lock:
            read = self.read_records.get((fp, pid), record)
        for key, value in new.items():
            if key not in EDITABLE and value not in (record.get(key, ...), read.get(key, ...)):
                raise self._refuse(errno.EINVAL, "write", f"{fp}/{METADATA}",
                                   f"{key} is read-only (editable: {', '.join(EDITABLE)})")
        fields = {k: new.get(k, record.get(k)) for k in EDITABLE}
        if fields == {k: record.get(k) for k in EDITABLE}:
            return
        if any(read.get(k) != record.get(k) for k in EDITABLE):
            raise self._refuse(errno.ESTALE, "write", f"{fp}/{METADATA}",
                               "the record changed since it was read: read it again")
        try:
            self.client.update_image(fp, fields, etag)
        except LXDError as e:
            if e.status == 412:
                raise self._refuse(errno.ESTALE, "write", f"{fp}/{METADATA}",
                                   "the record changed since it was read: read it again") from None
            raise
        finally:
            self.catalog.invalidate()
        with self._lock:  # saved: the next save by this process starts from what it saved
            self.read_records.pop((fp, pid), None)
        self.on_change(f"/{FP_DIR}/{fp}/{METADATA}")
        log.info("saved %s of image %s", ", ".join(k for k in EDITABLE if k in new), fp)
