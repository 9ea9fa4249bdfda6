"""Fast checks of the block manifest and the disk cache's files (no LXD; the judges are
test_manifest.py and test_diskcache.py, on real mounts)."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import evict, resident_pages

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.diskcache import CacheRefused, DiskCache
from lxdimagefs.data.exports import Exports
from lxdimagefs.data.manifest import Manifest
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.wire.transport import Connection

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


def test_a_sequential_reader_finds_the_next_blocks_asked_of_the_disk_and_a_random_one_does_not(
        tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    total, other = 48 * BLOCK, "cd" * 32
    for index in range(48):
        cache.put(FP, index, bytearray([index]) * BLOCK, total)
        cache.put(other, index, bytearray(b"r") * BLOCK, total)
    for fp in (FP, other):
        evict(cache.export(fp))
        if resident_pages(cache.export(fp), 0, total):
            pytest.skip("the page cache cannot be dropped here (tmpfs?)")
    buf = memoryview(bytearray(BLOCK))
    assert cache.readinto(FP, 0, buf, total) and buf[0] == 0
    ahead = 4 * BLOCK, 17 * BLOCK  # past what the kernel reads ahead by itself, up to 16 MiB ahead
    deadline = time.monotonic() + 10
    while resident_pages(cache.export(FP), *ahead) < 13 * 256 and time.monotonic() < deadline:
        time.sleep(0.05)  # asked on a thread of its own, off the reader's
    assert resident_pages(cache.export(FP), *ahead) == 13 * 256
    assert cache.readinto(other, 30, buf, total) and buf[0] == ord("r")  # a read out of nowhere
    time.sleep(0.5)
    assert resident_pages(cache.export(other), 36 * BLOCK, 48 * BLOCK) == 0  # no window for it


def test_a_verified_block_is_read_straight_into_the_callers_buffer(tmp_path: Path) -> None:
    """The reader's buffer (libfuse's, in the daemon) is filled and checked in place: nothing of
    a block's size is allocated per read (it was 1 MiB zeroed and copied per block)."""
    data = os.urandom(5 * BLOCK + 100)
    fp = hashlib.sha256(data).hexdigest()
    disk = DiskCache(tmp_path / "c")
    manifest = Manifest(fp, len(data))
    for index in range(6):
        block = data[index * BLOCK:(index + 1) * BLOCK]
        manifest.admit(index, block)
        disk.put(fp, index, bytearray(block), len(data))
    disk.seal(manifest)
    client = LXDClient(Connection(socket=str(tmp_path / "no-server.socket")))  # never asked
    exports = Exports(client, tmp_path / "spool", disk=disk)
    try:
        reader = exports.unified(fp, len(data))
        assert reader.verified
        buf = memoryview(bytearray(BLOCK))
        reader.readinto(0, buf)  # the first read opens the file
        got, peaks = bytearray(buf), []
        for index in range(1, 6):
            tracemalloc.start()
            n = reader.readinto(index * BLOCK, buf)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            got += buf[:n]
        assert max(peaks) < BLOCK // 16, peaks
        assert bytes(got) == data and disk.hits == 6
    finally:
        exports.close()
