"""Restoring a backup of images into import/ with the tools people use, as they use them.

rsync writes temporary names and renames them into place, then sets times,
modes and owners (on import/ itself too); cp -a, install and tar -x set
them after writing. Each must exit 0, create the images, and leave nothing;
run again, it has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import lxd_fps, sha
from lxd_sandbox import make_split, make_unified

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def backup(where: Path) -> tuple[Path, set[str]]:
    """A folder as `cp -r by-fingerprint/<fp>` makes them: a unified tarball and a split image folder."""
    where.mkdir(parents=True)
    unified = make_unified(where / "unified.tar.gz", rootfs_bytes=256 << 10)
    meta, rootfs = make_split(where.parent / f"{where.name}-split", rootfs_bytes=256 << 10)
    fp = sha(meta, rootfs)
    folder = where / fp
    folder.mkdir()
    shutil.copy(meta, folder / f"meta-{fp}.tar.xz")
    shutil.copy(rootfs, folder / f"{fp}.squashfs")
    (folder / "metadata.json").write_text(json.dumps({"fingerprint": fp, "public": True,
                                                      "properties": {"restored": "yes"}}, indent=2))
    for p in [unified, *folder.iterdir(), folder]:
        os.utime(p, (1600000000, 1600000000))
        os.chmod(p, 0o640 if p.is_file() else 0o750)
    return where, {sha(unified), fp}


RESTORES = {
    "rsync": lambda src, dst: ["rsync", "-a", f"{src}/", f"{dst}/"],
    "cp -a": lambda src, dst: ["cp", "-a", f"{src}/.", f"{dst}/"],
    "tar -x": lambda src, dst: ["sh", "-c", f"tar -C '{src}' -cf - . | tar -C '{dst}' -xf -"],
}


@pytest.mark.parametrize("tool", list(RESTORES))
def test_a_restore_into_import_works_and_again_has_nothing_to_do(mnt, sandbox, tmp_path, tool):
    src, fps = backup(tmp_path / "backup")
    before = lxd_fps(sandbox)
    try:
        for run in (1, 2):
            done = subprocess.run(RESTORES[tool](src, mnt.path / "import"), capture_output=True, text=True)
            assert done.returncode == 0, (run, done.stderr)
            assert lxd_fps(sandbox) == before | fps, run
            assert os.listdir(mnt.path / "import") == [], run
        split = next(fp for fp in fps if (src / fp).is_dir())
        assert sandbox.rest(f"/1.0/images/{split}")["properties"]["restored"] == "yes"
        unified = next(fp for fp in fps if fp != split)
        assert sandbox.rest(f"/1.0/images/{unified}")["filename"] == "unified.tar.gz"  # not .NAME.XXXXXX
    finally:
        for fp in fps:
            sandbox.lxc("image", "delete", fp, check=False)


def test_install_into_import(mnt, sandbox, tmp_path):
    tarball = make_unified(tmp_path / "installed.tar.xz")
    fp = sha(tarball)
    try:
        for run in (1, 2):
            done = subprocess.run(["install", "-m", "0644", "-p", str(tarball), str(mnt.path / "import")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, (run, done.stderr)
            assert fp in lxd_fps(sandbox)
            assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_an_image_that_exists_already_is_nothing_to_do(mnt, sandbox, images):
    """Before: EEXIST and an .error file."""
    tarball = images.files["gz"][0]
    before = lxd_fps(sandbox)
    subprocess.run(["cp", str(tarball), str(mnt.path / "import" / "again.tar.gz")], check=True)
    assert lxd_fps(sandbox) == before
    assert os.listdir(mnt.path / "import") == []


def test_a_copied_folder_is_one_image_whichever_part_comes_first(mnt, sandbox, tmp_path):
    """The squashfs, then metadata.json, then the metadata tarball: before, the squashfs was sent
    alone (EINVAL) and the folder vanished before the tarball arrived."""
    meta, rootfs = make_split(tmp_path / "order", rootfs_bytes=256 << 10)
    fp = sha(meta, rootfs)
    folder = mnt.path / "import" / fp
    folder.mkdir()
    try:
        for name, data in ((f"{fp}.squashfs", rootfs.read_bytes()),
                           ("metadata.json", json.dumps({"public": False}).encode()),
                           (f"meta-{fp}.tar.xz", meta.read_bytes())):
            (folder / name).write_bytes(data)
        assert fp in lxd_fps(sandbox)
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_times_modes_and_owners_on_import_are_accepted(mnt):
    where = mnt.path / "import"
    os.utime(where, (1600000000, 1600000000))
    os.chmod(where, 0o700)
    os.chown(where, os.getuid(), os.getgid())
    assert os.listdir(where) == []


class _LyingSource:
    """A source server whose export of an image is another image's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.headers = {"Content-Type": "application/octet-stream"}

    def export_stream(self, fp: str) -> _LyingSource:
        return self

    def iter_chunks(self, resp: object) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        pass


def test_a_copy_that_arrives_as_another_image_is_deleted(sandbox, tmp_path):
    """The target, a real LXD, creates what it was sent; the copy is then found to be the wrong image."""
    from lxdimagefs.errors import LXDError
    from lxdimagefs.servers.lxd import LXDClient
    from lxdimagefs.servers.pull import stream_copy
    from lxdimagefs.wire.transport import Connection

    tarball = make_unified(tmp_path / "impostor.tar.gz")
    target = LXDClient(Connection(socket=sandbox.socket))
    asked = "0" * 64
    try:
        with pytest.raises(LXDError) as e:
            stream_copy(_LyingSource(tarball.read_bytes()), asked, target, [],  # type: ignore[arg-type]
                        {"filename": "impostor.tar.gz"})
        assert "arrived as" in e.value.message
        assert sha(tarball) not in lxd_fps(sandbox)  # before: the wrong image stayed
    finally:
        sandbox.lxc("image", "delete", sha(tarball), check=False)


def test_an_upload_renamed_while_written_lands_under_its_new_name(mnt, sandbox, tmp_path):
    tarball = make_unified(tmp_path / "renamed.tar")
    fp = sha(tarball)
    temporary, final = mnt.path / "import" / ".renamed.tar.part", mnt.path / "import" / "renamed.tar"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, tarball.read_bytes())
        os.rename(temporary, final)
        assert os.listdir(mnt.path / "import") == ["renamed.tar"]
        os.close(fd)
        assert fp in lxd_fps(sandbox)
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_folder_that_became_an_image_can_be_listed_and_removed(mnt, sandbox, tmp_path):
    src, fps = backup(tmp_path / "b")
    split = next(fp for fp in fps if (src / fp).is_dir())
    try:
        subprocess.run(["cp", "-r", str(src / split), str(mnt.path / "import")], check=True)
        assert split in lxd_fps(sandbox)
        landed = mnt.path / "import" / split
        assert sorted(os.listdir(landed)) == sorted(os.listdir(src / split))
        subprocess.run(["rm", "-r", str(landed)], check=True)
        assert not landed.exists()
        assert split in lxd_fps(sandbox)  # forgetting the name never touches the image
    finally:
        for fp in fps:
            sandbox.lxc("image", "delete", fp, check=False)
