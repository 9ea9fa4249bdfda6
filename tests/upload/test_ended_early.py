"""An upload whose bytes do not end as its image ends is broken off (issue #27, 2).

A writer that fails part-way (its source gives EIO, its disk fills) closes its file normally:
cp, curl, Python's `with`, Go's `defer`. LXD takes a tarball cut anywhere after metadata.yaml,
so the mount must see the cut itself: nothing is created, import/NAME.error says why.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import lxd_fps, sha
from lxd_sandbox import make_split, make_unified

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

# Python copying with `with`, from a source that fails after `cut` bytes: exit 1, the target closed.
COPY_THEN_FAIL = """
import sys
src, dst, cut = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, "rb") as s, open(dst, "wb") as d:
    while chunk := s.read(1 << 17):
        if s.tell() > cut:
            d.write(chunk[:len(chunk) - (s.tell() - cut)])
            raise OSError(5, "Input/output error", src)
        d.write(chunk)
"""


def _copy_then_fail(src, dst, cut):
    return subprocess.run([sys.executable, "-c", COPY_THEN_FAIL, str(src), str(dst), str(cut)],
                          capture_output=True, text=True)


def _error_of(path):
    assert path.exists(), f"no {path.name}"
    text = path.read_text()
    path.unlink()
    return text


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz", ".tar.bz2"])
def test_a_copy_that_fails_part_way_creates_no_image(mnt, sandbox, tmp_path, suffix):
    tarball = make_unified(tmp_path / f"partial{suffix}", rootfs_bytes=6 << 20)
    before = lxd_fps(sandbox)
    done = _copy_then_fail(tarball, mnt.path / "import" / tarball.name, 5 << 19)  # 2.5 MiB
    assert done.returncode == 1 and "Input/output error" in done.stderr
    assert lxd_fps(sandbox) == before  # LXD would have taken the cut tarball
    assert "ended early" in _error_of(mnt.path / "import" / f"{tarball.name}.error")
    assert os.listdir(mnt.path / "import") == []
    # the whole file, copied again, is an image (the check refuses only a cut)
    subprocess.run(["cp", str(tarball), str(mnt.path / "import")], check=True)
    try:
        assert sha(tarball) in lxd_fps(sandbox)
    finally:
        sandbox.lxc("image", "delete", sha(tarball), check=False)


def test_a_split_image_with_a_cut_squashfs_creates_no_image(mnt, sandbox, tmp_path):
    meta, rootfs = make_split(tmp_path / "s", rootfs_bytes=2 << 20)
    before = lxd_fps(sandbox)
    folder = mnt.path / "import" / "cutsplit"
    os.mkdir(folder)
    subprocess.run(["cp", str(meta), str(folder)], check=True)
    done = _copy_then_fail(rootfs, folder / rootfs.name, rootfs.stat().st_size // 2)
    assert done.returncode == 1
    assert lxd_fps(sandbox) == before
    assert "ended early" in _error_of(mnt.path / "import" / "cutsplit.error")
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.mark.parametrize("command", ["zstd -q -c", "xz --format=lzma -c", "xz -T2 --block-size=1MiB -c",
                                     "gzip -c", "bzip2 -c", "cat"])
def test_every_cut_of_a_compressed_tarball_is_seen_and_the_whole_one_passes(tmp_path, command):
    """The check itself, on what the tools make (no mount): a cut anywhere is seen."""
    from lxdimagefs.upload.ending import ending
    from lxdimagefs.upload.streamed import sniff

    tar = make_unified(tmp_path / "u.tar", rootfs_bytes=1 << 20)
    data = subprocess.run(f"{command} {tar}", shell=True, capture_output=True, check=True).stdout

    def early(b: bytes) -> str | None:
        end = ending(sniff(b[:512]) or "")
        for i in range(0, len(b), 65536):
            end.feed(b[i:i + 65536])
        return end.ended_early(len(b))

    assert early(data) is None
    tail = () if command == "cat" else (len(data) - 1025, len(data) - 13, len(data) - 1)  # tar: zero padding
    for cut in (600, len(data) // 3, len(data) // 2, *tail):
        assert early(data[:cut]) is not None, cut


def _noise_qcow2(tmp_path, *options):
    """qemu-img's qcow2 of an 8 MiB disk holding 6 MiB of noise."""
    raw = tmp_path / "raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(6 << 20))
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", *options, str(raw), str(disk)], check=True)
    raw.unlink()
    return disk


def test_a_vm_image_with_a_qcow2_cut_among_its_data_clusters_creates_no_image(mnt, sandbox, tmp_path):
    meta = make_unified(tmp_path / "vm-meta.tar", rootfs_bytes=0, description="vm image")
    disk = _noise_qcow2(tmp_path)
    before = lxd_fps(sandbox)
    folder = mnt.path / "import" / "cutvm"
    os.mkdir(folder)
    subprocess.run(["cp", str(meta), str(folder)], check=True)
    done = _copy_then_fail(disk, folder / disk.name, disk.stat().st_size * 2 // 3)
    assert done.returncode == 1
    assert lxd_fps(sandbox) == before  # LXD takes a qcow2 cut there
    assert "ended early" in _error_of(mnt.path / "import" / "cutvm.error")
    subprocess.run(["rm", "-rf", str(folder)], check=False)
    os.mkdir(folder)  # whole, the same files are an image: only the cut is refused
    subprocess.run(["cp", str(meta), str(disk), str(folder)], check=True)
    made = lxd_fps(sandbox) - before
    try:
        assert len(made) == 1
    finally:
        for fp in made:
            sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("options", [[], ["-c"], ["-o", "refcount_bits=1"],
                                     ["-o", "refcount_bits=64,cluster_size=4096"]])
def test_a_qcow2_cut_among_its_data_clusters_is_seen(tmp_path, options):
    """Before, only the header's tables were checked: a disk cut anywhere after them (among its
    data clusters, most of the file) passed. Made by qemu-img from 6 MiB of noise in an 8 MiB disk."""
    from lxdimagefs.upload.ending import ending

    data = _noise_qcow2(tmp_path, *options).read_bytes()

    def early(b: bytes) -> str | None:
        end = ending("qcow2")
        for i in range(0, len(b), 65536):
            end.feed(b[i:i + 65536])
        return end.ended_early(len(b))

    assert early(data) is None
    for cut in (len(data) // 3, len(data) // 2, len(data) - (70 << 10)):
        assert early(data[:cut]) is not None, cut
    empty = tmp_path / "e.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "8M"], check=True)
    assert early(empty.read_bytes()) is None


def test_a_refused_upload_written_again_under_its_name_with_a_plain_open_lands(mnt, sandbox, tmp_path):
    """`cp junk k.tar` is refused; `rm k.tar.error`, then `open("k.tar", "wb")` (a shell's `>`,
    which does not stat first). The kernel keeps names for an hour where events are followed: the
    refused name must leave its cache, or the open reaches the daemon as an open of a file that is
    not there (ENOENT) instead of a create."""
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(64 << 10))
    target = mnt.path / "import" / "again.tar"
    assert subprocess.run(["cp", str(junk), str(target)], capture_output=True).returncode != 0
    _error_of(mnt.path / "import" / "again.tar.error")
    tarball = make_unified(tmp_path / "again.tar")
    with open(target, "wb") as f:
        f.write(tarball.read_bytes())
    try:
        assert sha(tarball) in lxd_fps(sandbox)
    finally:
        sandbox.lxc("image", "delete", sha(tarball), check=False)
