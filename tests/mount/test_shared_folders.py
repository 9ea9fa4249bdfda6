"""Files another local user put in a shared folder ($TMPDIR, --cache-dir) never stall a mount
(issue #27, 4): every open there is non-blocking and refuses what is not this user's own file."""

from __future__ import annotations

import os

import pytest
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

NOBODY = 65534


def _fifo(path):
    os.mkfifo(path, 0o666)
    os.chown(path, NOBODY, NOBODY)


def test_another_users_fifos_in_the_shared_folder_do_not_stall_the_mount(sandbox, images, tmp_path,
                                                                         monkeypatch):
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp is
    _fifo(shared / f"lxdimagefs-layouts-{os.getuid()}.jsonl")  # the layout journal's name
    # A "spool" of this user's, by a link to a folder of this user's where anyone may write: its
    # pid file, another user's FIFO, would be read by the sweep of dead daemons' spools.
    os.symlink(shared, shared / "lxdimagefs-spool-planted")
    _fifo(shared / "pid")
    monkeypatch.setenv("TMPDIR", str(shared))
    for n in range(2):  # the second mount reads the journal the first would have written
        with mounted(sandbox, tmp_path / f"m{n}", "--cache-dir", str(shared)) as m:  # within 20 s
            assert os.listdir(m.path / "by-fingerprint")
            assert (m.path / "by-alias" / "plain").is_symlink()
    assert (shared / "lxdimagefs-spool-planted").is_symlink()  # left as it was
    assert os.stat(shared / f"lxdimagefs-layouts-{os.getuid()}.jsonl").st_uid == NOBODY


def _walk(root):
    return sorted(os.path.join(d, n) [len(str(root)):] for d, ds, fs in os.walk(root) for n in ds + fs)


def test_two_mounts_sharing_a_cache_folder_both_read_a_split_images_contents(sandbox, images, tmp_path):
    """Both mounts index the same image into the one index folder: the second must not meet the
    first's index half-built, nor its lock ("database is locked" was EIO)."""
    shared = tmp_path / "cache"
    shared.mkdir()
    fp = images.fps["split"]
    with mounted(sandbox, tmp_path / "m0", "--cache-dir", str(shared)) as m0, \
            mounted(sandbox, tmp_path / "m1", "--cache-dir", str(shared)) as m1:
        first = _walk(m0.path / "contents" / "by-fingerprint" / fp)
        assert "/rootfs/etc" in first
        assert _walk(m1.path / "contents" / "by-fingerprint" / fp) == first
        assert _walk(m0.path / "contents" / "by-fingerprint" / fp) == first
    for m in (m0, m1):
        assert "locked" not in m.log.read_text()


def test_a_spool_made_again_is_refused_when_another_user_took_its_name(sandbox, images, tmp_path):
    """A cleaner of $TMPDIR removed the mount's spool, and another user made a folder of that
    name: a folder import (`mkdir import/NAME`, its parts written into the spool) must not make
    its files in there (before: `mkdir(parents=True, exist_ok=True)`, no owner check)."""
    import errno
    import shutil

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with mounted(sandbox, tmp_path / "m", "--cache-dir", str(shared)) as m:
        (spool,) = shared.glob("lxdimagefs-spool-*")
        shutil.rmtree(spool)
        spool.mkdir(0o777)
        os.chown(spool, NOBODY, NOBODY)
        os.chmod(spool, 0o777)
        with pytest.raises(OSError) as e:
            os.mkdir(m.path / "import" / "parts")
        assert e.value.errno == errno.EACCES
        assert os.listdir(spool) == []
        assert "not a folder only this user can use" in m.log.read_text()
