"""Fast checks of the block manifest and the disk cache's files (no LXD; the judges are
test_manifest.py and test_diskcache.py, on real mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.diskcache import CacheRefused, DiskCache
from lxdimagefs.data.manifest import Manifest

FP = "ab" * 32


def test_a_manifest_records_the_first_copy_and_refuses_a_different_one() -> None:
    m = Manifest(FP, 2 * BLOCK + 10)
    assert m.blocks == 3 and not m.has(1)
    assert m.admit(1, b"x" * BLOCK)
    assert m.has(1) and m.admit(1, b"x" * BLOCK)
    assert not m.admit(1, b"y" * BLOCK)
    sealed = Manifest(FP, 2 * BLOCK + 10, bytes(16 * 3))
    assert sealed.verified and not sealed.admit(0, b"z")  # a sealed manifest records nothing new


def test_the_disk_cache_keeps_a_sealed_manifest_and_drops_a_damaged_one(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    m = Manifest(FP, BLOCK + 1)
    m.admit(0, b"a" * BLOCK)
    m.admit(1, b"b")
    cache.seal(m)
    again = cache.manifest(FP, BLOCK + 1)
    assert again is not None and again.verified and again.admit(1, b"b") and not again.admit(1, b"c")
    assert cache.manifest(FP, BLOCK + 2) is None  # another size: not this image's
    path = tmp_path / "c" / f"manifest-{FP}"
    assert not path.exists()  # dropped
    cache.seal(m)
    raw = bytearray(path.read_bytes())
    raw[30] ^= 1
    path.write_bytes(raw)
    assert cache.manifest(FP, BLOCK + 1) is None and not path.exists()


def test_blocks_come_back_as_written_and_a_hole_reads_as_zeros(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    cache.put(FP, 2, bytearray(b"q" * BLOCK), 4 * BLOCK)
    assert cache.get(FP, 2, BLOCK) == b"q" * BLOCK and cache.written(FP, 2)
    assert cache.get(FP, 0, BLOCK) == bytes(BLOCK) and not cache.written(FP, 0)
    assert cache.get("cd" * 32, 0, BLOCK) is None


def test_the_bound_evicts_the_least_recently_used_images(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes=8 * BLOCK)
    fps = [f"{i:02x}" * 32 for i in range(6)]
    for n, fp in enumerate(fps):
        for index in range(3):
            cache.put(fp, index, bytearray(os.urandom(BLOCK)), 3 * BLOCK)
        os.utime(tmp_path / "c" / f"export-{fp}", (n, n))  # older images first
        used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "c").iterdir())
        assert used <= 8 * BLOCK
    assert (tmp_path / "c" / f"export-{fps[-1]}").exists()
    assert not (tmp_path / "c" / f"export-{fps[0]}").exists()


def test_a_cache_folder_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir(mode=0o755)
    DiskCache(root)
    assert root.stat().st_mode & 0o777 == 0o700
    (tmp_path / "f").write_text("")
    with pytest.raises(CacheRefused):
        DiskCache(tmp_path / "f")
