"""Where a qcow2 upload must end: past its tables, and into the last cluster its refcounts use.

The header says where the L1, refcount and snapshot tables are; the data clusters are
anywhere after. The refcount table (found from the header) says where the refcount blocks
are, and those say which clusters the image uses: the file must reach into the last one.
Both are read as they stream past. A refcount block placed before the end of the refcount
table (qemu-img puts them after) has passed unread: then only the tables are checked.
"""

from __future__ import annotations

import struct

MAX_TABLE = 8 << 20  # the refcount table held at most (with 64 KiB clusters it covers 2 PiB)
MAX_BLOCKS = 1 << 16  # refcount blocks looked for at most (each is read as it passes, not held)


class Qcow2End:
    def __init__(self) -> None:
        self.head = bytearray()
        self.pos = 0  # bytes seen
        self.want: dict[int, int] = {}  # ranges to read as they pass: offset -> length
        self.got: dict[int, bytearray] = {}
        self.table_at = -1
        self.index: dict[int, int] = {}  # a refcount block's offset -> its place in the table
        self.last = -1  # the last cluster a refcount block says is used
        self.bits = self.refbits = 16
        self.unread = False  # a refcount block passed before the table said where it was

    def feed(self, data: bytes | memoryview) -> None:
        start, self.pos = self.pos, self.pos + len(data)
        if len(self.head) < 104:
            self.head += data[:104 - len(self.head)]
            if len(self.head) == 104:
                self._header()
        more = True
        while more:  # the refcount table read adds its blocks, which may be in this same piece
            more = False
            for offset, length in list(self.want.items()):
                kept = self.got.get(offset, b"")
                lo, hi = max(offset + len(kept), start), min(offset + length, self.pos)
                if lo < hi:
                    kept = self.got.setdefault(offset, bytearray())
                    kept += data[lo - start:hi - start]
                if len(kept) == length:
                    del self.want[offset]
                    more = self._read(offset, bytes(self.got.pop(offset, b""))) or more

    def _header(self) -> None:
        version, = struct.unpack(">I", self.head[4:8])
        self.bits, = struct.unpack(">I", self.head[20:24])
        _l1, _at, self.table_at, clusters = struct.unpack(">IQQI", self.head[36:60])
        order = struct.unpack(">I", self.head[96:100])[0] if version >= 3 else 4
        self.refbits = 1 << min(order, 7)
        if not 9 <= self.bits <= 21 or self.refbits > 64 or (clusters << self.bits) > MAX_TABLE:
            self.unread = True  # not ours to judge here: the tables' check stands
            return
        self.want[self.table_at] = clusters << self.bits

    def _read(self, offset: int, data: bytes) -> bool:
        """A table or block read whole; True if it asks for more ranges."""
        if offset == self.table_at:
            blocks = [e & ~0x1FF for e in struct.unpack(f">{len(data) // 8}Q", data)]
            if sum(1 for b in blocks if b) > MAX_BLOCKS:
                self.unread = True
                return False
            for index, at in enumerate(blocks):
                if at and at < offset + len(data):  # passed before it was known: not read
                    self.unread = True
                elif at:
                    self.want[at], self.index[at] = 1 << self.bits, index
            return True
        used = data.rstrip(b"\0")
        if used:  # the last non-zero refcount of this block (sub-byte refcounts: low bits first)
            bit = (len(used) - 1) * 8 + (used[-1].bit_length() - 1 if self.refbits < 8 else 0)
            per_block = (8 << self.bits) // self.refbits
            self.last = max(self.last, self.index[offset] * per_block + bit // self.refbits)
        return False

    def ended_early(self, total: int) -> str | None:
        try:
            return self._tables(total) or self._clusters(total)
        except (ValueError, IndexError, struct.error) as e:
            return f"not a whole qcow2 file: {e}"

    def _tables(self, total: int) -> str | None:
        (cluster_bits,) = struct.unpack(">I", self.head[20:24])
        l1_size, l1_offset, rc_offset, rc_clusters, snapshots, snapshots_offset = struct.unpack(
            ">IQQIIQ", self.head[36:72])
        ends = [l1_offset + 8 * l1_size, rc_offset + (rc_clusters << cluster_bits)]
        if snapshots:
            ends.append(snapshots_offset + 1)
        need = max(ends)
        return None if total >= need else f"the file ended early ({total} of at least {need} bytes its " \
            "tables say)"

    def _clusters(self, total: int) -> str | None:
        if len(self.head) < 104:
            return "the file ended early (inside its header)"
        if self.unread:
            return None
        if self.want:
            return "the file ended early (before its refcount blocks)"
        need = (self.last << self.bits) + 1  # into the last cluster used (a compressed one may end short)
        return None if total >= need else f"the file ended early ({total} bytes; its refcounts use " \
            f"{self.last + 1} clusters of {1 << self.bits})"
