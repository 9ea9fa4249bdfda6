"""Changing LXD's images through the mount, checked with LXD's own answers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from helpers import lxd_fps, sha
from lxd_sandbox import make_split, make_unified
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def lxd_aliases(sandbox) -> dict[str, str]:
    return {a["name"]: a["target"] for a in sandbox.rest("/1.0/images/aliases?recursion=1")}


def write_file(path: Path, data: bytes, chunk: int = 1 << 16) -> None:
    """open/write/close with every error raised (close is where an import commits)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), chunk):
            os.write(fd, data[i:i + chunk])
    finally:
        os.close(fd)


@pytest.fixture()
def fresh(sandbox, tmp_path):
    """An image of the test's own, deleted afterwards if still there."""
    made: list[str] = []

    def make(alias: str | None = None, **kw) -> str:
        fp = sandbox.import_image(make_unified(tmp_path / f"own{len(made)}.tar.gz", **kw), alias=alias)
        made.append(fp)
        return fp

    yield make
    for fp in made:
        sandbox.lxc("image", "delete", fp, check=False)


# -- import ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".tar"])
def test_cp_imports_a_unified_image(mnt, sandbox, tmp_path, suffix):
    tarball = make_unified(tmp_path / f"new{suffix}", rootfs_bytes=3 << 20)
    fp = sha(tarball)
    before = lxd_fps(sandbox)
    try:
        subprocess.run(["cp", str(tarball), str(mnt.path / "import")], check=True)
        assert lxd_fps(sandbox) == before | {fp}
        assert os.listdir(mnt.path / "import") == []
        assert fp in os.listdir(mnt.path / "by-fingerprint")  # visible at once
        assert sandbox.rest(f"/1.0/images/{fp}")["filename"] == tarball.name
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_import_progress_shows_in_ls(mnt, sandbox, tmp_path):
    tarball = make_unified(tmp_path / "slow.tar", rootfs_bytes=2 << 20)
    data = tarball.read_bytes()
    target = mnt.path / "import" / "slow.tar"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    sizes = []
    try:
        for i in range(0, len(data), 512 << 10):
            os.write(fd, data[i:i + (512 << 10)])
            sizes.append(os.stat(target).st_size)
    finally:
        os.close(fd)
    try:
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == len(data)
        assert os.listdir(target.parent) == []  # gone from the listing (a lookup still answers: landed.py)
        assert sha(tarball) in lxd_fps(sandbox)
    finally:
        sandbox.lxc("image", "delete", sha(tarball), check=False)


def test_files_written_into_import_ask_for_1_mib_writes(mnt, sandbox, tmp_path):
    """cp sizes its buffer by st_blksize: 1 MiB makes a 1 GiB import 1,024 FUSE
    writes instead of 8,192 (docs/PERFORMANCE.md, issue 16)."""
    tarball = make_unified(tmp_path / "blk.tar", rootfs_bytes=64 << 10)
    (mnt.path / "import" / "blkdir").mkdir()
    fds = [os.open(mnt.path / "import" / "blk.tar", os.O_WRONLY | os.O_CREAT, 0o644),
           os.open(mnt.path / "import" / "blkdir" / "meta.tar", os.O_WRONLY | os.O_CREAT, 0o644)]
    try:
        os.write(fds[0], tarball.read_bytes())
        assert [os.fstat(fd).st_blksize for fd in fds] == [1 << 20, 1 << 20]
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(mnt.path / "import" / "blkdir", ignore_errors=True)
        sandbox.lxc("image", "delete", sha(tarball), check=False)


def _bad_inputs(tmp_path: Path) -> list[tuple[str, bytes, int, str]]:
    good = make_unified(tmp_path / "good.tar.xz", rootfs_bytes=256 << 10).read_bytes()
    nometa = tmp_path / "nometa.tar.gz"
    with tarfile.open(nometa, "w:gz") as tar:
        info = tarfile.TarInfo("rootfs/hello")
        info.size = 5
        tar.addfile(info, __import__("io").BytesIO(b"hello"))
    return [
        ("garbage.tar", os.urandom(4096), errno.EINVAL, "is not an image"),
        ("image.json", json.dumps({"source": {"type": "url"}}).encode(), errno.EINVAL, "is not an image"),
        # cut before metadata.yaml ends (LXD itself accepts a tarball cut after it)
        ("truncated.tar.xz", good[:60], errno.EINVAL, ""),
        ("nometa.tar.gz", nometa.read_bytes(), errno.EINVAL, "metadata.yaml"),
    ]


