"""Fast checks of the block manifest and the disk cache's files (no LXD; the judges are
test_manifest.py and test_diskcache.py, on real mounts)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import evict, resident_pages

from lxdimagefs.data.blocks import BLOCK, BlockCache, cut, new_block
from lxdimagefs.data.directwrite import DirectWriter
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
    cache.flush()
    assert cache.get(FP, 2, BLOCK) == b"q" * BLOCK and cache.written(FP, 2)
    assert cache.get(FP, 0, BLOCK) == bytes(BLOCK) and not cache.written(FP, 0)
    assert cache.get("cd" * 32, 0, BLOCK) is None


def test_the_bound_evicts_the_least_recently_used_images(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes=8 * BLOCK)
    fps = [f"{i:02x}" * 32 for i in range(6)]
    for n, fp in enumerate(fps):
        for index in range(3):
            cache.put(fp, index, bytearray(os.urandom(BLOCK)), 3 * BLOCK)
        cache.flush()
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
    cache.flush()  # put() queues: the writer thread writes
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


def _resident(path: Path) -> int:
    """Bytes of a file in the page cache, as util-linux's fincore counts them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def test_blocks_are_written_past_the_page_cache_and_a_short_tail_buffered(tmp_path: Path) -> None:
    """Full blocks go to disk with O_DIRECT (none of them lands in the page cache: a buffered write
    cost the fetch thread up to 1.1 CPU-s/GiB); a tail that O_DIRECT cannot take is still written."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    writer = DirectWriter(BLOCK)
    blocks = [os.urandom(BLOCK), os.urandom(BLOCK), os.urandom(100)]
    for index, data in enumerate(blocks):
        writer.write(str(path), index * BLOCK, bytearray(data))
    writer.flush()
    assert path.read_bytes() == b"".join(blocks)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # the tail was written buffered: a dirty page stays in the page cache
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # what the reads above left
    os.close(fd)
    writer.write(str(path), 0, bytearray(blocks[1]))  # copied into the writer's aligned buffer
    aligned = new_block(BLOCK)  # written from where it is
    aligned[:] = blocks[0]
    writer.write(str(path), BLOCK, aligned)
    writer.flush()
    assert _resident(path) == 0
    assert path.read_bytes() == blocks[1] + blocks[0] + blocks[2]


def test_a_forgotten_file_gets_no_block_through_its_old_descriptor(tmp_path: Path) -> None:
    """A cache file dropped and made again: later blocks go to the new file, a block for a file
    that is gone is skipped without making one."""
    path = tmp_path / "f"
    path.write_bytes(bytes(BLOCK))
    writer = DirectWriter(BLOCK)
    writer.write(str(path), 0, bytearray(b"a" * BLOCK))
    writer.flush()
    path.unlink()
    writer.forget(str(path))
    path.write_bytes(bytes(BLOCK))
    writer.write(str(path), 0, bytearray(b"b" * BLOCK))
    writer.write(str(tmp_path / "gone"), 0, bytearray(b"c" * BLOCK))
    writer.flush()
    assert path.read_bytes() == b"b" * BLOCK
    assert not (tmp_path / "gone").exists()


def test_a_manifest_is_sealed_only_once_the_blocks_kept_before_it_are_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another daemon (or the next mount) that finds the manifest finds the blocks too, however
    slow the disk: seal() waits for the writer."""
    slow = DirectWriter._write

    def slowly(self: DirectWriter, path: str, offset: int, data: memoryview) -> None:
        time.sleep(0.2)
        slow(self, path, offset, data)

    monkeypatch.setattr(DirectWriter, "_write", slowly)
    cache = DiskCache(tmp_path / "c")
    blocks = [os.urandom(BLOCK) for _ in range(3)]
    m = Manifest(FP, 3 * BLOCK)
    for index, data in enumerate(blocks):
        m.admit(index, data)
        cache.put(FP, index, bytearray(data), 3 * BLOCK)
    cache.seal(m)
    assert (tmp_path / "c" / f"export-{FP}").read_bytes() == b"".join(blocks)


