"""A server operation that outlasts `-o timeout` is waited for, not taken for an outage.

Costs about 20 s: a 768 MiB tarball, copied into import/ through a mount
whose timeout is 1 s, so that LXD's own work on it (hashing, reading its
metadata) runs for longer than the timeout.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import big_tarball
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def test_an_import_that_outlasts_the_timeout_succeeds(sandbox, tmp_path):
    tarball, fp = big_tarball(tmp_path, "long operation")
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
