"""contents/disk/ext4root.py: a real mkfs.ext4 -d root, inside a GPT disk inside a zlib and a zstd qcow2,
read entry by entry against the folder it was made from."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from lxdimagefs.contents.disk import gpt
from lxdimagefs.contents.disk.ext4check import CheckedInodes
from lxdimagefs.contents.disk.ext4root import Ext4Rootfs
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader

MiB = 1 << 20


def _tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=test\nNAME=Test\n")
    (root / "etc/fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
    (root / "big").write_bytes(os.urandom(300_000))
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o4750)
    os.chown(root / "suid", 100000, 200001)
    os.link(root / "big", root / "etc/big-again")
    os.symlink("../big", root / "etc/rel")
    os.symlink("x" * 200, root / "long")  # not a fast symlink: its target in a block
    os.mkfifo(root / "fifo")
    os.mknod(root / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 5))
    os.mknod(root / "blk", 0o600 | stat.S_IFBLK, os.makedev(259, 300))
    os.utime(root / "big", (1_600_000_000, 1_600_000_000), follow_symlinks=False)


def read_as_tree(fs: Ext4Rootfs, tree: Path) -> int:
    """`fs` holds `tree`'s entries, each as its source: names, type, mode, owner, time, link count,
    link target, size, bytes (whole, and at two offsets: across an inline file's i_block end too),
    device numbers. How many were compared."""
    seen = 0
    for dirpath, dirs, files in os.walk(tree):
        listed = fs.list("/" + os.path.relpath(dirpath, tree).lstrip("."))
        assert listed is not None and set(listed) - {"lost+found"} == set(dirs + files), dirpath
        for name in files + dirs:
            path = Path(dirpath) / name
            inner = "/" + str(path.relative_to(tree))
            want, got = os.lstat(path), fs.lookup(inner)
            assert got is not None, inner
            assert (got.mode, got.uid, got.gid, got.mtime) == (
                want.st_mode, want.st_uid, want.st_gid, int(want.st_mtime)), inner
            assert fs.nlink(got) == (1 if stat.S_ISDIR(want.st_mode) else want.st_nlink), inner
            if stat.S_ISLNK(want.st_mode):
                assert got.linkname == os.readlink(path), inner
            elif stat.S_ISREG(want.st_mode):
                data = path.read_bytes()
                assert got.size == len(data) and fs.read(got, len(data) + 10, 0) == data, inner
                assert fs.read(got, 10, 5) == data[5:15] and fs.read(got, 7, 58) == data[58:65], inner
            elif stat.S_ISCHR(want.st_mode) or stat.S_ISBLK(want.st_mode):
                assert fs.device(got) == want.st_rdev, inner
            seen += 1
    return seen


@pytest.mark.parametrize("options", [["-c"], ["-c", "-o", "compression_type=zstd"]])
def test_an_ext4_root_reads_as_its_source_tree(tmp_path: Path, options: list[str]) -> None:
    tree, raw, disk = tmp_path / "tree", tmp_path / "root.img", tmp_path / "disk.raw"
    _tree(tree)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(raw), "16M"], check=True)
    with open(disk, "wb") as f:
        f.truncate(20 * MiB)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True,
                   input=f"label: gpt\nstart=2048, size=32768, type={gpt.ROOT_X86_64}\n".encode())
    subprocess.run(["dd", f"if={raw}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none"],
                   check=True)
    subprocess.run(["qemu-img", "convert", *options, "-f", "raw", "-O", "qcow2", str(disk),
                    str(tmp_path / "d.qcow2")], check=True)
    with open(tmp_path / "d.qcow2", "rb") as f:
        reader = io.BufferedReader(Qcow2Reader(f))
        root = gpt.root_of(reader, gpt.partitions(reader))  # type: ignore[arg-type]
        assert root is not None
        fs = Ext4Rootfs(io.BufferedReader(gpt.Slice(reader, root.offset, root.length)))  # type: ignore[arg-type]
        assert read_as_tree(fs, tree) == 11
        big, again = fs.lookup("/big"), fs.lookup("/etc/big-again")
        assert big is not None and again is not None
        assert big.userdata[-1].offsetheader == again.userdata[-1].offsetheader  # one inode, two names


def test_a_meta_bg_volume_reads_past_its_first_descriptor_block(tmp_path: Path) -> None:
    """meta_bg (a volume grown past its reserved descriptor table): group 16 on of 1 KiB blocks
    has its descriptor at the start of its own meta group; eight inodes a group put files there."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(150):
        (tree / f"f{i}").write_text(f"file {i}\n")
    image = tmp_path / "m.img"
    subprocess.run(["mkfs.ext4", "-q", "-O", "meta_bg,^resize_inode", "-b", "1024", "-I", "128", "-N", "200",
                    "-d", str(tree), str(image), "200M"], check=True, capture_output=True)
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        numbers = set()
        for i in range(150):
            got = fs.lookup(f"/f{i}")
            assert got is not None and fs.read(got, 100, 0) == f"file {i}\n".encode()
            numbers.add(got.userdata[-1].offsetheader)
        assert max(numbers) > 16 * 8  # an inode of group 16 or later was read


def test_a_folder_of_more_names_than_are_kept_lists_and_looks_up(tmp_path: Path, monkeypatch) -> None:
    """A folder's names are kept (NAMES in all, by folder); a larger folder is kept packed in a
    slot of its own, never refused (cachetools would raise `value too large`), and the lookups
    after its listing (`ls -l`) do not read it again (70,000 names: 45 minutes)."""
    monkeypatch.setattr(Ext4Rootfs, "NAMES", 1000)
    reads = []
    entries = CheckedInodes.entries
    monkeypatch.setattr(CheckedInodes, "entries", lambda self, n: reads.append(n) or entries(self, n))
    (tmp_path / "t/d").mkdir(parents=True)
    for i in range(1500):
        (tmp_path / f"t/d/f{i}").write_text(str(i))
    subprocess.run(["mkfs.ext4", "-q", "-N", "4000", "-d", str(tmp_path / "t"), str(tmp_path / "b.img"),
                    "16M"], check=True, capture_output=True)
    with open(tmp_path / "b.img", "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        listed = fs.list("/d")
        assert listed is not None and len(listed) == 1500
        for i in (*range(1500), 0, 777, 1499):
            got = fs.lookup(f"/d/f{i}")
            assert got is not None and fs.read(got, 10, 0) == str(i).encode()
        assert fs.lookup("/d/f1500") is None and fs.lookup("/d/e") is None and fs.lookup("/d/g") is None
        assert len(reads) == 2  # the root, then /d once


def test_an_extent_of_32768_blocks_reads_its_bytes(tmp_path: Path) -> None:
    """32,768 blocks is the longest initialized extent (the kernel's EXT_INIT_MAX_LEN), not an
    unwritten one: its bytes are the file's, not zeros. mke2fs stops at 32,767: the first two
    extents of a contiguous file are joined in the inode with debugfs."""
    (tmp_path / "t").mkdir()
    data = os.urandom(40 << 20)
    (tmp_path / "t/f").write_bytes(data)
    image = tmp_path / "f.img"
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", "-G", "64", "-O", "sparse_super2,^has_journal", "-E",
                    "num_backup_sb=0", "-d", str(tmp_path / "t"), str(image), "64M"], check=True,
                   capture_output=True)
    lines = subprocess.run(["debugfs", "-R", "ex /f", str(image)], capture_output=True, text=True,
                           check=True).stdout.splitlines()[1:3]
    first, second = ([int(n) for n in re.findall(r"\d+", line)][4:9] for line in lines)
    assert first[4] == 32767 and first[3] + 1 == second[2]  # one run on disk, cut at 32,767 blocks
    joined = ["sif /f block[4] 32768", "sif /f block[6] 32768", f"sif /f block[7] {second[4] - 1}",
              f"sif /f block[8] {second[2] + 1}"]
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(joined).encode(), check=True,
                   capture_output=True)
    assert "32768" in subprocess.run(["debugfs", "-R", "ex /f", str(image)], capture_output=True, text=True,
                                     check=True).stdout
    with open(image, "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        got = fs.lookup("/f")
        assert got is not None and fs.read(got, got.size, 0) == data


def test_a_folders_inodes_are_read_a_table_block_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Listing a folder of 200 files (256-byte inodes side by side in the inode table: 16 to a
    4 KiB block) reads the table block by block, not inode by inode; each entry is still its own
    inode's, and a file's inode read again after other blocks is read anew, right."""
    reads: list[tuple[int, int]] = []
    read = CheckedInodes._read
    monkeypatch.setattr(CheckedInodes, "_read",
                        lambda self, at, n: reads.append((at, n)) or read(self, at, n))
    monkeypatch.setattr("lxdimagefs.contents.disk.ext4check.TABLE_KEPT", 8 * 4096, raising=False)
    (tmp_path / "t/d").mkdir(parents=True)
    for i in range(200):
        (tmp_path / f"t/d/f{i}").write_text("x" * i)
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-I", "256", "-d", str(tmp_path / "t"),
                    str(tmp_path / "b.img"), "16M"], check=True, capture_output=True)
    with open(tmp_path / "b.img", "rb") as f:
        fs = Ext4Rootfs(io.BufferedReader(f))
        fs.list("/")
        reads.clear()
        listed = fs.list("/d")
        assert listed is not None and sorted(listed) == sorted(f"f{i}" for i in range(200))
        assert all(listed[f"f{i}"].size == i for i in range(200))
        assert len({at for at, _ in reads}) == len(reads) <= 200 // 16 + 4, reads  # blocks, and the folder's
        assert all(n == 4096 for _, n in reads)
        first = listed["f0"]
        assert fs.read(first, 10, 0) == b"" and fs.read(listed["f7"], 10, 0) == b"x" * 7
        assert fs.lookup("/d/f199").size == 199 and fs.lookup("/d/f0").size == 0  # type: ignore[union-attr]
