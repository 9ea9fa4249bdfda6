"""A squashfs rootfs as ratarmountcore reads it, with what its rows leave out put back.

ratarmountcore 0.11 gives every squashfs entry uid and gid 0, ORs a file
type into a mode that already holds one (a character device became a
symlink, a FIFO or block device no valid type) and makes its root up
(0777, owned by the reader, dated now). PySquashfsImage, under it, has each
inode's own values: they go into the index as they are.

A file's bytes are read here, not through ratarmountcore's file object: that
one reads the inode and block list again and decodes the first block at each
read, then copies every byte three times; `pieces` keeps each file's block
list and hands out views of the decoded blocks. A small file all in one
fragment block (most files of a rootfs) has its fragment's number and its
place in it in its index row (the data offset ratarmountcore leaves 0): its
read is one lookup of that block, without its inode.
"""

from __future__ import annotations

import functools
import itertools
import lzma
import os
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from typing import Any, NamedTuple

from cachetools import LRUCache
from ratarmountcore.mountsource.formats.squashfs import SquashFSMountSource
from ratarmountcore.mountsource.MountSource import FileInfo
from ratarmountcore.SQLiteIndex import SQLiteIndex, SQLiteIndexedTarUserData

from lxdimagefs.contents.inodes import header
from lxdimagefs.contents.plain import spans

try:
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - ratarmountcore depends on it where it builds
    _zlib = zlib  # type: ignore[misc]

# Part of the index's file name: an index written from ratarmountcore's own rows is never read, nor
# one whose rows do not place small files in their fragments (rootfs2: read right, but slower);
# the index folder's cap removes them in time.
INDEX = "rootfs3"
BLOCKS_KEPT = 16
METADATA_KEPT = 256  # decoded 8 KiB metadata blocks kept per table (2 MiB)
UNCOMPRESSED = 1 << 24  # in a data block's size word: stored as it is
WORDS_KEPT = 1 << 18  # block-list words kept, all files together (12 bytes each: 3 MiB)
KEPT_EACH = 16  # what a kept file costs besides its words, in words (a file of a fragment only)
PIECE = 2048  # words of a block list read at a time (8 KiB: a metadata block)
IN_FRAGMENT = 1 << 62  # in a row's data offset: a file all in one fragment (its number << 20, where in it)


class Layout(NamedTuple):
    """Where a regular file's bytes are: its data blocks (`blocks` size words, 0: a hole, from
    `start` on; the list at `where` in the inode table; `words` and their places from `start`
    when kept, None when longer than WORDS_KEPT) and the tail in a fragment block (place, size
    word, where in it, how long), None if it has none."""

    size: int
    start: int
    blocks: int
    where: tuple[int, int]
    words: array | None
    places: array | None
    tail: tuple[int, int, int, int] | None


def _checked(word: int, unit: int) -> int:
    """A data block's stored size, as the kernel's squashfs_block_size takes it: bits above 24,
    or a size over the block size, are a hostile image (ValueError)."""
    size = word & ~UNCOMPRESSED
    if word >> 25 or size > unit:
        raise ValueError(f"squashfs block size word {word:#x}: over the block size {unit}")
    return size


def inflate(kind: int, raw: Any, limit: int) -> bytes:
    """`raw` decoded by the image's compressor (`kind`, its superblock's id), to at most `limit`
    bytes whatever its stream claims (ValueError past them)."""
    try:
        if kind == 1:  # zlib, by isal (twice as fast) where it is installed, as ratarmountcore does
            out = _zlib.decompressobj().decompress(raw, limit + 1)
        elif kind == 3:  # lzo: python-lzo's decompress stops at its output size
            import lzo  # type: ignore[import-not-found]
            out = lzo.decompress(bytes(raw), False, limit)
        elif kind == 2:  # lzma: raw LZMA1 after squashfs-tools' 13-byte header (as ratarmountcore reads it)
            lzma1 = {"id": lzma.FILTER_LZMA1, "lc": 3, "lp": 0, "pb": 2, "dict_size": limit}
            out = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1]).decompress(raw[13:], limit + 1)
        elif kind == 4:  # xz
            out = lzma.LZMADecompressor().decompress(raw, limit + 1)
        elif kind == 5:  # lz4: the kernel's LZ4_decompress_safe, a block without a size header
            import lz4.block  # type: ignore[import-untyped]
            out = lz4.block.decompress(raw, uncompressed_size=limit)
        elif kind == 6:  # zstd: a stream, not trusting the frame's content size
            import zstandard
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(raw))
            out = b""
            while len(out) <= limit and (more := reader.read(limit + 1 - len(out))):
                out += more
        else:
            raise ValueError(f"squashfs compressor {kind} not read here")
    except ValueError:
        raise
    except Exception as e:  # zlib.error, LZMAError, ZstdError, LZ4BlockError: a damaged block
        raise ValueError(f"squashfs block does not decode: {type(e).__name__}: {e}") from None
    if len(out) > limit:
        raise ValueError(f"squashfs block decodes past the block size {limit}")
    return out


