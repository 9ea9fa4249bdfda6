"""What the `ext4` package trusts and a hostile image can break, checked before it reads an inode.

The package follows an inode's extent tree as its headers say: an index block pointing at itself
loops for ever, a tree deeper than ext4 allows reads blocks as index nodes. Each inode's tree is
walked here first (its index nodes only: a few blocks for a large file), every node's depth one
less than its parent's, at most MAX_DEPTH (the kernel's limit) and MAX_NODES of them; a path whose
folders come back to one of their own is a loop. Both are EIO (Ext4Fault), and so is what the
package would read wrong: an extent of 32,768 blocks (read as zeros), a file of block maps or of
inline data past its inode's 60 bytes (read as the inode's own bytes).
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import cachetools

EXTENTS_FL, INLINE_FL = 0x80000, 0x10000000
MAGIC = 0xF30A
MAX_DEPTH = 5
MAX_NODES = 4096
RECORD = 0x8C  # up to i_mtime_extra
FULL = 32768  # an extent's largest initialized length
INLINE_MAX = 60  # the bytes of i_block: a fast symlink's target
DATA = (0x8000, 0x4000, 0xA000)  # regular file, folder, symlink


class Ext4Fault(OSError):
    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"ext4: {why}")


class CheckedInodes:
    """The volume's inode table with each inode's extent tree checked the first time it is read;
    the first RECORD bytes of each checked inode are kept (4,096 of them), for an entry's stat."""

    def __init__(self, volume: Any, stream: Any) -> None:
        self._inodes, self._stream, self._block = volume.inodes, stream, int(volume.block_size)
        self.inode_size = int(volume.superblock.s_inode_size)
        self.extra = self.inode_size > 128  # a large inode: its fields past 128 bytes (ns times)
        self._count = int(volume.superblock.s_inodes_count)
        self._raw: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(1024)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inodes, name)

    def __getitem__(self, number: int) -> Any:
        self.raw(number)
        return self._inodes[number]

    def raw(self, number: int) -> bytes:
        """Inode `number`'s first RECORD bytes (128 for a small inode), its extent tree checked."""
        found = self._raw.get(number)
        if found is None:
            if not 1 <= number <= self._count:
                raise Ext4Fault(f"inode {number} is not one of the {self._count} the volume has")
            found = self._read(int(self._inodes.offset(number)), RECORD if self.extra else 128)
            self._check(number, found)
            self._raw[number] = found
        return found

    def _read(self, offset: int, length: int) -> bytes:
        self._stream.seek(offset)
        data: bytes = self._stream.read(length)
        if len(data) != length:
            raise Ext4Fault(f"{length} bytes at {offset:#x} lie past the end of the filesystem")
        return data

    def _check(self, number: int, raw: bytes) -> None:
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if not flags & EXTENTS_FL or flags & INLINE_FL:
            size = struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32
            if size > INLINE_MAX and struct.unpack_from("<H", raw, 0)[0] & 0xF000 in DATA:
                # the `ext4` package would read it as bytes in the inode: wrong ones
                raise Ext4Fault(f"inode {number}: {size} bytes in block maps or inline data (not read here)")
            return
        todo, nodes = [(raw[0x28:0x28 + 60], None)], 0
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
            if not depth and any(struct.unpack_from("<H", node, 12 + 12 * i + 4)[0] == FULL
                                 for i in range(entries)):
                # initialized (the kernel's EXT_INIT_MAX_LEN), but the package reads it as zeros
                raise Ext4Fault(f"inode {number}: an extent of {FULL} blocks (not read here)")
            for i in range(entries if depth else 0):
                low, high = struct.unpack_from("<IH", node, 12 + 12 * i + 4)
                todo.append((self._read((low | high << 32) * self._block, self._block), depth - 1))
