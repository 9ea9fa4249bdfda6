"""contents/ of .tar.zst and .tar.lzma images: decoded once per mount into a checked plain tarball.

Each test imports one small image (8 MiB) into the session's LXD and mounts once; about 5-10 s.
"""

from __future__ import annotations

import subprocess
import tarfile

import pytest
from helpers import zeros_tar_zst
from lxd_sandbox import make_split, make_unified
from mounts import socket_mounted as mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

MIB = 1 << 20


def test_a_truncated_tar_zst_that_lxd_took_is_eio_inside_never_short_bytes(sandbox, tmp_path):
    """LXD reads only metadata.yaml of a unified image, so it takes a .tar.zst cut short after it.
    Its sha256 is its fingerprint: the cut must show up as EIO inside, not as a shorter file
    (zstandard's stream reader ends quietly where its input does)."""
    tar = make_unified(tmp_path / "t.tar", rootfs_bytes=8 * MIB)
    with tarfile.open(tar) as t:
        want = t.extractfile("rootfs/blob").read()
    packed = tmp_path / "t.tar.zst"
    subprocess.run(["zstd", "-q", str(tar), "-o", str(packed)], check=True)
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) - 2 * MIB])  # inside rootfs/blob's bytes
    try:
        fp = sandbox.import_image(packed)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"this LXD refuses a truncated .tar.zst: {e.stderr!r}")
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            blob = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob"
            run = subprocess.run(["cat", str(blob)], capture_output=True)
            assert run.stdout != want  # it cannot be: the bytes are not in the image
            assert run.returncode != 0, f"{len(run.stdout)} of {len(want)} bytes, exit status 0"
            assert b"Input/output error" in run.stderr
            spooled = tmp_path.glob("lxdimagefs-spool-*/*")
            assert not [p for p in spooled if ".tar" in p.name]  # nothing half-made kept
            assert (m.path / "contents" / "by-fingerprint" / fp).is_dir()  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_tar_zst_of_several_frames_and_a_skippable_one_reads_whole(sandbox, tmp_path):
    """What zstd itself decodes (frames one after another, skippable frames between) is read
    whole: the check that no frame is cut short does not refuse it."""
    import zstandard

    tar = make_unified(tmp_path / "f.tar", rootfs_bytes=6 * MIB)
    with tarfile.open(tar) as t:
        want = t.extractfile("rootfs/blob").read()
    data, half = tar.read_bytes(), 3 * MIB
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"lxdfs"
    packed = tmp_path / "f.tar.zst"
    packed.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data[:half]) + skippable
                       + zstandard.ZstdCompressor(write_content_size=False).compress(data[half:]))
    assert subprocess.run(["zstd", "-dc", str(packed)], capture_output=True, check=True).stdout == data
    fp = sandbox.import_image(packed)
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            assert (m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob").read_bytes() == want
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.lzma"])
def test_a_copy_changed_since_its_check_is_an_integrity_error_where_the_decoder_fails_first(tmp_path, suffix):
    """A kept export damaged after this daemon checked it (it is checked once per daemon) makes the
    decoder fail before the hash is done: still the integrity error, so the caller drops that copy
    (a decoder's error alone would leave it, and the image EIO for the daemon's life)."""
    import hashlib
    import lzma

    from lxdimagefs.data.exports import decode
    from lxdimagefs.errors import IntegrityError

    tar = make_unified(tmp_path / "c.tar", rootfs_bytes=2 * MIB)
    packed = tmp_path / f"c{suffix}"
    if suffix == ".tar.zst":
        subprocess.run(["zstd", "-q", str(tar), "-o", str(packed)], check=True)
    else:
        packed.write_bytes(lzma.compress(tar.read_bytes(), format=lzma.FORMAT_ALONE))
    fp = hashlib.sha256(packed.read_bytes()).hexdigest()
    with open(packed, "r+b") as f:  # the copy rots after its check
        f.seek(MIB)
        f.write(bytes(4096))
    with pytest.raises(IntegrityError):
        decode(packed, tmp_path / "out.tar", fp, suffix.rsplit(".", 1)[1])
    assert [p.name for p in tmp_path.iterdir() if "out.tar" in p.name] == []  # nothing half-made


def test_a_local_servers_tar_zst_is_decoded_from_its_own_file_without_a_download(sandbox, tmp_path):
    """As root beside the server (the default), the image's own file is decoded: no export is
    asked of LXD and nothing is spooled; the decoded tarball is kept for later mounts."""
    from mounts import mounted as default_mounted

    tar = make_unified(tmp_path / "l.tar", rootfs_bytes=4 * MIB)
    with tarfile.open(tar) as t:
        want = t.extractfile("rootfs/blob").read()
    packed = tmp_path / "l.tar.zst"
    subprocess.run(["zstd", "-q", str(tar), "-o", str(packed)], check=True)
    fp = sandbox.import_image(packed)
    try:
        for n in range(2):
            with default_mounted(sandbox, tmp_path / f"mnt{n}") as m:
                assert (m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob").read_bytes() == want
                log = m.log_text()
                asked = [line for line in log.splitlines() if f"/1.0/images/{fp}/export" in line]
                assert all(line.endswith(" 206 1") for line in asked), asked  # the name's 1-byte probe only
                assert "spooled " + fp not in log, log[-2000:]
                assert ("decoded " + fp in log) == (n == 0)  # the second mount finds it kept
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_tar_zst_cut_at_a_frame_boundary_is_eio_inside_never_a_short_file(sandbox, tmp_path):
    """A .tar.zst whose last frames are missing is whole to zstd (it ends where a frame ends), and
    LXD takes it (it reads only metadata.yaml): the tarball it decodes to stops inside rootfs/blob.
    Reading that file must fail, not end early with exit status 0 (its size says more)."""
    import zstandard

    tar = make_unified(tmp_path / "b.tar", rootfs_bytes=8 * MIB)
    data = tar.read_bytes()
    packed = tmp_path / "b.tar.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(data[: 4 * MIB]))  # the first frame alone
    fp = sandbox.import_image(packed)
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            blob = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob"
            run = subprocess.run(["cat", str(blob)], capture_output=True)
            assert run.returncode != 0, f"{len(run.stdout)} of {8 * MIB} bytes, exit status 0"
            assert b"Input/output error" in run.stderr
            assert (m.path / "contents" / "by-fingerprint" / fp).is_dir()  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.lzma"])
def test_a_split_image_whose_metadata_is_a_tar_zst_shows_its_contents(sandbox, tmp_path, suffix):
    """A split image's metadata tarball may be zstd or lzma (its export is then meta-<fp>.tar.zst):
    it is one part of a multipart export, never a unified export to decode whole, and is decoded
    in memory from its checked reader (before: EIO, the multipart body in the log)."""
    import lzma

    meta, rootfs = make_split(tmp_path / "s")
    packed, plain = meta.with_name("meta" + suffix), lzma.decompress(meta.read_bytes())
    if suffix == ".tar.zst":
        subprocess.run(["zstd", "-q", "-o", str(packed)], input=plain, check=True)
    else:
        packed.write_bytes(lzma.compress(plain, format=lzma.FORMAT_ALONE))
    fp = sandbox.import_image(packed, rootfs)
    try:
        with mounted(sandbox, tmp_path / "mnt") as m:
            inside = m.path / "contents" / "by-fingerprint" / fp
            assert (inside / "metadata.yaml").read_bytes().startswith(b"architecture")
            assert (inside / "rootfs" / "etc" / "hostname").read_text().startswith("s")
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("noise, nothing, why", [(64 << 10, 256 * MIB, "200 times the export's size"),
                                               (MIB, 128 * MIB, "filesystem free")])
def test_a_decompression_bomb_stops_at_the_bound_is_eio_and_is_not_set_off_again(sandbox, tmp_path, noise,
                                                                                  nothing, why):
    """A .tar.zst of a few KiB that holds 256 MiB of zeros (past 200 times its size), or of 1 MiB
    that holds 128 MiB (within that, but past the room), read inside through a mount whose cache
    folder is a 64 MiB tmpfs: the decode stops before the filesystem fills, contents/ of that
    image is EIO (not ENOSPC), with one log line saying why, nothing half-made is left, and later
    lookups do not decode again."""
    import os

    packed = zeros_tar_zst(tmp_path / "b.tar.zst", nothing, noise)
    assert packed.stat().st_size < 2 * MIB
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,mode=0755", "tmpfs", str(small)], check=True)
    fp = sandbox.import_image(packed)
    try:
        with mounted(sandbox, tmp_path / "mnt", "--cache-dir", str(small)) as m:
            inside = m.path / "contents" / "by-fingerprint" / fp
            for _ in range(3):
                with pytest.raises(OSError) as e:
                    os.listdir(inside / "rootfs")
                assert e.value.errno == 5, e.value  # EIO, never ENOSPC
                fs = os.statvfs(small)
                assert fs.f_bavail > 0.04 * fs.f_blocks  # the folder never filled
            assert m.log_text().count("is EIO until the mount ends") == 1, m.log_text()[-2000:]
            assert why in m.log_text()
            assert (m.path / "by-fingerprint" / fp / "metadata.json").read_bytes()  # still serving
        assert not [p for p in small.rglob("*") if p.is_file() and ".tar" in p.name]  # nothing half-made
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
        subprocess.run(["umount", str(small)], check=False)
