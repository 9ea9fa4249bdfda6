"""An ext4 volume's superblock, inodes, file bytes and folder entries, read and checked here.

Own code, because the `ext4` package (MIT, through ratarmountcore's ext4 source) read a block per
call through several layers (most of a `diff -r`), took 15 ms to import with a cold page cache,
read an extent of 32,768 blocks (the kernel's largest initialized one) as zeros, and followed an
extent tree as its headers said: an index block pointing at itself looped for ever. Here a file's
extent tree or block maps are walked when it is first read (ext4map.py), not at its stat; inline
data is read from the whole inode (ext4inline.py); an encrypted file is not read. Each fault is
EIO (Ext4Fault), for that inode alone.
"""

from __future__ import annotations

import io
import struct
from collections import OrderedDict
from typing import Any

import cachetools

from lxdimagefs.contents.disk import ext4inline
from lxdimagefs.contents.disk.ext4map import Ext4Fault, Runs, block_maps, extents

EXTENTS_FL, INLINE_FL, ENCRYPT_FL, HUGE_FILE_FL = 0x80000, 0x10000000, 0x800, 0x40000
INCOMPAT_64BIT = 0x80
INCOMPAT_META_BG = 0x10
INCOMPAT_REFUSED = 0x1 | 0x8 | 0x1000  # compression, a journal device, dirdata
RECORD = 0x8C  # up to i_mtime_extra
INLINE_MAX = 60  # the bytes of i_block: a fast symlink's target
FOLDER_MAX = 16 << 20  # a folder's bytes read whole: some 500,000 names
RUNS_KEPT = 1 << 18  # the runs kept, of all files (24 bytes each)
TABLE_KEPT = 1 << 20  # inode table bytes kept, in whole blocks
GROUPS_KEPT = 4096  # inode tables' places kept, by group


