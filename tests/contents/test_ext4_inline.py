"""contents/disk/ext4inline.py: ext4 inline data (mkfs.ext4 -O inline_data -d, as a guest's volume may
be made): files, symlinks and folders whose bytes are in the inode (i_block, then the in-inode
attribute system.data) read as their source, entry by entry; a hostile attribute area is EIO for
that inode alone, with a log line, the rest reading on. No LXD, no mount."""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import subprocess
from pathlib import Path

import pytest
from test_ext4root import read_as_tree

from lxdimagefs.contents.disk.ext4root import Ext4Rootfs
from lxdimagefs.contents.disk.root import GuestTree

SIZES = (0, 1, 59, 60, 61, 100, 128, 129, 3000)  # 61 to 128: i_block's 60, the rest in system.data


def inline_tree(tree: Path) -> None:
    """Files and symlink targets of every size around i_block's 60 bytes, empty and small folders
    (inline) and a larger one (in a block), owners, modes and times of their own."""
    (tree / "empty").mkdir(parents=True)
    (tree / "small").mkdir()
    (tree / "large").mkdir()
    for n in SIZES:
        (tree / f"f{n}").write_bytes(os.urandom(n))
        if 0 < n < 1000:  # no longer than a block
            os.symlink("t" * n, tree / f"l{n}")
    for name in ("a", "bb"):
        (tree / "small" / name).write_text(name)
    for i in range(40):
        (tree / "large" / f"name-{i}").write_text(str(i))
    os.chmod(tree / "f100", 0o4750)
    os.chown(tree / "f100", 1000, 2000)
    os.utime(tree / "f100", (1_600_000_000, 1_600_000_000))


def make(tmp_path: Path, tree: Path, *edits: str) -> Path:
    image = tmp_path / "inline.img"
    subprocess.run(["mkfs.ext4", "-q", "-O", "inline_data", "-d", str(tree), str(image), "8M"], check=True,
                   capture_output=True)
    if edits:
        subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(edits).encode(), check=True,
                       capture_output=True)
    return image


def flags(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split("Flags: ")[1].split()[0], 16)


def inode_at(image: Path, path: str) -> int:
    """Where `path`'s inode is in the image (debugfs imap), in bytes."""
    out = subprocess.run(["debugfs", "-R", f"imap {path}", str(image)], capture_output=True, text=True,
                         check=True).stdout
    block, offset = out.split("located at block ")[1].split(", offset ")
    return int(block) * 1024 + int(offset.split()[0], 16)


def test_inline_files_symlinks_and_folders_read_as_their_source(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    inline_tree(tree)
    image = make(tmp_path, tree)
    for inline in ("/f61", "/f100", "/f128", "/l100", "/empty", "/small"):  # what is tested is inline
        assert flags(image, inline) & 0x10000000, inline
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        assert read_as_tree(fs, tree) == 3 + 9 + 7 + 2 + 40


def test_an_inline_folder_with_entries_in_system_data_lists_them(tmp_path: Path) -> None:
    """The kernel moves an inline folder's entries on into system.data before it gives it a block
    (mkfs.ext4 -d never does): both places are listed, each entry checked within its own."""
    tree = tmp_path / "tree"
    inline_tree(tree)
    image = make(tmp_path, tree)
    number = int(subprocess.run(["debugfs", "-R", "stat /f1", str(image)], capture_output=True, text=True,
                                check=True).stdout.split("Inode: ")[1].split()[0])

    def entry(name: bytes, length: int) -> bytes:
        return struct.pack("<IHBB", number, length, len(name), 1) + name.ljust(length - 8, b"\0")
    (tmp_path / "value").write_bytes(entry(b"moved", 16) + entry(b"also-moved", 24))
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], check=True, capture_output=True,
                   input=f"ea_set -f {tmp_path / 'value'} /small system.data\nsif /small size 100\n"
                         "sif /f1 links_count 3\n".encode())
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        assert sorted(fs.list("/small")) == ["a", "also-moved", "bb", "moved"]
        moved = fs.lookup("/small/also-moved")
        assert moved is not None and fs.read(moved, 5, 0) == (tree / "f1").read_bytes()
        assert fs.nlink(moved) == 3
    value = bytearray((tmp_path / "value").read_bytes())
    value[20:22] = struct.pack("<H", 28)  # the second entry runs past the value's end
    (tmp_path / "value").write_bytes(value)
    subprocess.run(["debugfs", "-w", "-R", f"ea_set -f {tmp_path / 'value'} /small system.data", str(image)],
                   check=True, capture_output=True)
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        with pytest.raises(OSError, match="a bad folder entry"):
            fs.list("/small")
        assert fs.read(fs.lookup("/f100"), 200, 0) == (tree / "f100").read_bytes()


def _patch(image: Path, at: int, packed: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(at)
        f.write(packed)


ENTRY = 128 + 32 + 4  # the first attribute entry of a 256-byte inode: after i_extra_isize (32), the magic


@pytest.mark.parametrize("case, fault", [
    ("name past the inode", "name runs past the inode"),
    ("entry past the inode", "an extended attribute entry runs past the inode"),
    ("value out of range", "lies outside the inode's attribute area"),
    ("value among the entries", "lies outside the inode's attribute area"),
    ("value in another inode", "its inline data is in inode 12"),
    ("size past the value", "500 bytes of inline data, 100 in the inode"),
    ("no attribute area", "100 bytes of inline data, 60 in the inode"),
])
def test_a_hostile_attribute_area_is_eio_for_that_file_alone(tmp_path: Path, case: str, fault: str,
                                                             caplog) -> None:
    tree = tmp_path / "tree"
    inline_tree(tree)
    image = make(tmp_path, tree, "sif /f100 size 500" if case == "size past the value" else "")
    at = inode_at(image, "/f100")
    entry = image.read_bytes()[at + ENTRY:at + ENTRY + 20]
    assert entry[1] == 7 and entry[16:20] == b"data"  # system.data, the one entry
    patch = {"name past the inode": (ENTRY, b"\xf0"),  # e_name_len
             "entry past the inode": (ENTRY + 20, b"\x01" * (256 - ENTRY - 20)),  # no end before the inode's
             "value out of range": (ENTRY + 2, struct.pack("<H", 0x200)),  # e_value_offs
             "value among the entries": (ENTRY + 2, struct.pack("<H", 0)),
             "value in another inode": (ENTRY + 4, struct.pack("<I", 12)),  # e_value_inum
             "no attribute area": (128 + 32, b"\0\0\0\0"),  # the magic
             }.get(case)
    if patch is not None:
        _patch(image, at + patch[0], patch[1])
    with open(image, "rb") as f:
        fs = GuestTree("vm.qcow2", Ext4Rootfs(io.BufferedReader(f)))
        info = fs.lookup("/f100")
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                with pytest.raises(OSError) as caught:
                    fs.read(info, 4096, 0)
                assert caught.value.errno == errno.EIO
        assert fault in caplog.text and "vm.qcow2" in caplog.text
        for other in ("f61", "f128", "f3000"):  # the rest reads on
            assert fs.read(fs.lookup(f"/{other}"), 4096, 0) == (tree / other).read_bytes()
        assert sorted(fs.list("/small")) == ["a", "bb"]