def test_bad_imports_fail_with_lxds_message_and_leave_nothing(mnt, sandbox, images, tmp_path):
    before_images, before_aliases = lxd_fps(sandbox), lxd_aliases(sandbox)
    for name, data, code, message in _bad_inputs(tmp_path):
        with pytest.raises(OSError) as e:
            write_file(mnt.path / "import" / name, data)
        assert e.value.errno == code, name
        error_file = mnt.path / "import" / f"{name}.error"
        assert os.listdir(mnt.path / "import") == [error_file.name], name
        text = error_file.read_text()
        assert message.lower() in text.lower(), (name, text)
        error_file.unlink()
        assert os.listdir(mnt.path / "import") == []
        assert lxd_fps(sandbox) == before_images, name
        assert lxd_aliases(sandbox) == before_aliases
    assert not [p for p in os.listdir(sandbox.lxd_dir / "images") if len(p.split(".")[0]) != 64]


def test_an_empty_import_leaves_its_reason_and_nothing_else(mnt, sandbox, tmp_path):
    """A file closed without a write is committed at its last close (a close before the first write
    may be a shell's dup2): close returns 0, and import/NAME.error says why nothing was made."""
    before = lxd_fps(sandbox)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert subprocess.run(["cp", str(empty), str(mnt.path / "import")]).returncode == 0
    error_file = mnt.path / "import" / "empty.tar.error"
    deadline = time.monotonic() + 5  # FUSE's release comes just after close returns
    while not error_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "is not an image" in error_file.read_text()
    error_file.unlink()
    assert os.listdir(mnt.path / "import") == [] and lxd_fps(sandbox) == before


