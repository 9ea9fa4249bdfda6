"""Every block served is the block the fingerprint check saw: LXD's copy rotting, a server that
changes its answer, and verified files through the page cache (mmap).

Each test imports a 16 MiB image and mounts with a 4 MiB block cache so blocks leave memory
early; about 10 s each on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import export_of, imported_unified
from lxd_sandbox import make_unified
from mounts import socket_mounted as mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root



MIB = 1 << 20


def _export_path(mount, fp: str) -> str:
    return str(export_of(mount, fp))


def _flip(path: Path, offset: int, length: int) -> bytes:
    """XOR `length` bytes of a file at `offset`; returns what was there."""
    with open(path, "r+b") as f:
        f.seek(offset)
        was = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in was))
    return was


def _restore(path: Path, offset: int, was: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(was)


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cat(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", path], capture_output=True)


@pytest.fixture
def image(sandbox, tmp_path):
    yield from imported_unified(sandbox, tmp_path / "img.tar", 16 * MIB)


@pytest.mark.parametrize(("options", "said"), [
    # No disk cache: the hash gets those blocks from LXD again, and they differ from the copies
    # handed out. With it, the hash reads back the very copies handed out: the sha256 fails.
    ("cache_size=4,cache_max=0", "arrived twice with different bytes"),
    ("cache_size=4", "do not hash to its fingerprint"),
])
def test_bytes_handed_out_ahead_of_the_hash_must_be_the_bytes_hashed(sandbox, image, tmp_path, options, said):
    stored = sandbox.lxd_dir / "images" / image
    with mounted(sandbox, tmp_path / "mnt", "-o", options) as m:
        path = _export_path(m, image)
        size = os.path.getsize(path)
        tail = [b * MIB for b in range(size // MIB - 4, size // MIB)]
        saved = [(off, _flip(stored, off + 100, 64)) for off in tail]  # LXD serves 4 bad tail blocks
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in tail:  # ahead of the hash: handed out as they are
                assert len(os.pread(fd, MIB, off)) == MIB
        finally:
            os.close(fd)
        for off, was in saved:  # ... and good ones from now on
            _restore(stored, off + 100, was)
        # The hash reaches the tail after those blocks left the 4 MiB cache: it gets the good
        # copies, which hash to the fingerprint, but a reader was given the bad ones.
        for run in (_cat(path), _cat(path)):
            assert run.returncode != 0 and b"Input/output error" in run.stderr
        assert said in m.log_text()
        assert sorted(os.listdir(m.path))  # still serving


def test_a_verified_image_whose_stored_copy_rots_is_never_served_wrong(sandbox, image, tmp_path):
    stored = sandbox.lxd_dir / "images" / image
    # No disk cache: the re-read must come from LXD again (test_diskcache.py reads it from disk).
    with mounted(sandbox, tmp_path / "mnt", "-o", "cache_size=4,cache_max=0") as m:
        path = _export_path(m, image)
        first = _cat(path)
        assert first.returncode == 0 and hashlib.sha256(first.stdout).hexdigest() == image
        _flip(stored, MIB + 4096, 4096)  # 4 KiB of LXD's file rot after the verified read
        _drop_caches()
        again = _cat(path)
        assert again.returncode != 0 or hashlib.sha256(again.stdout).hexdigest() == image
        if again.returncode != 0:
            assert b"Input/output error" in again.stderr
            assert "differs from the verified one" in m.log_text()
    with mounted(sandbox, tmp_path / "mnt2", "-o", "cache_size=4") as m2:
        run = _cat(_export_path(m2, image))
        assert run.returncode != 0 or hashlib.sha256(run.stdout).hexdigest() == image


def test_a_verified_export_can_be_mapped_and_is_reread_from_the_page_cache(sandbox, image, tmp_path):
    with mounted(sandbox, tmp_path / "mnt") as m:
        path = _export_path(m, image)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ) as mapped:  # before the check too
            assert hashlib.sha256(mapped).hexdigest() == image  # its page faults complete the check
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ) as mapped:
            assert hashlib.sha256(mapped).hexdigest() == image
        requests = m.log_text().count("/export")
        for _ in range(3):  # kept in the page cache: nothing asked of the daemon, nor of LXD
            assert hashlib.sha256(_cat(path).stdout).hexdigest() == image
        assert m.log_text().count("/export") == requests
        dev = os.stat(m.path).st_dev  # as root, the mount reads ahead 1 MiB (the kernel's default: 128 KiB)
        assert Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text() == "1024\n"


def test_a_file_inside_a_verified_image_is_checked_when_the_stored_copy_rots(sandbox, tmp_path):
    tarball = make_unified(tmp_path / "inside.tar", rootfs_bytes=8 * MIB)  # uncompressed: read at offsets
    with tarfile.open(tarball) as tar:
        member = tar.getmember("rootfs/etc/hostname")
        want = member.size
    fp = sandbox.import_image(tarball)
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "cache_size=4,cache_max=0") as m:
            assert hashlib.sha256(_cat(_export_path(m, fp)).stdout).hexdigest() == fp  # verified
            _flip(sandbox.lxd_dir / "images" / fp, member.offset_data, want)
            _drop_caches()
            subprocess.run(["tail", "-c", str(5 * MIB), _export_path(m, fp)], capture_output=True, check=True)
            # The first look inside reads the rotted block from LXD again: refused, never served.
            run = _cat(str(m.path / "contents" / "by-fingerprint" / fp / "rootfs/etc/hostname"))
            assert run.returncode != 0 and b"Input/output error" in run.stderr
            assert "differs from the verified one" in m.log_text()
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
