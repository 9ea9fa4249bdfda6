"""An ext4 volume's inodes, file bytes and folder entries, read and checked here: the `ext4`
package only finds where each inode is (its superblock and group descriptors).

Own code because the package reads a block per call through several layers (most of a `diff -r`),
reads an extent of 32,768 blocks (the kernel's largest initialized one) as zeros, and follows an
extent tree as its headers say: an index block pointing at itself loops for ever. Here an inode's
tree is walked once when the inode is first read: every node's depth one less than its parent's,
at most MAX_DEPTH (the kernel's limit) and MAX_NODES of them, no extent past the volume's end; a
file of block maps or inline data past its inode's 60 bytes (ext2/3's layout) is not read. Each
fault is EIO (Ext4Fault), for that inode alone.
"""

from __future__ import annotations

import bisect
import errno
import struct
from typing import Any

import cachetools

EXTENTS_FL, INLINE_FL = 0x80000, 0x10000000
MAGIC = 0xF30A
MAX_DEPTH = 5
MAX_NODES = 4096
MAX_EXTENTS = 1 << 16
RECORD = 0x8C  # up to i_mtime_extra
FULL = 32768  # an extent's largest initialized length
INLINE_MAX = 60  # the bytes of i_block: a fast symlink's target
DATA = (0x8000, 0x4000, 0xA000)  # regular file, folder, symlink
FOLDER_MAX = 16 << 20  # a folder's bytes read whole: some 500,000 names
Extent = tuple[int, int, int, bool]  # first block in the file, blocks, first block on disk, initialized


class Ext4Fault(OSError):
    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"ext4: {why}")


class CheckedInodes:
    """The volume's inodes, each checked the first time it is read: the first RECORD bytes of
    1,024 of them are kept (an entry's stat), and the extents of 64 (the files being read)."""

    def __init__(self, volume: Any, stream: Any) -> None:
        self._inodes, self._stream, self.block = volume.inodes, stream, int(volume.block_size)
        self.inode_size = int(volume.superblock.s_inode_size)
        self.extra = self.inode_size > 128  # a large inode: its fields past 128 bytes (ns times)
        self._count = int(volume.superblock.s_inodes_count)
        self.filetype = bool(int(volume.superblock.s_feature_incompat) & 0x2)
        self._blocks = len(volume) // self.block  # what the partition holds
        self._raw: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(1024)
        self._extents: cachetools.LRUCache[int, list[Extent]] = cachetools.LRUCache(64)

    def raw(self, number: int) -> bytes:
        """Inode `number`'s first RECORD bytes (128 for a small inode), its extent tree checked."""
        found = self._raw.get(number)
        if found is None:
            if not 1 <= number <= self._count:
                raise Ext4Fault(f"inode {number} is not one of the {self._count} the volume has")
            found = self._read(int(self._inodes.offset(number)), RECORD if self.extra else 128)
            self._extents[number] = self._walk(number, found)
            self._raw[number] = found
        return found

    def _read(self, offset: int, length: int) -> bytes:
        self._stream.seek(offset)
        data: bytes = self._stream.read(length)
        if len(data) != length:
            raise Ext4Fault(f"{length} bytes at {offset:#x} lie past the end of the filesystem")
        return data

    def _walk(self, number: int, raw: bytes) -> list[Extent]:
        """The inode's extents in file order (none for a fast symlink, a device), checked."""
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if not flags & EXTENTS_FL or flags & INLINE_FL:
            if size(raw) > INLINE_MAX and struct.unpack_from("<H", raw, 0)[0] & 0xF000 in DATA:
                raise Ext4Fault(f"inode {number}: {size(raw)} bytes in block maps or inline data "
                                "(not read here)")
            return []
        todo: list[tuple[bytes, int | None]] = [(raw[0x28:0x28 + 60], None)]
        nodes, found = 0, list[Extent]()
        while todo:
            node, depth_wanted = todo.pop()
            nodes += 1
            magic, entries, most, depth = struct.unpack_from("<HHHH", node)
            if magic != MAGIC or entries > most or 12 + 12 * entries > len(node):
                raise Ext4Fault(f"inode {number}: a bad extent node")
            if depth > MAX_DEPTH or depth_wanted not in (None, depth):
                raise Ext4Fault(f"inode {number}: an extent node of depth {depth} where "
                                f"{depth_wanted if depth_wanted is not None else f'at most {MAX_DEPTH}'} "
                                "may be (a loop or a corrupt tree)")
            if nodes + len(todo) + (entries if depth else 0) > MAX_NODES:
                raise Ext4Fault(f"inode {number}: an extent tree of over {MAX_NODES} nodes")
            for i in range(entries):
                if depth:
                    low, high = struct.unpack_from("<IH", node, 12 + 12 * i + 4)
                    todo.append((self._read((low | high << 32) * self.block, self.block), depth - 1))
                    continue
                first, length, high, low = struct.unpack_from("<IHHI", node, 12 + 12 * i)
                written = length <= FULL
                extent = (first, length if written else length - FULL, low | high << 32, written)
                if extent[2] + extent[1] > self._blocks or len(found) >= MAX_EXTENTS:
                    raise Ext4Fault(f"inode {number}: an extent past the end of the filesystem "
                                    f"(or over {MAX_EXTENTS})")
                found.append(extent)
        return sorted(found)

    def data(self, number: int, offset: int, length: int) -> bytes | bytearray:
        """Up to `length` bytes of inode `number`'s file at `offset`: holes and extents not yet
        written read as zeros, as the kernel reads them (read into one buffer, not copied)."""
        raw = self.raw(number)
        end = min(size(raw), offset + length)
        if end <= offset:
            return b""
        if not struct.unpack_from("<I", raw, 0x20)[0] & EXTENTS_FL:  # in i_block (at most 60 bytes)
            return raw[0x28 + offset:0x28 + end]
        extents = self._extents.get(number)
        if extents is None:
            extents = self._extents[number] = self._walk(number, raw)
        out, bs = bytearray(end - offset), self.block
        view = memoryview(out)
        at = max(0, bisect.bisect_right(extents, (offset // bs, FULL + 1)) - 1)
        for first, blocks, disk, written in extents[at:]:
            lo, hi = max(offset, first * bs), min(end, (first + blocks) * bs)
            if first * bs >= end:
                break
            if lo < hi and written:
                self._stream.seek(disk * bs + lo - first * bs)
                if self._stream.readinto(view[lo - offset:hi - offset]) != hi - lo:
                    raise Ext4Fault(f"inode {number}: an extent past the end of the filesystem")
        return out

    def entries(self, number: int) -> dict[bytes, int]:
        """A folder's names (without . and ..) and their inode numbers, from its blocks."""
        if size(self.raw(number)) > FOLDER_MAX:
            raise Ext4Fault(f"inode {number}: a folder of {size(self.raw(number))} bytes")
        data, bs, at, found = bytes(self.data(number, 0, FOLDER_MAX)), self.block, 0, {}
        while at + 8 <= len(data):
            inode, rec_len, name_len = struct.unpack_from("<IHB" if self.filetype else "<IHH", data, at)
            if rec_len in (0, 65535) and bs == 1 << 16:
                rec_len = 1 << 16
            if rec_len < 8 or rec_len % 4 or at % bs + rec_len > bs or 8 + name_len > rec_len:
                raise Ext4Fault(f"inode {number}: a bad folder entry at byte {at}")
            name = data[at + 8:at + 8 + name_len]
            if inode and name_len and name not in (b".", b".."):
                found[name] = inode
            at += rec_len
        return found


def size(raw: bytes) -> int:
    return int(struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32)