def test_cp_of_a_json_file_fails_and_never_reaches_lxd(mnt, sandbox, tmp_path):
    bogus = tmp_path / "request.json"
    bogus.write_text(json.dumps({"source": {"type": "url", "url": "https://127.0.0.1:1/x"}}))
    done = subprocess.run(["cp", str(bogus), str(mnt.path / "import")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Invalid argument" in done.stderr
    assert not any("POST /images" in line for line in mnt.log_text().splitlines()[-20:])
    (mnt.path / "import" / "request.json.error").unlink()


def test_writes_out_of_order_are_refused(mnt, tmp_path):
    data = make_unified(tmp_path / "x.tar", rootfs_bytes=1 << 20).read_bytes()
    fd = os.open(mnt.path / "import" / "seek.tar", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[:4096])
        with pytest.raises(OSError) as e:
            os.pwrite(fd, data[8192:12288], 8192)
        assert e.value.errno == errno.ESPIPE
    finally:
        with pytest.raises(OSError):
            os.close(fd)  # the upload was broken off: close says so
    (mnt.path / "import" / "seek.tar.error").unlink()
    assert os.listdir(mnt.path / "import") == []


def test_split_image_from_a_folder(mnt, sandbox, tmp_path):
    meta, rootfs = make_split(tmp_path / "s", rootfs_bytes=1 << 20)
    fp = sha(meta, rootfs)
    try:
        os.mkdir(mnt.path / "import" / "mysplit")
        subprocess.run(["cp", str(rootfs), str(meta), str(mnt.path / "import" / "mysplit")], check=True)
        assert fp in lxd_fps(sandbox)
        assert os.listdir(mnt.path / "import") == []
        assert sorted(os.listdir(mnt.path / "by-fingerprint" / fp)) == sorted(
            ["metadata.json", f"meta-{fp}.tar.xz", f"{fp}.squashfs"])
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_split_image_whose_last_part_is_renamed_into_its_folder_lands_without_a_stall(mnt, sandbox,
                                                                                        tmp_path):
    """rsync's way: the last part written under a temporary name, then renamed into place. The
    rename's call holds the folder's lock while the image lands: the kernel's caches are told to
    drop the folder's names without waiting on that lock (each wait ran out: 5 s per part)."""
    meta, rootfs = make_split(tmp_path / "r", rootfs_bytes=1 << 20)
    fp, folder = sha(meta, rootfs), mnt.path / "import" / "renamed"
    try:
        os.mkdir(folder)
        shutil.copy(meta, folder / "meta.tar.xz")
        shutil.copy(rootfs, folder / ".rootfs.squashfs.tmp")
        os.rename(folder / ".rootfs.squashfs.tmp", folder / "rootfs.squashfs")
        assert fp in lxd_fps(sandbox)
        assert "not dropped within" not in mnt.log_text()
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_cp_r_copies_an_image_to_another_server(mnt, sandbox, fresh, tmp_path):
    """The other server is another LXD project: its own images, through its own mount."""
    fp = fresh(rootfs_bytes=1 << 20)
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": True, "properties": {"flavour": "copied"}})
    sandbox.lxc("project", "create", "other", check=False)
    try:
        with mounted(sandbox, tmp_path / "b", "--project", "other") as b:
            subprocess.run(["cp", "-r", str(mnt.path / "by-fingerprint" / fp), str(b.path / "import")],
                           check=True)
            assert os.listdir(b.path / "import") == []
            copied = sandbox.rest(f"/1.0/images/{fp}?project=other")
            assert copied["public"] is True
            assert copied["properties"]["flavour"] == "copied"
            assert fp in os.listdir(b.path / "by-fingerprint")
    finally:
        sandbox.lxc("image", "delete", fp, "--project", "other", check=False)
        sandbox.lxc("project", "delete", "other", check=False)


# -- aliases ---------------------------------------------------------------------

def test_ln_rm_mv_manage_aliases(mnt, sandbox, fresh):
    a, b = fresh(), fresh()
    aliases = mnt.path / "by-alias"
    subprocess.run(["ln", "-s", f"../by-fingerprint/{a}", str(aliases / "one")], check=True)
    assert lxd_aliases(sandbox)["one"] == a
    subprocess.run(["ln", "-s", a[:12], str(aliases / "two")], check=True)  # a unique prefix
    subprocess.run(["ln", "-s", "one", str(aliases / "three")], check=True)  # another alias
    subprocess.run(["ln", "-s", str(mnt.path / "by-fingerprint" / b), str(aliases / "four")], check=True)
    subprocess.run(["ln", "-s", f"../by-fingerprint/{b}", str(aliases / "os／12")], check=True)
    got = lxd_aliases(sandbox)
    assert (got["two"], got["three"], got["four"], got["os/12"]) == (a, a, b, b)
    assert os.readlink(aliases / "os／12") == f"../by-fingerprint/{b}"

    subprocess.run(["mv", str(aliases / "two"), str(aliases / "renamed")], check=True)
    got = lxd_aliases(sandbox)
    assert "two" not in got and got["renamed"] == a
    subprocess.run(["mv", "-T", str(aliases / "four"), str(aliases / "one")], check=True)  # onto an alias
    got = lxd_aliases(sandbox)
    assert "four" not in got and got["one"] == b
    subprocess.run(["ln", "-sfn", f"../by-fingerprint/{a}", str(aliases / "one")], check=True)
    assert lxd_aliases(sandbox)["one"] == a
    for name in ("one", "three", "renamed", "os／12"):
        subprocess.run(["rm", str(aliases / name)], check=True)
    got = lxd_aliases(sandbox)
    assert not {"one", "three", "renamed", "os/12"} & set(got)


@pytest.mark.parametrize("target, code", [
    ("../by-fingerprint/" + "0" * 64, errno.ENOENT),
    ("../by-fingerprint/" + "0" * 12, errno.ENOENT),
    ("no-such-alias", errno.ENOENT),
    ("/etc/passwd", errno.EINVAL),
    ("../../etc", errno.EINVAL),
])
def test_bad_alias_targets(mnt, sandbox, target, code):
    before = lxd_aliases(sandbox)
    with pytest.raises(OSError) as e:
        os.symlink(target, mnt.path / "by-alias" / "bad")
    assert e.value.errno == code
    assert lxd_aliases(sandbox) == before


def test_a_taken_alias_name_is_eexist(mnt, sandbox, images, fresh):
    fp = fresh()
    with pytest.raises(FileExistsError):
        os.symlink(f"../by-fingerprint/{fp}", mnt.path / "by-alias" / "xz")
    assert lxd_aliases(sandbox)["xz"] == images.fps["xz"]


# -- attributes --------------------------------------------------------------------

def test_metadata_json_edits_are_saved(mnt, sandbox, fresh):
    fp = fresh()
    path = mnt.path / "by-fingerprint" / fp / "metadata.json"
    record = json.loads(path.read_text())
    record["public"] = True
    record["properties"]["color"] = "blue"
    with open(path, "w") as f:
        json.dump(record, f)
    got = sandbox.rest(f"/1.0/images/{fp}")
    assert got["public"] is True and got["properties"]["color"] == "blue"

    subprocess.run(["sed", "-i", 's/"blue"/"red"/', str(path)], check=True)
    assert sandbox.rest(f"/1.0/images/{fp}")["properties"]["color"] == "red"
    assert sorted(os.listdir(path.parent)) == sorted(["metadata.json", f"{fp}.tar.gz"])

    subprocess.run(["sh", "-c", f"echo '{{\"auto_update\": true}}' > {path}"], check=True)
    got = sandbox.rest(f"/1.0/images/{fp}")
    assert got["auto_update"] is True and got["properties"]["color"] == "red"  # others kept
    assert json.loads(path.read_text())["auto_update"] is True


def test_vim_saves_metadata_json(mnt, sandbox, fresh):
    vim = shutil.which("vim") or shutil.which("vim.tiny")
    if not vim:
        pytest.fail("vim is not installed: scripts/install.sh installs vim-tiny")
    fp = fresh()
    path = mnt.path / "by-fingerprint" / fp / "metadata.json"
    subprocess.run([vim, "-u", "NONE", "-es", "-c", '%s/"public": false/"public": true/', "-c", "wq",
                    str(path)], check=True, timeout=30)
    assert sandbox.rest(f"/1.0/images/{fp}")["public"] is True
    assert sorted(os.listdir(path.parent)) == sorted(["metadata.json", f"{fp}.tar.gz"])


@pytest.mark.parametrize("edit, code", [
    (lambda r: "not json {", errno.EINVAL),
    (lambda r: json.dumps([1, 2]), errno.EINVAL),
    (lambda r: json.dumps({**r, "size": 1}), errno.EINVAL),
    (lambda r: json.dumps({**r, "fingerprint": "0" * 64}), errno.EINVAL),
    (lambda r: json.dumps({**r, "public": True}) + " " * (2 << 20), errno.EFBIG),
])
def test_bad_metadata_edits_change_nothing(mnt, sandbox, fresh, edit, code):
    fp = fresh()
    before = sandbox.rest(f"/1.0/images/{fp}")
    path = mnt.path / "by-fingerprint" / fp / "metadata.json"
    with pytest.raises(OSError) as e:
        write_file(path, edit(json.loads(path.read_text())).encode())
    assert e.value.errno == code
    assert sandbox.rest(f"/1.0/images/{fp}") == before


def test_a_concurrent_edit_is_detected_not_overwritten(mnt, sandbox, fresh):
    fp = fresh()
    path = mnt.path / "by-fingerprint" / fp / "metadata.json"
    record = json.loads(path.read_text())  # the user reads…
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"properties": {"by": "someone else"}})  # …another edits…
    record["public"] = True
    with pytest.raises(OSError) as e:  # …the user's save is refused
        write_file(path, json.dumps(record).encode())
    assert e.value.errno == errno.ESTALE
    got = sandbox.rest(f"/1.0/images/{fp}")
    assert got["properties"]["by"] == "someone else" and got["public"] is False


