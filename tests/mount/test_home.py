"""Where filesystems and LXD users live: mount(8) and fstab, df, extended attributes, packaging."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxd_sandbox import Sandbox, make_unified
from mounts import mounted, unmount, wait_mounted

pytestmark = pytest.mark.lxd

ROOT = Path(__file__).resolve().parents[2]  # the repository
# mount(8) runs helpers with a PATH of its own: lxdimagefs must be where `pip install .` as root puts it.
SYSTEM_BIN = Path("/usr/local/bin/lxdimagefs")


@pytest.fixture
def on_system_path() -> Iterator[None]:
    """This checkout's lxdimagefs as /usr/local/bin/lxdimagefs for the test, and what was there after."""
    ours = Path(sys.executable).parent / "lxdimagefs"
    saved = SYSTEM_BIN.with_name(".lxdimagefs.saved-by-tests")
    had = SYSTEM_BIN.exists() or SYSTEM_BIN.is_symlink()
    if had:
        SYSTEM_BIN.rename(saved)
    SYSTEM_BIN.symlink_to(ours)
    try:
        yield
    finally:
        SYSTEM_BIN.unlink()
        if had:
            saved.rename(SYSTEM_BIN)


def _source_of(where: Path) -> str:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(where):
                return fields[0]
    raise AssertionError(f"{where} is not in /proc/mounts")


@contextlib.contextmanager
def _umounted_after(where: Path) -> Iterator[None]:
    try:
        yield
    finally:
        if os.path.ismount(where):
            subprocess.run(["umount", str(where)], check=False)
        unmount(where)


