"""import/'s folders: `mkdir import/NAME`, then the parts of a split image copied into it."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

from lxdimagefs.errors import ImportFailed, fs_error
from lxdimagefs.fs.handles import FileHandle
from lxdimagefs.fs.node import check_name
from lxdimagefs.private import private_folder
from lxdimagefs.tree.import_links import ERROR_SUFFIX, LinkImports
from lxdimagefs.tree.landed import Landed, Landing
from lxdimagefs.upload.folders import FolderImport

log = logging.getLogger(__name__)


class FolderImports(LinkImports):
    """The part of import/ (tree/import_dir.py) that takes a folder of parts instead of one file."""

    spool_dir: Path
    _landed: Landed  # files and folders that became images, for the tools that wrote them

    def mkdir(self, rest: list[str]) -> None:
        if len(rest) != 1:
            super().mkdir(rest)
        path = self.path(rest)
        check_name(rest[0], path)
        with self._lock:
            if rest[0] in self._folders or rest[0] in self._uploads or rest[0] in self._errors:
                raise fs_error(errno.EEXIST, path)
            try:  # made again if a cleaner of $TMPDIR removed it: only if still this user's alone
                base = private_folder(private_folder(self.spool_dir) / "import")
            except PermissionError as e:
                raise self.ctx.refuse(errno.EACCES, "mkdir", path, str(e)) from None
            spool = Path(tempfile.mkdtemp(dir=base))  # its own: the folder may be renamed
            self._folders[rest[0]] = FolderImport(self.client, rest[0], spool)

    def rmdir(self, rest: list[str]) -> None:
        if len(rest) == 1 and rest[0] not in self._folders and self._landed.discard(rest):
            return
        with self._lock:
            folder = self._folders.get(rest[0]) if len(rest) == 1 else None
            if folder is not None:
                if folder.files:
                    raise fs_error(errno.ENOTEMPTY, self.path(rest))
                del self._folders[rest[0]]
        if folder is None:
            super().rmdir(rest)
            return
        folder.remove_spool()

    def _folder_file(self, folder: FolderImport, name: str, flags: int, pid: int) -> FileHandle:
        """A part, read or written in the folder's spool; closing one may complete the image."""
        if not flags & (os.O_RDWR | os.O_WRONLY):
            return FileHandle(str(folder.path(name)), opener=pid)
        with folder.lock:
            folder.open_files.add(name)
            folder.files.setdefault(name, 0)

        def closed() -> None:
            with folder.lock:
                folder.files[name] = folder.path(name).stat().st_size
                folder.open_files.discard(name)
            self._folder_changed(folder)

        def abandoned(why: str) -> None:  # the part may be cut short: it goes, the folder stays
            log.warning("import %s/%s dropped: %s", folder.name, name, why)
            with folder.lock:
                folder.files.pop(name, None)
                folder.open_files.discard(name)
            folder.path(name).unlink(missing_ok=True)
        return FileHandle(str(folder.path(name)), flags, on_close=closed, opener=pid, on_abandon=abandoned)

    def _folder_changed(self, folder: FolderImport) -> None:
        """A part closed or renamed: the folder becomes an image once it holds one whole."""
        with folder.lock:
            go = not folder.finishing and folder.ready()
            folder.finishing |= go
        if go:
            self._finish_folder(folder)

    def _finish_folder(self, folder: FolderImport) -> None:
        try:
            folder.fingerprint = folder.commit()
            log.info("imported folder %s as %s", folder.name, folder.fingerprint)
            self._landed.add(folder.name, Landing(files=dict(folder.files)))
        except ImportFailed as e:
            self._failed(folder.name, e)
            raise
        finally:
            if folder.fingerprint is not None or folder.name + ERROR_SUFFIX in self._errors:
                folder.remove_spool()
                with self._lock:
                    self._folders.pop(folder.name, None)
                for name in [*folder.files, ""]:  # its files' attributes, then the folder's
                    self.ctx.on_change(self.path([folder.name, name] if name else [folder.name]), wait=True,
                                       entry=False)
                # its name, and every name below it: not waited for (a rename into the folder,
                # rsync's last step, holds the folder's lock, which dropping a name in it takes)
                self.ctx.on_change(self.path([folder.name]))
        self.catalog.invalidate()