def test_another_process_reading_does_not_reset_a_writers_base(mnt, sandbox, fresh):
    fp = fresh()
    path = mnt.path / "by-fingerprint" / fp / "metadata.json"
    record = json.loads(path.read_text())  # this process reads…
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"properties": {"by": "someone else"}})  # …lxc edits…
    subprocess.run(["cat", str(path)], check=True, capture_output=True)  # …a third process reads…
    record["public"] = True
    for _ in range(2):  # …and this process's save is refused, a retry too
        with pytest.raises(OSError) as e:
            write_file(path, json.dumps(record).encode())
        assert e.value.errno == errno.ESTALE
    assert sandbox.rest(f"/1.0/images/{fp}")["public"] is False
    record = json.loads(path.read_text())  # read again: now it saves
    record["public"] = True
    write_file(path, json.dumps(record).encode())
    assert sandbox.rest(f"/1.0/images/{fp}")["public"] is True


@pytest.mark.parametrize("name", ["日本.tar.gz", "café.tar", "debian／12.tar"])
def test_import_names_outside_latin1_reach_lxd_as_lxc_sends_them(mnt, sandbox, tmp_path, name):
    tarball = make_unified(tmp_path / ("x" + name[-7:].replace("／", "")))
    fp = sha(tarball)
    try:
        shutil.copyfile(tarball, mnt.path / "import" / name)
        assert sandbox.rest(f"/1.0/images/{fp}")["filename"] == name
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("record", [b"[1, 2]", b'{"properties": [1]}', b'{"properties": {"a": 1}}'])
def test_a_copied_folder_with_a_bad_record_is_einval_and_leaves_nothing(mnt, sandbox, tmp_path, record):
    tarball = make_unified(tmp_path / "copy.tar")
    fp = sha(tarball)
    folder = mnt.path / "import" / fp
    folder.mkdir()
    write_file(folder / "metadata.json", record)
    with pytest.raises(OSError) as e:
        write_file(folder / f"{fp}.tar", tarball.read_bytes())
    assert e.value.errno == errno.EINVAL
    assert os.listdir(mnt.path / "import") == [f"{fp}.error"]
    assert "metadata.json" in (mnt.path / "import" / f"{fp}.error").read_text()
    os.unlink(mnt.path / "import" / f"{fp}.error")
    assert fp not in lxd_fps(sandbox)
    assert not list(Path(mnt.log.parent).glob("lxdimagefs-spool-*/import/*"))