def test_an_evicted_block_is_reused_only_once_no_view_of_it_is_left() -> None:
    """Views of blocks go to readers and FUSE without a copy: a buffer is filled again only when
    nothing can still see it (a reader's slice, a ctypes array over it, a queue holding it)."""
    cache = BlockCache(2 * BLOCK)
    blocks = [cache.new_block(BLOCK) for _ in range(4)]
    owners = [id(b.obj) for b in blocks]
    reader = memoryview(blocks[0])[10:20]  # what a read(2) of block 0 is handed
    fuse = (ctypes.c_char * 10).from_buffer(memoryview(blocks[1])[:10])  # mfusepy's view of block 1
    for index, block in enumerate(blocks):
        cache.claim(FP, index, index)
        cache.publish(FP, index, block)  # blocks 0 and 1 are evicted
    del blocks, block
    assert {id(cache.new_block(BLOCK).obj) for _ in range(3)}.isdisjoint(owners)
    del reader
    again = cache.new_block(BLOCK)
    assert id(again.obj) == owners[0]
    assert ctypes.addressof(ctypes.c_char.from_buffer(again)) % mmap.PAGESIZE == 0
    del fuse
    assert id(cache.new_block(BLOCK).obj) == owners[1]
    assert cache.new_block(100).nbytes == 100  # a tail block: never a spare


def test_a_block_queued_before_an_export_is_kept_whole_never_changes_the_kept_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole export is linked into the cache as the file blocks are written to: a block still
    queued (an unchecked copy from a range read) must land in the file it replaces, not in it."""
    data = os.urandom(2 * BLOCK)
    fp = hashlib.sha256(data).hexdigest()
    gate, write = threading.Event(), DirectWriter._write

    def slow(self: DirectWriter, path: str, offset: int, block: memoryview) -> None:
        gate.wait(5)
        write(self, path, offset, block)

    monkeypatch.setattr(DirectWriter, "_write", slow)
    cache = DiskCache(tmp_path / "c")
    cache.put(fp, 0, bytearray(b"W" * BLOCK), len(data))
    spooled = tmp_path / "spool-whole"
    spooled.write_bytes(data)
    threading.Timer(0.3, gate.set).start()
    cache.keep_whole(fp, spooled)
    cache.put(fp, 1, bytearray(b"W" * BLOCK), len(data))  # after: refused
    cache.flush()
    assert hashlib.sha256(spooled.read_bytes()).hexdigest() == fp
    assert hashlib.sha256(cache.export(fp).read_bytes()).hexdigest() == fp


def test_a_request_of_more_than_a_block_is_answered_whole_not_short(tmp_path: Path) -> None:
    """A short reply to a page-cache read is end of file to the kernel: never short mid-file."""
    data = os.urandom(5 * BLOCK + 100)
    fp = hashlib.sha256(data).hexdigest()
    disk, manifest = DiskCache(tmp_path / "c"), Manifest(fp, len(data))
    for index in range(6):
        block = data[index * BLOCK:(index + 1) * BLOCK]
        manifest.admit(index, block)
        disk.put(fp, index, bytearray(block), len(data))
    disk.seal(manifest)
    exports = Exports(LXDClient(Connection(socket=str(tmp_path / "none.socket"))), tmp_path / "s", disk=disk)
    try:
        reader = exports.unified(fp, len(data))
        buf = bytearray(2 * BLOCK)
        assert reader.readinto(0, memoryview(buf)) == 2 * BLOCK and bytes(buf) == data[:2 * BLOCK]
    finally:
        exports.close()


def test_a_block_is_given_to_the_disk_cache_before_the_hash_can_see_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash's verdict seals the manifest, and a sealed manifest must find every block kept:
    so a block from the server is put before it is published to the hash (a new mount once
    asked LXD for the last block, put after the seal)."""
    disk = DiskCache(tmp_path / "c")
    exports = Exports(LXDClient(Connection(socket=str(tmp_path / "none.socket"))), tmp_path / "s", disk=disk)
    order: list[str] = []
    monkeypatch.setattr(disk, "put", lambda *args: order.append("put"))
    monkeypatch.setattr(exports.verification, "published", lambda *args: order.append("hash"))
    data = bytearray(os.urandom(BLOCK))
    try:
        exports.fetcher._arrived(hashlib.sha256(data).hexdigest(), BLOCK, 0, data)
    finally:
        exports.close()
    assert order == ["put", "hash"]


