"""by-fingerprint/'s changes to an image itself: `rm -r` deletes it, `touch` has LXD refresh it.

Kept apart from tree/images.py, which shows the folders and edits their
records: these are the calls that make LXD drop or replace a whole image.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import Counter

from lxdimagefs.fs.handles import DirHandle, Handle
from lxdimagefs.fs.node import Fading, Node
from lxdimagefs.names import alias_to_filename
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.records import Image

log = logging.getLogger(__name__)

FP_DIR = "by-fingerprint"


class DeleteAndRefresh(Node):
    """The part of by-fingerprint/ (tree/images.py) that deletes and refreshes images."""

    catalog: Catalog
    _lock: threading.Lock
    _scratch: dict[tuple[str, str], bytearray]  # editors' temporary files
    _hidden: set[tuple[str, str]]  # files unlinked by `rm -r` before its rmdir
    _open_dirs: Counter[tuple[str, int]]  # (fp, pid): image folders held open
    _replaced: Fading  # image folders a refresh just replaced

    def image(self, name: str, path: str) -> Image:
        raise NotImplementedError

    def opendir(self, rest: list[str], pid: int) -> Handle:
        """An image folder held open: `rm -r` empties it (see unlink) before its rmdir."""
        if len(rest) != 1:
            return super().opendir(rest, pid)
        key = (self.image(rest[0], self.path(rest)).fingerprint, pid)
        with self._lock:
            self._open_dirs[key] += 1

        def closed() -> None:
            with self._lock:
                self._open_dirs[key] -= 1
                if self._open_dirs[key] <= 0:
                    del self._open_dirs[key]
        return DirHandle(pid, closed)

    def unlink(self, rest: list[str], pid: int = 0) -> None:
        path = self.path(rest)
        fp = self.image(rest[0], path).fingerprint
        with self._lock:
            if self._scratch.pop((fp, rest[1]), None) is not None:
                return
            emptying = (fp, pid) in self._open_dirs
        self._deleting(path, "unlink")
        if not emptying:  # hiding it would "succeed" and lose nothing: the next mount shows it again
            raise self.ctx.refuse(errno.EPERM, "unlink", path,
                                  "an image's files go only with the image: rm -r its folder")
        with self._lock:  # `rm -r` empties the folder it holds open, then rmdir deletes the image
            self._hidden.add((fp, rest[1]))

    def _deleting(self, path: str, op: str) -> None:
        if not self.ctx.allow_delete:
            raise self.ctx.refuse(errno.EPERM, op, path,
                                  "deleting images is off: mount with -o allow_delete to allow it")

    def rmdir(self, rest: list[str]) -> None:
        if len(rest) != 1:
            super().rmdir(rest)
        self._deleting(self.path(rest), "rmdir")
        image = self.image(rest[0], self.path(rest))
        fp = image.fingerprint
        self.catalog.server.delete_image(fp)
        for alias in image.aliases:  # LXD removes them with the image
            self.ctx.on_change(f"/by-alias/{alias_to_filename(alias)}")
        self.ctx.on_change(f"/{FP_DIR}/{fp}")
        log.info("deleted image %s", fp)
        with self._lock:
            self._hidden.difference_update([k for k in self._hidden if k[0] == fp])
        self.catalog.invalidate()

    def touch(self, rest: list[str]) -> bool:
        """`touch by-fingerprint/<fp>`: `lxc image refresh`, for an image LXD keeps up to date."""
        if len(rest) != 1:
            return False
        path = self.path(rest)
        image = self.image(rest[0], path)
        if not image.record.get("auto_update"):
            raise self.ctx.refuse(errno.EPERM, "utimens", path,
                                  "refresh is for images with auto_update on (set user.lxd.auto_update)")
        try:
            refreshed = self.catalog.server.refresh_image(image.fingerprint)
        finally:
            self.catalog.invalidate()
        log.info("refreshed %s: %s", image.fingerprint, "replaced by a newer one" if refreshed else "current")
        if refreshed:
            self._replaced.add(image.fingerprint, True)
        for alias in image.aliases:  # a refresh moves them to the new image
            self.ctx.on_change(f"/by-alias/{alias_to_filename(alias)}")
        self.ctx.on_change(f"/{FP_DIR}/{image.fingerprint}")
        return True
