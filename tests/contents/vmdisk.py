"""A VM image as distrobuilder makes one, small: a GPT disk with a FAT32 ESP (label UEFI, made with
mkfs.vfat + mtools) and an ext4 root (mkfs.ext4 -d) whose /etc/fstab mounts the ESP at /boot/efi
by UUID, as a compressed qcow2; with the metadata tarball LXD wants beside it. Used by the tests
and scripts/benchmark.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from lxdimagefs.contents.disk import gpt

ESP_UUID = "1234-ABCD"
ESP_MIB = 34  # FAT32 with 512-byte clusters
OPTIONS = {"zlib": ["-c"], "zstd": ["-c", "-o", "compression_type=zstd"]}


def esp_tree(where: Path) -> Path:
    """What an ESP holds: a boot loader's bytes, nested folders; times on FAT's 2-second steps."""
    for rel, size in [("EFI/BOOT/BOOTX64.EFI", 150_000), ("EFI/BOOT/grubx64.efi", 40_000),
                      ("EFI/debian/grub.cfg", 120), ("EFI/debian/fonts/unicode.pf2", 5000)]:
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_bytes(os.urandom(size))
        os.utime(where / rel, (1_700_000_000, 1_700_000_000))
    return where


def root_tree(source: Path, where: Path) -> Path:
    """A copy of `source` with /boot/efi and an fstab mounting the ESP there by UUID."""
    subprocess.run(["cp", "-a", str(source), str(where)], check=True)
    (where / "boot/efi").mkdir(parents=True, exist_ok=True)
    (where / "etc/fstab").write_text(f"LABEL=rootfs / ext4 defaults 0 1\n"
                                     f"UUID={ESP_UUID.lower()} /boot/efi vfat umask=0077 0 1\n")
    return where


def vm_image(work: Path, root: Path, esp: Path, compression: str, no_fat: bool = False,
             inline: bool = False) -> tuple[Path, Path]:
    """(metadata tarball, qcow2 disk) of a VM image holding `root` and `esp`; `no_fat`: the ESP's
    boot sector says it has no FAT (a vfat by its signature that no reader can read); `inline`: the
    root made with ext4's inline_data (small files and folders kept in their inodes)."""
    work.mkdir(parents=True)
    (work / "metadata.yaml").write_bytes(b"architecture: x86_64\ncreation_date: 1700000000\n"
                                         b"properties:\n  description: vm disk " + work.name.encode() + b"\n")
    with tarfile.open(work / "meta.tar.xz", "w:xz") as tar:
        tar.add(work / "metadata.yaml", "metadata.yaml")
    used = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True, check=True)
               .stdout.split()[0])
    root_mib = max(16, used * 3 // 2 + 16)
    fat, ext4, disk = work / "esp.img", work / "root.img", work / "disk.raw"
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", "-n", "UEFI", "-i", ESP_UUID.replace("-", ""),
                    "-C", str(fat), str(ESP_MIB << 10)], check=True, capture_output=True)
    subprocess.run(["mcopy", "-s", "-m", "-i", str(fat), *map(str, esp.iterdir()), "::/"], check=True,
                   env={**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"})
    if no_fat:
        with open(fat, "r+b") as f:
            f.seek(16)  # BPB_NumFATs
            f.write(b"\0")
    features = ["-O", "inline_data"] if inline else []
    subprocess.run(["mkfs.ext4", "-q", "-L", "rootfs", "-b", "4096", "-i", "8192", *features, "-d", str(root),
                    str(ext4), f"{root_mib}M"], check=True)
    with open(disk, "wb") as f:
        f.truncate((2 + ESP_MIB + root_mib) << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, input=(
        f"label: gpt\nstart=2048, size={ESP_MIB << 11}, type={gpt.ESP}\n"
        f"start={(1 + ESP_MIB) << 11}, size={root_mib << 11}, type={gpt.ROOT_X86_64}\n").encode())
    for part, at in ((fat, 1), (ext4, 1 + ESP_MIB)):
        subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={at}", "conv=notrunc,sparse",
                        "status=none"], check=True)
    subprocess.run(["qemu-img", "convert", *OPTIONS[compression], "-f", "raw", "-O", "qcow2", str(disk),
                    str(work / "rootfs.img")], check=True)
    for made in (fat, ext4, disk):
        made.unlink()
    return work / "meta.tar.xz", work / "rootfs.img"


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
