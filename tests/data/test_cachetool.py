"""`lxdimagefs cache du|ls|verify|prune` on the folder real mounts fill, and prune while a mount reads."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import within
from mounts import mounted

pytestmark = pytest.mark.lxd


def tool(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxdimagefs", "cache", "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=60)


def export_of(mount: Path, fp: str) -> Path:
    folder = mount / "by-fingerprint" / fp
    return folder / next(n for n in os.listdir(folder) if n != "metadata.json")


def hashed(path: Path, chunk: int = 64 << 10) -> str:
    """sha256 of a file read in small pieces (slow enough that prunes land in the middle)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def test_cache_tool_shows_checks_and_prunes_what_mounts_keep(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    cache = tmp_path / "new" / "cache"  # does not exist: the mount makes it, private
    disk = cache / f"lxdimagefs-cache-{os.getuid()}"
    with mounted(sandbox, tmp_path / "a", "--cache-dir", str(cache), "-o", "nolocal") as a:
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
        assert hashed(export_of(a.path, fp)) == fp  # read whole: checked, kept and sealed
        within((disk / f"manifest-{fp}").exists, 10)  # sealed by the check's thread, at its verdict
    listed = tool(cache, "ls")
    assert listed.returncode == 0 and fp in listed.stdout and "export=" in listed.stdout, listed
    du = tool(cache, "du")
    assert str(disk) in du.stdout, du
    checked = tool(cache, "verify")
    assert checked.returncode == 0 and f"{fp}  ok" in checked.stdout, checked

    # A prune while another mount reads the image: that read is correct, or EIO, never wrong bytes.
    with mounted(sandbox, tmp_path / "b", "--cache-dir", str(cache), "-o", "nolocal") as b:
        results: list[str] = []

        def read() -> None:
            for _ in range(3):
                try:
                    results.append(hashed(export_of(b.path, fp), 16 << 10))
                except OSError as e:
                    results.append(errno.errorcode[e.errno or 0])

        reader = threading.Thread(target=read)
        reader.start()
        prunes = 0
        while reader.is_alive():
            pruned = tool(cache, "prune", fp)
            assert pruned.returncode == 0, pruned.stderr
            prunes += 1
        reader.join()
        assert prunes >= 1 and results and set(results) <= {fp, "EIO"}, results
        assert fp in results

    # A damaged block is told apart: verify exits 1 and names the image; prune --max 0 empties it.
    with mounted(sandbox, tmp_path / "c", "--cache-dir", str(cache), "-o", "nolocal") as c:
        assert hashed(export_of(c.path, fp)) == fp
    with open(disk / f"export-{fp}", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 4096)
    checked = tool(cache, "verify")
    assert checked.returncode == 1 and f"{fp}  DAMAGED" in checked.stdout, checked
    assert tool(cache, "prune", "--max", "0").returncode == 0
    assert fp not in tool(cache, "ls").stdout
    assert not list(disk.glob(f"*{fp}*"))


def test_prune_refuses_what_is_not_a_fingerprint(tmp_path):
    assert tool(tmp_path, "prune").returncode == 2
    done = tool(tmp_path, "prune", "../etc")
    assert done.returncode == 2 and "not a fingerprint" in done.stderr
