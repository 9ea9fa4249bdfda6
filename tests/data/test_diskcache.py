"""The disk cache: verified exports kept across mounts, checked on the way back, bounded.

Each test imports small images (4-16 MiB) into the session's LXD and mounts two or three
times; about 5-15 s each on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import lzma
import mmap
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from helpers import export_of, imported_unified, zeros_tar_zst
from lxd_sandbox import make_split, make_unified
from mounts import socket_mounted as mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root



MIB = 1 << 20


def _export_path(mount, fp: str) -> str:
    return str(export_of(mount, fp))


def _cache(tmp_path: Path) -> Path:
    return tmp_path / f"lxdimagefs-cache-{os.getuid()}"  # mounts.py passes --cache-dir tmp_path


def _sha(path: str) -> str:
    run = subprocess.run(["cat", path], capture_output=True, check=True)
    return hashlib.sha256(run.stdout).hexdigest()


def _export_requests(log: str, fp: str) -> int:
    return sum(1 for line in log.splitlines() if "GET" in line and fp in line and "export" in line)


@pytest.fixture
def image(sandbox, tmp_path):
    yield from imported_unified(sandbox, tmp_path / "img.tar", 16 * MIB)


def test_a_new_mount_reads_a_verified_image_from_disk_without_asking_the_server(sandbox, image, tmp_path):
    with mounted(sandbox, tmp_path / "mnt1") as m:
        assert _sha(_export_path(m, image)) == image
        assert _export_requests(m.log_text(), image) >= 1
    cache = _cache(tmp_path)
    assert (os.stat(cache).st_mode & 0o777) == 0o700
    assert (cache / f"manifest-{image}").exists() and (cache / f"export-{image}").exists()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with mounted(sandbox, tmp_path / "mnt2") as m:
        path = _export_path(m, image)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ) as mapped:  # verified from the start
            assert hashlib.sha256(mapped).hexdigest() == image
        assert _sha(path) == image
        assert _export_requests(m.log_text(), image) == 0


def test_a_tampered_cache_file_is_never_served(sandbox, image, tmp_path):
    with mounted(sandbox, tmp_path / "mnt1") as m:
        assert _sha(_export_path(m, image)) == image
    data = _cache(tmp_path) / f"export-{image}"
    with open(data, "r+b") as f:  # someone edits a kept block
        f.seek(3 * MIB + 10)
        f.write(b"tampered")
    with mounted(sandbox, tmp_path / "mnt2") as m:
        assert _sha(_export_path(m, image)) == image
        assert "does not match its manifest" in m.log_text()
        assert _export_requests(m.log_text(), image) >= 1  # that block came from the server again
    manifest = _cache(tmp_path) / f"manifest-{image}"
    with open(manifest, "r+b") as f:  # and a damaged manifest is not trusted either
        f.seek(40)
        f.write(b"\xff\xff")
    with mounted(sandbox, tmp_path / "mnt3") as m:
        assert _sha(_export_path(m, image)) == image
        assert "manifest of" in m.log_text() and "damaged" in m.log_text()


def test_two_daemons_sharing_the_cache_stay_correct(sandbox, image, tmp_path):
    with mounted(sandbox, tmp_path / "a") as a, mounted(sandbox, tmp_path / "b") as b:
        paths = [_export_path(a, image), _export_path(b, image)]
        sums: list[str] = []
        readers = [threading.Thread(target=lambda p=p: sums.append(_sha(p))) for p in paths * 2]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert sums == [image] * 4
    with mounted(sandbox, tmp_path / "c") as c:
        assert _sha(_export_path(c, image)) == image
        assert _export_requests(c.log_text(), image) == 0


def test_a_cache_filled_to_three_times_its_bound_stays_within_it(sandbox, tmp_path):
    fps = [sandbox.import_image(make_unified(tmp_path / f"i{n}.tar", rootfs_bytes=3 * MIB)) for n in range(8)]
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "cache_max=8M") as m:
            for fp in fps:  # 8 x 3 MiB through a cache of 8 MiB
                assert _sha(_export_path(m, fp)) == fp
                used = sum(p.stat().st_blocks * 512 for p in _cache(tmp_path).iterdir())
                assert used <= 8 * MIB, used
        kept = [fp for fp in fps if (_cache(tmp_path) / f"manifest-{fp}").exists()]
        assert kept and fps[-1] in kept and fps[0] not in kept  # the least recently used left
    finally:
        for fp in fps:
            sandbox.lxc("image", "delete", fp, check=False)


def test_cache_max_zero_keeps_nothing_on_disk(sandbox, image, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "-o", "cache_max=0") as m:
        assert _sha(_export_path(m, image)) == image
    assert not _cache(tmp_path).exists()


def _parts(mount, fp: str) -> list[Path]:
    folder = mount.path / "by-fingerprint" / fp
    return sorted((p for p in folder.iterdir() if p.name != "metadata.json"), key=lambda p: p.suffix != ".xz")


def test_a_split_image_is_downloaded_once_not_once_per_mount(sandbox, tmp_path):
    fp = sandbox.import_image(*make_split(tmp_path / "s", rootfs_bytes=2 * MIB))
    try:
        for n in range(2):
            with mounted(sandbox, tmp_path / f"mnt{n}") as m:
                whole = b"".join(p.read_bytes() for p in _parts(m, fp))
                assert hashlib.sha256(whole).hexdigest() == fp
                assert ("spooled " + fp in m.log_text()) == (n == 0)  # the second mount reads the kept parts
        kept = _cache(tmp_path) / f"part-{fp}.1"
        with open(kept, "r+b") as f:  # a kept part edited on disk: EIO, never its bytes; dropped
            f.seek(100)
            f.write(b"tampered")
        with mounted(sandbox, tmp_path / "mnt3") as m:
            meta, rootfs = _parts(m, fp)
            run = subprocess.run(["cat", str(rootfs)], capture_output=True)
            assert run.returncode != 0 and b"Input/output error" in run.stderr
            assert b"tampered" not in run.stdout
            assert "does not match its manifest" in m.log_text() and not kept.exists()
            whole = meta.read_bytes() + rootfs.read_bytes()  # the next open: downloaded again
            assert hashlib.sha256(whole).hexdigest() == fp and "spooled " + fp in m.log_text()
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_cache_folder_of_another_owner_is_refused_at_mount(sandbox, tmp_path):
    cache = _cache(tmp_path)
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)  # someone else's: what it holds could be anything
    where = tmp_path / "mnt"
    where.mkdir()
    run = subprocess.run([sys.executable, "-m", "lxdimagefs", "--socket", sandbox.socket, "--cache-dir",
                          str(tmp_path), str(where)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "belongs to uid 65534" in run.stderr and "cache_max=0" in run.stderr
    assert not os.path.ismount(where)


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.lzma"])
def test_an_image_looked_inside_by_descriptor_is_decoded_once_not_once_per_mount(sandbox, tmp_path, suffix):
    """contents/ of a .tar.zst or .tar.lzma: downloaded and decoded by the first mount, kept with
    the decoded tarball's manifest; a later mount neither downloads nor decodes. Both kept files
    edited: the edited block is EIO, never served; the mount after that decodes anew, right."""
    tar = make_unified(tmp_path / "z.tar", rootfs_bytes=2 * MIB)
    fp = sandbox.import_image(_packed(tar, suffix))
    try:
        want = None
        for n in range(4):
            with mounted(sandbox, tmp_path / f"mnt{n}") as m:
                hostname = m.path / "contents/by-fingerprint" / fp / "rootfs/etc/hostname"
                run = subprocess.run(["cat", str(hostname)], capture_output=True)
                log = m.log_text()
                if n == 2:  # both kept files were edited: EIO, never the edited bytes
                    assert run.returncode != 0 and b"Input/output error" in run.stderr, run
                else:
                    want = want or run.stdout
                    assert run.returncode == 0 and run.stdout == want and want.startswith(b"z.tar")
                assert ("spooled " + fp in log) == (n in (0, 3)), log[-2000:]  # downloaded
                assert ("decoded " + fp in log) == (n in (0, 3)), log[-2000:]
            names = {p.name for p in _cache(tmp_path).iterdir()}
            assert names <= {f"export-{fp}", f"manifest-{fp}", f"part-{fp}.2", f"manifest-{fp}.2"}, names
            if n == 1:  # the kept export and the kept decoded tarball, both edited
                for name in (f"export-{fp}", f"part-{fp}.2"):
                    with open(_cache(tmp_path) / name, "r+b") as f:
                        f.seek(1000)  # the first block: metadata.yaml and rootfs/etc/hostname
                        f.write(b"tampered")
    finally:
        sandbox.lxc("image", "delete", fp, check=False)

def _packed(tar: Path, suffix: str) -> Path:
    packed = tar.with_name(tar.stem + suffix)
    if suffix == ".tar.zst":
        subprocess.run(["zstd", "-q", str(tar), "-o", str(packed)], check=True)
    else:
        packed.write_bytes(lzma.compress(tar.read_bytes(), format=lzma.FORMAT_ALONE))
    return packed


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.lzma"])
def test_a_decoded_tarball_changed_while_the_mount_uses_it_is_eio_never_wrong(sandbox, tmp_path, suffix):
    """contents/ of a .tar.zst or .tar.lzma reads a plain tarball decoded into the mount's spool:
    edited after the first look (or rotted), its bytes are EIO, never served."""
    tar = make_unified(tmp_path / "z.tar", rootfs_bytes=24 * MIB)  # more than the 16 MiB block cache
    with tarfile.open(tar) as t:
        want = t.extractfile("rootfs/blob").read()
    fp = sandbox.import_image(_packed(tar, suffix))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            blob = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob"
            assert blob.read_bytes() == want  # its first blocks have left the block cache since
            decoded = list(tmp_path.glob("lxdimagefs-spool-*/*.tar"))
            assert len(decoded) == 1, decoded  # the plain tarball the daemon reads
            with open(decoded[0], "r+b") as f:
                f.seek(MIB + 4096)  # inside rootfs/blob's bytes
                f.write(os.urandom(4096))
            Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the mount's pages too: ask the daemon
            run = subprocess.run(["cat", str(blob)], capture_output=True)
            assert run.stdout != want or run.returncode != 0, "cannot tell: the edit was not read"
            assert run.returncode != 0 and b"Input/output error" in run.stderr, "wrong bytes, exit status 0"
            assert not decoded[0].exists()  # that copy is not used again
            assert (m.path / "contents" / "by-fingerprint" / fp / "metadata.yaml").exists()  # still serving
        with mounted(sandbox, tmp_path / "mnt2") as m:  # a new mount decodes it again, right
            assert (m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob").read_bytes() == want
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_bytes_read_before_another_mounts_verdict_are_not_served_as_verified(sandbox, tmp_path):
    """Another mount sharing the disk cache seals the image: this mount's own check, begun on
    bytes the server got wrong for a while, still decides for what this mount was handed."""
    fp = sandbox.import_image(make_unified(tmp_path / "img.tar", rootfs_bytes=6 * MIB))
    stored, bad = sandbox.lxd_dir / "images" / fp, MIB + 8192
    try:
        good = stored.read_bytes()
        with mounted(sandbox, tmp_path / "mnt1") as m1:
            path1 = _export_path(m1, fp)
            _flip(stored, bad)  # the server is wrong for a while
            fd = os.open(path1, os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, bad) != good[bad:bad + 4096]
            finally:
                os.close(fd)
            _flip(stored, bad)  # and right again
            with mounted(sandbox, tmp_path / "mnt2") as m2:
                assert Path(_export_path(m2, fp)).read_bytes() == good  # verified and sealed
            done = subprocess.run(["cat", path1], capture_output=True)
            assert done.returncode != 0 or done.stdout == good, "wrong bytes with exit status 0"
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_whole_file_is_kept_only_if_it_leaves_the_free_space_and_never_leaves_a_temporary(tmp_path):
    """A decoded tarball or split part is copied into the cache when the spool is on another
    filesystem (root's default: /tmp and /var/cache). One that would leave less than 5% of the
    cache's filesystem free is not kept; a copy cut by ENOSPC leaves no temporary file (eviction
    counts only the cache's own names: one would stay for ever). A 16 MiB tmpfs; about 1 s."""
    from lxdimagefs.data import diskparts
    from lxdimagefs.data.diskcache import DiskCache

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        cache, fp = DiskCache(small / "cache"), "cd" * 32
        near, big = tmp_path / "near.tar", tmp_path / "big.tar"
        near.write_bytes(os.urandom(15 * MIB + MIB // 2))  # fits, leaving 0.5 MiB of 16 free
        big.write_bytes(os.urandom(20 * MIB))  # does not fit
        cache.keep_parts(fp, [near], first=2)
        assert not cache.part(fp, 2).exists(), "kept, leaving less than 5% free"
        diskparts.keep(cache, fp, [big], 2)  # as once keep_parts found room, then the disk filled
        assert os.listdir(cache.root) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_image_dropped_or_evicted_leaves_no_decoded_tarballs_manifest_behind(tmp_path):
    """drop (eviction, a damaged manifest) removes every file of the image: a sealed manifest of
    a decoded tarball left behind was never removed by anything, and kept counting as an image."""
    from lxdimagefs.data.diskcache import DECODED, DiskCache
    from lxdimagefs.data.manifest import BlockSums
    from lxdimagefs.keys import ObjectKey, Sha256

    cache, fp = DiskCache(tmp_path / "cache"), "ef" * 32
    src = tmp_path / "decoded.tar"
    src.write_bytes(os.urandom(3 * MIB))
    sums = BlockSums()
    sums.update(src.read_bytes())
    cache.keep_parts(fp, [src], first=DECODED)
    cache.seal(sums.manifest(fp, 3 * MIB), ObjectKey(Sha256(fp), "manifest", part=DECODED))
    assert sorted(os.listdir(cache.root)) == [f"manifest-{fp}.2", f"part-{fp}.2"]
    cache.drop(fp)
    assert os.listdir(cache.root) == []


def test_a_temporary_file_of_a_daemon_killed_while_writing_it_is_removed_by_the_next(sandbox, tmp_path):
    """A daemon killed (SIGKILL) while it copies a decoded tarball into the disk cache leaves its
    temporary file (`.part-…`), which matches no image's name: before, never evicted nor counted.
    The next daemon's scan of the folder removes it (its writer's lock is free) and says so.
    The cache folder is a tmpfs of its own, so the copy is a copy (not a link) that takes a while:
    a .tar.zst of 384 MiB of zeros, a few KiB."""
    import time

    from mounts import mounted as any_mounted
    from mounts import unmount, wait_mounted

    packed = zeros_tar_zst(tmp_path / "z.tar.zst", 384 * MIB, noise=4 * MIB)  # within 200 times its size
    cache = tmp_path / "cache"
    root = _cache(cache)
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G,mode=0700", "tmpfs", str(root)], check=True)
    fp = sandbox.import_image(packed)
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--socket", sandbox.socket,
                                 "--cache-dir", str(cache), str(where)], stdin=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_mounted(where, proc)
            looker = threading.Thread(target=lambda: os.path.exists(
                where / "contents" / "by-fingerprint" / fp / "rootfs" / "zeros"), daemon=True)
            looker.start()
            deadline = time.monotonic() + 120
            left: list[str] = []
            while not left and time.monotonic() < deadline and proc.poll() is None:
                left = [n for n in os.listdir(root) if n.startswith(".part-")]
            proc.kill()
            proc.wait()
        finally:
            unmount(where)
        left = [n for n in os.listdir(root) if n.startswith(".")]
        assert left, "no temporary file was caught (the copy ended before the kill)"
        with any_mounted(sandbox, tmp_path / "again", "--cache-dir", str(cache)) as m:
            inside = m.path / "contents" / "by-fingerprint" / fp
            assert (inside / "rootfs" / "zeros").stat().st_size == 384 * MIB
            assert "left by a writer that is gone" in m.log_text()
            assert not [n for n in os.listdir(root) if n.startswith(".")]
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
        subprocess.run(["umount", str(root)], check=False)
