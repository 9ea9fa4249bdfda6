"""Promises SEMANTICS.md makes that no other test checks, each through a real mount."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import time

import pytest
from lxd_sandbox import make_unified
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def test_a_sequential_read_is_one_request(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:  # LXD's socket, not its files
        data = (m.path / "by-fingerprint" / fp / f"{fp}.tar").read_bytes()
        assert len(data) > 5 << 20
        assert len([line for line in m.log_text().splitlines() if f"/images/{fp}/export bytes=" in line]) == 1


def test_statfs_and_block_size(mnt, images):
    fp = images.fps["plain"]
    st = os.stat(mnt.path / "by-fingerprint" / fp / f"{fp}.tar")
    assert st.st_blksize == 1 << 20  # so cp and cat read in 1 MiB requests
    vfs = os.statvfs(mnt.path)
    assert vfs.f_bsize == 1 << 20 and vfs.f_namemax == 255
    assert vfs.f_files >= len(images.fps)


def test_the_spool_is_private_and_goes_at_unmount(sandbox, images, tmp_path):
    fp = images.fps["split"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:  # spooled from the socket
        (m.path / "by-fingerprint" / fp / f"{fp}.squashfs").read_bytes()
        spools = list(tmp_path.glob("lxdimagefs-spool-*"))
        assert len(spools) == 1 and stat.S_IMODE(spools[0].stat().st_mode) == 0o700
        assert any(p.name.startswith("spool-") and fp in p.name for p in spools[0].iterdir())  # by key
    assert not list(tmp_path.glob("lxdimagefs-spool-*"))


def test_rmdir_of_a_unique_prefix_deletes_the_image(deleting_mnt, sandbox, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "prefix.tar"))
    os.rmdir(deleting_mnt.path / "by-fingerprint" / fp[:12])
    assert fp not in {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}


def test_an_alias_too_long_for_a_file_name_is_left_out_but_kept(mnt, sandbox, images):
    fp = images.fps["xz"]
    name = "l" * 300
    sandbox.lxc("image", "alias", "create", name, fp)
    try:
        deadline = time.monotonic() + 5
        while name not in (mnt.path / "by-fingerprint" / fp / "metadata.json").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert name not in os.listdir(mnt.path / "by-alias")
    finally:
        sandbox.lxc("image", "alias", "delete", name)


def test_unlinking_an_import_in_progress_creates_nothing(mnt, sandbox, tmp_path):
    data = make_unified(tmp_path / "half.tar", rootfs_bytes=4 << 20).read_bytes()
    before = {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}
    fd = os.open(mnt.path / "import" / "half.tar", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[:2 << 20])
        os.unlink(mnt.path / "import" / "half.tar")
        assert os.listdir(mnt.path / "import") == []  # gone at once, and no .error to clean up
        with pytest.raises(OSError) as e:
            os.write(fd, data[2 << 20:])
        assert e.value.errno == errno.EIO
    finally:
        with contextlib.suppress(OSError):  # the writer's close reports the break too
            os.close(fd)
    assert {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")} == before
    assert os.listdir(mnt.path / "import") == []


def test_a_forked_childs_close_does_not_commit(mnt, sandbox, tmp_path):
    tarball = make_unified(tmp_path / "forked.tar", rootfs_bytes=1 << 20)
    data = tarball.read_bytes()
    fd = os.open(mnt.path / "import" / "forked.tar", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data[:len(data) // 2])
    child = os.fork()
    if child == 0:  # a child that inherits the file and closes it (a shell, a subprocess) must not end it
        os.close(fd)
        os._exit(0)
    os.waitpid(child, 0)
    os.write(fd, data[len(data) // 2:])  # still open for the opener
    os.close(fd)
    fp = subprocess.run(["sha256sum", str(tarball)], capture_output=True, text=True).stdout.split()[0]
    try:
        assert sandbox.rest(f"/1.0/images/{fp}")["size"] == len(data)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_errno_for_a_full_disk():
    from lxdimagefs.errors import LXDError

    assert LXDError("write /var/lib/lxd/images/x: no space left on device", 500).errno == errno.ENOSPC
    assert LXDError("Storage full", 507).errno == errno.ENOSPC


def test_direct_io_mode_reads_the_right_bytes(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "direct_io") as m:
        path = m.path / "by-fingerprint" / fp / f"{fp}.tar"
        for _ in range(2):  # from LXD, then from the block cache or LXD again
            assert hashlib.sha256(path.read_bytes()).hexdigest() == fp
        assert "Traceback" not in m.log_text()
