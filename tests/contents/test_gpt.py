"""contents/disk/gpt.py: partitions of a real sfdisk GPT disk, read through the qcow2 reader."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
from pathlib import Path

import pytest

from lxdimagefs.contents.disk import gpt
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader

MiB = 1 << 20


def _disk(tmp_path: Path) -> tuple[Path, bytes]:
    """A GPT disk: a 2 MiB ESP, then an 8 MiB ext4 root made from a folder; and the root's bytes."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    root = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(root), "8M"], check=True)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(12 * MiB)
    layout = (f"label: gpt\nstart=2048, size=4096, type={gpt.ESP}, name=esp\n"
              f"start=6144, size=16384, type={gpt.ROOT_X86_64}, name=root\n")
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    subprocess.run(["dd", f"if={root}", f"of={disk}", "bs=1M", "seek=3", "conv=notrunc", "status=none"],
                   check=True)
    return disk, root.read_bytes()


def test_finds_the_root_and_esp_of_a_qcow2_disk(tmp_path: Path) -> None:
    disk, root_bytes = _disk(tmp_path)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2)],
                   check=True)
    with open(qcow2, "rb") as f:
        reader = io.BufferedReader(Qcow2Reader(f))
        parts = gpt.partitions(reader)  # type: ignore[arg-type]
        found = [(p.name, p.first_lba, p.last_lba) for p in parts]
        assert found == [("esp", 2048, 6143), ("root", 6144, 22527)]
        esp = gpt.esp_of(parts)
        root = gpt.root_of(reader, parts)  # type: ignore[arg-type]
        assert esp is not None and esp.type == gpt.ESP
        assert root is not None and root.name == "root"
        part = gpt.Slice(reader, root.offset, root.length)  # type: ignore[arg-type]
        assert part.read() == root_bytes
        part.seek(1080)
        assert part.read(2) == b"\x53\xef"


def test_a_damaged_table_or_no_gpt_is_eio(tmp_path: Path) -> None:
    disk, _ = _disk(tmp_path)
    data = bytearray(disk.read_bytes())
    data[1024 + 5] ^= 0xFF  # inside the first entry: the array's CRC32 no longer holds
    with pytest.raises(OSError) as caught:
        gpt.partitions(io.BytesIO(bytes(data)))
    assert caught.value.errno == errno.EIO and "CRC32" in str(caught.value)
    with pytest.raises(gpt.GptError, match="protective MBR"):
        gpt.partitions(io.BytesIO(bytes(4096)))


@pytest.mark.parametrize("kind", [gpt.ROOT_AARCH64, gpt.LINUX_DATA])
def test_the_root_of_another_architecture_or_linux_data(tmp_path: Path, kind: object) -> None:
    """An arm64 image's root is an aarch64 root partition (or plain Linux data): found as the
    x86-64 one is, before a Linux data partition holding no ext4."""
    disk, root_bytes = _disk(tmp_path)
    layout = (f"label: gpt\nstart=2048, size=4096, type={gpt.LINUX_DATA}, name=data\n"
              f"start=6144, size=16384, type={kind}, name=root\n")
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    with open(disk, "rb") as f:
        root = gpt.root_of(f, gpt.partitions(f))
        assert root is not None and root.name == "root" and root.type == kind
        assert gpt.Slice(f, root.offset, root.length).read() == root_bytes  # type: ignore[arg-type]


def test_a_window_never_keeps_or_joins_a_chunk_cut_short_by_a_bad_cluster(tmp_path: Path) -> None:
    """The qcow2 reader stops before a bad cluster after good ones (a short read): a Window chunk
    holding one is not kept, nor joined to the next chunk as if whole (that served the bytes of
    the next chunk at the wrong offsets); the read is EIO with the cluster's own fault."""
    raw, qcow2 = tmp_path / "d.raw", tmp_path / "d.qcow2"
    data = os.urandom(MiB)
    raw.write_bytes(data)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    image = bytearray(qcow2.read_bytes())
    l1 = struct.unpack_from(">Q", image, 40)[0]
    l2 = struct.unpack_from(">Q", image, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", image, l2 + 8 * 3, (1 << 63) | (len(image) + (1 << 30)))  # cluster 3: past the end
    window = gpt.Window(Qcow2Reader(io.BytesIO(bytes(image))), 0, MiB, chunk=4 << 16)  # chunk 0: clusters 0-3
    assert window.seek(5 << 16) and window.read(100) == data[5 << 16:(5 << 16) + 100]  # chunk 1 is sound
    for at, size in ((0, 10), ((4 << 16) - 4, 8), (0, 3 << 17)):
        window.seek(at)
        with pytest.raises(OSError) as caught:
            window.read(size)
        assert caught.value.errno == errno.EIO and "past the end of the file" in str(caught.value)
    window.seek(1 << 16)
    with pytest.raises(OSError, match="past the end of the file"):
        window.readinto(bytearray(9 << 16))
