"""A server operation that outlasts `-o timeout` is waited for, not taken for an outage.

Costs about 20 s: a 768 MiB tarball, copied into import/ through a mount
whose timeout is 1 s, so that LXD's own work on it (hashing, reading its
metadata) runs for longer than the timeout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

BIG = 768 << 20


def _big_tarball(where: Path) -> tuple[Path, str]:
    """An uncompressed image tarball of BIG bytes of zeros (a sparse blob: quick to make)."""
    blob = where / "blob"
    with open(blob, "wb") as f:
        f.truncate(BIG)
    meta = where / "metadata.yaml"
    meta.write_text("architecture: x86_64\ncreation_date: 1700000000\n"
                    f"properties:\n  description: long operation {os.getpid()} {where.name}\n")
    tarball = where / "big.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(meta, "metadata.yaml")
        tar.add(blob, "rootfs/blob")
    blob.unlink()
    h = hashlib.sha256()
    with open(tarball, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return tarball, h.hexdigest()


def test_an_import_that_outlasts_the_timeout_succeeds(sandbox, tmp_path):
    tarball, fp = _big_tarball(tmp_path)
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "timeout=1") as m:
            done = subprocess.run(["cp", str(tarball), str(m.path / "import")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert os.listdir(m.path / "import") == []
            assert fp in os.listdir(m.path / "by-fingerprint")
            # It was LXD's operation that took long, not the server that stopped answering.
            assert "operations/" in m.log_text()
    finally:
        tarball.unlink(missing_ok=True)
        sandbox.lxc("image", "delete", fp, check=False)
