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
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from cachetools import LRUCache

from lxdimagefs.contents.archives import Entry, ImageArchive, IndexFolder
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import BytesHandle, Caching, Handle
from lxdimagefs.fs.node import Attr, Context, Listing, Node, inode_number
from lxdimagefs.keys import Fingerprint
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.records import Image
from lxdimagefs.tree.images import FP_DIR, ImagesNode, is_public

log = logging.getLogger(__name__)
T = TypeVar("T")
Found = tuple[ImageArchive, Entry, Attr]

CONTENTS_DIR = "contents"
ALIASES = "by-alias"
# contents/ as the connection that serves it asks for it (mount/inside.py): no path the kernel
# sends holds a NUL, so the name is that connection's alone.
SERVED = "\0" + CONTENTS_DIR
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
                rdev=entry.rdev, ino=ino, mtime_ns=getattr(info, "mtime_ns", None))


class EntryHandle(Handle):
    def __init__(self, archive: ImageArchive, entry: Entry, opener: int = 0) -> None:
        super().__init__(opener)
        self.archive, self.entry = archive, entry

    def read(self, offset: int, size: int) -> bytes | memoryview:
        pieces = _guarded(self.archive.fp, lambda: self.archive.read(self.entry, offset, size))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, offset: int, buf: memoryview) -> int:
        """The pieces (views of cached blocks, mostly) go straight into libfuse's buffer."""
        at = 0
        for piece in _guarded(self.archive.fp, lambda: self.archive.read(self.entry, offset, len(buf))):
            buf[at:at + len(piece)] = piece
            at += len(piece)
        return at

    def caching(self) -> Caching:
        """What is inside an image never changes (its name is its fingerprint): bytes served
        from checked blocks stay in the kernel's pages for as long as it keeps them; bytes of
        an export whose check is under way are read afresh at each open (docs/SEMANTICS.md)."""
        return Caching.KEEP if self.archive.proven(self.entry) else Caching.FRESH


class FolderHandle(Handle):
    """A folder open inside an image: KEEP where the kernel may keep its listing for the mount's life;
    FRESH if whole, from bytes being checked (mount/inside.py drops it if the check fails); else DIRECT."""

    def __init__(self, opener: int, caching: Caching) -> None:
        super().__init__(opener)
        self._caching = caching

    def caching(self) -> Caching:
        return self._caching


def _guarded(fp: str, call: Callable[[], T]) -> T:
    """Archive errors (a corrupt or unreadable image) are EIO and a log line; the mount goes on."""
    try:
        return call()
    except OSError:
        raise
    except Exception as e:
        log.error("reading inside image %s failed: %s: %s", fp[:12], type(e).__name__, e)
        raise fs_error(errno.EIO, fp, f"cannot read inside the image: {e}") from None


class _Archives(LRUCache[str, ImageArchive]):
    """The open archives; `on_evict` is told of each that leaves, evicted or popped."""

    def __init__(self, maxsize: int, on_evict: Callable[[str], None]) -> None:
        super().__init__(maxsize)
        self.on_evict = on_evict

    def __delitem__(self, fp: str) -> None:  # the one way out: popitem and pop both come here
        super().__delitem__(fp)
        self.on_evict(fp)


