"""A split image's parts through real mounts: a later mount reads them at once, with no pass over
the whole parts, and every block it serves is checked against the part's sealed manifest.

Both ways a daemon finds the parts are covered: the server's own files (the default as root
beside LXD) and the disk cache's copy (`-o nolocal`). Split images of 8-40 MiB; 22 s
for the file on this 2-core machine at load 3-5 (mksquashfs and two mounts per test).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxd_sandbox import make_split
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

MIB = 1 << 20
WAYS = {"servers_file": (), "disk_cache": ("-o", "nolocal")}


def _split(sandbox, folder: Path, rootfs_bytes: int) -> Iterator[tuple[str, Path]]:
    meta, squash = make_split(folder, rootfs_bytes=rootfs_bytes)
    fp = sandbox.import_image(meta, squash)
    yield fp, squash
    sandbox.lxc("image", "delete", fp, check=False)


@pytest.fixture
def big(sandbox, tmp_path):
    yield from _split(sandbox, tmp_path / "big", 40 * MIB)


@pytest.fixture
def small(sandbox, tmp_path):
    yield from _split(sandbox, tmp_path / "small", 8 * MIB)


def _bytes_read(pid: int) -> int:
    """What the daemon has read by system calls so far (files, /dev/fuse, sockets): rchar."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"])


@pytest.mark.parametrize("way", WAYS)
def test_a_second_mounts_first_look_inside_reads_no_part_whole(sandbox, images, big, tmp_path, way):
    fp, _ = big
    hostname = Path("contents/by-fingerprint", fp, "rootfs/etc/hostname")
    with mounted(sandbox, tmp_path / "mnt1", *WAYS[way]) as m:  # verifies the parts, seals manifests
        want = (m.path / hostname).read_bytes()
    with mounted(sandbox, tmp_path / "mnt2", *WAYS[way]) as m:
        os.listdir(m.path / "contents/by-fingerprint" / images.fps["gz"])  # libraries loaded first
        before = _bytes_read(m.proc.pid)
        assert (m.path / hostname).read_bytes() == want
        read = _bytes_read(m.proc.pid) - before
        log = m.log_text()
        # The parts are 40 MiB: hashing them whole (sha256 of the server's files, or the old
        # whole-file sums of the kept copy) reads all of it; the look itself, a few blocks.
        assert read < 12 * MIB, f"{read / MIB:.1f} MiB read for one small file"  # 1.5 MiB seen
        assert f"hashing both parts of {fp[:12]}" not in log and "spooled " + fp not in log


def _cat(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], capture_output=True)


def _eio_or_right(path: Path, want: bytes) -> bool:
    """A whole read: every byte handed out is right; it ends in EIO or with all of them. True if EIO."""
    run = _cat(path)
    assert run.stdout == want[:len(run.stdout)], "wrong bytes handed out"
    assert run.returncode == 0 or b"Input/output error" in run.stderr, run.stderr
    assert run.returncode != 0 or run.stdout == want
    return run.returncode != 0


@pytest.mark.parametrize("way", WAYS)
def test_a_split_part_changed_after_its_verified_read_is_eio_or_right_never_wrong(
        sandbox, small, tmp_path, way):
    fp, squash = small
    want = squash.read_bytes()
    changed = (sandbox.lxd_dir / "images" / f"{fp}.rootfs" if way == "servers_file"
               else tmp_path / f"lxdimagefs-cache-{os.getuid()}" / f"part-{fp}.1")
    # Two blocks of memory: the changed block has left it by the time it is read again.
    args = (*WAYS[way], "-o", "cache_size=2")
    with mounted(sandbox, tmp_path / "mnt1", *args) as m:
        rootfs = m.path / "by-fingerprint" / fp / f"{fp}.squashfs"
        assert rootfs.read_bytes() == want  # verified: the sha256 of both parts is the fingerprint
        with open(changed, "r+b") as f:
            f.seek(5 * MIB)
            f.write(os.urandom(4096))
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the mount's pages too
        _eio_or_right(rootfs, want)  # the same mount
    with mounted(sandbox, tmp_path / "mnt2", *args) as m:  # a new mount: the sealed manifests
        rootfs = m.path / "by-fingerprint" / fp / f"{fp}.squashfs"
        if _eio_or_right(rootfs, want):
            assert "does not match its manifest" in m.log_text()
        if way == "disk_cache":  # the bad copy was dropped (here or by the first mount): downloaded again
            assert _cat(rootfs).stdout == want
            assert not changed.exists() or changed.read_bytes() == want  # kept again, if at all, right
        assert subprocess.run(["ls", str(m.path)], capture_output=True).returncode == 0  # still serving


def test_kept_parts_evicted_under_a_mount_are_found_elsewhere(sandbox, small, tmp_path):
    """Another daemon sharing the disk cache evicts the parts this mount reads: the next open
    downloads them again instead of failing to open a file that is gone."""
    fp, squash = small
    with mounted(sandbox, tmp_path / "mnt1", "-o", "nolocal") as m:  # downloads, keeps, seals
        (m.path / "by-fingerprint" / fp / f"{fp}.squashfs").read_bytes()
    with mounted(sandbox, tmp_path / "mnt2", "-o", "nolocal") as m:
        rootfs = m.path / "by-fingerprint" / fp / f"{fp}.squashfs"
        assert rootfs.read_bytes() == squash.read_bytes() and "spooled " + fp not in m.log_text()
        for kept in (tmp_path / f"lxdimagefs-cache-{os.getuid()}").glob(f"part-{fp}.*"):
            kept.unlink()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        assert _cat(rootfs).stdout == squash.read_bytes() and "spooled " + fp in m.log_text()


def test_a_file_inside_a_split_image_changed_after_a_verified_read_is_eio_or_right(sandbox, small, tmp_path):
    """contents/ reads a split image's parts through the same checked blocks as its export files
    (before: the squashfs was read by path once its hash passed, and changed bytes were served, exit 0)."""
    fp, squash = small
    blob = subprocess.run(["unsquashfs", "-cat", str(squash), "blob"], capture_output=True, check=True).stdout
    at = squash.read_bytes().find(blob[5 * MIB:5 * MIB + 4096])  # noise: stored as it is
    assert at > 0
    with mounted(sandbox, tmp_path / "mnt1") as m:
        rootfs = m.path / "contents/by-fingerprint" / fp / "rootfs"
        assert (rootfs / "etc/hostname").read_bytes()  # the first look: both parts verified
        with open(sandbox.lxd_dir / "images" / f"{fp}.rootfs", "r+b") as f:
            f.seek(at)
            f.write(os.urandom(4096))
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        _eio_or_right(rootfs / "blob", blob)  # the same mount
    with mounted(sandbox, tmp_path / "mnt2") as m:  # a new mount: the sealed manifests
        rootfs = m.path / "contents/by-fingerprint" / fp / "rootfs"
        assert _eio_or_right(rootfs / "blob", blob)
        assert "does not match its manifest" in m.log_text()
