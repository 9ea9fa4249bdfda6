"""contents/: what is inside each image, read-only.

    contents/by-fingerprint/<fp>/   metadata.yaml, templates/, rootfs/ … as inside the export
    contents/by-alias/<alias> -> ../by-fingerprint/<fp>
    contents/CACHEDIR.TAG        so that backups of the mount leave the derived files out

Owners, modes, times and link targets are the image's own, but for the
top folder of a private image: the mounter's alone (0500), so that no one
else reads inside it, as no one else reads its export. Nothing here can be
changed: every change is EROFS.
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from cachetools import LRUCache

from lxdimagefs.contents.archives import Entry, ImageArchive, IndexFolder
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import BytesHandle, Handle
from lxdimagefs.fs.node import Attr, Context, Node, inode_number
from lxdimagefs.keys import Fingerprint
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.tree.images import FP_DIR, ImagesNode, is_public

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTENTS_DIR = "contents"
ALIASES = "by-alias"
# contents/ is derived from the exports beside it: backups skip it with --exclude-caches (tar,
# restic, borg), as https://bford.info/cachedir/ has every tool do.
CACHEDIR_TAG = "CACHEDIR.TAG"
TAG = (b"Signature: 8a477f597d28d172789f06886806bc55\n"
       b"# This file is a cache directory tag created by lxdimagefs: contents/ shows what is inside\n"
       b"# the images beside it, unpacked on the fly. See https://bford.info/cachedir/\n")


def _attr(entry: Entry, ino: int | None) -> Attr:
    """An entry's attributes as the image holds them (a symlink's size: its target's length)."""
    info = entry.info
    kind = stat.S_IFMT(info.mode)
    size = len(info.linkname.encode("utf-8", "surrogateescape")) if kind == stat.S_IFLNK else info.size
    return Attr(info.mode, size if kind in (stat.S_IFREG, stat.S_IFLNK) else 0, info.mtime, info.mtime,
                info.mtime, 2 if kind == stat.S_IFDIR else entry.nlink, uid=info.uid, gid=info.gid,
                rdev=entry.rdev, ino=ino)


class EntryHandle(Handle):
    def __init__(self, archive: ImageArchive, entry: Entry, opener: int = 0) -> None:
        super().__init__(opener)
        self.archive, self.entry = archive, entry

    def read(self, offset: int, size: int) -> bytes:
        return _guarded(self.archive.fp, lambda: self.archive.read(self.entry, offset, size))


def _guarded(fp: str, call: Callable[[], T]) -> T:
    """Archive errors (a corrupt or unreadable image) are EIO and a log line; the mount goes on."""
    try:
        return call()
    except OSError:
        raise
    except Exception as e:
        log.error("reading inside image %s failed: %s: %s", fp[:12], type(e).__name__, e)
        raise fs_error(errno.EIO, fp, f"cannot read inside the image: {e}") from None


class ContentsNode(Node):
    """Nothing inside an image changes: the root refuses every change here with EROFS."""

    read_only = True
    MAX_OPEN = 16  # archives kept open at once (each holds its index and decoder state)

    def __init__(self, ctx: Context, catalog: Catalog, exports: Exports, images: ImagesNode,
                 index: IndexFolder) -> None:
        super().__init__(ctx, CONTENTS_DIR)
        self.catalog, self.exports, self.images, self.index = catalog, exports, images, index
        self._archives: LRUCache[str, ImageArchive] = LRUCache(maxsize=self.MAX_OPEN)
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}

    def _archive(self, fp: Fingerprint) -> ImageArchive:
        if self.exports.verification.failed(fp):  # its index may be from the bytes that failed
            with self._lock:
                self._archives.pop(fp, None)
            raise fs_error(errno.EIO, fp, "the image failed its check")
        with self._lock:
            archive = self._archives.get(fp)
            if archive is not None:
                return archive
            lock = self._opening.setdefault(fp, threading.Lock())
        with lock:  # one opening (and index build) per image, however many callers
            with self._lock:
                archive = self._archives.get(fp)
            if archive is None:
                layout = self.catalog.layout(fp)
                index = self.index.base(fp, self.exports.server)
                archive = _guarded(fp, lambda: ImageArchive(fp, layout, self.exports, index))
                with self._lock:
                    self._archives[fp] = archive
        return archive

    def _entry(self, rest: list[str]) -> tuple[ImageArchive, Entry]:
        fp = self.images.image(rest[1], self.path(rest)).fingerprint
        archive = self._archive(fp)
        entry = _guarded(fp, lambda: archive.lookup("/" + "/".join(rest[2:])))
        if entry is None:
            raise fs_error(errno.ENOENT, self.path(rest))
        return archive, entry

    def getattr(self, rest: list[str]) -> Attr:
        t = self.ctx.started
        if rest == [CACHEDIR_TAG]:
            return Attr(stat.S_IFREG | 0o444, len(TAG), t, t, t)
        if len(rest) < 2:
            if rest and rest[0] not in (FP_DIR, ALIASES):
                raise fs_error(errno.ENOENT, self.path(rest))
            return Attr(stat.S_IFDIR | 0o555, 0, t, t, t, 2)
        if rest[0] == ALIASES:
            target = self.readlink(rest)
            return Attr(stat.S_IFLNK | 0o777, len(target.encode()), t, t, t)
        if rest[0] != FP_DIR:
            raise fs_error(errno.ENOENT, self.path(rest))
        if len(rest) == 2:  # the image's folder: from the catalog, without opening its archive
            image = self.images.image(rest[1], self.path(rest))
            up = image.uploaded_at  # a private image's is the mounter's alone
            return Attr(stat.S_IFDIR | (0o555 if is_public(image) else 0o500), 0, up, up, up, 2)
        archive, entry = self._entry(rest)
        # The names of one file share its number; the same image under two remotes of a forest does not.
        ino = None if entry.place is None else inode_number(self.ctx.mountpoint, archive.fp, *entry.place)
        return _attr(entry, ino)

    def readdir(self, rest: list[str]) -> list[str]:
        if not rest:
            return [CACHEDIR_TAG, FP_DIR, ALIASES]
        if rest == [FP_DIR]:
            return sorted(self.catalog.snapshot().images)
        if rest == [ALIASES]:
            return sorted(self.catalog.snapshot().aliases)
        if rest[0] != FP_DIR or len(rest) < 2:
            self.getattr(rest)
            raise fs_error(errno.ENOTDIR, self.path(rest))
        archive, entry = self._entry(rest)  # one lookup serves the check and the listing
        if not stat.S_ISDIR(entry.info.mode):
            raise fs_error(errno.ENOTDIR, self.path(rest))
        return _guarded(archive.fp, lambda: archive.list("/" + "/".join(rest[2:])))

    def readlink(self, rest: list[str]) -> str:
        if len(rest) == 2 and rest[0] == ALIASES:
            fp = self.catalog.alias_target(rest[1])
            if fp is None:
                raise fs_error(errno.ENOENT, self.path(rest))
            return f"../{FP_DIR}/{fp}"
        if len(rest) >= 2 and rest[0] == FP_DIR:
            _, entry = self._entry(rest)
            if stat.S_ISLNK(entry.info.mode):
                return entry.info.linkname
        self.getattr(rest)
        raise fs_error(errno.EINVAL, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        if rest == [CACHEDIR_TAG]:
            return BytesHandle(TAG)
        if len(rest) < 3 or rest[0] != FP_DIR:
            raise fs_error(errno.ENOENT, self.path(rest))
        archive, entry = self._entry(rest)
        return EntryHandle(archive, entry, opener=pid)
