"""contents/ of a VM image (metadata tarball + qcow2 disk) through a real LXD and a real mount:
rootfs/ is the guest's ext4 root, entry by entry as the folder it was made from (zlib and zstd)."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
import vmdisk
import zstandard
from mounts import mounted
from test_ext4_inline import inline_tree
from test_ext4root import _tree
from test_kept import kept_by_kernel

from lxdimagefs.contents.disk import gpt
from lxdimagefs.contents.disk.root import NOTE

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

META = b"architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: vm contents test\n"


def _vm(work: Path, options: list[str], tree: Path | None, edit: str = "", mkfs: tuple[str, ...] = ()
        ) -> tuple[Path, Path]:
    """A split VM image: a metadata tarball and a qcow2 GPT disk (its ext4 root made from `tree`,
    then changed by the debugfs commands `edit`)."""
    work.mkdir(parents=True)
    (work / "metadata.yaml").write_bytes(META + work.name.encode().join([b"  seed: ", b"\n"]))
    with tarfile.open(work / "meta.tar.xz", "w:xz") as tar:
        tar.add(work / "metadata.yaml", "metadata.yaml")
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True,
                   input=f"label: gpt\nstart=2048, size=32768, type={gpt.ROOT_X86_64}\n".encode())
    if tree is not None:
        subprocess.run(["mkfs.ext4", "-q", *mkfs, "-d", str(tree), str(work / "root.img"), "16M"], check=True)
        if edit:
            subprocess.run(["debugfs", "-w", "-f", "-", str(work / "root.img")], input=edit.encode(),
                           check=True, capture_output=True)
        subprocess.run(["dd", f"if={work / 'root.img'}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc",
                        "status=none"], check=True)
    subprocess.run(["qemu-img", "convert", *options, "-f", "raw", "-O", "qcow2", str(disk),
                    str(work / "rootfs.img")], check=True)
    return work / "meta.tar.xz", work / "rootfs.img"


def _same_entries(tree: Path, root: Path) -> int:
    """`root` (through the mount) holds `tree`'s entries, each as its source: names, type, mode,
    owner, time, link target, bytes, hard links, device numbers. How many were compared."""
    seen = 0
    for dirpath, dirs, files in os.walk(tree):
        got_dir = root / Path(dirpath).relative_to(tree)
        assert set(os.listdir(got_dir)) - {"lost+found"} == set(dirs + files), got_dir
        for entry in dirs + files:
            want_path, got_path = Path(dirpath) / entry, got_dir / entry
            want, got = os.lstat(want_path), os.lstat(got_path)
            assert (got.st_mode, got.st_uid, got.st_gid, int(got.st_mtime)) == (
                want.st_mode, want.st_uid, want.st_gid, int(want.st_mtime)), got_path
            if stat.S_ISLNK(want.st_mode):
                assert os.readlink(got_path) == os.readlink(want_path), got_path
            elif stat.S_ISREG(want.st_mode):
                assert (got.st_size, got.st_nlink) == (want.st_size, want.st_nlink), got_path
                assert got_path.read_bytes() == want_path.read_bytes(), got_path
            elif stat.S_ISCHR(want.st_mode) or stat.S_ISBLK(want.st_mode):
                assert got.st_rdev == want.st_rdev, got_path
            seen += 1
    return seen


def test_a_vm_images_rootfs_is_its_ext4_root(sandbox, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _tree(tree)
    fps = {name: sandbox.import_image(*_vm(tmp_path / name, options, tree if name != "blank" else None))
           for name, options in [("zlib", ["-c"]), ("zstd", ["-c", "-o", "compression_type=zstd"]),
                                 ("blank", ["-c"])]}
    with mounted(sandbox, tmp_path / "mnt") as m:
        blank = m.path / "contents" / "by-fingerprint" / fps["blank"]
        assert sorted(os.listdir(blank)) == ["metadata.yaml", NOTE]  # a disk not understood: and why
        assert "no ext4 Linux root partition" in (blank / NOTE).read_text()
        assert "no ext4 Linux root partition" in m.log_text()
        for name in ("zlib", "zstd"):
            root = m.path / "contents" / "by-fingerprint" / fps[name]
            assert sorted(os.listdir(root)) == ["metadata.yaml", "rootfs"]
            assert _same_entries(tree, root / "rootfs") == 11
            assert os.lstat(root / "rootfs/big").st_ino == os.lstat(root / "rootfs/etc/big-again").st_ino


def test_a_cluster_past_the_end_of_the_disk_is_eio_and_the_mount_serves_on(sandbox, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _tree(tree)
    meta, disk = _vm(tmp_path / "hostile", [], tree)
    raw = (tmp_path / "hostile" / "disk.raw").read_bytes()
    cluster = raw.index((tree / "big").read_bytes()[:4096]) // 65536 + 1  # inside big, not its first
    image = bytearray(disk.read_bytes())
    l1 = struct.unpack_from(">Q", image, 40)[0]
    l2 = struct.unpack_from(">Q", image, l1 + 8 * (cluster // 8192))[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", image, l2 + 8 * (cluster % 8192), (1 << 63) | (len(image) + (1 << 30)))
    disk.write_bytes(image)
    fp = sandbox.import_image(meta, disk)
    with mounted(sandbox, tmp_path / "mnt") as m:
        root = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
        with pytest.raises(OSError) as caught:
            (root / "big").read_bytes()
        assert caught.value.errno == errno.EIO
        assert "lies past the end of the file" in m.log_text()  # the reason, in one log line
        assert (root / "etc/os-release").read_bytes() == (tree / "etc/os-release").read_bytes()
        assert fp in os.listdir(m.path / "by-fingerprint")


def test_a_vm_images_times_are_exact_to_the_nanosecond(sandbox, tmp_path: Path) -> None:
    """ext4 keeps a time's nanoseconds and epoch bits (past 2038) in i_mtime_extra: the mount shows
    them exactly (a float of seconds holds a time of 2023 only to 0.24 us)."""
    tree = tmp_path / "tree"
    _tree(tree)
    # mkfs.ext4 -d keeps whole seconds: the nanoseconds are set in the image itself
    edit = ("sif /etc/os-release mtime @1700000000\nsif /etc/os-release mtime_extra "
            f"{123_456_789 << 2}\nsif /big mtime @5\nsif /big mtime_extra {1 | 999_999_999 << 2}\n"
            f"sif /etc mtime @1600000000\nsif /etc mtime_extra {7 << 2}\n")
    fp = sandbox.import_image(*_vm(tmp_path / "ns", ["-c"], tree, edit))
    with mounted(sandbox, tmp_path / "mnt") as m:
        root = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
        assert os.lstat(root / "etc/os-release").st_mtime_ns == 1_700_000_000_123_456_789
        assert os.lstat(root / "big").st_mtime_ns == ((1 << 32) + 5) * 10**9 + 999_999_999  # 2106
        assert os.lstat(root / "etc").st_mtime_ns == 1_600_000_000_000_000_007
        assert os.lstat(root / "etc/big-again").st_mtime_ns == os.lstat(root / "big").st_mtime_ns
        assert int(os.lstat(root / "etc/fstab").st_mtime) == int(os.lstat(tree / "etc/fstab").st_mtime)


def test_an_esp_no_reader_can_read_is_eio_under_boot_efi_and_the_rest_serves(sandbox, tmp_path: Path) -> None:
    """The ESP is opened when a path under /boot/efi is first reached (not for a `cat` in /etc):
    one whose FAT cannot be read is EIO there, with the reason in the log; the root reads on."""
    tree = tmp_path / "tree"
    _tree(tree)
    root, esp = vmdisk.root_tree(tree, tmp_path / "root"), vmdisk.esp_tree(tmp_path / "esp")
    fp = sandbox.import_image(*vmdisk.vm_image(tmp_path / "vm", root, esp, "zlib", no_fat=True))
    with mounted(sandbox, tmp_path / "mnt") as m:
        top = m.path / "contents" / "by-fingerprint" / fp
        assert (top / "rootfs/etc/os-release").read_bytes() == (tree / "etc/os-release").read_bytes()
        assert sorted(os.listdir(top)) == ["metadata.yaml", "rootfs"]
        assert "At least one FAT expected" not in m.log_text()  # not read for /etc
        for _ in range(2):
            with pytest.raises(OSError) as caught:
                os.listdir(top / "rootfs/boot/efi/EFI")
            assert caught.value.errno == errno.EIO
        assert "/boot/efi not read: PyFATException: At least one FAT expected" in m.log_text()
        assert (top / "rootfs/big").read_bytes() == (tree / "big").read_bytes()
        assert sorted(os.listdir(top / "rootfs/boot")) == ["efi"]


def test_an_ext2_boot_of_block_maps_reads_and_a_bad_entry_is_eio_alone(sandbox, tmp_path: Path) -> None:
    """An ext2 /boot (block maps, 32-byte group descriptors: EIO or a crash before) mounted by its
    fstab line reads as its source; in the root, an inode of no known type is left out of its
    folder's listing (which listed nothing before) and is EIO alone, with a log line."""
    tree, boot = tmp_path / "tree", tmp_path / "boot"
    _tree(tree)
    (tree / "boot").mkdir()
    (tree / "etc/fstab").write_text("LABEL=root / ext4 defaults 0 1\nLABEL=BOOT /boot ext2 defaults 0 2\n")
    (boot / "grub").mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(os.urandom(700_000))
    (boot / "grub/grub.cfg").write_text("set default=0\n")
    work = tmp_path / "vm"
    meta, _ = _vm(work, [], tree, "sif /suid mode 0170750")
    disk = work / "disk.raw"
    with open(disk, "r+b") as f:
        f.truncate(28 << 20)
    subprocess.run(["sfdisk", "-q", "-a", str(disk)], check=True,
                   input=f"start=34816, size=16384, type={gpt.LINUX_DATA}\n".encode())
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-b", "1024", "-L", "BOOT", "-d", str(boot),
                    str(work / "boot.img"), "8M"], check=True)
    subprocess.run(["dd", f"if={work / 'boot.img'}", f"of={disk}", "bs=1M", "seek=17", "conv=notrunc",
                    "status=none"], check=True)
    (work / "rootfs.img").unlink()
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(disk),
                    str(work / "rootfs.img")],
                   check=True)
    fp = sandbox.import_image(meta, work / "rootfs.img")
    sock = tmp_path / "metrics.sock"
    with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}") as m:
        root = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
        assert sorted(os.listdir(root / "boot")) == ["grub", "lost+found", "vmlinuz"]
        assert (root / "boot/vmlinuz").read_bytes() == (boot / "vmlinuz").read_bytes()
        assert (root / "boot/grub/grub.cfg").read_bytes() == b"set default=0\n"
        assert "suid" not in os.listdir(root) and "big" in os.listdir(root)
        with pytest.raises(OSError) as caught:
            os.lstat(root / "suid")
        assert caught.value.errno == errno.EIO
        assert "unknown file type" in m.log_text()
        assert (root / "big").read_bytes() == (tree / "big").read_bytes()
        # A listing that left an entry out is asked for at each open, never kept by the kernel
        # (a read that failed for a moment would be missing for the mount's life); a whole one is.
        assert kept_by_kernel(sock, root / "etc") and not kept_by_kernel(sock, root, tries=1)


