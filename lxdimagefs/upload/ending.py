"""Whether an upload's bytes end where the image they start does, checked as they stream past.

A writer that fails part-way (a read error, a full disk, a dropped
connection) still closes its file normally, and LXD takes a tarball cut
anywhere after its metadata.yaml. So an upload is created only if its bytes
end as its format ends (`ended_early` says why not, else None). What is
proven, per format (docs/SEMANTICS.md, "Uploads that end early"):

- tar: every header is walked (sizes, pax `size`, GNU sparse extensions,
  checksums) to the two zero blocks that end the archive;
- gzip: inflated as it passes (output discarded): each member's deflate
  stream ends and its trailer follows; nothing but whole members;
- zstd: its frames and blocks walked by their headers to the last block
  and checksum of the last frame, ending at the file's end;
- xz: its stream footer and index (both CRC-checked) at the end, whose
  block sizes add up to the stream's length (the last stream, if several);
- bzip2: the end-of-stream marker and CRC in the last bytes;
- lzma (legacy): decoded as it passes, to its end;
- squashfs: the file holds its superblock's `bytes_used`;
- qcow2: the file holds its L1, refcount and snapshot tables, and reaches into the last
  cluster its refcounts use (upload/qcow2end.py).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from typing import Any, cast

from lxdimagefs.upload.qcow2end import Qcow2End

TAIL = 1 << 20  # the last bytes kept: xz's index and footer, bzip2's end marker
_HEADER_ONLY = b"1234567"  # tar entries whose size says nothing of data that follows (as Go reads them)


class _Walk:
    """Structures at known offsets of a stream, each read as its bytes pass (a few bytes held)."""

    def __init__(self, need: int) -> None:
        self.at, self.need, self.pos, self.state = 0, need, 0, "start"
        self.buf = bytearray()
        self.end: int | None = None  # where the format ended (nothing more is read)
        self.error: str | None = None

    def feed(self, data: bytes | memoryview) -> None:
        start, self.pos = self.pos, self.pos + len(data)
        while self.end is None and self.error is None and self.at + len(self.buf) < self.pos:
            off = self.at + len(self.buf) - start
            self.buf += data[off:off + self.need - len(self.buf)]
            if len(self.buf) < self.need:
                return
            block, self.buf = bytes(self.buf), bytearray()
            try:
                getattr(self, "_" + self.state)(block)
            except (ValueError, struct.error) as e:
                self.error = str(e)

    def ended_early(self, total: int) -> str | None:
        if self.error:
            return self.error
        return None if self.end is not None and self.end <= total else "the file ended early"


class _Tar(_Walk):
    def __init__(self) -> None:
        super().__init__(512)
        self.size: int | None = None  # a pax header's size for the next entry
        self.zero = False  # the block before was a zero block

    def _start(self, block: bytes) -> None:  # a header, or a zero block
        if block == bytes(512):
            if self.zero:
                self.end = self.at + 512
            self.zero, self.at = True, self.at + 512
            return
        if self.zero:
            raise ValueError("a lone zero block inside the tarball")
        stored = _octal(block[148:156])
        if stored not in (sum(block) - sum(block[148:156]) + 256,
                          sum(struct.unpack("512b", block)) - sum(struct.unpack("8b", block[148:156])) + 256):
            raise ValueError(f"a tar header with a wrong checksum at byte {self.at}")
        kind = block[156:157]
        size = self.size if self.size is not None else _number(block[124:136])
        self.size, nxt = None, self.at + 512
        if kind == b"S" and block[482]:  # GNU sparse: extension headers follow
            self.at, self.state, self._after = nxt, "sparse", size
            return
        if kind in (b"x", b"X") and size:
            if size > TAIL:
                raise ValueError("a pax header of over 1 MiB")
            self.at, self.need, self.state = nxt, size, "pax"
            return
        self.at = nxt + (0 if kind and kind in _HEADER_ONLY else _round(size))

    def _sparse(self, block: bytes) -> None:
        self.at += 512
        if not block[504]:
            self.at += _round(self._after)
            self.state = "start"

    def _pax(self, block: bytes) -> None:
        for record in block.split(b"\n"):
            if b" size=" in record:
                self.size = int(record.split(b"=", 1)[1])
        self.at += _round(len(block))
        self.need, self.state = 512, "start"


def _round(n: int) -> int:
    return (n + 511) // 512 * 512


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip(b" \0")
    return int(text or b"0", 8)


def _number(field: bytes) -> int:
    """A tar size: octal text, or base-256 (the first byte's top bit set)."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return _octal(field)


class _Zstd(_Walk):
    """Frames (and skippable frames) by their headers, blocks by their 3-byte headers."""

    def __init__(self) -> None:
        super().__init__(5)
        self.checksum = 0

    def _start(self, block: bytes) -> None:  # a frame's magic and descriptor
        magic = int.from_bytes(block[:4], "little")
        if magic & ~0xF == 0x184D2A50:
            self.need, self.state = 8, "skippable"
            return
        if magic != 0xFD2FB528:
            raise ValueError("not a zstd frame where one should begin")
        fhd = block[4]
        single = (fhd >> 5) & 1
        fcs = [1 if single else 0, 2, 4, 8][fhd >> 6]
        self.checksum = 4 if (fhd >> 2) & 1 else 0
        self.at += 5 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3] + fcs
        self.need, self.state = 3, "block"

    def _skippable(self, block: bytes) -> None:
        self.at += 8 + int.from_bytes(block[4:8], "little")
        self._frame_done()

    def _block(self, block: bytes) -> None:
        n = int.from_bytes(block, "little")
        kind, size = (n >> 1) & 3, n >> 3
        if kind == 3:
            raise ValueError("a reserved zstd block type")
        self.at += 3 + (1 if kind == 1 else size)
        if n & 1:
            self.at += self.checksum
            self._frame_done()

    def _frame_done(self) -> None:
        self.need, self.state = 5, "start"

    def ended_early(self, total: int) -> str | None:
        if self.error:
            return self.error
        whole = self.at == total and self.state == "start" and self.at > 0
        return None if whole else "the file ended early (inside a zstd frame)"


