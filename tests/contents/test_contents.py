"""contents/: what is inside images, through a real mount, checked against the files they came from."""

from __future__ import annotations

import errno
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from helpers import deleting
from lxd_sandbox import make_split
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

META = b"architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: contents test\n"


def _entries(blob: int = 0) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """An image's files: owners, modes, a symlink, a hard link, a private file, a device node."""
    def info(name, type_=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, data=b"", **kw):
        t = tarfile.TarInfo(name)
        t.type, t.mode, t.uid, t.gid, t.mtime, t.size = type_, mode, uid, gid, 1700000000, len(data)
        for k, v in kw.items():
            setattr(t, k, v)
        return t, (data if type_ == tarfile.REGTYPE else None)

    files = [info("metadata.yaml", data=META), info("templates", tarfile.DIRTYPE, 0o755),
             info("templates/hostname.tpl", data=b"{{ container.name }}\n"),
             info("rootfs", tarfile.DIRTYPE, 0o755), info("rootfs/etc", tarfile.DIRTYPE, 0o755),
             info("rootfs/usr", tarfile.DIRTYPE, 0o755)]
    if blob:  # a large file before the small ones: reading those must not download it
        files.append(info("rootfs/usr/blob", data=os.urandom(blob)))
    files += [info("rootfs/etc/os-release", data=b'PRETTY_NAME="Contents OS 1"\n'),
              info("rootfs/etc/shadow", mode=0o600, uid=0, gid=42, data=b"root:*:1::::::\n"),
              info("rootfs/etc/user-owned", uid=1000, gid=1000, data=b"mine\n"),
              info("rootfs/etc/motd", tarfile.SYMTYPE, 0o777, linkname="os-release"),
              info("rootfs/etc/hard", tarfile.LNKTYPE, linkname="rootfs/etc/os-release"),
              info("rootfs/dev", tarfile.DIRTYPE, 0o755),
              info("rootfs/dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
              info("rootfs/dev/sda", tarfile.BLKTYPE, 0o660, gid=6, devmajor=8, devminor=0),
              info("rootfs/dev/initctl", tarfile.FIFOTYPE, 0o600),
              info("rootfs/usr/su", mode=0o4755, data=b"#!/bin/sh\n")]
    return files


def _tarball(path: Path, entries, compression: str = "") -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for t, data in entries:
            tar.addfile(t, io.BytesIO(data) if data is not None else None)
    body = raw.getvalue()
    if compression in ("gz", "bz2", "xz"):
        with tarfile.open(path, f"w:{compression}") as tar:
            for t, data in entries:
                tar.addfile(t, io.BytesIO(data) if data is not None else None)
        return path
    if compression == "lzma":
        body = lzma.compress(body, format=lzma.FORMAT_ALONE)
    elif compression == "zst":
        body = subprocess.run(["zstd", "-q", "-c"], input=body, capture_output=True, check=True).stdout
    path.write_bytes(body)
    return path


@pytest.fixture(scope="module")
def made(sandbox, tmp_path_factory):
    work = tmp_path_factory.mktemp("contents")
    entries = _entries()
    with deleting(sandbox, {}) as fps:
        for comp, suffix in (("", ".tar"), ("gz", ".tar.gz"), ("xz", ".tar.xz"), ("bz2", ".tar.bz2"),
                             ("zst", ".tar.zst"), ("lzma", ".tar.lzma")):
            fps[comp or "tar"] = sandbox.import_image(_tarball(work / f"c{suffix}", entries, comp))
        fps["big"] = sandbox.import_image(_tarball(work / "big.tar", _entries(blob=160 << 20)))
        meta, rootfs = make_split(work / "split", rootfs_bytes=1 << 20)
        fps["split"] = sandbox.import_image(meta, rootfs)
        yield fps, entries, (meta, rootfs)


@pytest.fixture(scope="module")
def cmnt(sandbox, made, tmp_path_factory):
    with mounted(sandbox, tmp_path_factory.mktemp("cm") / "mnt") as m:
        yield m


FORMATS = ["tar", "gz", "xz", "bz2", "zst", "lzma"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_unified_format_shows_the_images_files_as_stored(cmnt, made, fmt):
    fps, entries, _ = made
    root = cmnt.path / "contents" / "by-fingerprint" / fps[fmt]
    assert sorted(os.listdir(root)) == ["metadata.yaml", "rootfs", "templates"]
    for t, data in entries:
        path = root / t.name
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (t.uid, t.gid, t.mtime), t.name
        if t.type == tarfile.REGTYPE:
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == t.mode
            assert path.read_bytes() == data
        elif t.type == tarfile.SYMTYPE:
            assert os.readlink(path) == t.linkname
            assert st.st_size == len(t.linkname)
        elif t.type == tarfile.LNKTYPE:  # one file, two names: one inode number, two links
            target = os.lstat(root / t.linkname)
            assert (st.st_ino, st.st_nlink) == (target.st_ino, 2) and target.st_ino != os.lstat(root).st_ino
            assert path.read_bytes() == (root / t.linkname).read_bytes()
        elif t.type == tarfile.DIRTYPE:
            assert stat.S_ISDIR(st.st_mode)
        else:  # devices and FIFOs: type, mode and device number as the header has them
            kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}.get(t.type, stat.S_IFIFO)
            assert st.st_mode == kind | t.mode, t.name
            assert st.st_rdev == (os.makedev(t.devmajor, t.devminor) if t.type != tarfile.FIFOTYPE else 0)


def test_stat_of_an_image_folder_does_not_open_its_archive(sandbox, made, tmp_path):
    """find, du and updatedb stat every folder first: an image's own must cost no download."""
    fps, _, _ = made
    with mounted(sandbox, tmp_path / "mnt", "--cache-dir", str(tmp_path)) as m:
        images = m.path / "contents" / "by-fingerprint"
        for fp in fps.values():
            st = os.stat(images / fp)
            assert stat.S_ISDIR(st.st_mode) and st.st_mtime > 0
        subprocess.run(["find", str(m.path / "contents"), "-maxdepth", "2", "-ls"], check=True,
                       capture_output=True)
        assert "/export" not in m.log_text()
        index = tmp_path / f"lxdimagefs-index-{os.getuid()}"
        assert not index.exists() or not any(index.iterdir())
        os.listdir(images / fps["xz"])  # the control: a listing opens it
        assert f"/images/{fps['xz']}/export" in m.log_text()


def test_an_images_devices_and_setuid_files_grant_nothing(cmnt, made):
    """Devices and setuid files show as the image has them, on a nodev,nosuid mount: opening a
    block device of the image is refused, as is running a program as its owner."""
    fps, _, _ = made
    with open("/proc/self/mounts") as f:
        options = next(line.split()[3] for line in f if line.split()[1] == str(cmnt.path)).split(",")
    assert "nodev" in options and "nosuid" in options
    dev = cmnt.path / "contents" / "by-fingerprint" / fps["tar"] / "rootfs/dev/sda"
    assert os.lstat(dev).st_rdev == os.makedev(8, 0)
    with pytest.raises(PermissionError):
        open(dev, "rb")  # noqa: SIM115


def test_the_same_files_in_two_compressions_are_equal_and_a_different_image_is_not(cmnt, made):
    fps, _, _ = made
    c = cmnt.path / "contents" / "by-fingerprint"
    same = subprocess.run(["diff", "-r", "--no-dereference", "-x", "initctl",  # diff compares no FIFO
                           str(c / fps["gz"]), str(c / fps["xz"])], capture_output=True)
    assert same.returncode == 0, same.stdout
    other = subprocess.run(["diff", "-r", "--no-dereference", str(c / fps["gz"]), str(c / fps["big"])],
                           capture_output=True)
    assert other.returncode == 1 and b"blob" in other.stdout
    found = subprocess.run(["grep", "-r", "Contents OS", str(c / fps["tar"] / "rootfs/etc")],
                           capture_output=True, text=True)
    assert "os-release" in found.stdout


def test_a_small_file_behind_a_large_one_downloads_little(sandbox, made, tmp_path):
    fps, _, _ = made
    with mounted(sandbox, tmp_path / "mnt", "--cache-dir", str(tmp_path), "-o", "nolocal") as m:
        started = time.monotonic()
        data = (m.path / "contents" / "by-fingerprint" / fps["big"] / "rootfs/etc/os-release").read_bytes()
        took = time.monotonic() - started
        assert data == b'PRETTY_NAME="Contents OS 1"\n'
        blocks = m.log_text().count(f"of {fps['big']} in (")  # each a MiB at most, of 160
        assert 0 < blocks <= 8, f"{blocks} MiB downloaded"
        assert took < 5


def test_the_index_is_kept_for_the_next_mount(sandbox, made, tmp_path):
    fps, _, _ = made
    for n in range(2):
        with mounted(sandbox, tmp_path / f"mnt{n}", "--cache-dir", str(tmp_path), "-o", "nolocal") as m:
            root = m.path / "contents" / "by-fingerprint" / fps["xz"]
            subprocess.run(["find", str(root), "-ls"], check=True, capture_output=True)
            requests = m.log_text().count(f"/images/{fps['xz']}/export bytes=")
            if n == 0:
                assert requests >= 1  # the first time, one pass over the export builds the index
            else:  # then the index answers every lookup and listing; opening reads the format's magic
                assert requests <= 1
            assert (root / "rootfs/etc/os-release").read_bytes().startswith(b"PRETTY_NAME")
    index = tmp_path / f"lxdimagefs-index-{os.getuid()}"
    assert stat.S_IMODE(index.stat().st_mode) == 0o700
    assert any(p.name.startswith("index-") and fps["xz"] in p.name for p in index.iterdir())


def test_a_split_image_shows_its_metadata_and_its_squashfs_rootfs(cmnt, made):
    fps, _, (meta, _rootfs) = made
    root = cmnt.path / "contents" / "by-fingerprint" / fps["split"]
    assert sorted(os.listdir(root)) == ["metadata.yaml", "rootfs"]
    with tarfile.open(meta) as tar:
        assert (root / "metadata.yaml").read_bytes() == tar.extractfile("metadata.yaml").read()
    assert sorted(os.listdir(root / "rootfs")) == ["blob", "etc"]
    assert (root / "rootfs/etc/hostname").read_text().strip()
    assert (root / "rootfs/blob").stat().st_size == 1 << 20


def test_by_alias_links_to_the_image_folder(cmnt, sandbox, made):
    fps, _, _ = made
    sandbox.lxc("image", "alias", "create", "inside/gz", fps["gz"])
    try:
        link = cmnt.path / "contents" / "by-alias" / "inside／gz"
        deadline = time.monotonic() + 5
        while not os.path.lexists(link):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.readlink(link) == f"../by-fingerprint/{fps['gz']}"
        assert (link / "rootfs/etc/os-release").read_bytes().startswith(b"PRETTY_NAME")
    finally:
        sandbox.lxc("image", "alias", "delete", "inside/gz")


@pytest.mark.parametrize("change", [
    lambda r: open(r / "rootfs/etc/os-release", "w"),  # noqa: SIM115
    lambda r: os.unlink(r / "rootfs/etc/os-release"),
    lambda r: os.mkdir(r / "rootfs/new"),
    lambda r: os.chmod(r / "rootfs/etc/os-release", 0o600),
    lambda r: os.rename(r / "rootfs/etc/os-release", r / "rootfs/etc/x"),
    lambda r: os.symlink("x", r / "rootfs/link"),
])
def test_nothing_inside_an_image_can_be_changed(cmnt, made, change):
    fps, _, _ = made
    with pytest.raises(OSError) as e:
        change(cmnt.path / "contents" / "by-fingerprint" / fps["tar"])
    assert e.value.errno == errno.EROFS


def test_nocontents_leaves_the_subtree_out(sandbox, made, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "-o", "nocontents") as m:
        assert sorted(os.listdir(m.path)) == ["by-alias", "by-fingerprint", "import"]


def test_other_users_get_the_images_own_modes(sandbox, made):
    fps, _, _ = made
    public = Path(tempfile.mkdtemp(prefix="lxdimagefs-shared-"))  # pytest's own folders are root's alone
    public.chmod(0o755)
    sandbox.rest(f"/1.0/images/{fps['tar']}", "PATCH", {"public": True})  # a private one is no one else's
    try:
        with mounted(sandbox, public / "mnt", "-o", "allow_other") as m:
            etc = m.path / "contents" / "by-fingerprint" / fps["tar"] / "rootfs/etc"
            def as_nobody(*args):
                return subprocess.run(["runuser", "-u", "nobody", "--", *args], capture_output=True,
                                      text=True)
            assert as_nobody("cat", str(etc / "os-release")).stdout.startswith("PRETTY_NAME")
            denied = as_nobody("cat", str(etc / "shadow"))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        sandbox.rest(f"/1.0/images/{fps['tar']}", "PATCH", {"public": False})
        shutil.rmtree(public)


def test_hostile_tarballs_stay_inside_and_the_mount_keeps_serving(sandbox, tmp_path):
    entries = _entries()
    evil = []
    for name, data in (("../escape", b"up"), ("/absolute", b"abs"), ("rootfs/" + "n" * 300, b"long"),
                       ("rootfs/dup", b"first"), ("rootfs/dup", b"second"), ("rootfs/./dot", b"dot")):
        t = tarfile.TarInfo(name)
        t.size, t.mode, t.mtime = len(data), 0o644, 1700000000
        evil.append((t, data))
    link = tarfile.TarInfo("rootfs/outside")
    link.type, link.linkname, link.mode = tarfile.SYMTYPE, "../../../../../etc/passwd", 0o777
    evil.append((link, None))
    fp = sandbox.import_image(_tarball(tmp_path / "evil.tar", entries + evil))
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            root = m.path / "contents" / "by-fingerprint" / fp
            names = subprocess.run(["find", str(root)], capture_output=True, text=True, check=True).stdout
            assert all(line.startswith(str(root)) for line in names.splitlines())
            assert (root / "rootfs/dup").read_bytes() in (b"first", b"second")
            assert os.readlink(root / "rootfs/outside") == "../../../../../etc/passwd"  # shown, as stored
            assert (root / "rootfs/etc/os-release").read_bytes().startswith(b"PRETTY_NAME")
            assert sorted(os.listdir(m.path)) == ["by-alias", "by-fingerprint", "contents", "import"]
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_corrupt_archive_is_eio_and_the_rest_of_the_mount_works(sandbox, made, tmp_path):
    fps, _, _ = made
    fp = sandbox.import_image(_tarball(tmp_path / "bad.tar.gz", _entries(blob=2 << 20), "gz"))
    try:
        stored = sandbox.lxd_dir / "images" / fp
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        with mounted(sandbox, tmp_path / "mnt") as m:
            with pytest.raises(OSError) as e:
                os.listdir(m.path / "contents" / "by-fingerprint" / fp)
            assert e.value.errno == errno.EIO
            assert "inside image" in m.log_text() or "fingerprint" in m.log_text()
            good = m.path / "contents" / "by-fingerprint" / fps["gz"] / "rootfs/etc/os-release"
            assert good.read_bytes().startswith(b"PRETTY_NAME")
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_vm_image_shows_its_metadata_and_templates(mnt, images):
    fp = images.fps["vm"]
    root = mnt.path / "contents" / "by-fingerprint" / fp
    names = sorted(os.listdir(root))
    assert "metadata.yaml" in names and "rootfs" in names  # rootfs/ as the metadata tarball holds it
    assert b"vm image" in (root / "metadata.yaml").read_bytes()


def test_find_newer_and_ls_work_inside(cmnt, made, tmp_path):
    fps, _, _ = made
    root = cmnt.path / "contents" / "by-fingerprint" / fps["gz"]
    stamp = tmp_path / "stamp"
    stamp.touch()
    os.utime(stamp, (1600000000, 1600000000))
    newer = subprocess.run(["find", str(root / "rootfs/etc"), "-newer", str(stamp), "-type", "f"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert str(root / "rootfs/etc/os-release") in newer
    listing = subprocess.run(["ls", "-ln", str(root / "rootfs/etc")], capture_output=True, text=True,
                             check=True).stdout
    assert " 1000 1000 " in listing and "motd -> os-release" in listing


def test_folders_a_tarball_never_names_have_inode_numbers_of_their_own(sandbox, tmp_path):
    """A tarball of files only (no `rootfs/` or `rootfs/dN/` headers, as some tools write them):
    ratarmountcore gives a folder it makes up the place of its first file, so `rootfs`,
    `rootfs/d0` and `rootfs/d0/f0` had one inode number, and GNU find left d0 out as a loop."""
    tar = tmp_path / "files-only.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in [("metadata.yaml", b"architecture: x86_64\ncreation_date: 1\n")] + [
                (f"rootfs/d{i}/f{j}", b"y") for i in range(3) for j in range(4)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    fp = sandbox.import_image(tar)
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            root = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
            numbers = [os.lstat(p).st_ino for p in [root, root / "d0", root / "d1", root / "d0" / "f0",
                                                    root / "d0" / "f1", root / "d1" / "f0"]]
            assert len(set(numbers)) == len(numbers), numbers
            found = subprocess.run(["find", str(root)], capture_output=True, text=True, check=True).stdout
            assert len(found.split()) == 1 + 3 + 12
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
