"""import/'s links: `ln -s` asks the server to fetch an image itself (server-side creation)."""

from __future__ import annotations

import errno
import logging
import threading

from lxdimagefs import stats
from lxdimagefs.errors import ImportFailed, LXDError, fs_error
from lxdimagefs.fs.node import Fading, Node, check_name
from lxdimagefs.names import filename_to_alias, is_fingerprint
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.protocol import ImageServer
from lxdimagefs.servers.pull import Source, from_url
from lxdimagefs.upload.folders import FolderImport
from lxdimagefs.upload.streamed import Upload

log = logging.getLogger(__name__)
PROGRESS = "user.lxdimagefs.progress"

IMPORT_DIR = "import"
ERROR_SUFFIX = ".error"


class LinkImports(Node):
    """The part of import/ (tree/import_dir.py) that takes links instead of bytes."""

    catalog: Catalog
    client: ImageServer
    _lock: threading.Lock
    _uploads: dict[str, Upload]
    _errors: dict[str, bytes]
    _folders: dict[str, FolderImport]
    _pulled: Fading  # links that became images: name -> what they named

    def _failed(self, name: str, e: ImportFailed) -> None:
        raise NotImplementedError

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
            with stats.underway("pull", name):  # LXD's download progress shows in the stats
                fp = source.create(self.client, aliases)
        except LXDError as e:
            failure = ImportFailed((e.errno if e.status else None) or errno.EIO, e.message)
            self._failed(name, failure)
            raise fs_error(failure.errno or errno.EIO, path, e.message) from None
        finally:
            self.catalog.invalidate()
        log.info("%s: the server now holds %s as %s", path, source.describe, fp)
        self._pulled.add(name, source.describe)  # gone once looked up, as a closed upload's file is

    def _pulled_link(self, rest: list[str]) -> str | None:
        named = self._pulled.get(rest[0]) if len(rest) == 1 else None
        return named if isinstance(named, str) else None

    def readlink(self, rest: list[str]) -> str:
        pulled = self._pulled_link(rest)
        if pulled is None:
            return super().readlink(rest)
        return pulled

    def xattrs(self, rest: list[str]) -> dict[str, bytes]:
        """`user.lxdimagefs.progress` of an import/ name LXD is working on (unpacking an upload):
        how far along LXD says it is, or `under way` while it says nothing."""
        self.getattr(rest)
        name = rest[0] if len(rest) == 1 else None
        running = [p for p in stats.progress(name=name) if p[0] in ("import", "pull")] if name else []
        if not running:
            return {}
        done = running[0][2]
        return {PROGRESS: (f"{done:.0%}" if done >= 0 else "under way").encode()}
