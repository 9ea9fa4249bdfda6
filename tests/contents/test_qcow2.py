"""contents/disk/qcow2.py: real qemu-img images read byte for byte; hostile images refused (EIO)."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
from pathlib import Path

import pytest

from lxdimagefs.contents.disk.qcow2 import Qcow2Error, Qcow2Reader

CLUSTER = 65536


def _raw_disk(path: Path) -> bytes:
    """A disk with random clusters, a hole and a zero run, sized off a cluster boundary."""
    rng = os.urandom
    data = rng(3 * CLUSTER + 100) + bytes(5 * CLUSTER) + b"text " * 30000 + rng(CLUSTER // 2) + bytes(777)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("options", [[], ["-c"], ["-c", "-o", "compression_type=zstd"],
                                     ["-o", "cluster_size=4096"], ["-c", "-o", "cluster_size=512"]])
def test_reads_the_guest_disk_byte_for_byte(tmp_path: Path, options: list[str]) -> None:
    data = _raw_disk(tmp_path / "disk.raw")
    subprocess.run(["qemu-img", "convert", *options, "-f", "raw", "-O", "qcow2",
                    str(tmp_path / "disk.raw"), str(tmp_path / "disk.qcow2")], check=True)
    with open(tmp_path / "disk.qcow2", "rb") as f:
        reader = Qcow2Reader(f)
        assert reader.size >= len(data)
        assert reader.read(len(data)) == data
        assert reader.read() == bytes(reader.size - len(data))  # qemu rounds the size up to a sector
        for offset, length in [(0, 1), (CLUSTER - 3, 10), (3 * CLUSTER + 50, 200), (len(data) - 5, 5)]:
            reader.seek(offset)
            assert reader.read(length) == data[offset:offset + length]
        reader.seek(-1, io.SEEK_END)
        assert reader.tell() == reader.size - 1


class _ByOffset(io.RawIOBase):
    """A checked part's reader as contents/archives.ExportFile is: `pread` gives views of its
    blocks; seek and read are refused, so that every byte is read by offset."""

    def __init__(self, data: bytes) -> None:
        self._data, self.calls = data, 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        assert (offset, whence) == (0, io.SEEK_END), "read by offset only"
        return len(self._data)

    def readinto(self, buffer: object) -> int:
        raise AssertionError("read by offset only")

    def pread(self, offset: int, size: int) -> memoryview:
        self.calls += 1
        return memoryview(self._data)[offset:offset + size]


@pytest.mark.parametrize("options", [["-c"], ["-c", "-o", "compression_type=zstd"], []])
def test_a_reader_by_offset_is_read_by_offset_and_nothing_kept_is_a_view_of_it(tmp_path: Path,
                                                                                options: list[str]) -> None:
    """Over a checked part's reader (`pread`, views of its blocks): the same bytes, read by offset
    without a shared position; the tables and clusters kept are copies, not views pinning its blocks."""
    data = _raw_disk(tmp_path / "disk.raw")
    subprocess.run(["qemu-img", "convert", *options, "-f", "raw", "-O", "qcow2",
                    str(tmp_path / "disk.raw"), str(tmp_path / "disk.qcow2")], check=True)
    part = _ByOffset((tmp_path / "disk.qcow2").read_bytes())
    reader = Qcow2Reader(part)  # type: ignore[arg-type]
    assert reader.read(len(data)) == data and part.calls > 2
    kept = [*reader._l2_cache.values(), *reader._data_cache.values()]
    assert kept and all(type(k) is bytes for k in kept)


def _uncompressed(tmp_path: Path) -> bytearray:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(2 * CLUSTER))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "d.qcow2")],
                   check=True)
    return bytearray((tmp_path / "d.qcow2").read_bytes())


def test_an_l2_entry_past_the_end_is_eio_and_the_reader_still_serves(tmp_path: Path) -> None:
    image = _uncompressed(tmp_path)
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    l2_offset = struct.unpack_from(">Q", image, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    good = struct.unpack_from(">Q", image, l2_offset)[0]
    struct.pack_into(">Q", image, l2_offset + 8, (1 << 63) | (len(image) + 100 * CLUSTER))
    reader = Qcow2Reader(io.BytesIO(bytes(image)))
    reader.seek(CLUSTER)
    with pytest.raises(OSError) as caught:
        reader.read(10)
    assert caught.value.errno == errno.EIO
    assert "past the end" in str(caught.value)
    reader.seek(0)
    assert reader.read(10) == bytes(image[good & 0x00FFFFFFFFFFFE00:][:10])
    reader.seek(0)  # a read running into the bad cluster is short; only a read starting there fails
    assert len(reader.read(2 * CLUSTER)) == CLUSTER


def test_a_compressed_cluster_that_inflates_wrong_is_eio(tmp_path: Path) -> None:
    image = _uncompressed(tmp_path)
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    l2_offset = struct.unpack_from(">Q", image, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    # a "compressed" cluster pointing at random (not deflate) bytes: the header's own first sector
    struct.pack_into(">Q", image, l2_offset, (1 << 62) | 0)
    reader = Qcow2Reader(io.BytesIO(bytes(image)))
    with pytest.raises(OSError) as caught:
        reader.read(10)
    assert caught.value.errno == errno.EIO


def test_a_backing_file_and_bad_magic_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(tmp_path / "top.qcow2")], check=True)
    with open(tmp_path / "top.qcow2", "rb") as f, pytest.raises(Qcow2Error, match="backing file"):
        Qcow2Reader(f)
    with pytest.raises(Qcow2Error, match="magic"):
        Qcow2Reader(io.BytesIO(b"\0" * 512))
