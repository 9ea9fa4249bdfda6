"""A local server's own image files read in place through a real mount (issue 16 item 4).

The daemon runs as root beside the session's LXD, so it may read $LXD_DIR/images: a read
asks LXD for no export, is checked like the socket's bytes, and leaves nothing in the disk
cache. Small images (2-8 MiB); about 10-20 s for the file on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from helpers import imported_unified
from lxd_sandbox import make_split
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

MIB = 1 << 20


def _exports_asked(log: str, fp: str) -> int:
    return sum(1 for line in log.splitlines() if "GET" in line and f"/images/{fp}/export" in line)


def _cached(tmp_path: Path, fp: str) -> list[str]:
    """What the disk cache holds of an image's bytes (its manifest is a few sums, not bytes)."""
    cache = tmp_path / f"lxdimagefs-cache-{os.getuid()}"  # mounts.py passes --cache-dir tmp_path
    return [p.name for p in cache.glob(f"*{fp}*") if not p.name.startswith("manifest-")]


def _cat(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], capture_output=True)


def _export(m, fp: str) -> Path:
    return next(p for p in (m.path / "by-fingerprint" / fp).iterdir() if p.name != "metadata.json")


def _tamper(sandbox, fp: str, offset: int = MIB) -> None:
    with open(sandbox.lxd_dir / "images" / fp, "r+b") as f:  # the server's own file, edited
        f.seek(offset)
        f.write(os.urandom(4096))


def _parts(m, fp: str) -> list[Path]:
    return [p for p in (m.path / "by-fingerprint" / fp).iterdir() if p.name != "metadata.json"]


@pytest.fixture
def unified(sandbox, tmp_path):
    yield from imported_unified(sandbox, tmp_path / "img.tar", 8 * MIB)


def test_a_unified_image_is_read_from_the_servers_file_not_its_export(sandbox, unified, tmp_path):
    with mounted(sandbox, tmp_path / "mnt") as m:
        path = _export(m, unified)  # its name: the one-byte layout probe, once per image (journaled)
        before = _exports_asked(m.log_text(), unified)
        run = _cat(path)
        assert run.returncode == 0 and hashlib.sha256(run.stdout).hexdigest() == unified
        assert _exports_asked(m.log_text(), unified) == before
    assert _cached(tmp_path, unified) == []  # already on this host's disk: not a second time


def test_nolocal_reads_the_socket(sandbox, unified, tmp_path):
    """The control: the same read with -o nolocal asks LXD (so the count above can fail)."""
    with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:
        path = _export(m, unified)
        before = _exports_asked(m.log_text(), unified)
        run = _cat(path)
        assert run.returncode == 0 and hashlib.sha256(run.stdout).hexdigest() == unified
        assert _exports_asked(m.log_text(), unified) > before


def test_an_edited_file_after_a_verified_read_is_eio_or_right_never_wrong(sandbox, unified, tmp_path):
    with mounted(sandbox, tmp_path / "mnt1") as m:
        assert hashlib.sha256(_cat(_export(m, unified)).stdout).hexdigest() == unified
    _tamper(sandbox, unified)
    with mounted(sandbox, tmp_path / "mnt2") as m:
        run = _cat(_export(m, unified))
        assert run.returncode != 0 or hashlib.sha256(run.stdout).hexdigest() == unified
        assert run.returncode != 0 or _exports_asked(m.log_text(), unified) >= 1
        assert subprocess.run(["ls", str(m.path)], capture_output=True).returncode == 0  # still serving
    assert _cached(tmp_path, unified) == []


def test_an_edited_file_before_any_verified_read_is_eio(sandbox, unified, tmp_path):
    _tamper(sandbox, unified, offset=3 * MIB)
    with mounted(sandbox, tmp_path / "mnt") as m:
        run = _cat(_export(m, unified))
        assert run.returncode != 0 and b"Input/output error" in run.stderr
        assert hashlib.sha256(run.stdout).hexdigest() != unified
    assert _cached(tmp_path, unified) == []


def test_a_split_images_first_look_inside_needs_no_download(sandbox, tmp_path):
    fp = sandbox.import_image(*make_split(tmp_path / "s", rootfs_bytes=2 * MIB))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            parts = _parts(m, fp)  # their names and sizes: the layout probe reads the metadata part once
            assert len(parts) == 2
            before = _exports_asked(m.log_text(), fp)
            assert "metadata.yaml" in os.listdir(m.path / "contents" / "by-fingerprint" / fp)
            assert _exports_asked(m.log_text(), fp) == before
            whole = hashlib.sha256()
            for p in sorted(parts, key=lambda p: p.stat().st_size):  # the metadata tarball is the smaller
                whole.update(p.read_bytes())
            assert whole.hexdigest() == fp
            log = m.log_text()
            assert _exports_asked(log, fp) == before and "spooled " + fp not in log
        assert _cached(tmp_path, fp) == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_split_image_whose_file_was_edited_is_eio_never_wrong(sandbox, tmp_path):
    fp = sandbox.import_image(*make_split(tmp_path / "s", rootfs_bytes=2 * MIB))
    try:
        with open(sandbox.lxd_dir / "images" / (fp + ".rootfs"), "r+b") as f:
            f.seek(MIB)
            f.write(os.urandom(4096))
        with mounted(sandbox, tmp_path / "mnt") as m:
            rootfs = max(_parts(m, fp), key=lambda p: p.stat().st_size)
            before = _exports_asked(m.log_text(), fp)
            assert _cat(rootfs).returncode != 0  # LXD's export is those files too: it fails its check
            log = m.log_text()
            assert "do not hash to its fingerprint" in log and _exports_asked(log, fp) > before
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_read_from_the_servers_file_needs_no_lxd(sandbox, unified, tmp_path):
    """LXD stopped (by pid) once the file's name is known: the read goes on and is verified."""
    with mounted(sandbox, tmp_path / "mnt") as m:
        path = _export(m, unified)
        fd = os.open(path, os.O_RDONLY)  # opened while LXD answers
        try:
            sandbox.halt()
            try:
                data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            finally:
                sandbox.resume()
        finally:
            os.close(fd)
        assert hashlib.sha256(data).hexdigest() == unified