def test_rootfs_reads_without_the_metadata_tarball_a_bad_one_is_eio_alone(sandbox, tmp_path: Path) -> None:
    """A look inside rootfs/ never makes the metadata tarball's source (ratarmountcore's tar source and
    its index: 80 ms of a VM's first `cat`): one that cannot be read (a .tar.zst cut short inside its
    frame; LXD reads only its metadata.yaml) is EIO at the image's top, with a log line, and rootfs/
    serves on (the whole image was EIO before)."""
    tree = tmp_path / "tree"
    _tree(tree)
    meta, disk = _vm(tmp_path / "cut", ["-c"], tree)
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        tar.add(meta.parent / "metadata.yaml", "metadata.yaml")
    cut = meta.with_name("meta.tar.zst")
    cut.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(plain.getvalue())[:-2])
    fp = sandbox.import_image(cut, disk)
    with mounted(sandbox, tmp_path / "mnt") as m:
        top = m.path / "contents" / "by-fingerprint" / fp
        assert (top / "rootfs/etc/os-release").read_bytes() == (tree / "etc/os-release").read_bytes()
        assert "the metadata tarball" not in m.log_text()  # not made for rootfs/
        for _ in range(2):  # its fault kept: EIO again, rootfs/ still read
            with pytest.raises(OSError) as caught:
                (top / "metadata.yaml").read_bytes()
            assert caught.value.errno == errno.EIO
            assert os.lstat(top / "rootfs/big").st_size == (tree / "big").stat().st_size
        assert "tarball: ValueError: the metadata tarball ends inside a zstd frame" in m.log_text()
        assert (top / "rootfs/big").read_bytes() == (tree / "big").read_bytes()


def test_a_root_of_inline_data_reads_as_its_source_entry_by_entry(sandbox, tmp_path: Path) -> None:
    """mkfs.ext4 -O inline_data: small files, symlinks and folders kept in their inodes (EIO past
    i_block's 60 bytes before) read through the mount as the folder they were made from."""
    tree = tmp_path / "tree"
    inline_tree(tree)
    fp = sandbox.import_image(*_vm(tmp_path / "inline", ["-c", "-o", "compression_type=zstd"], tree,
                                   mkfs=("-O", "inline_data")))
    with mounted(sandbox, tmp_path / "mnt") as m:
        root = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
        assert _same_entries(tree, root) == 61
        assert "inline data" not in m.log_text()
