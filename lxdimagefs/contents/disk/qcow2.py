"""A read-only, seekable view of a qcow2 image's guest disk, over any seekable file object.

Own code because no maintained, Apache-compatible Python qcow2 reader exists. Reads only what is
asked (L2 tables and clusters on demand, a bounded LRU of each), so a large disk costs nothing until
read. Every fault of the image (offsets past its end, a cluster inflating past its size) is
OSError(EIO) with the reason: the image is untrusted input.
"""

import errno
import io
import struct
import threading
import zlib
from typing import BinaryIO

import cachetools
import zstandard

try:  # twice as fast as zlib's inflate (a `diff -r` of a zlib qcow2 inflates every cluster it reads)
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - ratarmountcore depends on it where it builds (squashfs.py too)
    _zlib = zlib  # type: ignore[misc]
from lxdimagefs.contents.seekable import Seekable

_BAD_STREAM: tuple[type[Exception], ...] = (zlib.error, _zlib.error, zstandard.ZstdError)  # type: ignore[assignment]
MAGIC = b"QFI\xfb"
_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of an L1 or standard L2 entry
_COMPRESSED = 1 << 62
_ZERO = 1
# incompatible feature bits: 0 dirty (harmless to a reader), 3 compression type (handled)
_REFUSED = {1: "marked corrupt", 2: "external data file", 4: "extended L2 entries"}


