"""What a reader sees when LXD hangs, goes away or serves wrong bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import within
from lxd_sandbox import make_split, make_unified
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def _export_path(mount, fp: str) -> str:
    folder = mount.path / "by-fingerprint" / fp
    return str(next(p for p in folder.iterdir() if p.name != "metadata.json"))


def test_frozen_lxd_gives_eio_within_the_timeout_then_recovers(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    # no_events: a live event stream keeps the last listing (a frozen LXD sends no events, and
    # does not close the stream); without it, listings expire and must fail, not hang.
    with mounted(sandbox, tmp_path / "mnt", "-o", "timeout=2,metadata_ttl=0.5,no_events,nolocal") as m:
        path = _export_path(m, fp)  # learns the layout while LXD answers
        fd = os.open(path, os.O_RDONLY)
        try:
            os.kill(sandbox.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, 4 << 20)
                took = time.monotonic() - started
                assert e.value.errno == errno.EIO
                assert took < 2 * 2 + 3, took  # one read timeout, not a hang
                time.sleep(0.6)
                with pytest.raises(OSError) as e:
                    os.listdir(m.path / "by-fingerprint")
                assert e.value.errno == errno.EIO
            finally:
                os.kill(sandbox.pid, signal.SIGCONT)
            # LXD is back: the same open file and fresh listings work without a remount.
            assert len(os.pread(fd, 4096, 4 << 20)) == 4096
            assert fp in os.listdir(m.path / "by-fingerprint")
        finally:
            os.close(fd)


def _corrupt(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _pread_fully(fd: int, length: int, offset: int) -> None:
    """What a careful reader does: a short read mid-file is followed by a read of the rest. Through
    the page cache the read that meets a failed page returns the bytes before it; the next is EIO."""
    while length:
        got = len(os.pread(fd, length, offset))
        assert got, f"EOF at {offset} before the end"
        offset, length = offset + got, length - got


def test_unified_bytes_that_do_not_match_the_fingerprint_give_eio(sandbox, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "bad.tar", rootfs_bytes=2 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            path = _export_path(m, fp)
            _corrupt(sandbox.lxd_dir / "images" / fp, 1 << 20)
            done = subprocess.run(["cat", path], capture_output=True)
            assert done.returncode != 0
            assert b"Input/output error" in done.stderr
            assert "do not match the fingerprint" in m.log_text()
            assert sorted(os.listdir(m.path))  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("order", ["tail-then-cat", "random", "concurrent"])
def test_a_corrupt_image_is_eio_whatever_order_it_is_read_in(sandbox, tmp_path, order):
    fp = sandbox.import_image(make_unified(tmp_path / "bad.tar", rootfs_bytes=6 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            path = _export_path(m, fp)
            size = os.path.getsize(path)
            _corrupt(sandbox.lxd_dir / "images" / fp, size // 2)  # same size, a byte changed mid-file
            if order == "tail-then-cat":
                assert subprocess.run(["tail", "-c", "100", path], capture_output=True).returncode == 0
                runs = [subprocess.run(["cat", path], capture_output=True) for _ in range(2)]
            elif order == "random":
                offsets = list(range(0, size, 256 << 10))
                random.Random(7).shuffle(offsets)
                fd = os.open(path, os.O_RDONLY)
                with pytest.raises(OSError) as e:
                    for off in offsets:
                        _pread_fully(fd, min(256 << 10, size - off), off)
                os.close(fd)
                assert e.value.errno == errno.EIO
                runs = [subprocess.run(["cat", path], capture_output=True)]
            else:
                procs = [subprocess.Popen(["cat", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                         for _ in range(4)]
                runs = [subprocess.CompletedProcess(p.args, p.wait(), b"", p.stderr.read()) for p in procs]
            for run in runs:  # every whole read fails, the later ones too (sticky)
                assert run.returncode != 0 and b"Input/output error" in run.stderr
            assert "do not hash to its fingerprint" in m.log_text()
            assert sorted(os.listdir(m.path))  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def _handed_then_dropped(held: str, whole: str, bad: int) -> None:
    """`held` is open and was handed the bad page ahead of the hash; `cat whole` fails the check;
    then that page, read again through `held`, is EIO (the kernel dropped it), not the bytes."""
    fd = os.open(held, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 4096, bad)) == 4096  # served ahead of the hash, into the page cache
        done = subprocess.run(["cat", whole], capture_output=True)
        assert done.returncode != 0 and b"Input/output error" in done.stderr

        def refused() -> bool:
            try:
                os.pread(fd, 4096, bad)
            except OSError as e:
                return e.errno == errno.EIO
            return False
        within(refused, seconds=5)
    finally:
        os.close(fd)


def test_pages_of_a_corrupt_image_handed_out_before_the_verdict_are_dropped(sandbox, tmp_path):
    """Unchecked reads go through the page cache: when the check fails, the kernel must drop
    what it was handed, so a reader that kept the file open gets EIO, not the bad bytes again."""
    fp = sandbox.import_image(make_unified(tmp_path / "bad.tar", rootfs_bytes=6 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:
            path = _export_path(m, fp)
            bad = 1 << 20  # the second block: handed out long before the read that completes the file
            _corrupt(sandbox.lxd_dir / "images" / fp, bad)
            _handed_then_dropped(path, path, bad)
            assert sorted(os.listdir(m.path))  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("layout", [(), ("--all-projects",)])
def test_pages_read_through_a_prefix_path_are_dropped_when_the_check_fails(sandbox, tmp_path, layout):
    """A fingerprint prefix names the export too, as its own path in the kernel: its pages are
    dropped on a failed check as well (and under --all-projects' project folder)."""
    fp = sandbox.import_image(make_unified(tmp_path / "bad.tar", rootfs_bytes=6 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal", *layout) as m:
            root = m.path / "default" if layout else m.path
            full = str(next(p for p in (root / "by-fingerprint" / fp).iterdir() if p.name != "metadata.json"))
            by_prefix = str(root / "by-fingerprint" / fp[:12] / os.path.basename(full))
            bad = 1 << 20
            _corrupt(sandbox.lxd_dir / "images" / fp, bad)
            _handed_then_dropped(by_prefix, full, bad)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


_MAPPED = r"""
import mmap, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
bad = int(sys.argv[2])
print(m[bad:bad + 1].hex(), flush=True)  # faulted in before the verdict
sys.stdin.readline()  # the parent's cat has failed
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    m[bad:bad + 1]  # SIGBUS once the kernel dropped the page
    time.sleep(0.05)
print("still mapped", flush=True)
"""


def test_a_mapping_of_a_corrupt_export_made_before_the_verdict_faults_after_it(sandbox, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "bad.tar", rootfs_bytes=6 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:
            path = _export_path(m, fp)
            bad = 1 << 20
            _corrupt(sandbox.lxd_dir / "images" / fp, bad)
            child = subprocess.Popen([sys.executable, "-c", _MAPPED, path, str(bad)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip()
            assert subprocess.run(["cat", path], capture_output=True).returncode != 0
            child.stdin.write("\n")
            child.stdin.flush()
            out, _ = child.communicate(timeout=20)
            assert child.returncode == -signal.SIGBUS, (child.returncode, out)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_scattered_reads_over_many_images_stay_within_the_memory_bound(sandbox, tmp_path):
    fps = [sandbox.import_image(make_unified(tmp_path / f"many{i}.tar", rootfs_bytes=24 << 20))
           for i in range(12)]
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            paths = [_export_path(m, fp) for fp in fps]
            fds = [os.open(p, os.O_RDONLY) for p in paths]
            rng = random.Random(3)
            for _ in range(3):  # every block of every image, in a scattered order
                blocks = [(fd, b) for fd in fds for b in range(24)]
                rng.shuffle(blocks)
                for fd, b in blocks:
                    os.pread(fd, 1 << 20, b << 20)
            for fd in fds:
                os.close(fd)
            status = (Path("/proc") / str(m.proc.pid) / "status").read_text()
            peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
            assert peak_kib < 100 << 10, f"peak RSS {peak_kib} KiB"
            assert "fingerprint" not in m.log_text()  # every image was covered, checked, and matched
    finally:
        for fp in fps:
            sandbox.lxc("image", "delete", fp, check=False)


def test_split_bytes_that_do_not_match_the_fingerprint_give_eio(sandbox, tmp_path):
    fp = sandbox.import_image(*make_split(tmp_path / "s", rootfs_bytes=1 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            path = _export_path(m, fp)
            _corrupt(sandbox.lxd_dir / "images" / f"{fp}.rootfs", 4096)
            with pytest.raises(OSError) as e:
                open(path, "rb").close()
            assert e.value.errno == errno.EIO
            spooled = [f for d in tmp_path.glob("lxdimagefs-spool-*") for f in os.listdir(d) if f != "pid"]
            assert spooled == []  # the failed download left nothing behind
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_stopped_lxd_gives_eio_after_the_timeout_and_the_mount_recovers(sandbox, images, tmp_path):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=0.2,timeout=2,nolocal") as m:
        path = _export_path(m, fp)
        fd = os.open(path, os.O_RDONLY)
        try:
            sandbox.halt()
            try:
                time.sleep(0.3)
                # A call may first wait for the listing the event stream's drop started (its own
                # timeout), then list itself: two timeouts at most (docs/SEMANTICS.md), no longer.
                for call in (lambda: os.listdir(m.path / "by-fingerprint"),
                             lambda: os.pread(fd, 10, 3 << 20)):
                    started = time.monotonic()
                    with pytest.raises(OSError) as e:
                        call()
                    assert e.value.errno == errno.EIO
                    assert 1.5 < time.monotonic() - started < 2 * 2 + 1.5
            finally:
                sandbox.resume()
            assert fp in os.listdir(m.path / "by-fingerprint")
            assert len(os.pread(fd, 10, 3 << 20)) == 10
        finally:
            os.close(fd)


def test_a_copy_rides_out_an_lxd_restart(sandbox, tmp_path):
    """LXD stopped (by pid) for several seconds, then started: reads wait, resume, and verify."""
    fp = sandbox.import_image(make_unified(tmp_path / "restart.tar", rootfs_bytes=40 << 20))
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", "nolocal") as m:  # the socket: LXD's files need no LXD
            path = _export_path(m, fp)
            fd = os.open(path, os.O_RDONLY)
            head = os.read(fd, 3 << 20)  # a stream is open, mid-image, when LXD goes
            sandbox.halt()
            try:
                copy = subprocess.Popen(["cp", path, str(tmp_path / "copy")])
                time.sleep(6)
                assert copy.poll() is None, "cp gave up while LXD was down"
            finally:
                sandbox.resume()
            assert copy.wait(timeout=60) == 0
            rest = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            os.close(fd)
            assert hashlib.sha256(head + rest).hexdigest() == fp
            out = subprocess.run(["sha256sum", str(tmp_path / "copy")], capture_output=True, text=True)
            assert out.stdout.split()[0] == fp
            assert "retrying for up to" in m.log_text()
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
