"""The read-only mount against a real LXD, through real system calls and shell tools."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import subprocess
from datetime import datetime

import pytest

from lxdimagefs.names import alias_to_filename

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

PYLXD_ATTRIBUTES = ("aliases", "auto_update", "architecture", "cached", "created_at", "expires_at",
                    "filename", "fingerprint", "last_used_at", "properties", "public", "size",
                    "uploaded_at", "update_source")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def lxd_images(sandbox) -> dict[str, dict]:
    return {r["fingerprint"]: r for r in sandbox.rest("/1.0/images?recursion=1")}


def test_top_level(mnt):
    assert sorted(os.listdir(mnt.path)) == ["by-alias", "by-fingerprint", "contents", "import"]
    assert os.listdir(mnt.path / "import") == []


def test_listing_matches_lxd(mnt, sandbox, images):
    listed = sh("ls", str(mnt.path / "by-fingerprint")).split()
    assert sorted(listed) == sorted(lxd_images(sandbox))
    assert set(images.fps.values()) <= set(listed)


def test_aliases_are_relative_symlinks(mnt, sandbox):
    aliases = sandbox.rest("/1.0/images/aliases?recursion=1")
    entries = sorted(os.listdir(mnt.path / "by-alias"))
    assert entries == sorted(alias_to_filename(a["name"]) for a in aliases)
    for alias in aliases:
        link = mnt.path / "by-alias" / alias_to_filename(alias["name"])
        assert stat.S_ISLNK(os.lstat(link).st_mode)
        assert os.readlink(link) == f"../by-fingerprint/{alias['target']}"
        assert sh("readlink", "-f", str(link)).strip() == str(mnt.path / "by-fingerprint" / alias["target"])


def test_alias_with_slash_is_shown_losslessly(mnt, images):
    link = mnt.path / "by-alias" / "test／gz"
    assert os.readlink(link) == f"../by-fingerprint/{images.fps['gz']}"
    assert "metadata.json" in os.listdir(link)


def test_metadata_json_is_lxds_record(mnt, sandbox, images):
    for fp in images.fps.values():
        path = mnt.path / "by-fingerprint" / fp / "metadata.json"
        text = path.read_text()
        assert text.endswith("}\n")
        record = json.loads(text)
        assert record == sandbox.rest(f"/1.0/images/{fp}")
        assert list(record) == sorted(record)
        for attr in PYLXD_ATTRIBUTES:
            if attr != "update_source":  # LXD leaves it out for images not fetched from a server
                assert attr in record, attr
        assert os.stat(path).st_size == len(text.encode())


def test_export_names_sizes_and_bytes_match_lxc_export(mnt, images, exported):
    for role, fp in images.fps.items():
        folder = mnt.path / "by-fingerprint" / fp
        reference = sorted(os.listdir(exported[role]))
        assert sorted(os.listdir(folder)) == sorted(["metadata.json", *reference]), role
        whole = hashlib.sha256()
        for name in sorted(reference, key=lambda n: not n.startswith("meta-")):
            ours, theirs = folder / name, exported[role] / name
            assert os.stat(ours).st_size == os.stat(theirs).st_size, name
            assert sh("cmp", str(ours), str(theirs)) == ""
            whole.update(ours.read_bytes())
        assert whole.hexdigest() == fp, role


def test_sha256sum_of_unified_exports_is_the_fingerprint(mnt, images):
    for role in ("gz", "xz", "plain"):
        fp = images.fps[role]
        (export,) = [p for p in (mnt.path / "by-fingerprint" / fp).iterdir() if p.name != "metadata.json"]
        assert sh("sha256sum", str(export)).split()[0] == fp
    names = {role: next(n for n in os.listdir(mnt.path / "by-fingerprint" / images.fps[role])
                        if n != "metadata.json") for role in ("gz", "xz", "plain")}
    assert names == {"gz": f"{images.fps['gz']}.tar.gz", "xz": f"{images.fps['xz']}.tar.xz",
                     "plain": f"{images.fps['plain']}.tar"}


def test_split_image_parts_are_named_like_lxc(mnt, images):
    fp = images.fps["split"]
    assert sorted(os.listdir(mnt.path / "by-fingerprint" / fp)) == sorted(
        ["metadata.json", f"meta-{fp}.tar.xz", f"{fp}.squashfs"])


def test_vm_image_has_a_qcow2_part(mnt, images):
    fp = images.fps["vm"]
    assert f"{fp}.qcow2" in os.listdir(mnt.path / "by-fingerprint" / fp)


def test_random_reads_match_lxc_export(mnt, images, exported):
    for role in ("plain", "split"):
        fp = images.fps[role]
        for reference in exported[role].iterdir():
            data = reference.read_bytes()
            rng = random.Random(role)
            fd = os.open(mnt.path / "by-fingerprint" / fp / reference.name, os.O_RDONLY)
            try:
                for _ in range(40):
                    off = rng.randrange(0, len(data))
                    size = rng.choice([1, 4096, 65536, 1 << 20, 3 << 20])
                    assert os.pread(fd, size, off) == data[off:off + size], (role, off, size)
                assert os.pread(fd, 100, len(data)) == b""
                assert os.pread(fd, 100, len(data) + 5000) == b""
            finally:
                os.close(fd)


def test_unique_prefix_resolves_and_short_one_does_not(mnt, images):
    fp = images.fps["gz"]
    assert sorted(os.listdir(mnt.path / "by-fingerprint" / fp[:12])) == sorted(
        os.listdir(mnt.path / "by-fingerprint" / fp))
    for bad in (fp[:11], "zz" + fp[2:20], "0" * 64):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt.path / "by-fingerprint" / bad)
    assert fp[:12] not in os.listdir(mnt.path / "by-fingerprint")


def test_times_follow_lxd(mnt, sandbox, images):
    fp = images.fps["xz"]
    record = sandbox.rest(f"/1.0/images/{fp}")
    uploaded = datetime.fromisoformat(record["uploaded_at"][:26].rstrip("Z") + "+00:00").timestamp()
    st = os.stat(mnt.path / "by-fingerprint" / fp / "metadata.json")
    assert abs(st.st_mtime - uploaded) < 0.01
    assert abs(os.stat(mnt.path / "by-fingerprint" / fp).st_mtime - uploaded) < 0.01


def test_modes_belong_to_the_mounting_user(mnt, ro_mnt, images):
    fp = images.fps["gz"]  # a private image: the mounter's alone (docs/SEMANTICS.md, "Who can see what")
    for m, file_mode, private_dir, dir_mode in ((mnt, 0o600, 0o700, 0o755), (ro_mnt, 0o400, 0o500, 0o555)):
        st = os.stat(m.path / "by-fingerprint" / fp / "metadata.json")
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        assert stat.S_IMODE(st.st_mode) == file_mode
        assert stat.S_IMODE(os.stat(m.path / "by-fingerprint" / fp / f"{fp}.tar.gz").st_mode) == file_mode
        assert stat.S_IMODE(os.stat(m.path / "by-fingerprint" / fp).st_mode) == private_dir
        assert stat.S_IMODE(os.stat(m.path / "by-fingerprint").st_mode) == dir_mode
        assert stat.S_IMODE(os.stat(m.path / "by-alias").st_mode) == dir_mode


@pytest.mark.parametrize("action, code", [
    (lambda m, fp: os.open(m / "by-fingerprint" / fp / "metadata.json", os.O_WRONLY), errno.EROFS),
    (lambda m, fp: os.open(m / "import" / "x.tar", os.O_WRONLY | os.O_CREAT), errno.EROFS),
    (lambda m, fp: os.mkdir(m / "by-fingerprint" / "new"), errno.EROFS),
    (lambda m, fp: os.symlink(f"../by-fingerprint/{fp}", m / "by-alias" / "new"), errno.EROFS),
    (lambda m, fp: os.unlink(m / "by-alias" / "xz"), errno.EROFS),
    (lambda m, fp: os.rename(m / "by-alias" / "xz", m / "by-alias" / "yz"), errno.EROFS),
    (lambda m, fp: os.rmdir(m / "by-fingerprint" / fp), errno.EROFS),
    (lambda m, fp: os.chmod(m / "by-fingerprint" / fp / "metadata.json", 0o644), errno.EROFS),
    (lambda m, fp: os.truncate(m / "by-fingerprint" / fp / "metadata.json", 0), errno.EROFS),
    (lambda m, fp: os.stat(m / "by-fingerprint" / fp / "nothing"), errno.ENOENT),
    (lambda m, fp: os.stat(m / "by-alias" / "nothing"), errno.ENOENT),
    (lambda m, fp: os.stat(m / "elsewhere"), errno.ENOENT),
    (lambda m, fp: os.unlink(m / "by-alias" / "nothing"), errno.EROFS),  # the kernel says so first
    (lambda m, fp: os.listdir(m / "by-fingerprint" / fp / "metadata.json"), errno.ENOTDIR),
])
def test_read_only_mount_refuses_every_change(ro_mnt, images, action, code):
    with pytest.raises(OSError) as e:
        action(ro_mnt.path, images.fps["xz"])
    assert e.value.errno == code
    assert sorted(os.listdir(ro_mnt.path / "by-alias"))  # still serving


def test_shell_tools(mnt, images, exported, tmp_path):
    fp = images.fps["split"]
    subprocess.run(["cp", "-r", str(mnt.path / "by-fingerprint" / fp), str(tmp_path / "copy")], check=True)
    assert sorted(os.listdir(tmp_path / "copy")) == sorted(["metadata.json", *os.listdir(exported["split"])])
    listing = sh("tar", "-tf", str(mnt.path / "by-fingerprint" / images.fps["plain"] /
                                   f"{images.fps['plain']}.tar"))
    assert "metadata.yaml" in listing.split()
    assert "rootfs/blob" in listing.split()
    subprocess.run(["tar", "-cf", str(tmp_path / "backup.tar"), "-C", str(mnt.path), "by-alias"], check=True)