def test_two_parts_closed_at_once_make_one_image(mnt, sandbox, tmp_path):
    meta, rootfs = make_split(tmp_path / "race", rootfs_bytes=1 << 20)
    folder = mnt.path / "import" / "race"
    folder.mkdir()
    fds = []
    for src in (meta, rootfs):
        fds.append(os.open(folder / src.name, os.O_WRONLY | os.O_CREAT, 0o644))
        os.write(fds[-1], src.read_bytes())
    errors: list[OSError] = []

    def close(fd: int) -> None:
        try:
            os.close(fd)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=close, args=(fd,)) for fd in fds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fp = sha(meta, rootfs)
    try:
        assert errors == []
        # Closed by two threads of the writer: each close is its writer's (fs/commit.py), one finishes.
        deadline = time.monotonic() + 20
        while fp not in lxd_fps(sandbox):
            assert time.monotonic() < deadline, os.listdir(mnt.path / "import")
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while os.listdir(mnt.path / "import"):  # no .error: one upload, no false EEXIST
            assert time.monotonic() < deadline, os.listdir(mnt.path / "import")
            time.sleep(0.05)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


# -- deletion --------------------------------------------------------------------

def test_rm_r_deletes_the_image_and_its_aliases(deleting_mnt, sandbox, fresh):
    mnt = deleting_mnt
    fp = fresh(alias="doomed")
    assert "doomed" in os.listdir(mnt.path / "by-alias")
    subprocess.run(["rm", "-r", str(mnt.path / "by-fingerprint" / fp)], check=True)
    assert fp not in lxd_fps(sandbox)
    assert fp not in os.listdir(mnt.path / "by-fingerprint")
    assert "doomed" not in os.listdir(mnt.path / "by-alias")


