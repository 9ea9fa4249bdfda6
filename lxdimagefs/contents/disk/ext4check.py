"""What the `ext4` package trusts and a hostile image can break, checked before it reads an inode.

The package follows an inode's extent tree as its headers say: an index block pointing at itself
loops for ever, a tree deeper than ext4 allows reads blocks as index nodes. Each inode's tree is
walked here first (its index nodes only: a few blocks for a large file), every node's depth one
less than its parent's, at most MAX_DEPTH (the kernel's limit) and MAX_NODES of them; a path whose
folders come back to one of their own is a loop. Both are EIO (Ext4Fault).
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


class Ext4Fault(OSError):
    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"ext4: {why}")


class CheckedInodes:
    """The volume's inode table with each inode's extent tree checked the first time it is read."""

    def __init__(self, volume: Any, stream: Any) -> None:
        self._inodes, self._stream, self._block = volume.inodes, stream, int(volume.block_size)
        self._checked: cachetools.LRUCache[int, bool] = cachetools.LRUCache(4096)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inodes, name)

    def __getitem__(self, number: int) -> Any:
        if number not in self._checked:
            self._check(int(number))
            self._checked[number] = True
        return self._inodes[number]

    def _read(self, offset: int, length: int) -> bytes:
        self._stream.seek(offset)
        data: bytes = self._stream.read(length)
        if len(data) != length:
            raise Ext4Fault(f"{length} bytes at {offset:#x} lie past the end of the filesystem")
        return data

    def _check(self, number: int) -> None:
        raw = self._read(int(self._inodes.offset(number)), 100)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if not flags & EXTENTS_FL or flags & INLINE_FL:
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
            for i in range(entries if depth else 0):
                low, high = struct.unpack_from("<IH", node, 12 + 12 * i + 4)
                todo.append((self._read((low | high << 32) * self._block, self._block), depth - 1))