def test_mount_t_fuse_lxdimagefs_drops_mount_options_and_returns_live(sandbox, images, tmp_path,
                                                                       on_system_path):
    where = tmp_path / "mnt"
    where.mkdir()
    source = f"unix://{sandbox.socket}"
    with _umounted_after(where):
        done = subprocess.run(["mount", "-t", "fuse.lxdimagefs", source, str(where), "-o",
                               "_netdev,nofail,noauto,users,x-systemd.automount,x-systemd.idle-timeout=60,"
                               "metadata_ttl=2"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(where)  # live when mount returns, no waiting
        assert "test／gz" in os.listdir(where / "by-alias")
        assert _source_of(where) == source  # so mount -a knows the line is mounted
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(where)


def test_an_fstab_line_mounts_a_remote_by_name(sandbox, images, tmp_path, on_system_path, monkeypatch):
    conf = tmp_path / "lxc-conf"
    monkeypatch.setenv("LXD_CONF", str(conf))
    subprocess.run(["lxc", "remote", "add", "sandbox", f"unix://{sandbox.socket}"], check=True,
                   capture_output=True)
    where = tmp_path / "mnt"
    where.mkdir()
    fstab = tmp_path / "fstab"
    options = "_netdev,nofail,ro,x-systemd.automount"
    fstab.write_text(f"# a test fstab\nsandbox {where} fuse.lxdimagefs {options} 0 0\n")
    with _umounted_after(where):
        done = subprocess.run(["mount", "-T", str(fstab), str(where)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(where) and _source_of(where) == "sandbox"
        assert sorted(os.listdir(where / "by-fingerprint")) == sorted(
            r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1"))
        with pytest.raises(OSError) as e:
            (where / "by-alias" / "x").symlink_to("../by-fingerprint/" + images.fps["gz"])
        assert e.value.errno == errno.EROFS  # the line's `ro` reached FUSE
        again = subprocess.run(["mount", "-T", str(fstab), "--all"], capture_output=True, text=True,
                               timeout=30)
        assert again.returncode == 0 and "already mounted" not in again.stderr


def test_an_unknown_remote_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("LXD_CONF", str(tmp_path / "none"))
    monkeypatch.setenv("INCUS_CONF", str(tmp_path / "none"))
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "nosuch", str(tmp_path / "mnt")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("lxdimagefs: no remote named 'nosuch' in the lxc or incus configuration "
                                   "(known: none)")


def _df(path: Path) -> tuple[int, int, int]:
    out = subprocess.run(["df", "-B1", "--output=size,used,avail", str(path)], check=True,
                         capture_output=True, text=True).stdout.split("\n")[1].split()
    return int(out[0]), int(out[1]), int(out[2])


def test_df_reports_the_filesystem_lxd_keeps_images_on(mnt, sandbox):
    size, used, avail = _df(mnt.path)
    ref_size, ref_used, ref_avail = _df(sandbox.lxd_dir / "images")
    block = 1 << 20  # the mount reports in 1 MiB blocks
    assert size > 0 and avail > 0  # never a full disk
    assert abs(size - ref_size) <= block
    # Other tests write meanwhile: the figures are measured a few seconds apart at most.
    assert abs(avail - ref_avail) <= 256 * block and abs(used - ref_used) <= 256 * block


def test_df_reports_the_pool_of_storage_images_volume(tmp_path):
    """With `storage.images_volume` set, images live in that pool: df is the pool's."""
    box = Sandbox.start()
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(pool_dir)], check=True)
    try:
        box.lxc("storage", "create", "small", "dir", f"source={pool_dir}")
        box.lxc("storage", "volume", "create", "small", "images")
        box.lxc("config", "set", "storage.images_volume", "small/images")
        box.import_image(make_unified(tmp_path / "one.tar"))
        res = box.rest("/1.0/storage-pools/small/resources")["space"]
        with mounted(box, tmp_path / "mnt") as m:
            size, used, _ = _df(m.path)
        assert abs(size - res["total"]) <= 1 << 20 and abs(size - (300 << 20)) <= 1 << 20
        assert abs(used - res["used"]) <= 2 << 20
    finally:
        box.stop()
        subprocess.run(["umount", "-l", str(pool_dir)], check=False)


# -- extended attributes -------------------------------------------------------------------------

def _getfattr(path: Path) -> dict[str, str]:
    out = subprocess.run(["getfattr", "-d", "--absolute-names", "-e", "hex", str(path)], check=True,
                         capture_output=True, text=True).stdout
    attrs = {}
    for line in out.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            attrs[name] = bytes.fromhex(value.removeprefix("0x")).decode()
    return attrs


def _image(sandbox: Sandbox, tmp_path: Path, name: str) -> str:
    fp = sandbox.import_image(make_unified(tmp_path / f"{name}.tar"), alias=f"x/{name}")
    sandbox.lxc("image", "alias", "create", f"{name}-2", fp)
    return fp


def test_getfattr_shows_the_record(mnt, sandbox, tmp_path):
    fp = _image(sandbox, tmp_path, "show")
    try:
        rec = sandbox.rest(f"/1.0/images/{fp}")
        want = {
            "user.lxd.fingerprint": fp, "user.lxd.architecture": rec["architecture"],
            "user.lxd.type": rec["type"], "user.lxd.public": "false", "user.lxd.auto_update": "false",
            "user.lxd.uploaded_at": rec["uploaded_at"],
            "user.lxd.aliases": "\n".join(a["name"] for a in rec["aliases"]),
            **{f"user.lxd.properties.{k}": v for k, v in rec["properties"].items()},
        }
        folder = mnt.path / "by-fingerprint" / fp
        assert _getfattr(folder) == want
        for name in os.listdir(folder):  # the files carry them too
            assert _getfattr(folder / name) == want
        assert _getfattr(mnt.path / "by-alias" / "x／show") == want  # through the symlink
        assert sorted(os.listxattr(folder)) == sorted(want)
        assert _getfattr(mnt.path / "by-fingerprint") == {}
        with pytest.raises(OSError) as e:
            os.getxattr(folder, "user.lxd.nope")
        assert e.value.errno == errno.ENODATA
        with pytest.raises(OSError) as e:
            os.getxattr(folder, "security.selinux")
        assert e.value.errno == errno.ENODATA
    finally:
        sandbox.lxc("image", "delete", fp)


def test_setfattr_saves_public_auto_update_and_properties(mnt, sandbox, tmp_path):
    fp = _image(sandbox, tmp_path, "edit")
    folder = mnt.path / "by-fingerprint" / fp
    try:
        def setf(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["setfattr", *args], capture_output=True, text=True)

        assert setf("-n", "user.lxd.public", "-v", "true", str(folder)).returncode == 0
        assert sandbox.rest(f"/1.0/images/{fp}")["public"] is True
        assert os.getxattr(folder, "user.lxd.public") == b"true"  # at once, through the mount
        assert setf("-n", "user.lxd.auto_update", "-v", "1", str(folder / "metadata.json")).returncode == 0
        assert sandbox.rest(f"/1.0/images/{fp}")["auto_update"] is True
        assert setf("-n", "user.lxd.properties.color", "-v", "blue", str(folder)).returncode == 0
        rec = sandbox.rest(f"/1.0/images/{fp}")
        assert rec["properties"]["color"] == "blue" and rec["properties"]["os"] == "lxdimagefs-test"
        assert json.loads((folder / "metadata.json").read_text())["properties"]["color"] == "blue"
        assert setf("-x", "user.lxd.properties.os", str(folder)).returncode == 0
        assert "os" not in sandbox.rest(f"/1.0/images/{fp}")["properties"]
        assert setf("-x", "user.lxd.public", str(folder)).returncode == 0
        assert sandbox.rest(f"/1.0/images/{fp}")["public"] is False
        before = sandbox.rest(f"/1.0/images/{fp}")

        def refused(call, *args) -> int:
            with pytest.raises(OSError) as e:
                call(folder, *args)
            return e.value.errno

        assert refused(os.setxattr, "user.lxd.fingerprint", b"0" * 64) == errno.EPERM
        assert refused(os.setxattr, "user.lxd.aliases", b"a") == errno.EPERM
        assert refused(os.removexattr, "user.lxd.architecture") == errno.EPERM
        assert refused(os.setxattr, "user.lxd.public", b"maybe") == errno.EINVAL
        assert refused(os.setxattr, "user.lxd.properties.bad", b"\xff") == errno.EINVAL
        assert refused(os.setxattr, "user.other", b"1") == errno.ENOTSUP
        assert refused(os.setxattr, "trusted.x", b"1") == errno.ENOTSUP
        assert refused(os.removexattr, "user.lxd.properties.nosuch") == errno.ENODATA
        assert refused(os.setxattr, "user.lxd.properties.color", b"red", os.XATTR_CREATE) == errno.EEXIST
        assert refused(os.setxattr, "user.lxd.properties.new", b"x", os.XATTR_REPLACE) == errno.ENODATA
        assert sandbox.rest(f"/1.0/images/{fp}") == before  # and nothing changed
        mnt_log = mnt.log_text()
        assert "user.lxd.fingerprint" in mnt_log  # the refusal is logged, by name
    finally:
        sandbox.lxc("image", "delete", fp)


def test_setfattr_on_a_read_only_mount_is_erofs(ro_mnt, images):
    folder = ro_mnt.path / "by-fingerprint" / images.fps["gz"]
    assert os.getxattr(folder, "user.lxd.fingerprint") == images.fps["gz"].encode()
    with pytest.raises(OSError) as e:
        os.setxattr(folder, "user.lxd.public", b"true")
    assert e.value.errno == errno.EROFS


def test_rsync_x_carries_the_attributes(mnt, images, tmp_path):
    fp = images.fps["xz"]
    if not shutil.which("rsync"):
        pytest.fail("rsync is not installed (scripts/install.sh installs it)")
    subprocess.run(["rsync", "-aX", str(mnt.path / "by-fingerprint" / fp) + "/", str(tmp_path / "copy")],
                   check=True)
    assert os.getxattr(tmp_path / "copy" / "metadata.json", "user.lxd.fingerprint") == fp.encode()


# -- packaging ----------------------------------------------------------------------------------

def test_pip_install_from_a_clone_gives_a_working_lxdimagefs(sandbox, images, tmp_path):
    """A clean venv, `pip install .` from a clone of this checkout, then one real mount from it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([str(env_dir / "bin/pip"), "install", "-q", str(clone)], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert "License classifiers are deprecated" not in pip.stderr and "project.license" not in pip.stderr
    exe = env_dir / "bin/lxdimagefs"
    helped = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("SOURCE", "fstab", "metadata_ttl", "nocontents", "user.lxd", "exit status"):
        assert words in helped
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([str(exe), f"unix://{sandbox.socket}", str(where)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert done.returncode == 0, done.stderr
        wait_mounted(where, timeout=1)
        assert images.fps["gz"] in os.listdir(where / "by-fingerprint")
    finally:
        unmount(where)