def test_shutil_rmtree_deletes_the_image(deleting_mnt, sandbox, fresh):
    fp = fresh()
    shutil.rmtree(deleting_mnt.path / "by-fingerprint" / fp)
    assert fp not in lxd_fps(sandbox)


def test_rmdir_deletes_the_image(deleting_mnt, sandbox, fresh):
    fp = fresh()
    os.rmdir(deleting_mnt.path / "by-fingerprint" / fp)
    assert fp not in lxd_fps(sandbox)


def test_without_allow_delete_rm_rf_deletes_no_image(mnt, sandbox, fresh):
    fp = fresh(alias="kept")
    before = lxd_fps(sandbox)
    folder = mnt.path / "by-fingerprint" / fp
    files = sorted(os.listdir(folder))
    done = subprocess.run(["rm", "-rf", str(folder)], capture_output=True, text=True)
    assert done.returncode != 0 and "Operation not permitted" in done.stderr
    with pytest.raises(OSError) as e:
        os.rmdir(folder)
    assert e.value.errno == errno.EPERM
    assert lxd_fps(sandbox) == before
    assert sorted(os.listdir(folder)) == files  # nothing hidden either
    assert lxd_aliases(sandbox)["kept"] == fp
    assert "mount with -o allow_delete" in mnt.log_text()


@pytest.mark.parametrize("mount", ["mnt", "deleting_mnt"])
def test_removing_one_export_file_is_refused(request, sandbox, fresh, mount):
    """Before, `rm` of one file "succeeded" and hid it until the next mount."""
    m = request.getfixturevalue(mount)
    fp = fresh()
    folder = m.path / "by-fingerprint" / fp
    for name in (f"{fp}.tar.gz", "metadata.json"):
        with pytest.raises(OSError) as e:
            os.unlink(folder / name)
        assert e.value.errno == errno.EPERM
        assert name in os.listdir(folder)
    assert fp in lxd_fps(sandbox)


# -- everything else ------------------------------------------------------------------

@pytest.mark.parametrize("action, code, op", [
    (lambda m, fp: os.open(m / "by-fingerprint" / fp / f"{fp}.tar.xz", os.O_WRONLY), errno.EACCES, "write"),
    (lambda m, fp: os.chmod(m / "by-fingerprint" / fp / f"{fp}.tar.xz", 0o644), errno.EPERM, "chmod"),
    (lambda m, fp: os.mkdir(m / "by-fingerprint" / "new"), errno.EPERM, "mkdir"),
    (lambda m, fp: os.mkdir(m / "by-alias" / "new"), errno.EPERM, "mkdir"),
    (lambda m, fp: os.open(m / "by-alias" / "file", os.O_WRONLY | os.O_CREAT), errno.EPERM, "create"),
    (lambda m, fp: os.open(m / "top", os.O_WRONLY | os.O_CREAT), errno.EPERM, "create"),
    (lambda m, fp: os.symlink("x", m / "by-fingerprint" / fp / "link"), errno.EPERM, "symlink"),
    # import/ takes links to https:// URLs and other remotes' images (server-side creation)
    (lambda m, fp: os.symlink("x", m / "import" / "link"), errno.EINVAL, "symlink"),
    (lambda m, fp: os.rename(m / "by-alias" / "xz", m / "import" / "xz"), errno.EXDEV, "rename"),
    (lambda m, fp: os.truncate(m / "by-fingerprint" / fp / "metadata.json", 10), errno.EACCES, "truncate"),
    (lambda m, fp: os.rmdir(m / "by-alias"), errno.EBUSY, "rmdir"),
])
def test_other_changes_are_refused_and_logged(mnt, sandbox, images, action, code, op):
    before = (lxd_fps(sandbox), lxd_aliases(sandbox))
    with pytest.raises(OSError) as e:
        action(mnt.path, images.fps["xz"])
    assert e.value.errno == code
    assert f"refused {op} " in mnt.log_text()
    assert (lxd_fps(sandbox), lxd_aliases(sandbox)) == before
