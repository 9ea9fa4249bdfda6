"""An index is kept for later mounts only when it was built from checked bytes (issue #27, 1).

A mount that lists inside an image not yet verified reads only its headers, lazily, before
any check: an index it kept would answer, in a later mount where the image verifies, with
what those bytes said (another file's bytes under a name). One small image, two mounts.
"""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
from helpers import export_of, sha
from lxd_sandbox import _metadata, _Noise
from mounts import mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

A, B = b"this is file A\n", b"this is file B\n"


def _image(path):
    """metadata.yaml, two files of one size, then 24 MiB the index pass seeks over (unread)."""
    with tarfile.open(path, "w") as tar:
        for name, data in (("metadata.yaml", _metadata("swapped headers", "swap")),
                           ("rootfs/etc/aaaa", A), ("rootfs/etc/bbbb", B)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("rootfs/blob")
        info.size = 24 << 20
        tar.addfile(info, _Noise("blob", info.size))
    return path


def _swap_headers(path):
    """The two files' 512-byte headers swapped in place: each keeps its own checksum."""
    with open(path, "r+b") as f:
        data = bytearray(f.read(8192))
        a, b = data.index(b"rootfs/etc/aaaa"), data.index(b"rootfs/etc/bbbb")
        data[a:a + 512], data[b:b + 512] = data[b:b + 512], data[a:a + 512]
        f.seek(0)
        f.write(data)


def test_an_index_built_before_the_check_is_not_taken_up_by_a_later_mount(sandbox, tmp_path):
    fp = sandbox.import_image(_image(tmp_path / "swap.tar"))
    stored = sandbox.lxd_dir / "images" / fp
    original = stored.read_bytes()
    indexes = tmp_path / "lxdimagefs-index-0"
    try:
        _swap_headers(stored)
        with mounted(sandbox, tmp_path / "m1") as m:
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "etc"
            assert sorted(p.name for p in inside.iterdir()) == ["aaaa", "bbbb"]
            assert (inside / "aaaa").read_bytes() == B  # what the unchecked bytes say, this mount only
        assert not list(indexes.glob("*.sqlite")), "an index of unchecked bytes was kept"
        stored.write_bytes(original)
        with mounted(sandbox, tmp_path / "m2") as m:
            assert sha(export_of(m, fp)) == fp  # verified, and sealed in the disk cache
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "etc"
            got = subprocess.run(["cat", str(inside / "aaaa")], capture_output=True)
            assert got.stdout == A, got
        assert list(indexes.glob("*.checked.sqlite")), "the verified image's index was not kept"
        with mounted(sandbox, tmp_path / "m3") as m:  # the kept index answers, rightly
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "etc"
            assert (inside / "bbbb").read_bytes() == B
    finally:
        stored.write_bytes(original)
        sandbox.lxc("image", "delete", fp, check=False)
