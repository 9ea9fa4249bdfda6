"""`lxdimagefs stats MOUNTPOINT` and the Prometheus text of a running mount, read by a scraper's
parser, change as reads and imports happen."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
from helpers import big_tarball
from lxd_sandbox import make_unified
from mounts import mounted
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.lxd


def scrape(where: str) -> dict[tuple[str, tuple], float]:
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "stats", "--prometheus", where],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(done.stdout) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_stats_change_as_reads_and_imports_happen(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    sock = tmp_path / "metrics.sock"
    with mounted(sandbox, tmp_path / "mnt", "-o", f"nolocal,cache_max=64M,metrics={sock}") as m:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # the mounter's alone
        before = scrape(str(sock))
        assert value(before, "lxdimagefs_bytes_total", source="server") == 0
        folder = m.path / "by-fingerprint" / fp
        export = folder / next(n for n in os.listdir(folder) if n != "metadata.json")
        assert hashlib.sha256(export.read_bytes()).hexdigest() == fp
        read = scrape(str(sock))
        size = export.stat().st_size
        remote = f"unix://{sandbox.socket}"
        assert value(read, "lxdimagefs_bytes_total", source="server", remote=remote) >= size
        assert value(read, "lxdimagefs_images_checked_total", verdict="verified") == 1
        assert value(read, "lxdimagefs_operation_seconds_count", operation="read") > \
            value(before, "lxdimagefs_operation_seconds_count", operation="read")
        assert value(read, "lxdimagefs_operation_seconds_sum", operation="read") > 0
        assert value(read, "lxdimagefs_disk_cache_max_bytes") == 64 << 20
        assert value(read, "lxdimagefs_disk_cache_bytes") > 0

        tarball = make_unified(tmp_path / "new.tar.gz", rootfs_bytes=1 << 20)
        new = hashlib.sha256(tarball.read_bytes()).hexdigest()
        try:
            subprocess.run(["cp", str(tarball), str(m.path / "import")], check=True)
            imported = scrape(str(sock))
            assert value(imported, "lxdimagefs_imports_total", result="created") == 1
            assert value(imported, "lxdimagefs_operation_seconds_count", operation="write") > 0
        finally:
            sandbox.lxc("image", "delete", new, check=False)

        # The default socket is found from the mount point alone; the summary is for people.
    with mounted(sandbox, tmp_path / "mnt2") as m2:
        os.listdir(m2.path / "by-fingerprint")
        done = subprocess.run([sys.executable, "-m", "lxdimagefs", "stats", str(m2.path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "operation_seconds_count" in done.stdout, done.stderr
    gone = subprocess.run([sys.executable, "-m", "lxdimagefs", "stats", str(m2.path)],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "no running mount" in gone.stderr


def test_an_import_lxd_is_unpacking_shows_its_progress(sandbox, tmp_path):
    """While LXD works on an upload (a 768 MiB tarball: longer than a second, as in
    tests/upload/test_long_operations.py), `getfattr -n user.lxdimagefs.progress import/NAME`, the
    stats and STATUS= say so; once it is done, nothing is under way."""
    tarball, fp = big_tarball(tmp_path, "progress")
    sock = tmp_path / "metrics.sock"
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}") as m:
            cp = subprocess.Popen(["cp", str(tarball), str(m.path / "import")])
            said, scraped = set(), []
            while cp.poll() is None:
                try:
                    said.add(os.getxattr(m.path / "import/big.tar", "user.lxdimagefs.progress").decode())
                    scraped.append(scrape(str(sock)))
                except OSError:
                    pass  # not there yet, or no operation yet: the upload is still being written
            assert cp.returncode == 0
            assert said and all(s == "under way" or s.endswith("%") for s in said), said
            assert any(value(s, "lxdimagefs_lxd_operation_progress", kind="import") != 0 for s in scraped)
            assert not value(scrape(str(sock)), "lxdimagefs_lxd_operation_progress", kind="import")
            assert fp in os.listdir(m.path / "by-fingerprint")
    finally:
        tarball.unlink(missing_ok=True)
        sandbox.lxc("image", "delete", fp, check=False)
