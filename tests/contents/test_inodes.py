"""What ratarmountcore leaves out of an entry, put back: checked on archives GNU tar and mksquashfs
make of a small tree with a device of each kind, a FIFO, a setuid file, a group and a hard link.
Fast (no LXD, no mount); tests/contents/test_fidelity.py checks the same through a mount on a real tree."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from ratarmountcore.mountsource.formats.tar import SQLiteIndexedTar

from lxdimagefs.contents import inodes
from lxdimagefs.contents.squashfs import SquashfsRootfs

# No LXD or mount, but device nodes: root, as the rest of the suite; `pytest -m "not lxd"` leaves it out.
pytestmark = pytest.mark.lxd


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("making device nodes needs root, as the rest of the suite does")
    root = tmp_path_factory.mktemp("tree") / "rootfs"
    (root / "dev").mkdir(parents=True)
    (root / "bin").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mknod(root / "dev/big", stat.S_IFCHR | 0o600, os.makedev(300, 70000))  # the wide encoding
    os.mkfifo(root / "dev/initctl", 0o600)
    (root / "bin/su").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "bin/su", 0, 42)
    os.chmod(root / "bin/su", 0o4750)  # after chown, which clears setuid
    os.link(root / "bin/su", root / "bin/su2")
    os.chmod(root, 0o751)
    os.utime(root, (1600000000, 1600000000))
    return root


def _expect(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_rdev


NAMES = ["dev/null", "dev/sda", "dev/big", "dev/initctl", "bin/su"]


def test_a_squashfs_entry_has_its_own_type_owners_device_and_links(tree, tmp_path):
    image = tmp_path / "r.sq"
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet"], check=True,
                   capture_output=True)
    source = SquashfsRootfs(str(image), writeIndex=False)
    for name in NAMES:
        info = source.lookup("/" + name)
        rdev = source.device(info) if stat.S_IFMT(info.mode) in inodes.DEVICES else 0
        assert (info.mode, info.uid, info.gid, rdev) == _expect(tree / name), name
    root = source.lookup("/")
    assert (root.mode, int(root.mtime)) == (stat.S_IFDIR | 0o751, 1600000000)
    su, su2 = source.lookup("/bin/su"), source.lookup("/bin/su2")
    assert inodes.header(su) == inodes.header(su2)
    assert inodes.squashfs_links(source) == {inodes.header(su): 2}


def test_a_tar_entry_has_its_type_and_device_from_its_header(tree, tmp_path):
    archive = tmp_path / "u.tar"
    subprocess.run(["tar", "-c", "--numeric-owner", "--sort=name", "-f", str(archive), "-C",
                    str(tree.parent), "rootfs"], check=True, capture_output=True)
    source = SQLiteIndexedTar(str(archive), writeIndex=False)
    for name in NAMES[:-1]:
        info = source.lookup("/rootfs/" + name)
        mode, rdev = inodes.tar_special(source, info)
        assert (mode, info.uid, info.gid, rdev) == _expect(tree / name), name
    assert inodes.tar_links(source) == {"/rootfs/bin/su": 2}
