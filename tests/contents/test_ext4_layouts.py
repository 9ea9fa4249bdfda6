"""contents/disk/ext4check.py and ext4map.py on the layouts a guest's volumes have besides a new
ext4 (32-byte group descriptors, ext2/3 block maps) and on crafted faults: each file reads as its
source or EIO, never other bytes; a bad entry is EIO alone, its folder lists on."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from lxdimagefs.contents.disk import ext4check
from lxdimagefs.contents.disk.ext4root import Ext4Rootfs


def _source(tree: Path) -> dict[str, bytes]:
    """Files of every size a block map has: in the inode's 60 bytes (not inline: pointers), direct,
    indirect, double and (sparse, 70 MiB on 1 KiB blocks) triple indirect blocks."""
    files = {"tiny": b"hello small\n", "direct": os.urandom(9000), "indirect": os.urandom(200_000),
             "double": os.urandom(900_000)}
    (tree / "boot/grub").mkdir(parents=True)
    for name, data in files.items():
        (tree / "boot" / name).write_bytes(data)
    with open(tree / "boot/triple", "wb") as f:
        f.seek(70 << 20)
        f.write(b"TAIL")
    os.symlink("vmlinuz-6.1", tree / "boot/vmlinuz")  # a fast symlink
    os.symlink("y" * 100, tree / "boot/grub/long")  # a slow one: its target in a mapped block
    return {f"/boot/{name}": data for name, data in files.items()}


@pytest.mark.parametrize("options", [["-t", "ext2", "-b", "1024"], ["-t", "ext3"],
                                     ["-t", "ext4", "-O", "^64bit"], ["-t", "ext4", "-O", "^extent,^64bit"]])
def test_ext2_ext3_and_32_byte_descriptors_read_as_their_source(tmp_path: Path, options: list[str]) -> None:
    tree, image = tmp_path / "t", tmp_path / "b.img"
    files = _source(tree)
    subprocess.run(["mke2fs", "-q", *options, "-d", str(tree), str(image), "32M"], check=True,
                   capture_output=True)
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        for path, data in files.items():
            got = fs.lookup(path)
            assert got is not None and got.size == len(data), path
            assert fs.read(got, len(data), 0) == data, path
            assert fs.read(got, 100, 5000) == data[5000:5100], path
        triple = fs.lookup("/boot/triple")
        assert triple is not None and fs.read(triple, 8, (70 << 20) - 4) == bytes(4) + b"TAIL"
        assert fs.read(triple, 4, 1 << 20) == bytes(4)  # a hole
        links = [fs.lookup(p).linkname for p in ("/boot/vmlinuz", "/boot/grub/long")]
        assert links == ["vmlinuz-6.1", "y" * 100]
        assert sorted(fs.list("/boot")) == ["direct", "double", "grub", "indirect", "tiny", "triple",
                                            "vmlinuz"]


def _debugfs(image: Path, *commands: str) -> str:
    return subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands).encode(),
                          check=True, capture_output=True).stdout.decode()


def _block(image: Path, path: str) -> int:
    return int(subprocess.run(["debugfs", "-R", f"bmap {path} 0", str(image)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])


@pytest.fixture
def crafted(tmp_path: Path) -> Path:
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    for name in ("ok", "bad", "gone", "secret", "aXb"):
        (tree / "d" / name).write_text(f"{name}\n")
    (tree / "f").write_bytes(b"A" * 4096 + b"B" * 4096 + b"C" * 4096)
    image = tmp_path / "c.img"
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-d", str(tree), str(image), "16M"], check=True,
                   capture_output=True)
    return image


def test_an_overlapping_or_empty_extent_is_eio_not_other_bytes(crafted: Path) -> None:
    first = _block(crafted, "/f")
    # a second extent in the inode: file block 1 (inside the first's 3) at the third block
    _debugfs(crafted, "sif /f block[0] 0x0002F30A", "sif /f block[6] 1", "sif /f block[7] 1",
             f"sif /f block[8] {first + 2}")
    with open(crafted, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        info = fs.lookup("/f")
        for _ in range(2):  # the fault is kept: a second read repeats no walk and is EIO too
            with pytest.raises(OSError) as caught:
                fs.read(info, 12288, 0)
            assert caught.value.errno == errno.EIO and "overlapping" in str(caught.value)
    _debugfs(crafted, "sif /f block[0] 0x0001F30A", "sif /f block[4] 0")  # one extent of 0 blocks
    with open(crafted, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        with pytest.raises(OSError, match="no blocks"):
            fs.read(fs.lookup("/f"), 10, 0)


def test_a_bad_entry_is_eio_alone_and_its_folder_lists_on(crafted: Path, caplog) -> None:
    """An unknown file type, a link count of 0, a name with '/', an entry naming a reserved inode,
    and an encrypted file: none fails the folder's listing; none serves other bytes."""
    _debugfs(crafted, "sif /d/bad mode 0170644", "sif /d/gone links_count 0", "sif /d/secret flags 0x80800",
             "link <7> /d/reserved")
    data = bytearray(crafted.read_bytes())
    at = data.index(b"aXb")
    data[at:at + 3] = b"a/b"  # a name no path can hold: it would be read as /d/a/b
    crafted.write_bytes(data)
    with open(crafted, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        assert sorted(fs.list("/d")) == ["ok", "secret"]
        assert "/d/bad left out" in caplog.text and "/d/gone left out" in caplog.text
        for path in ("/d/bad", "/d/gone"):
            with pytest.raises(OSError):
                fs.lookup(path)
        assert fs.lookup("/d/a") is None and fs.lookup("/d/a/b") is None and fs.lookup("/d/reserved") is None
        with pytest.raises(OSError, match="encrypted"):
            fs.read(fs.lookup("/d/secret"), 10, 0)
        assert fs.read(fs.lookup("/d/ok"), 10, 0) == b"ok\n"


def test_an_index_node_of_many_children_is_walked_one_at_a_time(tmp_path: Path) -> None:
    """64 KiB blocks: an index node of 4,094 entries, all pointing at one leaf. The walk held every
    child (256 MiB) before a check failed; one node at a time, the second leaf's repeat is EIO."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t/victim").write_bytes(b"v" * 3 * 65536)
    image = tmp_path / "z.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "65536", "-d", str(tmp_path / "t"), str(image), "64M"],
                   check=True, capture_output=True)
    free = subprocess.run(["debugfs", "-R", "ffb 2 100", str(image)], capture_output=True, text=True,
                          check=True)
    index, leaf = (int(n) for n in free.stdout.split()[-2:])
    data = bytearray(image.read_bytes())
    bs = 65536
    data[index * bs:(index + 1) * bs] = (struct.pack("<HHHHI", 0xF30A, 4094, 5460, 1, 0) + b"".join(
        struct.pack("<IIHH", i, leaf, 0, 0) for i in range(4094))).ljust(bs, b"\0")
    data[leaf * bs:(leaf + 1) * bs] = (struct.pack("<HHHHI", 0xF30A, 5460, 5460, 0, 0) + b"".join(
        struct.pack("<IHHI", i, 1, 0, leaf) for i in range(5460))).ljust(bs, b"\0")
    image.write_bytes(data)
    _debugfs(image, "sif /victim block[0] 0x0001F30A", "sif /victim block[1] 0x00020004",
             "sif /victim block[3] 0", f"sif /victim block[4] {index}", "sif /victim block[5] 0")
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        info = fs.lookup("/victim")
        tracemalloc.start()
        try:
            with pytest.raises(OSError, match="overlapping"):
                fs.read(info, 10, 0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_the_runs_kept_are_bounded_in_all(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ext4check, "RUNS_KEPT", 4)
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(10):
        (tree / f"f{i}").write_text(str(i))
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(tmp_path / "r.img"), "8M"], check=True,
                   capture_output=True)
    with open(tmp_path / "r.img", "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        for i in range(10):
            assert fs.read(fs.lookup(f"/f{i}"), 5, 0) == str(i).encode()
        assert len(fs._inodes._runs) == 4
