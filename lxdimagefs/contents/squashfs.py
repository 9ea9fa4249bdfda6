"""A squashfs rootfs as ratarmountcore reads it, with what its rows leave out put back.

ratarmountcore 0.11 gives every squashfs entry uid and gid 0, ORs a file
type into a mode that already holds one (a character device became a
symlink, a FIFO or block device no valid type) and makes its root up
(0777, owned by the reader, dated now). PySquashfsImage, under it, has each
inode's own values: they go into the index as they are.

A file's bytes are read here, not through ratarmountcore's file object: that
one reads the inode and block list again and decodes the first block at each
read, then copies every byte three times; `pieces` keeps each file's block
list and hands out views of the decoded blocks.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, NamedTuple

from ratarmountcore.mountsource.formats.squashfs import SquashFSMountSource
from ratarmountcore.mountsource.MountSource import FileInfo
from ratarmountcore.SQLiteIndex import SQLiteIndex, SQLiteIndexedTarUserData

from lxdimagefs.contents.inodes import header
from lxdimagefs.contents.plain import spans

# Part of the index's file name: an index written from ratarmountcore's own rows is never read.
INDEX = "rootfs2"
BLOCKS_KEPT = 16
UNCOMPRESSED = 1 << 24  # in a data block's size word: stored as it is
LAYOUTS_KEPT = 256  # files whose block lists are kept (a reader reads a file in a few requests)


class Layout(NamedTuple):
    """Where a regular file's bytes are: its data blocks (place, size word; 0: a hole) and the
    tail in a fragment block (place, size word, where in it, how long), None if it has none."""

    size: int
    blocks: list[tuple[int, int]]
    tail: tuple[int, int, int, int] | None


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
        self._layout = functools.lru_cache(maxsize=LAYOUTS_KEPT)(self._read_layout)
        ref = self.image.sblk.root_inode
        root = self.image.read_inode(ref)
        place = SQLiteIndexedTarUserData(offset=0, offsetheader=ref, istar=False, issparse=False,
                                         isgenerated=False, recursiondepth=0)
        self.root_info = FileInfo(size=0, mtime=root.time, mode=root.mode, linkname="", uid=root.uid,
                                  gid=root.gid, userdata=[place])

    def _convert_to_row(self, inodeOffset: int, info: Any) -> tuple:
        row = list(super()._convert_to_row(inodeOffset, info))
        row[6], row[9], row[10] = info.mode, info.uid, info.gid  # PySquashfsImage's mode has the type
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

    def _read_layout(self, ref: int) -> Layout:
        image = self.image
        with self._lock:
            inode = image.read_inode(ref)
            words = image._read_block_list(inode.block_start, inode.block_offset, inode.blocks) \
                if inode.blocks else []
            tail = (*image._read_fragment(inode.fragment), inode.offset, inode.frag_bytes) \
                if inode.frag_bytes else None
        blocks, place = [], inode.start
        for word in words:
            blocks.append((place, word))
            place += word & ~UNCOMPRESSED
        return Layout(inode.data, blocks, tail)

    def _decode(self, place: int, word: int) -> bytes:
        """One data or fragment block, decoded (kept: BLOCKS_KEPT of them)."""
        image, size = self.image, word & ~UNCOMPRESSED
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
        data: bytes = image._comp.uncompress(raw, size, image.sblk.block_size)
        return data

    def pieces(self, info: FileInfo, offset: int, size: int) -> list[memoryview]:
        """Bytes [offset, offset + size) of a regular file, as views of its decoded blocks: each
        block has the length the inode says (else ValueError), so no read is cut short unseen."""
        layout, unit = self._layout(header(info)), self.image.sblk.block_size
        out, pos, end = [], offset, min(offset + size, layout.size)
        while pos < end:
            i = pos // unit
            want = min(unit, layout.size - i * unit)  # this block's length in the file
            if i < len(layout.blocks):
                place, word = layout.blocks[i]
                data: bytes | memoryview = self._block(place, word) if word else bytes(want)
            elif i == len(layout.blocks) and layout.tail is not None:
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
