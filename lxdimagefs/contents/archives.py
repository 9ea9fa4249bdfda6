"""What is inside an image, read through ratarmountcore without unpacking anything.

A unified image's export is one tarball (any compression LXD takes), read
over the mount's own lazy reader: an uncompressed tarball is read only at
the offsets that hold what is asked for; a compressed one costs one
sequential pass to build its index (gzip seek points and the like). An index
built from checked bytes only is kept on disk for later mounts, named by the
image's key (server and fingerprint); one built from lazy reads before the
check is this mount's alone, in its spool (contents/indexes.py). A split
image's parts are local files: its metadata tarball is the top of the tree,
its squashfs `rootfs/`, both read through the parts' checked readers.
"""

from __future__ import annotations

import io
import logging
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxdimagefs.contents import inodes
from lxdimagefs.contents.deferred import Deferred
from lxdimagefs.contents.disk.root import vm_root  # with the daemon: 0.5 MiB, 20 ms off a VM's first look
from lxdimagefs.contents.indexes import IndexFolder as IndexFolder  # where it was first
from lxdimagefs.contents.indexes import Place
from lxdimagefs.contents.plain import AT_ONCE, compression_of, decode_later, plain_tar, spans
from lxdimagefs.contents.seekable import Seekable
from lxdimagefs.data.diskparts import CheckedPart
from lxdimagefs.data.exports import Exports, decoder_of, whole_frames
from lxdimagefs.data.prefetch import Prefetcher
from lxdimagefs.fs.node import Listing
from lxdimagefs.keys import Fingerprint
from lxdimagefs.names import fits
from lxdimagefs.servers.records import ExportLayout

if TYPE_CHECKING:
    from ratarmountcore.mountsource.MountSource import FileInfo, MountSource

log = logging.getLogger(__name__)
Pieces = list[bytes | memoryview]  # a read's bytes, in order

ROOTFS = "rootfs"
# indexed_gzip over rapidgzip: the same seek points for far less memory (rapidgzip decodes in
# parallel chunks, which a daemon sharing 2 cores with its readers does not want).
PREFERRED = ["indexed_gzip"]
# A gzip seek point every 4 MiB: indexed_gzip's buffers are a few times the spacing (ratarmountcore's
# 16 MiB default made a daemon reading one .tar.gz hold 136-231 MiB; this, about a quarter), and a
# read decompresses at most 4 MiB to reach its bytes.
GZIP_SPACING = 4 << 20
LISTED = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK)  # types a listing gives as they are indexed
META_MAX = 64 << 20  # a split image's zstd or lzma metadata tarball, decoded in memory
# Other metadata tarballs up to this are decoded in memory too: python-xz held an 8 MiB block
# buffer for as long as the image was open, for a tarball of a few KiB (metadata.yaml, templates).
META_KEPT = 1 << 20


def _in_memory(raw: Any, compression: str) -> bytes | None:
    """A split image's metadata tarball decoded whole from its checked reader (then closed): it
    holds metadata.yaml and templates, so it is small. Over META_KEPT: None, but `.tar.zst` and
    `.tar.lzma`, which ratarmountcore cannot read itself, up to META_MAX (over it: EIO); a
    `.tar.zst` cut short inside a frame: EIO (LXD takes one: it reads metadata.yaml only)."""
    cap = META_MAX if compression in AT_ONCE else META_KEPT
    with raw, decoder_of(raw, compression) as decoder:
        data: bytes = decoder.read(cap + 1)
        if compression == "zst" and len(data) <= cap and not whole_frames(raw.raw.pread, raw.raw.size):
            raise ValueError("the metadata tarball ends inside a zstd frame")  # its reader ends quietly
    if len(data) <= cap:
        return data
    if compression in AT_ONCE:
        raise ValueError(f"a metadata tarball of over {META_MAX >> 20} MiB")
    return None


