"""Verified exports on local disk, kept across mounts and servers, by fingerprint.

An image's bytes never change under its fingerprint, so a block kept here is
never stale, whichever server or mount fetched it. Each image is one sparse
file (`export-<fp>`, blocks at their own offsets) beside its sealed manifest
(`manifest-<fp>`, written once the sha256 agreed). A block is served from here
only if the image has a sealed manifest and the block's XXH3-128 matches it:
a file damaged or edited on disk is never served, it is fetched again. Daemons
sharing the folder stay correct (blocks written in place, manifests by rename).
Bounded (`cache_max`, 5% of its filesystem free): least recently opened out first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
from pathlib import Path

from lxdimagefs.data import diskparts
from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.directwrite import DirectWriter
from lxdimagefs.data.manifest import DIGEST, Manifest, digest
from lxdimagefs.keys import ObjectKey, Sha256
from lxdimagefs.private import Temporary, abandoned, moved
from lxdimagefs.servers.localfiles import ReadAhead

log = logging.getLogger(__name__)

MAGIC = b"lxdimagefs manifest 1\n"
# manifest-SERVER-FP.N: a split part's manifest is one server's (its layout says where parts divide)
_NAME = re.compile(r"(?:export|manifest|part)-(?:[0-9a-f]{16}-)?([0-9a-f]{64})(?:\.(?:0|1|2|sum))?")
_TEMPORARY = re.compile(r"\.(?:export|manifest|part)-.+\.[0-9]+\.[0-9]+")  # private.Temporary's
DECODED = 2  # the part index of a unified .tar.zst/.tar.lzma decoded for contents/ (a split image's: 0, 1)
KEEP_FREE = 0.05  # of the cache's filesystem, left free whatever cache_max says
OPEN_FILES = 8  # image files kept open
RESCAN = 16 * BLOCK


def _digest_of(name: str) -> str | None:
    """The fingerprint a kept file belongs to (temporary and stray files: None)."""
    found = _NAME.fullmatch(name)
    return found.group(1) if found else None


def decoded_key(fp: str) -> ObjectKey:
    """Where a decoded tarball's manifest is kept: content-addressed (decoding is the same anywhere)."""
    return ObjectKey(Sha256(fp), "manifest", part=DECODED)

class CacheRefused(Exception):
    """The cache folder cannot be made private to this user."""


