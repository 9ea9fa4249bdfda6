"""Where an ext4 file's bytes are on its volume: its extent tree (ext4) or its block maps (ext2/3,
and ext4 files converted from them), walked once when the file is first read, into Runs.

Both are untrusted: the walk goes one node at a time (at most MAX_DEPTH nodes held, not a whole
index node's children), reads at most MAX_NODES nodes (a block map: 16 MiB of them), and refuses
(EIO, Ext4Fault) a node of the wrong depth (a loop), a block past the volume's end, an extent of
no blocks or one overlapping or before the one preceding it (the kernel's
ext4_valid_extent_entries), or over MAX_EXTENTS runs.
"""

from __future__ import annotations

import bisect
import errno
import struct
from array import array
from collections.abc import Callable

MAGIC = 0xF30A
MAX_DEPTH = 5
MAX_NODES = 4096
MAX_EXTENTS = 1 << 16
FULL = 32768  # an extent's largest initialized length
BLOCK_MAP_LEVELS = ((12, 1), (13, 2), (14, 3))  # i_block's indirect, double, triple pointers

Read = Callable[[int], bytes]  # a block's bytes, by its number


class Ext4Fault(OSError):
    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"ext4: {why}")


class Runs:
    """A file's runs of blocks in file order, packed (24 bytes each, not a tuple of four ints):
    first block in the file, blocks, first block on the volume, whether written."""

    __slots__ = ("_rest", "firsts")

    def __init__(self) -> None:
        self.firsts, self._rest = array("Q"), array("Q")

    def __len__(self) -> int:
        return len(self.firsts)

    def add(self, first: int, blocks: int, disk: int, written: bool = True) -> None:
        self.firsts.append(first)
        self._rest.extend((blocks | written << 32, disk))

    def grow(self, first: int, disk: int) -> bool:
        """Block `first` at `disk` added to the last run if it follows it in both (block maps)."""
        if not self.firsts:
            return False
        blocks, end = self._rest[-2] & 0xFFFFFFFF, self._rest[-1]
        if self.firsts[-1] + blocks != first or end + blocks != disk:
            return False
        self._rest[-2] += 1
        return True

    def __getitem__(self, i: int) -> tuple[int, int, int, bool]:
        blocks = self._rest[2 * i]
        return self.firsts[i], blocks & 0xFFFFFFFF, self._rest[2 * i + 1], bool(blocks >> 32)

    def start(self, block: int) -> int:
        """The index of the run holding file block `block`, or of the first after it."""
        return max(0, bisect.bisect_right(self.firsts, block) - 1)


def _node(number: int, node: bytes, wanted: int | None) -> tuple[int, int]:
    magic, entries, most, depth = struct.unpack_from("<HHHH", node)
    if magic != MAGIC or entries > most or 12 + 12 * entries > len(node):
        raise Ext4Fault(f"inode {number}: a bad extent node")
    if depth > MAX_DEPTH or wanted not in (None, depth):
        where = wanted if wanted is not None else f"at most {MAX_DEPTH}"
        raise Ext4Fault(f"inode {number}: an extent node of depth {depth} where {where} may be (a loop or "
                        "a corrupt tree)")
    return entries, depth


def extents(number: int, root: bytes, read: Read, volume: int) -> Runs:
    """The runs of an extent tree whose root is `root` (i_block), on a volume of `volume` blocks."""
    runs, nodes, end = Runs(), 1, 0
    entries, depth = _node(number, root, None)
    stack = [(root, entries, depth, 0)]
    while stack:
        node, entries, depth, i = stack[-1]
        if i == entries:
            stack.pop()
            continue
        stack[-1] = (node, entries, depth, i + 1)
        if depth:
            low, high = struct.unpack_from("<IH", node, 12 + 12 * i + 4)
            nodes += 1
            if nodes > MAX_NODES or not 0 < low | high << 32 < volume:
                raise Ext4Fault(f"inode {number}: an extent tree of over {MAX_NODES} nodes, or an index "
                                "past the end of the filesystem")
            child = read(low | high << 32)
            stack.append((child, *_node(number, child, depth - 1), 0))
            continue
        first, length, high, low = struct.unpack_from("<IHHI", node, 12 + 12 * i)
        written = length <= FULL
        blocks, disk = length if written else length - FULL, low | high << 32
        if not blocks or first < end:
            raise Ext4Fault(f"inode {number}: an extent of no blocks, or overlapping the one before it "
                            f"(file block {first})")
        if disk + blocks > volume or len(runs) >= MAX_EXTENTS:
            raise Ext4Fault(f"inode {number}: an extent past the end of the filesystem (or over "
                            f"{MAX_EXTENTS})")
        runs.add(first, blocks, disk, written)
        end = first + blocks
    return runs


def block_maps(number: int, i_block: bytes, size: int, read: Read, volume: int, block: int) -> Runs:
    """The runs of an ext2/3 block map: 12 direct pointers, then an indirect, a double and a triple
    indirect one (pointer 0: a hole), as far as the file's `size` reaches."""
    runs, need, per = Runs(), -(-size // block), block // 4
    pointers = struct.unpack_from("<15I", i_block)
    nodes, most = 0, MAX_NODES * 4096 // block  # 16 MiB of indirect blocks: 4M pointers, whatever the block

    def add(at: int, disk: int) -> None:
        if disk >= volume:
            raise Ext4Fault(f"inode {number}: a block map pointing past the end of the filesystem")
        if not runs.grow(at, disk):
            if len(runs) >= MAX_EXTENTS:
                raise Ext4Fault(f"inode {number}: a block map of over {MAX_EXTENTS} runs")
            runs.add(at, 1, disk)

    def walk(pointer: int, level: int, start: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > most or pointer >= volume:
            raise Ext4Fault(f"inode {number}: a block map of over {most} indirect blocks, or one past "
                            "the end of the filesystem")
        span = per ** (level - 1)
        for k, child in enumerate(struct.unpack(f"<{per}I", read(pointer))):
            if start + k * span >= need:
                return
            if child:
                add(start + k * span, child) if level == 1 else walk(child, level - 1, start + k * span)

    for k in range(min(12, need)):
        if pointers[k]:
            add(k, pointers[k])
    start = 12
    for index, level in BLOCK_MAP_LEVELS:
        if start >= need:
            break
        if pointers[index]:
            walk(pointers[index], level, start)
        start += per ** level
    return runs
