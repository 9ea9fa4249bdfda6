"""Who commits a file written through the mount: its writer's close, from any of its threads.

Go, Java and Rust programs and Python thread pools close a file on another
thread than the one that opened it; a writer killed by a signal must not
commit what it had written so far.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from helpers import lxd_fps, sha
from lxd_sandbox import make_split, make_unified

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def close_on_another_thread(fd: int) -> None:
    """os.close(fd) in a new thread; its error, if any, raised here."""
    errors: list[OSError] = []

    def close() -> None:
        try:
            os.close(fd)
        except OSError as e:
            errors.append(e)
    t = threading.Thread(target=close)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def test_an_import_closed_on_another_thread_is_created(mnt, sandbox, tmp_path):
    tarball = make_unified(tmp_path / "threaded.tar.gz", rootfs_bytes=1 << 20)
    fp = sha(tarball)
    try:
        fd = os.open(mnt.path / "import" / tarball.name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, tarball.read_bytes())
        close_on_another_thread(fd)  # before: 0, and the upload broken off ("released without …")
        assert fp in lxd_fps(sandbox)
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_folder_part_closed_on_another_thread_counts(mnt, sandbox, tmp_path):
    meta, rootfs = make_split(tmp_path / "s", rootfs_bytes=256 << 10)
    fp = sha(meta, rootfs)
    folder = mnt.path / "import" / "threaded"
    folder.mkdir()
    try:
        for part in (meta, rootfs):
            fd = os.open(folder / part.name, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, part.read_bytes())
            close_on_another_thread(fd)
        assert fp in lxd_fps(sandbox)  # when the last close returns, not some time later
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_metadata_edit_closed_on_another_thread_is_saved(mnt, sandbox, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "edit.tar.gz"))
    try:
        record = json.loads((mnt.path / "by-fingerprint" / fp / "metadata.json").read_text())
        record["properties"]["threaded"] = "yes"
        fd = os.open(mnt.path / "by-fingerprint" / fp / "metadata.json", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, json.dumps(record).encode())
        close_on_another_thread(fd)
        assert sandbox.rest(f"/1.0/images/{fp}")["properties"]["threaded"] == "yes"
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


WRITE_AND_DIE = """
import os, signal, sys
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, data[:len(data) // 2])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_import_creates_nothing(mnt, sandbox, tmp_path):
    """Half an uncompressed tarball: LXD would take it (metadata.yaml comes first) as an image."""
    tarball = make_unified(tmp_path / "killed.tar", rootfs_bytes=2 << 20)
    half = tarball.read_bytes()[:tarball.stat().st_size // 2]
    before = lxd_fps(sandbox)
    target = mnt.path / "import" / tarball.name
    done = subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(tarball), str(target)])
    assert done.returncode == -signal.SIGKILL
    try:
        assert lxd_fps(sandbox) == before
        error = mnt.path / "import" / f"{tarball.name}.error"
        assert "killed" in error.read_text()
        error.unlink()
        assert os.listdir(mnt.path / "import") == []
    finally:
        for fp in lxd_fps(sandbox) - before:
            sandbox.lxc("image", "delete", fp, check=False)
    assert hashlib.sha256(half).hexdigest() not in before


@pytest.mark.parametrize("how", ["shell", "dd"])
def test_a_shells_redirection_and_dd_import(mnt, sandbox, tmp_path, how):
    """`cat X > import/NAME` and `dd of=import/NAME` open the file, dup2 it and close the first
    descriptor before anything is written: that close must not commit an empty import."""
    tarball = make_unified(tmp_path / f"{how}.tar.gz", rootfs_bytes=1 << 20)
    target = mnt.path / "import" / tarball.name
    command = (["sh", "-c", f'cat "{tarball}" > "{target}"'] if how == "shell"
               else ["dd", f"if={tarball}", f"of={target}", "bs=1M", "status=none"])
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr  # before: "not an image: it starts with b''"
        assert sha(tarball) in lxd_fps(sandbox)
        assert os.listdir(mnt.path / "import") == []
    finally:
        sandbox.lxc("image", "delete", sha(tarball), check=False)


def test_a_shells_redirection_saves_metadata_json(mnt, sandbox, images):
    fp = images.fps["gz"]
    record = mnt.path / "by-fingerprint" / fp / "metadata.json"
    edited = json.loads(record.read_text())
    edited["properties"]["redirected"] = "yes"
    source = mnt.path.parent / "edited.json"
    source.write_text(json.dumps(edited))
    try:
        done = subprocess.run(["sh", "-c", f'cat "{source}" > "{record}"'], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert sandbox.rest(f"/1.0/images/{fp}")["properties"].get("redirected") == "yes"
    finally:
        sandbox.lxc("image", "unset-property", fp, "redirected", check=False)


def test_an_open_record_truncated_in_place_saves_what_is_written(mnt, sandbox, images):
    """open("r+"), truncate(0), json.dump, close: ftruncate reaches the open file's handle (mfusepy
    3.1 dropped it on libfuse 3, and the old record's bytes stayed under the new ones)."""
    fp = images.fps["gz"]
    record = mnt.path / "by-fingerprint" / fp / "metadata.json"
    description = sandbox.rest(f"/1.0/images/{fp}")["properties"]["description"]
    try:
        with open(record, "r+") as f:
            edited = json.load(f)
            edited["properties"]["truncated"] = "in-place"
            del edited["properties"]["description"]  # shorter than before: a stale tail would show
            f.seek(0)
            f.truncate(0)
            json.dump(edited, f)
        assert sandbox.rest(f"/1.0/images/{fp}")["properties"].get("truncated") == "in-place"
    finally:
        sandbox.lxc("image", "unset-property", fp, "truncated", check=False)
        sandbox.lxc("image", "set-property", fp, "description", description, check=False)


def test_a_folder_part_changed_after_its_writers_close_took_it_is_eio(mnt, sandbox, tmp_path):
    """Write, close a dup of the descriptor (the writer's close: the part is taken), write again:
    the later bytes cannot silently miss the image, so that write is EIO."""
    folder = mnt.path / "import" / "late"
    folder.mkdir()
    fd = os.open(folder / "meta.tar", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\0" * 4096)
        os.close(os.dup(fd))  # a close by the writer: the part is taken as written so far
        with pytest.raises(OSError) as e:
            os.write(fd, b"\0" * 4096)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
