"""A GPT disk's partitions, and one partition as a file: where a VM image's root filesystem is.

Own code (a few dozen lines of a fixed format) over any seekable file object, such as the qcow2
reader. The header and entry array carry CRC32s: a table that fails them is refused (EIO).
"""

import errno
import struct
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from lxdimagefs.contents.seekable import Seekable

ROOT_X86_64 = uuid.UUID("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")
ROOT_AARCH64 = uuid.UUID("B921B045-1DF0-41C3-AF44-4C6F280D3FAE")
# The Discoverable Partitions Specification's root of every architecture LXD builds images for
# (x86-64, i686, aarch64, armv7l, ppc64le, riscv64, s390x), as util-linux's sfdisk names them.
ROOTS = frozenset({ROOT_X86_64, ROOT_AARCH64, *map(uuid.UUID, (
    "44479540-F297-41B2-9AF7-D131D5F0458A", "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
    "C31C45E6-3F39-412E-80FB-4809C4980599", "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
    "5EEAD9A9-FE09-4A1E-A1D7-520D00531306"))})
LINUX_DATA = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
ESP = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
EXT4_MAGIC_AT = 1080  # the superblock (at 1024) has its 0xEF53 magic at offset 56
MAX_ENTRIES = 1024


class GptError(OSError):
    """A disk without a GPT this reader can trust (errno EIO)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"GPT: {why}")


@dataclass(frozen=True)
class Partition:
    type: uuid.UUID
    unique: uuid.UUID
    name: str
    first_lba: int
    last_lba: int
    sector: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector

    @property
    def length(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector


def _read(disk: BinaryIO, offset: int, length: int) -> bytes:
    disk.seek(offset)
    return disk.read(length)


def partitions(disk: BinaryIO) -> list[Partition]:
    """The used entries of a disk's GPT (512- or 4096-byte sectors), in table order."""
    mbr = _read(disk, 0, 512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa" or 0xEE not in (mbr[446 + 16 * i + 4] for i in range(4)):
        raise GptError("no protective MBR (not a GPT disk)")
    for sector in (512, 4096):
        head = _read(disk, sector, 92)
        if head[:8] == b"EFI PART":
            break
    else:
        raise GptError("no GPT header at LBA 1")
    size = struct.unpack_from("<I", head, 12)[0]
    head = _read(disk, sector, size) if 92 <= size <= sector else b""
    if not head or zlib.crc32(head[:16] + b"\0\0\0\0" + head[20:]) != struct.unpack_from("<I", head, 16)[0]:
        raise GptError("header fails its CRC32")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", head, 72)
    if count > MAX_ENTRIES or not 128 <= entry_size <= 4096 or entry_size % 8:
        raise GptError(f"implausible entry array: {count} entries of {entry_size} bytes")
    raw = _read(disk, entries_lba * sector, count * entry_size)
    if len(raw) != count * entry_size or zlib.crc32(raw) != entries_crc:
        raise GptError("entry array fails its CRC32 or lies past the end of the disk")
    found = []
    for i in range(count):
        e = raw[i * entry_size:(i + 1) * entry_size]
        kind = uuid.UUID(bytes_le=e[:16])
        if kind.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            raise GptError(f"partition {i + 1} ends before it starts")
        name = e[56:128].decode("utf-16-le", "replace").split("\0")[0]
        found.append(Partition(kind, uuid.UUID(bytes_le=e[16:32]), name, first, last, sector))
    return found


def has_ext4(disk: BinaryIO, part: Partition) -> bool:
    return part.length > EXT4_MAGIC_AT + 2 and _read(disk, part.offset + EXT4_MAGIC_AT, 2) == b"\x53\xef"


def root_of(disk: BinaryIO, parts: list[Partition]) -> Partition | None:
    """The Linux root: a root partition of any architecture in ROOTS, or a Linux data partition;
    those holding ext4 first, then a root type before Linux data, then table order."""
    linux = [p for p in parts if p.type in ROOTS or p.type == LINUX_DATA]
    linux.sort(key=lambda p: (not has_ext4(disk, p), p.type not in ROOTS))
    return linux[0] if linux else None


def esp_of(parts: list[Partition]) -> Partition | None:
    return next((p for p in parts if p.type == ESP), None)


class Slice(Seekable):
    """A window [offset, offset + length) of a seekable file, as a read-only file of its own."""

    def __init__(self, disk: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._disk, self._offset, self.size, self._pos = disk, offset, length, 0

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        self._disk.seek(self._offset + self._pos)
        data = self._disk.read(n) if n else b""
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


class Window(Seekable):
    """A partition as a read-only file for the ext4 and FAT readers, which read a few hundred bytes
    at a time (an inode, a directory entry), most of them near the last: whole chunks of the disk
    are kept, `keep` of them (least recently used out), and a read is a slice of one. A read of
    two chunks or more goes to the disk whole, keeping nothing. A read is whole or raises the
disk's fault (a bad cluster). Not thread-safe: its owner locks."""

    def __init__(self, disk: BinaryIO, offset: int, length: int, chunk: int = 1 << 16,
                 keep: int = 16) -> None:
        super().__init__()
        self._disk, self._offset, self.size, self._pos = disk, offset, length, 0
        self._chunk_size, self._keep = chunk, keep
        self._chunks: OrderedDict[int, bytes] = OrderedDict()

    def _chunk(self, index: int) -> bytes:
        found = self._chunks.get(index)
        if found is not None:
            self._chunks.move_to_end(index)
            return found
        at = index * self._chunk_size
        found = self._exact(at, min(self._chunk_size, self.size - at))
        self._chunks[index] = found
        if len(self._chunks) > self._keep:
            self._chunks.popitem(last=False)
        return found

    def _exact(self, at: int, length: int) -> bytes:
        """`length` bytes at `at`, or the disk's own fault: a short read (the qcow2 reader stops
        before a bad cluster after good ones) is never kept, nor returned as if whole."""
        self._disk.seek(self._offset + at)
        data = self._disk.read(length)
        if len(data) != length:
            self._fault(at + len(data))
        return data

    def _fault(self, at: int) -> None:
        """Raise what reading at `at` raises (a bad cluster's reason), else: past the disk's end."""
        self._disk.seek(self._offset + at)
        self._disk.read(1)
        raise OSError(errno.EIO, f"partition: byte {at:#x} lies past the end of the disk")

    def read(self, size: int | None = -1) -> bytes:
        start = self._pos
        end = self.size if size is None or size < 0 else min(self.size, start + size)
        if end <= start:
            return b""
        chunk = self._chunk_size
        first, last = start // chunk, (end - 1) // chunk
        if last - first >= 2:
            data = self._exact(start, end - start)
        elif first == last:
            data = self._chunk(first)[start - first * chunk:end - first * chunk]
        else:
            data = (self._chunk(first) + self._chunk(last))[start - first * chunk:end - first * chunk]
        self._pos = start + len(data)
        return data

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n < 2 * self._chunk_size:
            data = self.read(n)
            view[:len(data)] = data
            return len(data)
        self._disk.seek(self._offset + self._pos)  # a file's bytes: straight into the caller's buffer
        done = 0
        while done < n and (got := self._disk.readinto(view[done:n])):  # type: ignore[attr-defined]
            done += got
        if done < n:
            self._fault(self._pos + done)
        self._pos += done
        return done

    def close(self) -> None:
        self._chunks.clear()
        super().close()
