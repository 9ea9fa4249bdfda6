"""contents/'s own connection (mount/inside.py): mounted with the mount, private, and gone with it,
however the mount ends or fails to start; never left behind, never a mount inside the mount."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mounts import unmount, wait_mounted

pytestmark = pytest.mark.lxd

CLI = [sys.executable, "-m", "lxdimagefs"]


def _inside(where: Path) -> Path:
    """The folder contents' connection of the mount on `where` is mounted on."""
    target = Path(os.readlink(where / "contents"))
    assert target.name == "contents", target
    return target.parent


def _options(mount_point: Path) -> set[str]:
    """The mount options (and the superblock's) of the mount on `mount_point`; empty if none."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if parts[4] == str(mount_point):
            return {*parts[5].split(","), *rest.split()[-1].split(",")}
    return set()


def _gone(folder: Path, within: float = 10.0) -> bool:
    """Whether `folder` is neither mounted on nor there, once the daemon had `within` seconds."""
    deadline = time.monotonic() + within
    while _options(folder) or folder.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _contents_mounts() -> set[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return {line for line in lines if "lxdimagefs-contents" in line}


def _foreground(sandbox, tmp_path: Path, where: Path, *args: str) -> subprocess.Popen:
    where.mkdir()
    proc = subprocess.Popen([*CLI, "-f", "--socket", sandbox.socket, "--cache-dir", str(tmp_path), *args,
                             str(where)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_mounted(where, proc)
    return proc


def test_fusermount_u_of_the_mount_ends_contents_connection_too(sandbox, images, tmp_path):
    """Run as a user would (the daemon in the background): `contents` is a link to a folder in the
    daemon's runtime folder (the user's, which no one else lists), mounted read-only; `fusermount -u
    MOUNT` works (no mount inside the mount to make it EBUSY) and takes that mount and folder along."""
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([*CLI, "--socket", sandbox.socket, "--cache-dir", str(tmp_path), str(where)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        inside = _inside(where)
        base = os.lstat(inside.parent)
        assert base.st_uid == os.getuid() and not stat.S_IMODE(base.st_mode) & 0o044, oct(base.st_mode)
        assert {"ro", "nosuid", "nodev"} <= _options(inside), _options(inside)
        fp = images.fps["gz"]
        assert (where / "contents" / "by-fingerprint" / fp / "rootfs" / "etc" / "hostname").read_bytes()
        subprocess.run(["fusermount", "-u", str(where)], check=True, timeout=30)
        assert _gone(inside)
    finally:
        unmount(where)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_contents_connection_too(sandbox, images, tmp_path, signum):
    where = tmp_path / "mnt"
    proc = _foreground(sandbox, tmp_path, where)
    try:
        inside = _inside(where)
        assert os.listdir(where / "contents" / "by-fingerprint")
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 0
        assert _gone(inside, within=0)
    finally:
        unmount(where)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_mount_that_fails_leaves_no_contents_connection(sandbox, tmp_path):
    """libfuse refuses an option after contents' connection was mounted (it is mounted first, before
    the daemon forks): it is unmounted and its folder removed as the command fails."""
    where = tmp_path / "mnt"
    where.mkdir()
    before = _contents_mounts()
    done = subprocess.run([*CLI, "--socket", sandbox.socket, "--cache-dir", str(tmp_path), "-o",
                           "no_such_fuse_option", str(where)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert not os.path.ismount(where)
    assert not _contents_mounts() - before


def test_allow_other_gives_contents_the_kernels_mode_checks(sandbox, images, tmp_path):
    """With allow_other, contents' connection has it too, with default_permissions: the kernel checks
    each image's own modes for other users (no OPEN reaches the daemon there to check them), and the
    runtime folder lets others pass through it, never list it."""
    where = tmp_path / "mnt"
    proc = _foreground(sandbox, tmp_path, where, "-o", "allow_other")
    try:
        inside = _inside(where)
        assert {"allow_other", "default_permissions", "ro"} <= _options(inside), _options(inside)
        mode = stat.S_IMODE(os.stat(inside.parent).st_mode)
        assert mode & 0o011 == 0o011 and not mode & 0o044, oct(mode)
    finally:
        unmount(where)
        proc.wait(timeout=20)
    assert _gone(inside)


def test_entry_timeout_0_leaves_the_daemon_idle(sandbox, tmp_path):
    """`-o entry_timeout=0` (the kernel keeps no name): contents' connection has nothing to drop
    on a timer that often, and the daemon idles (before: its sweep slept 0 s and spun a core,
    queueing drops faster than they were made; found by review)."""
    from mounts import mounted

    with mounted(sandbox, tmp_path / "mnt", "-o", "entry_timeout=0,attr_timeout=0") as m:
        assert os.listdir(m.path / "contents" / "by-fingerprint") is not None

        def cpu() -> int:  # the daemon's user and system clock ticks
            fields = Path(f"/proc/{m.proc.pid}/stat").read_text().rpartition(")")[2].split()
            return int(fields[11]) + int(fields[12])
        ticks, started = cpu(), time.monotonic()
        time.sleep(3)
        used = (cpu() - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started)
        assert used < 0.2, f"an idle daemon used {used:.0%} of a core"


def test_where_contents_connection_cannot_be_mounted_the_mount_serves_contents_itself(
        sandbox, tmp_path, monkeypatch):
    """No folder for contents' own connection (here the runtime folder's `lxdimagefs` is a
    file): a warning, and contents/ is a folder of the mount itself, inside images as before,
    its listings, links and files the same; the mount ends cleanly."""
    from mounts import mounted

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (runtime / "lxdimagefs").write_text("not a folder\n")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    from lxd_sandbox import make_unified

    fp = sandbox.import_image(make_unified(tmp_path / "fallback.tar", rootfs_bytes=4096), alias="fell")
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            contents = m.path / "contents"
            assert stat.S_ISDIR(os.lstat(contents).st_mode), "a link where no connection was made"
            assert "served by the mount itself" in m.log_text()
            assert fp in os.listdir(contents / "by-fingerprint")
            assert os.readlink(contents / "by-alias" / "fell") == f"../by-fingerprint/{fp}"
            for image in (fp, fp[:12]):
                hostname = contents / "by-fingerprint" / image / "rootfs" / "etc" / "hostname"
                assert hostname.read_bytes().startswith(b"fallback.tar"), image
            assert (contents / "by-alias" / "fell" / "rootfs" / "etc" / "hostname").read_bytes().startswith(
                b"fallback.tar")
            assert "CACHEDIR.TAG" in os.listdir(contents)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
