"""contents/ of a VM image against its sources, through a real LXD and a real mount: rootfs/ is the
Debian minbase tree's ext4 root entry by entry, rootfs/boot/efi the FAT32 ESP the guest's fstab
mounts there by UUID (as Linux's vfat shows it: root's, umask=0077, times in 2-second steps),
in a zlib and a zstd qcow2; a disk not understood says why beside rootfs/; LXD's stored copy
rotting after the first look is EIO or the right bytes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import vmdisk
from helpers import deleting
from mounts import mounted
from test_fidelity import _seen, _walk, distro  # noqa: F401 (a fixture)

pytestmark = pytest.mark.lxd


@pytest.fixture(scope="module")
def vm_images(sandbox, distro, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("vm")
    esp, root = vmdisk.esp_tree(work / "esp"), vmdisk.root_tree(distro, work / "root")
    with deleting(sandbox, {}) as fps:
        for kind in vmdisk.OPTIONS:
            fps[kind] = sandbox.import_image(*vmdisk.vm_image(work / kind, root, esp, kind))
        inline = vmdisk.vm_image(work / "inline", root, esp, "zstd", inline=True)
        fps["inline"] = sandbox.import_image(*inline)
        yield fps, root, esp
    vmdisk.remove(work)


def _esp_differences(source: Path, there: Path) -> list[str]:
    wrong = []
    for rel in _walk(source):
        want, got = os.lstat(source / rel), os.lstat(there / rel)
        mode = (stat.S_IFDIR if stat.S_ISDIR(want.st_mode) else stat.S_IFREG) | 0o700  # umask=0077
        seen = (got.st_mode, got.st_uid, got.st_gid)
        if seen != (mode, 0, 0):
            wrong.append(f"{rel}: {seen}")
        if stat.S_ISREG(want.st_mode) and ((there / rel).read_bytes() != (source / rel).read_bytes()
                                           or int(got.st_mtime) != int(want.st_mtime) // 2 * 2):
            wrong.append(f"{rel}: bytes or mtime {got.st_mtime}")
    return wrong


@pytest.fixture(scope="module")
def vm_mnt(sandbox, vm_images, tmp_path_factory):
    with mounted(sandbox, tmp_path_factory.mktemp("vmm") / "mnt") as m:
        yield m


@pytest.mark.parametrize("kind", [*vmdisk.OPTIONS, "inline"])  # inline: a root of ext4 inline_data
def test_a_vm_images_rootfs_and_esp_equal_their_sources(vm_images, vm_mnt, kind):
    fps, root, esp = vm_images
    top = vm_mnt.path / "contents" / "by-fingerprint" / fps[kind]
    assert sorted(os.listdir(top)) == ["metadata.yaml", "rootfs"]  # all understood: no note
    mounted_root, wrong, links = top / "rootfs", [], {}
    for rel in _walk(root):
        if rel.startswith("boot/efi"):
            continue
        want, got = os.lstat(root / rel), os.lstat(mounted_root / rel)
        a, b = _seen(root / rel, want), _seen(mounted_root / rel, got)
        if rel == "":  # the root's mtime is mkfs.ext4's making lost+found in it
            a["mtime"] = b["mtime"]
        if a != b:
            wrong.append(f"{rel}: {a} {b}")
        if want.st_nlink > 1 and not stat.S_ISDIR(want.st_mode):
            links.setdefault(want.st_ino, set()).add(got.st_ino)
    assert not wrong and links and all(len(v) == 1 for v in links.values()), wrong[:20]
    assert not _esp_differences(esp, mounted_root / "boot/efi")
    assert sorted(os.listdir(mounted_root / "boot/efi/EFI/BOOT")) == ["BOOTX64.EFI", "grubx64.efi"]
    assert os.lstat(mounted_root / "boot/efi").st_mode == stat.S_IFDIR | 0o700
    run = subprocess.run(["diff", "-r", "--no-dereference", str(esp), str(mounted_root / "boot/efi")])
    assert run.returncode == 0


def test_a_vm_disk_whose_stored_copy_rots_is_eio_or_right_never_wrong(sandbox, vm_images, vm_mnt, tmp_path):
    """LXD's copy of the qcow2 rots after the first look: every read, in the mount that looked and
    in a new one, gives the source's bytes or fails (the part is checked against its manifest)."""
    fps, root, _ = vm_images
    fp = fps["zlib"]
    first = vm_mnt.path / "contents" / "by-fingerprint" / fp / "rootfs"
    assert (first / "etc/os-release").read_bytes() == (root / "etc/os-release").read_bytes()
    stored = sandbox.lxd_dir / "images" / f"{fp}.rootfs"
    size = stored.stat().st_size
    with open(stored, "r+b") as f:  # 64 KiB rotten in every MiB past the tables
        for at in range(1 << 20, size, 1 << 20):
            f.seek(at)
            was = f.read(65536)
            f.seek(at)
            f.write(bytes(b ^ 0x5A for b in was))
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    lib = root / "usr/lib/x86_64-linux-gnu"
    files = [rel for rel in _walk(lib) if (lib / rel).is_file() and not (lib / rel).is_symlink()][:150]
    assert len(files) > 50
    with mounted(sandbox, tmp_path / "mnt") as again:
        for there in (first, again.path / "contents" / "by-fingerprint" / fp / "rootfs"):
            right = failed = 0
            for rel in ["etc/os-release", *(f"usr/lib/x86_64-linux-gnu/{r}" for r in files)]:
                run = subprocess.run(["cat", str(there / rel)], capture_output=True)
                if run.returncode == 0:
                    assert run.stdout == (root / rel).read_bytes(), rel  # never wrong bytes with exit 0
                    right += 1
                else:
                    assert b"Input/output error" in run.stderr, run.stderr
                    failed += 1
            assert right + failed == len(files) + 1


def test_the_esp_is_opened_when_reached_and_its_folder_lists_as_it_stats(sandbox, vm_images, tmp_path):
    """A `cat` in /etc opens no ESP (its FAT is read whole when opened); listing /boot does, and
    gives efi as its stat does: the ESP's root (umask=0077), not the folder it is mounted on."""
    fps, root, _ = vm_images
    with mounted(sandbox, tmp_path / "mnt") as m:
        rootfs = m.path / "contents" / "by-fingerprint" / fps["zstd"] / "rootfs"
        assert (rootfs / "etc/os-release").read_bytes() == (root / "etc/os-release").read_bytes()
        assert "/boot/efi opened" not in m.log_text()
        with os.scandir(rootfs / "boot") as listing:
            modes = {e.name: e.stat(follow_symlinks=False).st_mode for e in listing}
        assert modes == {"efi": stat.S_IFDIR | 0o700}, modes
        assert "/boot/efi opened" in m.log_text()
        assert os.lstat(rootfs / "boot/efi").st_mode == stat.S_IFDIR | 0o700