class Qcow2Error(OSError):
    """An image this reader refuses or cannot trust (errno EIO)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, f"qcow2: {why}")


class Qcow2Reader(Seekable):
    """The guest disk of a qcow2 image as a read-only raw file: unallocated and zero clusters read 0."""

    def __init__(self, fileobj: BinaryIO, cache_clusters: int = 8, cache_tables: int = 16) -> None:
        """Kept: `cache_clusters` clusters (the partitions' gpt.Window keeps what ext4 reads again)
        and `cache_tables` L2 tables (each maps 512 MiB of a disk of 64 KiB clusters)."""
        super().__init__()
        self._file = fileobj
        self._lock = threading.Lock()  # the file's position is shared
        # a checked part's reader (contents/archives.ExportFile): by offset, a view of its checked
        # block (no buffer's copy, no 2 MiB join where a read crosses two blocks), from any thread
        self._pread = getattr(fileobj, "pread", None)
        self._file_size = fileobj.seek(0, io.SEEK_END)
        head = self._read_at(0, 112, "header")
        if len(head) < 72 or head[:4] != MAGIC:
            raise Qcow2Error("not a qcow2 image (no QFI\\xfb magic)")
        version, backing_offset, _, cluster_bits, self.size, crypt = struct.unpack_from(">IQIIQI", head, 4)
        if version not in (2, 3):
            raise Qcow2Error(f"unsupported version {version}")
        if backing_offset:
            raise Qcow2Error("has a backing file (only standalone images are read)")
        if crypt:
            raise Qcow2Error("encrypted")
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"cluster_bits {cluster_bits} out of range")
        self._cluster_bits = cluster_bits
        self._cluster = 1 << cluster_bits
        l1_size, self._l1_offset = struct.unpack_from(">IQ", head, 36)
        self._zstd = False
        if version == 3:
            if len(head) < 104:
                raise Qcow2Error("truncated v3 header")
            incompatible = struct.unpack_from(">Q", head, 72)[0]
            header_length = struct.unpack_from(">I", head, 100)[0]
            for bit, what in _REFUSED.items():
                if incompatible & (1 << bit):
                    raise Qcow2Error(f"unsupported: {what}")
            if incompatible & ~0b11111:
                raise Qcow2Error(f"unknown incompatible features {incompatible:#x}")
            if header_length > 104 and len(head) > 104:
                kind = head[104]
                if kind not in (0, 1):
                    raise Qcow2Error(f"unknown compression type {kind}")
                self._zstd = kind == 1
        l2_entries = self._cluster // 8
        if l1_size * l2_entries * self._cluster < self.size:
            raise Qcow2Error("L1 table too small for the disk size")
        raw = self._read_at(self._l1_offset, 8 * l1_size, "L1 table")
        if len(raw) != 8 * l1_size:
            raise Qcow2Error("L1 table past the end of the file")
        self._l1 = struct.unpack(f">{l1_size}Q", raw)
        self._l2_cache: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(cache_tables)
        self._data_cache: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(cache_clusters)
        self._pos = 0

    def _read_at(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self._file_size:
            raise Qcow2Error(f"{what} at {offset:#x}+{length} lies past the end of the file")
        return bytes(self._bytes_at(offset, length))  # kept: no view holds a block of the part

    def _bytes_at(self, offset: int, length: int) -> bytes | memoryview:
        """The file's bytes at `offset`, fewer at its end."""
        if self._pread is not None:
            return self._pread(offset, length)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(length)

    def _l2(self, index: int) -> bytes | None:
        offset = self._l1[index] & _OFFSET_MASK
        if not offset:
            return None
        table = self._l2_cache.get(offset)
        if table is None:
            if offset % self._cluster:
                raise Qcow2Error(f"L2 table offset {offset:#x} not cluster-aligned")
            table = self._read_at(offset, self._cluster, "L2 table")
            if len(table) != self._cluster:
                raise Qcow2Error(f"L2 table at {offset:#x} cut short by the end of the file")
            self._l2_cache[offset] = table
        return table

    def _cluster_data(self, number: int) -> bytes | None:
        """The guest cluster `number`, or None when it reads as zeros."""
        l2_entries = self._cluster // 8
        table = self._l2(number // l2_entries)
        entry = struct.unpack_from(">Q", table, 8 * (number % l2_entries))[0] if table is not None else 0
        if not entry & ~(1 << 63):
            return None
        cached = self._data_cache.get(entry)
        if cached is not None:
            return cached
        if entry & _COMPRESSED:
            data = self._inflate(entry)
        elif entry & _ZERO:
            return None
        else:
            offset = entry & _OFFSET_MASK
            if not offset:
                return None
            data = self._read_at(offset, self._cluster, "data cluster")
        self._data_cache[entry] = data
        return data

    def _inflate(self, entry: int) -> bytes:
        shift = 62 - (self._cluster_bits - 8)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry & ~(1 << 63) & ~_COMPRESSED) >> shift) + 1
        length = sectors * 512 - (offset & 511)
        if offset >= self._file_size:
            raise Qcow2Error(f"compressed cluster at {offset:#x} lies past the end of the file")
        raw = self._bytes_at(offset, length)  # may end at EOF: qemu trims it; inflated at once
        try:
            if self._zstd:
                # a bounded read: a frame saying it holds gigabytes is cut at one byte past a cluster
                data = zstandard.ZstdDecompressor().stream_reader(raw).read(self._cluster + 1)
            else:
                inflater = _zlib.decompressobj(-15)  # qemu deflates raw, window -12: -15 reads it
                data = inflater.decompress(raw, self._cluster + 1)
        except _BAD_STREAM as e:
            raise Qcow2Error(f"compressed cluster at {offset:#x} does not decompress: {e}") from e
        if len(data) != self._cluster:
            raise Qcow2Error(f"compressed cluster at {offset:#x} inflates to {len(data)} bytes, "
                             f"not the cluster size {self._cluster}")
        return data

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            number, within = divmod(self._pos, self._cluster)
            step = min(len(view) - done, self._cluster - within, self.size - self._pos)
            try:
                data = self._cluster_data(number)
            except OSError:
                if done:  # a short read: a buffer's read-ahead must not fail the bytes before it
                    return done
                raise
            if data is None:
                view[done:done + step] = bytes(step)
            else:
                view[done:done + step] = data[within:within + step]
            done += step
            self._pos += step
        return done