class ExportFile(Seekable):
    """An export as a seekable file, read lazily through a read-ahead of its own."""

    def __init__(self, reader: Prefetcher | CheckedPart, size: int) -> None:
        super().__init__()
        self._reader, self.size, self._pos = reader, size, 0

    def readinto(self, buffer: Any) -> int:
        data = self._reader.read(self._pos, len(buffer))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def pread(self, offset: int, size: int) -> memoryview | bytes:
        """Bytes at `offset`, the position left alone: both readers are safe from any thread."""
        return self._reader.read(offset, size)

    def close(self) -> None:
        self._reader.close()
        super().close()


def _lazy(exports: Exports, key: str, size: int) -> tuple[io.BufferedReader, str | None]:
    """A file object over the lazy reader, and its key if the image is not verified yet (by this
    daemon's check or the disk cache's sealed verdict: then every read is checked)."""
    reader = exports.unified(key, size, max_window=4 << 20)
    return io.BufferedReader(ExportFile(reader, size), 1 << 16), None if reader.verified else key


def _tar(**options: Any) -> Any:
    """ratarmountcore's tar source, imported at a tarball's first look (0.15 s, 15 MiB with its
    decoders), which a daemon serving only exports, or only a VM's rootfs/, need not carry."""
    from ratarmountcore.mountsource.formats.tar import SQLiteIndexedTar
    return SQLiteIndexedTar(**options)


def _open(fp: Fingerprint, layout: ExportLayout, exports: Exports, index: Path) -> tuple[Any, Any, dict]:
    """An image's sources: its (metadata) tarball, a split image's squashfs rootfs, and the
    keys of those read lazily from an export (their bytes proven only once it is verified)."""
    def indexed(make: Any, source: Any, unchecked: str | None, suffix: str, **options: Any) -> Any:
        place = Place(exports, fp, index, suffix, [unchecked] if unchecked else [])
        built = make(fileObject=source, indexFilePath=place.ready(), writeIndex=True, **options)
        place.done()
        return built
    first = layout.parts[0]
    compression = compression_of(first.name)
    if compression and not layout.split:
        if first.key is not None and compression in AT_ONCE:
            raise ValueError(f"{first.name}: this compression is read inside images from LXD only")
        # Decoded once into a plain tarball whose blocks are checked at every read (contents/plain.py):
        # its bytes hashed to the fingerprint as they were decoded, so its index may be kept.
        decoded = None if first.key is not None else exports.decoded(
            fp, first.size, compression, decode=compression in AT_ONCE)
        if decoded is not None:
            return plain_tar(fp, decoded, Place(exports, fp, index, ".decoded.sqlite", [])), None, {}
    if not layout.split:
        return indexed(_tar, *_lazy(exports, first.key or fp, first.size), suffix=".sqlite",
                       tarFileName=fp, prioritizedBackends=PREFERRED, gzipSeekPointSpacing=GZIP_SPACING), \
            None, {"top": first.key or fp}
    sizes = tuple(p.size for p in layout.parts)

    def part(i: int) -> tuple[Any, str | None]:
        if first.key is not None:  # a simplestreams server's parts: each read lazily on its own
            return _lazy(exports, layout.parts[i].key or "", sizes[i])
        # LXD sends a split image as one multipart stream: its parts are local files, verified
        # whole before use and read checked
        return io.BufferedReader(ExportFile(exports.spool.open(fp, sizes, i), sizes[i]), 1 << 16), None

    def metadata() -> Any:  # decoded in memory (ratarmountcore reads a large one itself)
        meta, unchecked = part(0)
        plain = _in_memory(meta, compression) if compression else None
        meta = io.BytesIO(plain) if plain is not None else part(0)[0] if compression else meta
        suffix = ".meta-plain.sqlite" if plain is not None else ".meta.sqlite"  # never one from the other
        return indexed(_tar, meta, unchecked, suffix, tarFileName=f"{fp}.meta")
    top = Deferred(metadata)  # `cat rootfs/etc/os-release` needs neither the library nor this index
    lazy = {} if first.key is None else {"top": first.key, ROOTFS: layout.parts[1].key or ""}
    if not layout.parts[1].name.endswith((".squashfs", ".qcow2")):
        return top, None, lazy
    rootfs, unchecked = part(1)
    if layout.parts[1].name.endswith(".qcow2"):  # a VM's disk: its ext4 root (contents/disk/)
        return *vm_root(top, rootfs.detach(), layout.parts[1].name), lazy  # read by offset (ExportFile.pread)
    from lxdimagefs.contents.squashfs import INDEX, SquashfsRootfs
    return top, indexed(lambda fileObject, **o: SquashfsRootfs(fileObject, **o), rootfs, unchecked,
                        f".{INDEX}.sqlite"), lazy


