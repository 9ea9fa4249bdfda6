"""Hostile input and other users: a clear errno, and nothing else changes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def state(sandbox):
    return ({r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")},
            {a["name"]: a["target"] for a in sandbox.rest("/1.0/images/aliases?recursion=1")})


@pytest.mark.parametrize("action, code", [
    (lambda m, fp: os.open(m / "import" / ("x" * 256), os.O_WRONLY | os.O_CREAT), errno.ENAMETOOLONG),
    (lambda m, fp: os.symlink(f"../by-fingerprint/{fp}", m / "by-alias" / ("a" * 256)), errno.ENAMETOOLONG),
    (lambda m, fp: os.symlink(f"../by-fingerprint/{fp}", os.fsencode(m / "by-alias") + b"/bad\xff"),
     errno.EINVAL),
    (lambda m, fp: os.open(os.fsencode(m / "import") + b"/\xfe.tar", os.O_WRONLY | os.O_CREAT),
     errno.EINVAL),
    (lambda m, fp: os.symlink(f"../by-fingerprint/{fp}", m / "by-alias" / "tab\there"), errno.EINVAL),
    (lambda m, fp: os.mkdir(m / "import" / "new\nline"), errno.EINVAL),
    (lambda m, fp: os.symlink("../../../../etc/shadow", m / "by-alias" / "escape"), errno.EINVAL),
    (lambda m, fp: os.symlink("/etc", m / "by-alias" / "escape"), errno.EINVAL),
    (lambda m, fp: os.symlink(f"../by-fingerprint/{fp}/metadata.json", m / "by-alias" / "file"),
     errno.EINVAL),
    (lambda m, fp: os.symlink("../import", m / "by-alias" / "imp"), errno.EINVAL),
    (lambda m, fp: os.rename(m / "by-alias" / "xz", m / "by-alias" / ("r" * 256)), errno.ENAMETOOLONG),
])
def test_hostile_names_get_a_clear_errno(mnt, sandbox, images, action, code):
    before = state(sandbox)
    with pytest.raises(OSError) as e:
        action(mnt.path, images.fps["xz"])
    assert e.value.errno == code
    assert state(sandbox) == before
    assert os.listdir(mnt.path / "import") == []


def test_endless_writes_to_metadata_json_stop_at_a_bound(mnt, sandbox, images):
    fp = images.fps["xz"]
    before = sandbox.rest(f"/1.0/images/{fp}")
    fd = os.open(mnt.path / "by-fingerprint" / fp / "metadata.json", os.O_WRONLY | os.O_TRUNC)
    written = 0
    with pytest.raises(OSError) as e:
        while written < 64 << 20:
            written += os.write(fd, b" " * 65536)
    assert e.value.errno == errno.EFBIG
    assert written <= 1 << 20
    os.close(fd)  # nothing to save: the record was never whole
    assert sandbox.rest(f"/1.0/images/{fp}") == before


def test_thousands_of_open_files(mnt, images):
    fp, split = images.fps["plain"], images.fps["split"]
    folder = mnt.path / "by-fingerprint" / fp
    spooled = mnt.path / "by-fingerprint" / split / f"{split}.squashfs"  # each open holds a descriptor
    daemon_fds = len(os.listdir(f"/proc/{mnt.proc.pid}/fd"))
    fds = []
    try:
        for i in range(2000):
            fds.append(os.open([folder / "metadata.json", folder / f"{fp}.tar", spooled][i % 3], os.O_RDONLY))
        assert all(len(os.pread(fd, 16, 0)) == 16 for fd in fds[:50])
        assert len(os.listdir(f"/proc/{mnt.proc.pid}/fd")) >= daemon_fds + 600  # they were held…
    finally:
        for fd in fds:
            os.close(fd)
    deadline = time.monotonic() + 5  # …and are given back (release is asynchronous)
    while len(os.listdir(f"/proc/{mnt.proc.pid}/fd")) > daemon_fds + 2:
        assert time.monotonic() < deadline, "descriptors leaked"
        time.sleep(0.05)


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *args], capture_output=True, text=True)


def test_a_mount_is_private_unless_allow_other(mnt, images):
    done = _as_nobody("ls", str(mnt.path / "by-fingerprint"))
    assert done.returncode != 0
    assert "Permission denied" in done.stderr


@pytest.fixture()
def public_dir():
    """A folder another user can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lxdimagefs-shared-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_allow_other_with_default_permissions_keeps_the_mode_bits(sandbox, images, public_dir):
    fp = images.fps["gz"]
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": True})  # anyone's to read, no one's to change
    with contextlib.ExitStack() as undo:
        undo.callback(sandbox.rest, f"/1.0/images/{fp}", "PATCH", {"public": False})
        m = undo.enter_context(mounted(sandbox, public_dir / "shared", "-o",
                                       "allow_other,default_permissions"))
        listing = _as_nobody("ls", str(m.path / "by-fingerprint"))
        assert listing.returncode == 0 and fp in listing.stdout.split()
        assert _as_nobody("sha256sum", str(m.path / "by-fingerprint" / fp / f"{fp}.tar.gz")
                          ).stdout.split()[0] == fp
        before = state(sandbox)
        for args in (["ln", "-s", f"../by-fingerprint/{fp}", str(m.path / "by-alias" / "nobodys")],
                     ["cp", "/etc/hostname", str(m.path / "import" / "x.tar")],
                     ["rm", str(m.path / "by-alias" / "xz")],
                     ["sh", "-c", f"echo {{}} > {m.path / 'by-fingerprint' / fp / 'metadata.json'}"]):
            done = _as_nobody(*args)
            assert done.returncode != 0, args
            assert "Permission denied" in done.stderr, (args, done.stderr)
        assert state(sandbox) == before