class ContentsNode(Node):
    """Nothing inside an image changes: the root refuses every change here with EROFS."""

    read_only = True
    MAX_OPEN = 16  # archives kept open at once (each holds its index and decoder state)
    ENTRIES_KEPT = 8192  # entries inside images kept looked up, across them (about 500 bytes each)

    def __init__(self, ctx: Context, catalog: Catalog, exports: Exports, images: ImagesNode,
                 index: IndexFolder) -> None:
        super().__init__(ctx, CONTENTS_DIR)
        self.catalog, self.exports, self.images, self.index = catalog, exports, images, index
        # An image that fails its check: the kernel drops what it keeps of it (tree/images.py does
        # so for its export); every later read of it is EIO.
        exports.verification.on_corrupt.append(lambda fp: self.ctx.on_change(self.path([FP_DIR, fp])))
        self._archives = _Archives(self.MAX_OPEN, self._forget_entries)
        self._entries: LRUCache[tuple[str, ...], Found] = LRUCache(self.ENTRIES_KEPT)
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}

    def _forget_entries(self, fp: str) -> None:
        """An archive left the open ones: its entries go too (they would keep it, and its
        decoder's memory, alive). Called with the lock held."""
        for key in [key for key in self._entries if key[0] == fp]:
            del self._entries[key]

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

    def _entry(self, rest: list[str]) -> Found:
        """An entry inside an image and its attributes, worked out once (they never change): a
        stat, an open and their checks ask for the same one."""
        fp = self.images.image(rest[1], self.path(rest)).fingerprint  # still an image: asked every time
        key = (fp, *rest[2:])
        with self._lock:
            found = self._entries.get(key)
        if found is None or (self.exports.verification.corrupt and self.exports.verification.failed(fp)):
            archive = self._archive(fp)  # EIO for an image that failed its check, kept entries or not
            entry = _guarded(fp, lambda: archive.lookup("/" + "/".join(rest[2:])))
            if entry is None:
                raise fs_error(errno.ENOENT, self.path(rest))
            found = self._found(archive, entry)
            with self._lock:
                self._entries[key] = found
        return found

    def _found(self, archive: ImageArchive, entry: Entry) -> Found:
        # The names of one file share its number; the same image under two remotes of a forest does not.
        ino = None if entry.place is None else inode_number(self.ctx.mountpoint, archive.fp, *entry.place)
        return archive, entry, _attr(entry, ino)

    def _short(self, rest: list[str]) -> Image | None:
        """The image a short fingerprint names: `by-fingerprint/<prefix>` links to its full name (the
        prefix may name another image later; what is below a name inside an image is kept for good)."""
        if len(rest) != 2 or rest[0] != FP_DIR or Fingerprint.parse(rest[1]) is not None:
            return None
        return self.images.image(rest[1], self.path(rest))

    def getattr(self, rest: list[str]) -> Attr:
        t = self.ctx.started
        if (image := self._short(rest)) is not None:
            up = image.uploaded_at
            return Attr(stat.S_IFLNK | 0o777, len(image.fingerprint), up, up, up)
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
        return self._entry(rest)[2]

    def readdir(self, rest: list[str]) -> list[str]:
        if not rest:
            return [CACHEDIR_TAG, FP_DIR, ALIASES]
        if rest == [FP_DIR]:
            images = sorted(self.catalog.snapshot().images)
            return Listing(images, dict.fromkeys(images, stat.S_IFDIR))
        if rest == [ALIASES]:
            aliases = sorted(self.catalog.snapshot().aliases)
            return Listing(aliases, dict.fromkeys(aliases, stat.S_IFLNK))
        if rest[0] != FP_DIR or len(rest) < 2:
            self.getattr(rest)
            raise fs_error(errno.ENOTDIR, self.path(rest))
        archive, entry, _ = self._entry(rest)  # one lookup serves the check and the listing
        if not stat.S_ISDIR(entry.info.mode):
            raise fs_error(errno.ENOTDIR, self.path(rest))
        # Listed once: the kernel keeps the listing for the mount's life (mount/libfuse/kernelcache.py).
        listing, entries = _guarded(archive.fp, lambda: archive.list("/" + "/".join(rest[2:])))
        if len(entries) <= self.ENTRIES_KEPT // 4:  # the stat of each name that follows: no lookup
            key = (archive.fp, *rest[2:])
            found = {(*key, name): self._found(archive, e) for name, e in entries.items()}
            with self._lock:
                if archive is self._archives.get(archive.fp):  # not one that left (and forgot them)
                    self._entries.update(found)
        return listing

    def opendir(self, rest: list[str], pid: int) -> Handle:
        """A folder inside an image is asked for at each open (its image gone: ENOENT; failed its
        check: EIO), since the kernel may answer its listing itself: it keeps it for the mount's
        life under an image's full fingerprint (a short one may name another image later), once
        the bytes it comes from are checked (a check under way may yet fail), and unless its last
        listing left entries out (a guest's disk read that failed: asked again at each open)."""
        if len(rest) < 2 or rest[0] != FP_DIR:
            return super().opendir(rest, pid)
        archive, entry, _ = self._entry(rest)  # its listing comes from the source that holds it
        complete = getattr(entry.source, "complete", lambda _: True)  # a guest's folder listed whole
        if self.exports.verification.failed(archive.fp) or not complete(entry.info):
            return FolderHandle(pid, Caching.DIRECT)
        kept = Fingerprint.parse(rest[1]) is not None and archive.proven(entry)
        return FolderHandle(pid, Caching.KEEP if kept else Caching.FRESH)

    def readlink(self, rest: list[str]) -> str:
        if (image := self._short(rest)) is not None:
            return image.fingerprint
        if len(rest) == 2 and rest[0] == ALIASES:
            fp = self.catalog.alias_target(rest[1])
            if fp is None:
                raise fs_error(errno.ENOENT, self.path(rest))
            return f"../{FP_DIR}/{fp}"
        if len(rest) >= 2 and rest[0] == FP_DIR:
            _, entry, _ = self._entry(rest)
            if stat.S_ISLNK(entry.info.mode):
                return entry.info.linkname
        self.getattr(rest)
        raise fs_error(errno.EINVAL, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> Handle:
        if rest == [CACHEDIR_TAG]:
            return BytesHandle(TAG)
        if len(rest) < 3 or rest[0] != FP_DIR:
            raise fs_error(errno.ENOENT, self.path(rest))
        archive, entry, _ = self._entry(rest)
        return EntryHandle(archive, entry, opener=pid)


class ServedElsewhere(Node):
    """contents/ served by a connection of its own (mount/inside.py): a link to it (a mount inside
    the mount would make its unmount EBUSY). The root refuses every change here (EROFS)."""

    read_only = True

    def __init__(self, ctx: Context, target: str) -> None:
        super().__init__(ctx, CONTENTS_DIR)
        self.target = target

    def getattr(self, rest: list[str]) -> Attr:
        if rest:  # below a link: the kernel follows it instead
            raise fs_error(errno.ENOENT, self.path(rest))
        t = self.ctx.started
        return Attr(stat.S_IFLNK | 0o777, len(os.fsencode(self.target)), t, t, t)

    def readlink(self, rest: list[str]) -> str:
        self.getattr(rest)
        return self.target