def test_an_export_another_daemon_evicted_and_wrote_again_is_checked_anew_not_trusted(tmp_path: Path) -> None:
    """Two daemons share the folder (two DiskCaches on it). One checked an export whole and marked
    it intact; the other evicts it and starts it again block by block (no manifest yet): the
    first must not hand that file out as whole (its readers would meet holes: EIO)."""
    from lxdimagefs.data import diskparts

    data = os.urandom(3 * BLOCK)
    fp = hashlib.sha256(data).hexdigest()
    spooled = tmp_path / "spool-whole"
    spooled.write_bytes(data)
    one, other = DiskCache(tmp_path / "c"), DiskCache(tmp_path / "c")
    one.keep_whole(fp, spooled)
    assert diskparts.whole(one, fp, len(data)) == one.export(fp)
    other.drop(fp)  # evicted
    other.put(fp, 2, bytearray(data[2 * BLOCK:]), len(data))  # a reader of the last block
    other.flush()
    assert one.export(fp).stat().st_size == len(data)
    assert diskparts.whole(one, fp, len(data)) is None, "a stale intact mark was trusted"
    other.keep_whole(fp, spooled)  # whole again, by the other daemon: checked, then used
    assert diskparts.whole(one, fp, len(data)) == one.export(fp)


def test_blocks_written_after_another_daemon_evicted_the_file_go_to_a_file_the_bound_counts(
        tmp_path: Path) -> None:
    """One daemon keeps an image's file open (its descriptor, and the writer's); another evicts
    it. Blocks the first writes next must land in a file of that name (counted by every scan),
    not in the unlinked one, which no scan sees and whose space comes back only when closed."""
    data = os.urandom(2 * BLOCK)
    fp = hashlib.sha256(data).hexdigest()
    one, other = DiskCache(tmp_path / "c"), DiskCache(tmp_path / "c")
    one.put(fp, 0, bytearray(data[:BLOCK]), len(data))
    one.flush()
    other.drop(fp)  # evicted by the other daemon
    one.put(fp, 1, bytearray(data[BLOCK:]), len(data))
    one.flush()
    assert one.written(fp, 1) and one.get(fp, 1, BLOCK) == data[BLOCK:]
    assert other._evict(0) >= BLOCK  # counted
    held = []
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            held.append(os.readlink(f"/proc/self/fd/{n}"))
    assert not [p for p in held if p.startswith(str(one.root)) and p.endswith("(deleted)")]


def test_a_temporary_file_being_written_is_counted_and_never_removed_under_its_writer(tmp_path: Path) -> None:
    from lxdimagefs.private import Temporary

    cache = DiskCache(tmp_path / "c")
    with Temporary(cache.export(FP)) as tmp:
        os.write(tmp.fd, b"x" * BLOCK)
        assert cache._evict(0) >= BLOCK  # counted against the bound
        assert tmp.path.exists()  # its writer holds its lock
        assert os.stat(tmp.path).st_mode & 0o777 == 0o600
    assert os.listdir(cache.root) == []


def test_a_cut_across_blocks_joins_only_what_it_spans() -> None:
    """A few KiB across two blocks (a qcow2 cluster's compressed bytes) copy those bytes, not both
    blocks whole (2 MiB); across three, the middle one whole; within one, a view."""
    blocks = [bytes([i]) * BLOCK for i in range(3)]
    assert isinstance(cut(blocks[:1], 10, 20), memoryview) and bytes(cut(blocks[:1], 10, 20)) == bytes(10)
    tracemalloc.start()
    try:
        got = cut(blocks[:2], BLOCK - 3000, BLOCK + 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == bytes(3000) + b"\1" * 1000 and peak < 64 << 10, peak
    assert cut(blocks, BLOCK - 7, 2 * BLOCK + 9) == bytes(7) + b"\1" * BLOCK + b"\2" * 9
