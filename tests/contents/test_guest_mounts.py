"""contents/disk/guest.py and root.py over a real three-partition disk (no LXD: nothing of it is
LXD's): an ext4 /boot by LABEL with the FAT ESP mounted on its efi/ folder by PARTUUID, as Ubuntu's
cloud images lay them out; fstab lines that cannot be followed are left out and said in the note."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

from lxdimagefs.contents.disk import gpt
from lxdimagefs.contents.disk.root import NOTE, vm_root

ESP_PART = uuid.UUID("6f0b3a44-1c1e-4d0e-9a3c-3b1f1e2d4c5a")


def _disk(tmp: Path) -> Path:
    (tmp / "root/etc").mkdir(parents=True)
    (tmp / "root/boot").mkdir()
    (tmp / "root/efi").mkdir()
    (tmp / "root/etc/fstab").write_text(
        "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n"
        "LABEL=BOOT /boot ext4 defaults 0 2\n"
        f"PARTUUID={ESP_PART} /boot/efi vfat umask=0022,fmask=0133 0 1\n"
        "UUID=DEAD-BEEF /efi vfat defaults 0 1\n"  # no such partition
        "/dev/sdz9 /srv ext4 defaults 0 2\n")  # not a folder the guest's boot chain mounts: ignored
    (tmp / "boot/efi").mkdir(parents=True)
    (tmp / "boot/vmlinuz").write_bytes(os.urandom(70_000))
    (tmp / "esp/EFI/ubuntu").mkdir(parents=True)
    (tmp / "esp/EFI/ubuntu/shimx64.efi").write_bytes(os.urandom(30_000))
    for label, folder, image in (("cloudimg-rootfs", "root", "r.img"), ("BOOT", "boot", "b.img")):
        subprocess.run(["mkfs.ext4", "-q", "-L", label, "-d", str(tmp / folder), str(tmp / image), "8M"],
                       check=True)
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", "-C", str(tmp / "e.img"), str(34 << 10)], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-s", "-m", "-i", str(tmp / "e.img"), str(tmp / "esp/EFI"), "::/"], check=True,
                   env={**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"})
    raw = tmp / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(52 << 20)
    subprocess.run(["sfdisk", "-q", str(raw)], check=True, input=(
        f"label: gpt\nstart=2048, size={8 << 11}, type={gpt.LINUX_DATA}\n"
        f"start={9 << 11}, size={8 << 11}, type=BC13C2FF-59E6-4262-A352-B275FD6F7172\n"
        f"start={17 << 11}, size={34 << 11}, type={gpt.ESP}, uuid={ESP_PART}\n").encode())
    for image, at in (("r.img", 1), ("b.img", 9), ("e.img", 17)):
        subprocess.run(["dd", f"if={tmp / image}", f"of={raw}", "bs=1M", f"seek={at}", "conv=notrunc",
                        "status=none"], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tmp / "d.qcow2")],
                   check=True)
    return tmp / "d.qcow2"


def test_boot_and_the_esp_on_it_are_where_fstab_puts_them_and_the_rest_is_said(tmp_path: Path) -> None:
    top = type("Top", (), {"lookup": lambda self, path: None, "list": lambda self, path: {}})()
    with open(_disk(tmp_path), "rb") as part:
        shown, tree = vm_root(top, part, "d.qcow2")
        assert tree is not None
        kernel = tree.lookup("/boot/vmlinuz")
        assert tree.read(kernel, kernel.size, 0) == (tmp_path / "boot/vmlinuz").read_bytes()
        assert set(tree.list("/boot")) >= {"vmlinuz", "efi", "lost+found"}
        shim = tree.lookup("/boot/efi/EFI/ubuntu/shimx64.efi")
        assert shim.mode == stat.S_IFREG | 0o644 and tree.read(shim, 10, 0) == (
            tmp_path / "esp/EFI/ubuntu/shimx64.efi").read_bytes()[:10]
        assert tree.lookup("/boot/efi/EFI").mode == stat.S_IFDIR | 0o755
        root_efi = os.lstat(tmp_path / "root/efi").st_mode
        assert tree.lookup("/efi").mode == root_efi  # the root's own folder, nothing mounted on it
        note = shown.read(shown.lookup(NOTE), 4096, 0).decode()
        assert "/efi: UUID=DEAD-BEEF is no partition" in note and "/srv" not in note
        places = {tree.lookup(p).userdata[-1].offsetheader for p in ("/boot/vmlinuz", "/etc/fstab", "/etc")}
        assert len(places) == 3  # /boot's inode numbers are its own, not the root's