def private_folder(root: Path) -> None:
    """Make `root` (0700) or check it is this user's own and no one else's."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as e:
        raise CacheRefused(f"cache folder {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheRefused(f"cache folder {root} is not a folder")
    if st.st_uid != os.geteuid():
        raise CacheRefused(f"cache folder {root} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)


class DiskCache:
    def __init__(self, root: Path, max_bytes: int | None = None, keep_free: float = KEEP_FREE) -> None:
        private_folder(root)
        self.root, self.max_bytes, self.keep_free = root, max_bytes, keep_free
        self._used: int | None = None  # bytes the folder holds, as of the last scan plus writes since
        self._unscanned = 0  # bytes written since the last scan
        self._lock = threading.RLock()  # eviction drops files, which closes their descriptors
        self.hits = 0  # blocks served from here, for tests and benchmarks
        self.intact: dict[str, tuple[int, int]] = {}  # exports kept whole this daemon checked: their inodes
        self._fds: dict[str, int] = {}  # open image files, least recently used first
        self.ahead = ReadAhead()
        self._writer = DirectWriter(BLOCK)  # blocks go to disk off the fetch thread, past the page cache

    def in_use(self) -> int | None:
        """Bytes held, as of the last scan and writes since (None: not scanned yet)."""
        return self._used

    def export(self, fp: str) -> Path:
        return self.root / ObjectKey(Sha256(fp), "export").filename

    def _manifest(self, fp: str, key: ObjectKey | None = None) -> Path:
        return self.root / (key or ObjectKey(Sha256(fp), "manifest")).filename

    def manifest(self, fp: str, total: int, key: ObjectKey | None = None) -> Manifest | None:
        """The sealed manifest of an image (`key`: of one split part), if an earlier verdict left
        one; marks the image used."""
        try:
            raw = self._manifest(fp, key).read_bytes()
        except OSError:
            return None
        body, trailer = raw[:-DIGEST], raw[-DIGEST:]
        head = len(MAGIC) + 8
        if (not body.startswith(MAGIC) or digest(body) != trailer
                or int.from_bytes(body[len(MAGIC):head], "little") != total):
            log.warning("disk cache: the manifest of %s is damaged; dropped", fp)
            self.drop(fp)
            return None
        try:
            manifest = Manifest(fp, total, body[head:])
        except ValueError:
            self.drop(fp)
            return None
        with contextlib.suppress(OSError):  # opened: the most recently used
            os.utime(self.export(fp) if key is None else self._manifest(fp, key))
        return manifest

    def seal(self, manifest: Manifest, key: ObjectKey | None = None) -> None:
        """Keep the manifest of an image (`key`: a split part's) whose sha256 agreed, atomically."""
        body = MAGIC + manifest.total.to_bytes(8, "little") + manifest.sealed()
        final = self._manifest(manifest.fp, key)
        self.flush()  # every block kept before the verdict is on disk before the manifest
        try:
            with Temporary(final) as tmp:
                tmp.path.write_bytes(body + digest(body))  # the file just made, ours, locked
                os.replace(tmp.path, final)
        except OSError as e:
            log.warning("disk cache: cannot keep the manifest of %s: %s", manifest.fp, e.strerror)

    def drop(self, fp: str) -> None:
        self.intact.pop(fp, None)
        self.forget_fd(fp)
        self._writer.forget(str(self.export(fp)))
        decoded = self._manifest(fp, decoded_key(fp))
        servers = self.root.glob(f"manifest-*-{Sha256(fp)}.*")
        for path in (self._manifest(fp), decoded, self.export(fp), *servers):
            path.unlink(missing_ok=True)
        self.drop_parts(fp)

    def drop_parts(self, fp: str) -> None:
        """Drop an image's kept parts (a block of one failed its manifest), not their manifests."""
        for i in (0, 1, DECODED, "sum"):
            self.part(fp, i).unlink(missing_ok=True)

    def _open(self, fp: str, create: bool) -> int:
        """A descriptor of the image's file, for this call alone (close it); -1 if there is none.

        One description per image is kept open (the last few images), so the kernel's
        readahead follows a sequential reader across blocks instead of starting over.
        """
        with self._lock:
            fd = self._fds.pop(fp, None)
            if fd is not None and create and moved(fd, self.export(fp)):  # evicted by another daemon:
                os.close(fd)  # writes go to a file the bound counts (reads may go on through it)
                fd = None
            if fd is None:
                try:
                    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
                    fd = os.open(self.export(fp), flags, 0o600)
                except OSError:
                    return -1
            self._fds[fp] = fd
            while len(self._fds) > OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
            return os.dup(fd)

    def forget_fd(self, fp: str) -> None:
        """Close the kept descriptor of an image's file (dropped, or about to be replaced)."""
        with self._lock:
            fd = self._fds.pop(fp, None)
        if fd is not None:
            os.close(fd)

    def get(self, fp: str, index: int, length: int, total: int | None = None) -> bytearray | None:
        """The block as it is on disk, or None if the image has no file (unchecked: a hole reads
        as zeros; the caller checks it against the manifest)."""
        buf = bytearray(length)
        return buf if self.readinto(fp, index, memoryview(buf), total) else None

    def readinto(self, fp: str, index: int, buf: memoryview, total: int | None = None) -> bool:
        """`get` into the caller's buffer; False if not there. Asks the disk ahead of a sequential reader."""
        fd = self._open(fp, create=False)
        if fd < 0:
            return False
        try:
            offset = index * BLOCK
            if os.preadv(fd, [buf], offset) != len(buf):
                return False
            self.ahead.note(fp, fd, offset, len(buf), total or offset + len(buf))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def written(self, fp: str, index: int) -> bool:
        """Whether a block was ever written (else it is a hole, and reads as zeros)."""
        fd = self._open(fp, create=False)
        if fd < 0:
            return False
        try:
            return os.lseek(fd, index * BLOCK, os.SEEK_DATA) == index * BLOCK
        except OSError:  # ENXIO: no data past the offset
            return False
        finally:
            os.close(fd)

    def put(self, fp: str, index: int, data: bytearray | memoryview, total: int) -> None:
        """Keep a block, if the bound leaves room for it (it is checked when it is read back)."""
        if self.max_bytes is not None and total > self.max_bytes // 2:
            return  # an image that would push out everything else is not kept
        if fp in self.intact or not self._room(len(data)) or self._manifest(fp).exists():
            return  # kept whole; no room; or sealed already: its blocks were kept by the verified read
        fd = self._open(fp, create=True)  # made here: the writer writes only to files that exist
        if fd >= 0:
            os.close(fd)
            self._writer.write(str(self.export(fp)), index * BLOCK, data)

    def flush(self) -> None:
        """Wait until every block `put` so far is written."""
        self._writer.flush()

    def part(self, fp: str, index: int | str) -> Path:
        return self.root / f"{ObjectKey(Sha256(fp), 'part').filename}.{index}"

    def keep_parts(self, fp: str, verified: list[Path], first: int = 0) -> None:
        """Keep a split image's parts (or a decoded tarball: `first` DECODED), for later mounts."""
        sizes = [p.stat().st_size for p in verified]
        if (self.max_bytes is not None and sum(sizes) > self.max_bytes // 2) or not self._room(sum(sizes)):
            return
        diskparts.keep(self, fp, verified, first)

    def keep_whole(self, fp: str, verified: Path) -> None:
        """Keep a unified export just checked against the fingerprint, whole, for later mounts."""
        size = verified.stat().st_size
        if (self.max_bytes is None or size <= self.max_bytes // 2) and self._room(size):
            diskparts.keep_whole(self, fp, verified)

    def _room(self, size: int) -> bool:
        with self._lock:
            # Counted again every RESCAN bytes: other daemons sharing the folder write to it too.
            # Free space is asked as often (a statvfs per block cost the fetch threads).
            self._unscanned += size
            over_max = self.max_bytes is not None and (self._used or 0) + size > self.max_bytes
            if self._used is None or self._unscanned > RESCAN or over_max or size > BLOCK:  # a whole file
                self.flush()  # what waits to be written is counted too
                self._used, self._unscanned = self._evict(size), 0
                if _over(self, self._used + size, size):
                    return False
            self._used += size
            return True

    def _evict(self, size: int) -> int:
        """Drop the least recently used images until `size` more fits; returns the bytes left."""
        mtimes, sizes, temporary = _scan(self.root)
        images = [(mtime, sizes[fp], fp) for fp, mtime in mtimes.items()]
        images.sort()
        used = temporary + sum(size for _, size, _ in images)
        target = int(self.max_bytes * 0.9) if self.max_bytes is not None else None
        while images and (_over(self, used + size, size) or (target is not None and used + size > target)):
            _, gone, fp = images.pop(0)
            self.drop(fp)
            used -= gone
            log.debug("disk cache: dropped %s (%d bytes), least recently used", fp, gone)
        return used


def _scan(root: Path) -> tuple[dict[str, float], dict[str, int], int]:
    """Each image's last use and bytes, and the bytes of files on their way in (a writer's
    `Temporary`); one left by a writer that is gone (killed mid-write) is removed."""
    mtimes: dict[str, float] = {}
    sizes: dict[str, int] = {}
    temporary = 0
    for entry in os.scandir(root):
        fp = _digest_of(entry.name)
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat(follow_symlinks=False)
            if fp is not None:
                mtimes[fp] = max(mtimes.get(fp, 0.0), st.st_mtime)
                sizes[fp] = sizes.get(fp, 0) + st.st_blocks * 512
            elif _TEMPORARY.fullmatch(entry.name) and abandoned(entry.path):
                log.info("disk cache: removed %s, left by a writer that is gone", entry.name)
            elif _TEMPORARY.fullmatch(entry.name):
                temporary += st.st_blocks * 512
    return mtimes, sizes, temporary


def _over(cache: DiskCache, used: int, size: int) -> bool:
    """Past cache_max, or `size` bytes more would leave less than keep_free of the filesystem."""
    if cache.max_bytes is not None and used > cache.max_bytes:
        return True
    return diskparts.too_full(cache.root, max(size, BLOCK), cache.keep_free)


def drop_unsealed(cache: DiskCache, fp: str) -> None:
    """A reader's check failed: drop what it kept, unless an earlier verdict sealed the image (one
    server's wrong bytes must not throw away what another server's verified copy left)."""
    if not cache._manifest(fp).exists():
        cache.drop(fp)
