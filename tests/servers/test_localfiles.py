"""A local server's own image files (data/localfiles.py): what is used, what is refused, and
that the files are byte for byte the exports LXD serves."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import evict, resident_pages

from lxdimagefs.servers.localfiles import LocalImage, LocalImages, images_folder, open_image

FP = hashlib.sha256(b"an image").hexdigest()


def folder(tmp_path: Path, files: dict[str, bytes], mode: int = 0o600) -> Path:
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    for name, data in files.items():
        (images / name).write_bytes(data)
        os.chmod(images / name, mode)
    return images


def read_all(image: LocalImage, part: int = 0, block: int = 7) -> bytes:
    out, buf = bytearray(), bytearray(block)
    while n := image.readinto(len(out), buf, part):
        out += buf[:n]
    return bytes(out)


def test_a_unified_image_is_its_one_file_read_at_any_offset(tmp_path):
    data = os.urandom(100_000)
    with open_image(folder(tmp_path, {FP: data}), FP, size=len(data), owner=os.getuid()) as image:
        assert not image.split and image.size == len(data)
        buf = bytearray(4096)
        assert image.readinto(50_000, buf) == 4096 and bytes(buf) == data[50_000:54_096]
        assert image.readinto(len(data) - 10, memoryview(buf)) == 10  # short only at the end
        assert image.readinto(len(data), buf) == 0
        assert read_all(image, block=4093) == data


def test_a_split_image_is_its_two_files_metadata_first(tmp_path):
    meta, rootfs = os.urandom(3000), os.urandom(70_000)
    images = folder(tmp_path, {FP: meta, FP + ".rootfs": rootfs})
    with open_image(images, FP, size=len(meta) + len(rootfs), owner=os.getuid()) as image:
        assert image.split and [p.size for p in image.parts] == [len(meta), len(rootfs)]
        assert read_all(image, 0) == meta and read_all(image, 1, block=8192) == rootfs


@pytest.mark.parametrize("case", ["wrong size", "wrong owner", "group-writable", "no such image",
                                  "not a fingerprint", "no folder"])
def test_files_that_are_not_the_servers_own_are_not_used(tmp_path, case):
    data = b"x" * 1000
    images = folder(tmp_path, {FP: data}, mode=0o620 if case == "group-writable" else 0o600)
    fp = {"no such image": "0" * 64, "not a fingerprint": "../" + FP}.get(case, FP)
    where = tmp_path / "elsewhere" if case == "no folder" else images
    owner = os.getuid() + 1 if case == "wrong owner" else os.getuid()
    assert open_image(where, fp, size=999 if case == "wrong size" else 1000, owner=owner) is None


def test_a_link_or_a_fifo_in_place_of_an_image_is_not_followed(tmp_path):
    images = folder(tmp_path, {})
    (tmp_path / "secret").write_bytes(b"not an image")
    os.symlink(tmp_path / "secret", images / FP)
    assert open_image(images, FP, owner=os.getuid()) is None
    os.unlink(images / FP)
    os.mkfifo(images / FP, 0o600)
    assert open_image(images, FP, owner=os.getuid()) is None  # returns at once: O_NONBLOCK


def test_a_rootfs_that_cannot_be_used_fails_the_whole_image(tmp_path):
    images = folder(tmp_path, {FP: b"meta"})
    (images / (FP + ".rootfs")).write_bytes(b"rootfs")
    os.chmod(images / (FP + ".rootfs"), 0o666)
    assert open_image(images, FP, owner=os.getuid()) is None


def test_the_images_folder_is_beside_the_socket():
    assert images_folder("/var/snap/lxd/common/lxd/unix.socket") == Path("/var/snap/lxd/common/lxd/images")
    assert images_folder("/var/lib/incus/unix.socket") == Path("/var/lib/incus/images")


@pytest.mark.lxd
def test_the_files_are_byte_for_byte_the_exports_lxd_serves(sandbox, images, exported):
    """LXD's export of a unified image is its file; a split image's two parts are its two files."""
    where = images_folder(sandbox.socket)
    assert where == sandbox.lxd_dir / "images"
    for role in ("plain", "gz", "split", "vm"):
        fp = images.fps[role]
        record = sandbox.rest(f"/1.0/images/{fp}")
        with open_image(where, fp, size=record["size"]) as image:
            served = sorted(exported[role].iterdir(), key=lambda p: not p.name.startswith("meta-"))
            assert image.split == (len(served) == 2), role
            for part, path in enumerate(served):
                assert read_all(image, part, block=1 << 20) == path.read_bytes(), (role, path.name)


@pytest.mark.skipif(os.getuid() != 0, reason="the read path takes only root's files (the server's)")
def test_blocks_are_read_from_the_file_and_it_is_left_for_good_at_a_short_read(tmp_path):
    from lxdimagefs.data.blocks import BLOCK

    data = os.urandom(3 * BLOCK)
    images = folder(tmp_path, {FP: data})
    local = LocalImages(images)
    try:
        buf = bytearray(BLOCK)
        assert local.readinto(FP, len(data), 0, memoryview(buf)) and buf == data[:BLOCK]
        os.truncate(images / FP, BLOCK + 10)  # the server cut the file under us
        assert not local.readinto(FP, len(data), BLOCK, memoryview(buf))  # the socket serves it
        os.truncate(images / FP, 0)
        (images / FP).write_bytes(data)
        assert not local.readinto(FP, len(data), 2 * BLOCK, memoryview(buf))  # not reopened: the socket's
    finally:
        local.close()
    other = LocalImages(images)
    try:
        assert not other.readinto(FP, len(data) + 1, 0, memoryview(buf))  # not the record's size
    finally:
        other.close()


@pytest.mark.skipif(os.getuid() != 0, reason="the read path takes only root's files (the server's)")
def test_a_verified_images_file_is_read_from_any_thread_and_asked_of_the_disk_ahead(tmp_path):
    """LocalImages: what serves a verified image's blocks in FUSE's threads (the caller checks them)."""
    mib = 1 << 20
    data = os.urandom(24 * mib)
    split_fp = hashlib.sha256(b"a split image").hexdigest()
    images = folder(tmp_path, {FP: data, split_fp: b"metadata", split_fp + ".rootfs": b"rootfs"})
    evict(images / FP)
    local = LocalImages(images)
    try:
        got: dict[int, bytes] = {}

        def read(index: int) -> None:
            buf = bytearray(mib)
            assert local.readinto(FP, len(data), index * mib, memoryview(buf))
            got[index] = bytes(buf)

        threads = [threading.Thread(target=read, args=(i,)) for i in (0, 1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert b"".join(got[i] for i in (0, 1, 2)) == data[:3 * mib]
        deadline = time.monotonic() + 10
        while resident_pages(images / FP, 4 * mib, 17 * mib) < 13 * 256 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident_pages(images / FP, 4 * mib, 17 * mib) == 13 * 256  # asked ahead of the reader
        tail = bytearray(mib)
        assert not local.readinto(FP, len(data), len(data) - 10, memoryview(tail))  # past its end
        assert not local.readinto(FP, len(data) + 1, 0, memoryview(tail))  # not the record's size
        assert not local.readinto(split_fp, 14, 0, memoryview(bytearray(4)))  # a split image: the spool's
    finally:
        local.close()