class CheckedInodes:
    """An ext4 volume's inodes, each checked the first time it is read: the inode table's blocks
    last read are kept (TABLE_KEPT bytes: a folder's inodes, mostly side by side, cost one read
    for each block of them, not one each), and the runs of the files being read, RUNS_KEPT in all."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        sb = self._read(1024, 1024)
        self._count, _, _, _, _, first, log_block, _, group_blocks, _, self._per_group = struct.unpack_from(
            "<11I", sb)
        rev, inode_size = struct.unpack_from("<I", sb, 0x4C)[0], struct.unpack_from("<H", sb, 0x58)[0]
        incompat = struct.unpack_from("<I", sb, 0x60)[0]
        wide = bool(incompat & INCOMPAT_64BIT)
        self._desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if wide else 32
        self.block, self.inode_size = 1024 << min(log_block, 7), inode_size if rev else 128
        isize = self.inode_size
        if struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53 or log_block > 6 or not self._per_group or (
                isize < 128 or isize > self.block or isize & (isize - 1)
                or not 32 <= self._desc_size <= 1024 or (wide and self._desc_size < 64)):
            raise Ext4Fault("not a superblock this reader can read")
        if incompat & INCOMPAT_REFUSED:
            raise Ext4Fault(f"incompatible features {incompat & INCOMPAT_REFUSED:#x} (compression, a "
                            "journal device or dirdata) are not read here")
        self._first, self._group_blocks = first, group_blocks
        # meta_bg (a volume grown past its reserved table): the table's blocks from s_first_meta_bg
        # on are each at the start of the meta group they describe (after its superblock backup)
        self._first_meta = struct.unpack_from("<I", sb, 0x104)[0] if incompat & INCOMPAT_META_BG else 1 << 32
        compat, ro_compat = struct.unpack_from("<I", sb, 0x5C)[0], struct.unpack_from("<I", sb, 0x64)[0]
        self._backups = set(struct.unpack_from("<II", sb, 0x24C)) if compat & 0x200 else None  # sparse_super2
        self._sparse = bool(ro_compat & 0x1)
        self.extra = self.inode_size > 128  # a large inode: its fields past 128 bytes (ns times)
        self.filetype = bool(incompat & 0x2)
        self._blocks = stream.seek(0, io.SEEK_END) // self.block  # what the partition holds
        self._tables: dict[int, int] = {}  # inode table's first block, by group (GROUPS_KEPT)
        self._table_blocks: OrderedDict[int, bytes] = OrderedDict()  # by offset, least recent first
        self._runs: cachetools.LRUCache[int, Runs] = cachetools.LRUCache(
            RUNS_KEPT, getsizeof=lambda runs: max(1, len(runs)))
        self._faults: cachetools.LRUCache[int, str] = cachetools.LRUCache(1024)  # a walk's fault, by inode
        self.first_ino = struct.unpack_from("<I", sb, 0x54)[0] if rev else 11

    def _offset(self, number: int) -> int:
        """Where inode `number` is: its group's inode table (from the group's descriptor), its place."""
        group, index = divmod(number - 1, self._per_group)
        table = self._tables.get(group)
        if table is None:
            desc = self._read(self._descriptor(group), self._desc_size)
            low = struct.unpack_from("<I", desc, 8)[0]  # a 32-byte descriptor (no 64bit) has no high word
            high = struct.unpack_from("<I", desc, 0x28)[0] if self._desc_size >= 64 else 0
            if len(self._tables) >= GROUPS_KEPT:
                self._tables.clear()
            table = self._tables[group] = low | high << 32
        return table * self.block + index * self.inode_size

    def _descriptor(self, group: int) -> int:
        """Where group `group`'s descriptor is (the kernel's descriptor_loc)."""
        per_block = self.block // self._desc_size
        nr, at = divmod(group, per_block)
        if nr < self._first_meta:
            return (self._first + 1 + nr) * self.block + at * self._desc_size
        first_group = nr * per_block
        block = self._first + first_group * self._group_blocks + self._has_super(first_group)
        return block * self.block + at * self._desc_size

    def _has_super(self, group: int) -> bool:
        if group == 0 or (self._backups is None and not self._sparse):
            return True
        if self._backups is not None:
            return group in self._backups
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return group == 1

    def raw(self, number: int) -> bytes:
        """Inode `number`'s first RECORD bytes (128 for a small one); no block is found for a stat."""
        return self._inode(number, RECORD if self.extra else 128)

    def _inode(self, number: int, length: int) -> bytes:
        """The first `length` bytes of inode `number`, from its inode table block (read whole)."""
        if not 1 <= number <= self._count:
            raise Ext4Fault(f"inode {number} is not one of the {self._count} the volume has")
        at = self._offset(number)
        start = at - at % self.block  # an inode never crosses a block: its size divides the block's
        table = self._table_blocks.pop(start, None) or self._read(start, self.block)
        self._table_blocks[start] = table  # the most recent last
        if len(self._table_blocks) * self.block > TABLE_KEPT:
            self._table_blocks.popitem(last=False)
        return table[at - start:at - start + length]

    def _read(self, offset: int, length: int) -> bytes:
        self._stream.seek(offset)
        data: bytes = self._stream.read(length)
        if len(data) != length:
            raise Ext4Fault(f"{length} bytes at {offset:#x} lie past the end of the filesystem")
        return data

    def _whole(self, number: int) -> bytes:
        """All of inode `number`'s bytes (its inline data's attribute past RECORD)."""
        return self._inode(number, self.inode_size)

    def _block(self, number: int) -> bytes:
        return self._read(number * self.block, self.block)

    def runs(self, number: int, raw: bytes) -> Runs:
        """The file's runs, walked once (a fault too is kept: a stat or read again repeats no walk)."""
        found = self._runs.get(number)
        if found is None:
            fault = self._faults.get(number)
            if fault is not None:
                raise Ext4Fault(fault)
            flags = struct.unpack_from("<I", raw, 0x20)[0]
            try:
                if flags & ENCRYPT_FL:
                    raise Ext4Fault(f"inode {number}: encrypted (fscrypt): its bytes are not shown")
                if flags & INLINE_FL:
                    raise Ext4Fault(f"inode {number}: inline data has no blocks")
                i_block = raw[0x28:0x28 + 60]
                found = (extents(number, i_block, self._block, self._blocks) if flags & EXTENTS_FL
                         else block_maps(number, i_block, size(raw), self._block, self._blocks, self.block))
            except Ext4Fault as e:
                self._faults[number] = str(e).removeprefix("ext4: ")
                raise
            self._runs[number] = found
        return found

    def in_inode(self, raw: bytes) -> bool:
        """Whether a file's bytes are its i_block itself: inline data that fits it, or a fast
        symlink (no block of its own, as the kernel's ext4_inode_is_fast_symlink says)."""
        flags, mode = struct.unpack_from("<I", raw, 0x20)[0], struct.unpack_from("<H", raw, 0)[0]
        if flags & INLINE_FL:
            return not flags & ENCRYPT_FL
        acl = struct.unpack_from("<I", raw, 0x68)[0] | struct.unpack_from("<H", raw, 0x76)[0] << 32
        blocks = struct.unpack_from("<I", raw, 0x1C)[0] | struct.unpack_from("<H", raw, 0x74)[0] << 32
        own = blocks - ((1 if flags & HUGE_FILE_FL else self.block >> 9) if acl else 0)
        return mode & 0xF000 == 0xA000 and not flags & (EXTENTS_FL | ENCRYPT_FL) and own == 0

    def data(self, number: int, offset: int, length: int) -> bytes | bytearray:
        """Up to `length` bytes of inode `number`'s file at `offset`: holes and extents not yet
        written read as zeros, as the kernel reads them (read into one buffer, not copied)."""
        raw = self.raw(number)
        end = min(size(raw), offset + length)
        if end <= offset:
            return b""
        if self.in_inode(raw):
            if size(raw) <= INLINE_MAX:
                return raw[0x28 + offset:0x28 + end]
            if not struct.unpack_from("<I", raw, 0x20)[0] & INLINE_FL:
                raise Ext4Fault(f"inode {number}: a fast symlink of {size(raw)} bytes, past the "
                                f"{INLINE_MAX} bytes the inode holds")
            return ext4inline.file_bytes(number, self._whole(number), size(raw))[offset:end]
        runs = self.runs(number, raw)
        out, bs = bytearray(end - offset), self.block
        view = memoryview(out)
        for at in range(runs.start(offset // bs), len(runs)):
            first, blocks, disk, written = runs[at]
            if first * bs >= end:
                break
            lo, hi = max(offset, first * bs), min(end, (first + blocks) * bs)
            if lo < hi and written:
                self._stream.seek(disk * bs + lo - first * bs)
                if self._stream.readinto(view[lo - offset:hi - offset]) != hi - lo:
                    raise Ext4Fault(f"inode {number}: an extent past the end of the filesystem")
        return out

    def entries(self, number: int) -> dict[bytes, int]:
        """A folder's names (without . and ..) and their inode numbers, from its blocks; a name
        no path can hold (with '/' or NUL) or naming a reserved inode is left out."""
        raw = self.raw(number)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if size(raw) > FOLDER_MAX:
            raise Ext4Fault(f"inode {number}: a folder of {size(raw)} bytes (not read here)")
        if flags & INLINE_FL and flags & ENCRYPT_FL:
            raise Ext4Fault(f"inode {number}: encrypted (fscrypt): its names are not shown")
        found: dict[bytes, int] = {}
        if not flags & INLINE_FL:
            return self._entries(number, bytes(self.data(number, 0, FOLDER_MAX)), self.block, found)
        for region in ext4inline.folder_regions(number, self._whole(number)):  # each its own unit
            self._entries(number, region, len(region), found)
        return found

    def _entries(self, number: int, data: bytes, bs: int, found: dict[bytes, int]) -> dict[bytes, int]:
        """The entries of `data` into `found`: blocks of `bs` bytes no entry may cross."""
        at = 0
        while at + 8 <= len(data):
            inode, rec_len, name_len = struct.unpack_from("<IHB" if self.filetype else "<IHH", data, at)
            if rec_len in (0, 65535) and bs == 1 << 16:
                rec_len = 1 << 16
            if rec_len < 8 or rec_len % 4 or at % bs + rec_len > bs or 8 + name_len > rec_len:
                raise Ext4Fault(f"inode {number}: a bad folder entry at byte {at}")
            name = data[at + 8:at + 8 + name_len]
            if inode and name_len and name not in (b".", b"..") and b"/" not in name and (
                    b"\0" not in name and (inode == 2 or inode >= self.first_ino)):
                found[name] = inode
            at += rec_len
        return found


def size(raw: bytes) -> int:
    return int(struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32)