class _Decoded:
    """A format proven only by decoding it: gzip (zlib, members one after another), legacy lzma."""

    def __init__(self, kind: str) -> None:
        self.kind, self.error = kind, cast("str | None", None)
        self.pending = b""  # what followed an ended gzip member so far (the next one's start)
        self.decoder: Any = self._new()

    def _new(self) -> Any:
        return zlib.decompressobj(31) if self.kind == "gzip" else lzma.LZMADecompressor(lzma.FORMAT_ALONE)

    def feed(self, data: bytes | memoryview) -> None:
        if self.error:
            return
        try:
            self._feed(bytes(data))
        except (zlib.error, lzma.LZMAError) as e:
            self.error = f"not a whole {self.kind} file: {e}"

    def _feed(self, data: bytes) -> None:
        d = self.decoder
        while data:
            if d.eof:  # gzip: another member follows; lzma: nothing may
                if self.kind != "gzip":
                    raise lzma.LZMAError("bytes after the end of the stream")
                self.decoder = d = self._new()
            if self.kind == "gzip":
                d.decompress(data, 1 << 20)
                while d.unconsumed_tail and not d.eof:
                    d.decompress(d.unconsumed_tail, 1 << 20)
                data = d.unused_data if d.eof else b""
            else:
                d.decompress(data, 1 << 20)
                while not d.needs_input and not d.eof:
                    d.decompress(b"", 1 << 20)
                data = d.unused_data if d.eof else b""

    def ended_early(self, total: int) -> str | None:
        if self.error or self.decoder.eof:
            return self.error
        return f"the file ended early (inside its {self.kind} stream)"


class _Tail:
    """Formats whose end says where it is: xz, bzip2 (the last bytes); squashfs (the first)."""

    def __init__(self, kind: str) -> None:
        self.kind, self.head, self.tail = kind, bytearray(), bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        if len(self.head) < 512:
            self.head += data[:512 - len(self.head)]
        self.tail += data
        if len(self.tail) > 2 * TAIL:
            del self.tail[:-TAIL]

    def ended_early(self, total: int) -> str | None:
        try:
            return getattr(self, "_" + self.kind)(total)
        except (ValueError, IndexError, struct.error) as e:
            return f"not a whole {self.kind} file: {e}"

    def _xz(self, total: int) -> str | None:
        tail = bytes(self.tail).rstrip(b"\0")  # stream padding: zeros, in fours
        base = total - len(self.tail)  # where the kept tail starts in the file
        end = base + len(tail)  # where the last stream's footer ends
        footer = tail[-12:]
        if (total - end) % 4 or footer[-2:] != b"YZ" or zlib.crc32(footer[4:10]) != int.from_bytes(
                footer[:4], "little"):
            return "the file ended early (no xz stream footer at its end)"
        backward = (int.from_bytes(footer[4:8], "little") + 1) * 4
        index = tail[-12 - backward:-12]
        crc = int.from_bytes(index[-4:], "little")
        if len(index) != backward or index[0] or zlib.crc32(index[:-4]) != crc:
            return "the file ended early (its xz index is not whole)"
        pos, count = _varint(index, 1)
        blocks = 0
        for _ in range(count):
            pos, unpadded = _varint(index, pos)
            pos, _uncompressed = _varint(index, pos)
            blocks += (unpadded + 3) // 4 * 4
        start = end - (12 + blocks + backward + 12)  # where the last stream's header is
        header = self.head[:8] if start == 0 else tail[start - base:start - base + 8] if start >= base \
            else None
        if start < 0 or start % 4 or (header is not None and (header[:6] != b"\xfd7zXZ\0"
                                                               or header[6:8] != footer[8:10])):
            return "the file ended early (its xz index says more than the file holds)"
        return None

    def _bzip2(self, total: int) -> str | None:
        last = int.from_bytes(self.tail[-11:], "big")
        if any((last >> (32 + pad)) & (2**48 - 1) == 0x177245385090 for pad in range(8)):
            return None
        return "the file ended early (no bzip2 end-of-stream marker at its end)"

    def _squashfs(self, total: int) -> str | None:
        used = int.from_bytes(self.head[40:48], "little")
        return None if total >= used else f"the file ended early ({total} of its {used} bytes)"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return pos, value
        if shift > 63:
            raise ValueError("a malformed xz index")


def ending(kind: str) -> Any:
    """What checks the end of an upload of this format (sniffed from its first bytes)."""
    if kind == "tar":
        return _Tar()
    if kind == "zstd":
        return _Zstd()
    if kind in ("gzip", "lzma"):
        return _Decoded(kind)
    if kind == "qcow2":
        return Qcow2End()
    return _Tail(kind)