@dataclass(frozen=True)
class Entry:
    """A file inside an image, the source (tarball or squashfs) that holds it, and what the
    source's index does not say: a device's number, how many names the file has, and where it
    is in its source (one place for all its names: its inode number is made from it)."""

    source: MountSource
    info: FileInfo
    rdev: int = 0
    nlink: int = 1
    place: tuple[str, int] | None = None  # which source, where in it; None: a folder made up


class ImageArchive:
    """One image's contents, opened once and shared by every reader of it."""

    def __init__(self, fp: Fingerprint, layout: ExportLayout, exports: Exports, index: Path) -> None:
        """`index`: where this image's index files go, a suffix added per source."""
        self.fp, self._verified = fp, exports.verification.verified
        # ratarmountcore's sources are not made for concurrent use; held across a lookup, which a
        # hard link makes recursive, so that the decoded tarball's source never replaces one midway.
        self._lock = threading.RLock()
        self._top, self._rootfs, self._lazy = _open(fp, layout, exports, index)
        # How many names each hard-linked file has: one query of each index, not per stat.
        self._tar_links: dict[str, int] | None = None
        self._rootfs_links = inodes.squashfs_links(self._rootfs) if hasattr(self._rootfs, "index") else {}
        self._closed = False
        first, compression = layout.parts[0], compression_of(layout.parts[0].name)
        if self._lazy.get("top") == fp and compression and compression not in AT_ONCE:  # from LXD
            decoded_index = Place(exports, fp, index, ".decoded.sqlite", [])
            decode_later(exports, fp, first.size, compression, decoded_index, self._use)

    def _use(self, plain: Any) -> bool:
        """The decoded tarball serves from now on (the same bytes at the same offsets as before)."""
        links = inodes.tar_links(plain)
        with self._lock:
            if self._closed:
                return False
            old, self._top, self._tar_links = self._top, plain, links
            del self._lazy["top"]
            old.__exit__(None, None, None)
        return True

    def proven(self, entry: Entry) -> bool:
        """Whether an entry's bytes are served checked (not from an export whose check is under way)."""
        key = self._lazy.get(ROOTFS if entry.source is self._rootfs else "top")
        return key is None or key in self._verified

    def _route(self, path: str) -> tuple[MountSource | None, str]:
        """Which source holds a path (split images: rootfs/ is the squashfs), and its path there."""
        if self._rootfs is not None and (path == f"/{ROOTFS}" or path.startswith(f"/{ROOTFS}/")):
            return self._rootfs, path[len(ROOTFS) + 1:] or "/"
        return self._top, path

    def lookup(self, path: str) -> Entry | None:
        with self._lock:  # throughout (a hard link makes it recursive): no source is replaced midway
            return self._lookup(path)

    def _lookup(self, path: str, depth: int = 0) -> Entry | None:
        source, inner = self._route(path)
        with self._lock:
            info = source.lookup(inner) if source else None
        return None if info is None or source is None else self._entry(source, path, info, depth)

    def _entry(self, source: MountSource, path: str, info: FileInfo, depth: int = 0) -> Entry | None:
        """The entry of `path`, whose row in `source`'s index is `info`."""
        if not stat.S_IFMT(info.mode) and info.linkname:
            # A tar hard link: no file type of its own, the name of its target (relative to the
            # archive's root) in linkname. It is that file; a loop or a dangling one is absent.
            return self._lookup(inodes.inside(info.linkname), depth + 1) if depth < 8 else None
        rdev = 0
        if source is self._rootfs:
            nlink = self._rootfs_links.get(inodes.header(info)) or getattr(source, "nlink", lambda i: 1)(info)
            if stat.S_IFMT(info.mode) in inodes.DEVICES:
                with self._lock:
                    rdev = source.device(info)
        else:
            if self._tar_links is None:  # at the tarball's first entry, under the lock (as every call here)
                self._tar_links = inodes.tar_links(self._top)
            nlink = self._tar_links.get(path, 1)
            if stat.S_IFMT(info.mode) in inodes.DEVICES or not stat.S_IFMT(info.mode):
                # A device's number is in its header alone, and a block device's very type.
                with self._lock:
                    mode, rdev = inodes.tar_special(source, info)
                info = info.clone()
                info.mode = mode
        # A folder takes its number from its path: ratarmountcore gives one it made up (a tarball
        # of files only) its first file's place, and a folder has no other names to share it with.
        place = None if inodes.generated(info) or stat.S_ISDIR(info.mode) else (
            "rootfs" if source is self._rootfs else "top", inodes.header(info))
        return Entry(source, info, rdev, nlink, place)

    def list(self, path: str) -> tuple[Listing, dict[str, Entry]]:
        """A folder's names, with the types its index is sure of (LISTED; the rest, by a stat), and
        their entries made from the listing's own rows (the stat of each name asks no index again)."""
        with self._lock:
            source, inner = self._route(path)
            found = source.list(inner) if source else None
            if found is None or source is None:
                return Listing([], {}), {}
            names = [n for n in found if n not in ("", ".", "..") and "/" not in n and fits(n)]
            entries = {} if not isinstance(found, dict) else {
                n: e for n in names if (e := self._entry(source, f"{path.rstrip('/')}/{n}", found[n]))}
        kinds = {} if not isinstance(found, dict) else {
            n: kind for n in names if (kind := stat.S_IFMT(found[n].mode)) in LISTED}
        if path == "/" and self._rootfs is not None and ROOTFS not in names:
            names.append(ROOTFS)
            kinds[ROOTFS] = stat.S_IFDIR
        return Listing(sorted(names), kinds), entries

    def read(self, entry: Entry, offset: int, size: int) -> Pieces:
        """A file's bytes [offset, offset + size), in pieces (views of cached blocks where they
        can be: handed to libfuse's buffer with one copy). A squashfs file and a decoded tarball's
        are read by offset without the lock; the rest through ratarmountcore, under it."""
        size = min(size, entry.info.size - offset)  # the kernel does not stop at the size with direct_io
        if size <= 0:
            return []
        if entry.source is self._rootfs and hasattr(entry.source, "pieces"):
            pieces = entry.source.pieces(entry.info, offset, size)
        else:
            with self._lock:  # the tarball's source may have been replaced by its decoded one since
                source = entry.source if entry.source is self._rootfs else self._top
                pread, place = getattr(source, "pread", None), entry.info.userdata[-1]
                if pread is None or place.issparse:
                    pieces = [source.read(entry.info, size, offset)]
            if pread is not None and not place.issparse:
                pieces = spans(pread, place.offset + offset, size)
        if (got := sum(len(p) for p in pieces)) != size:  # an archive cut short inside the file
            raise ValueError(f"the archive ends inside the file: {got} of {size} bytes at {offset}")
        return pieces

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for source in (self._top, self._rootfs):
                if source is not None:
                    source.__exit__(None, None, None)