class SquashfsRootfs(SquashFSMountSource):
    """ratarmountcore's squashfs source with each inode's own type, owner, group and root."""

    def __init__(self, path: Any, **options: Any) -> None:
        super().__init__(path, **options)
        # The image's file object is shared: one user at a time. Data blocks are read by offset
        # where the file object's reader allows it (a part's checked blocks), without the lock.
        self._lock = threading.Lock()
        self._pread = getattr(getattr(path, "raw", None), "pread", None)
        # PySquashfsImage keeps 256 decoded blocks (32 MiB of 128 KiB ones) for all images at
        # once: a few per image serve a reader in path order (a fragment holds many small files).
        self.image._read_data_block = self._block = functools.lru_cache(maxsize=BLOCKS_KEPT)(self._decode)
        # PySquashfsImage keeps every metadata block it decoded (a long block list read is 1 MiB
        # of them per GiB of 4 KiB blocks): the last METADATA_KEPT of each table (used under the lock).
        self.image._inode_table_hash = LRUCache(METADATA_KEPT)
        self.image._directory_table_hash = LRUCache(METADATA_KEPT)
        self._layouts: OrderedDict[int, Layout] = OrderedDict()  # the last read, WORDS_KEPT words in all
        self._words_kept = 0
        sblk = self.image.sblk  # read once: each field is a ctypes property
        self._sizes = (sblk.block_size, sblk.bytes_used, sblk.compression)
        ref = sblk.root_inode
        root = self.image.read_inode(ref)
        place = SQLiteIndexedTarUserData(offset=0, offsetheader=ref, istar=False, issparse=False,
                                         isgenerated=False, recursiondepth=0)
        self.root_info = FileInfo(size=0, mtime=root.time, mode=root.mode, linkname="", uid=root.uid,
                                  gid=root.gid, userdata=[place])

    def _convert_to_row(self, inodeOffset: int, info: Any) -> tuple:
        row = list(super()._convert_to_row(inodeOffset, info))
        row[6], row[9], row[10] = info.mode, info.uid, info.gid  # PySquashfsImage's mode has the type
        inode = info.inode
        if info.is_file and not inode.blocks and inode.frag_bytes and inode.offset < 1 << 20:
            row[3] = IN_FRAGMENT | inode.fragment << 20 | inode.offset
        return tuple(row)

    def lookup(self, path: str, fileVersion: int = 0) -> FileInfo | None:
        if SQLiteIndex.normpath(path) == "/":
            return self.root_info
        return super().lookup(path, fileVersion)

    def device(self, info: FileInfo) -> int:
        """A device's number; squashfs keeps it in the kernel's new_encode_dev form."""
        with self._lock:
            dev = self.image.read_inode(header(info)).rdev
        return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))

    def _layout(self, ref: int) -> Layout:
        with self._lock:
            if (layout := self._layouts.get(ref)) is not None:
                self._layouts.move_to_end(ref)
                return layout
        layout = self._read_layout(ref)
        if layout.words is not None:
            with self._lock:
                if self._layouts.setdefault(ref, layout) is layout:
                    self._words_kept += layout.blocks + KEPT_EACH
                while self._words_kept > WORDS_KEPT:
                    self._words_kept -= self._layouts.popitem(last=False)[1].blocks + KEPT_EACH
        return layout

    def _read_layout(self, ref: int) -> Layout:
        image = self.image
        with self._lock:
            try:
                inode = image.read_inode(ref)
                count, where = inode.blocks, (inode.block_start, inode.block_offset)
                tail = (*image._read_fragment(inode.fragment), inode.offset, inode.frag_bytes) \
                    if inode.frag_bytes else None
                words = array("I", itertools.chain.from_iterable(self._words(where, count))) \
                    if count <= WORDS_KEPT else None
            except (IndexError, KeyError, OSError, EOFError) as e:
                raise ValueError(f"squashfs inode {ref}: {type(e).__name__}: {e}") from None
        places = None
        if words is not None:
            unit = self._sizes[0]
            places = array("Q", itertools.accumulate((_checked(w, unit) for w in words[:-1]), initial=0)) \
                if count else array("Q")
        return Layout(inode.data, inode.start, count, where, words, places, tail)

    def _words(self, where: tuple[int, int], count: int) -> Any:
        """A block list's first `count` words, PIECE at a time (the caller holds the lock)."""
        block, offset = where
        while count > 0:
            n = min(count, PIECE)
            data, block, offset = self.image._read_inode_data(block, offset, 4 * n)
            words = array("I", data)
            if sys.byteorder == "big":
                words.byteswap()
            yield words
            count -= n

    def _blocks(self, layout: Layout, first: int, last: int) -> list[tuple[int, int]]:
        """(place, size word) of data blocks first..last: from the kept list, else read again
        from the inode table in pieces, summing the sizes before `first` (as the kernel does
        without its meta_index), each word checked."""
        unit = self._sizes[0]
        if layout.words is not None and layout.places is not None:
            return [(layout.start + layout.places[i], layout.words[i]) for i in range(first, last + 1)]
        out: list[tuple[int, int]] = []
        place, i = layout.start, 0
        with self._lock:
            for words in self._words(layout.where, last + 1):
                for word in words:
                    if i >= first:
                        out.append((place, word))
                    place += _checked(word, unit)
                    i += 1
        return out

    def _decode(self, place: int, word: int) -> bytes:
        """One data or fragment block, decoded (kept: BLOCKS_KEPT of them)."""
        image, (unit, end, kind) = self.image, self._sizes
        size = _checked(word, unit)
        if place + size > end:
            raise ValueError(f"squashfs block at {place} of {size} bytes: past the image's end, {end}")
        if self._pread is not None:
            got = spans(self._pread, image._offset + place, size)
            raw: Any = got[0] if len(got) == 1 else b"".join(got)
        else:
            with self._lock:
                image._fd.seek(image._offset + place)
                raw = image._fd.read(size)
        if len(raw) != size:
            raise ValueError(f"squashfs block at {place}: {len(raw)} of {size} bytes")
        if word & UNCOMPRESSED:
            return bytes(raw)
        return inflate(kind, raw, unit)

    def pieces(self, info: FileInfo, offset: int, size: int) -> list[memoryview]:
        """Bytes [offset, offset + size) of a regular file, as views of its decoded blocks: each
        block has the length the inode says (else ValueError), so no read is cut short unseen."""
        if (where := info.userdata[-1].offset) & IN_FRAGMENT:
            return self._in_fragment(info, where, offset, size)
        layout, unit = self._layout(header(info)), self._sizes[0]
        out: list[memoryview] = []
        pos, end = offset, min(offset + size, layout.size)
        if pos >= end:
            return out
        first = pos // unit
        blocks = self._blocks(layout, first, min((end - 1) // unit, layout.blocks - 1)) \
            if first < layout.blocks else []
        while pos < end:
            i = pos // unit
            want = min(unit, layout.size - i * unit)  # this block's length in the file
            if i < layout.blocks:
                place, word = blocks[i - first]
                data: bytes | memoryview = self._block(place, word) if word else bytes(want)
            elif i == layout.blocks and layout.tail is not None:
                place, word, at, length = layout.tail
                data = memoryview(self._block(place, word))[at:at + length]
            else:
                raise ValueError(f"squashfs inode {header(info)}: no block {i}")
            if len(data) != want:
                raise ValueError(f"squashfs inode {header(info)}: block {i} of {len(data)} bytes, not {want}")
            lo = pos - i * unit
            out.append(memoryview(data)[lo:lo + min(end - pos, want - lo)])
            pos += len(out[-1])
        return out

    def _in_fragment(self, info: FileInfo, where: int, offset: int, size: int) -> list[memoryview]:
        """A file all in one fragment block, as its index row places it (IN_FRAGMENT)."""
        number, at, length = (where & ~IN_FRAGMENT) >> 20, where & 0xFFFFF, info.size
        try:
            place, word = self.image._read_fragment(number)
        except IndexError:
            raise ValueError(f"squashfs inode {header(info)}: no fragment {number}") from None
        data = memoryview(self._block(place, word))[at:at + length]
        if len(data) != length:
            raise ValueError(f"squashfs inode {header(info)}: fragment of {len(data)} bytes, not {length}")
        return [data[offset:offset + size]] if offset < length else []
