"""contents/disk/ against hostile disks, crafted byte by byte where a real LXD adds nothing (the
mount-level cases are in test_vm_rootfs.py): each fault is EIO for its own call, with the reason;
memory stays bounded and nothing loops for ever."""

from __future__ import annotations

import errno
import io
import logging
import struct
import subprocess
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard

from lxdimagefs.contents.disk.ext4root import Ext4Rootfs
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader
from lxdimagefs.contents.disk.root import NOTE, GuestTree, vm_root

CLUSTER = 1 << 16


def _qcow2(l2_entry: int, payload: bytes = b"", zstd: bool = False, backing: bool = False) -> bytes:
    """A v3 qcow2 of one 64 KiB guest cluster: header, L1 at 64 KiB, L2 at 128 KiB, `payload` at
    192 KiB; the guest cluster's L2 entry is `l2_entry`."""
    head = bytearray(CLUSTER)
    struct.pack_into(">4sIQIIQIIQQIIQQQQII", head, 0, b"QFI\xfb", 3, 512 * backing, 4 * backing,
                     16, CLUSTER, 0, 1, CLUSTER, 0, 0, 0, 0, 8 * zstd, 0, 0, 4, 112)
    head[104] = 1 if zstd else 0
    head[512:516] = b"base"
    l1 = struct.pack(">Q", (1 << 63) | 2 * CLUSTER).ljust(CLUSTER, b"\0")
    l2 = struct.pack(">Q", l2_entry).ljust(CLUSTER, b"\0")
    return bytes(head) + l1 + l2 + payload


def _compressed(payload: bytes) -> int:
    """The L2 entry of a compressed cluster at 192 KiB, `payload` long."""
    sectors = (len(payload) + 511) // 512
    return (1 << 62) | ((sectors - 1) << 54) | 3 * CLUSTER


def _read_all(image: bytes) -> bytes:
    return Qcow2Reader(io.BytesIO(image)).read(CLUSTER)


def test_the_crafted_image_reads_when_it_is_sound() -> None:  # the cases below fail for their fault alone
    data = bytes(range(256)) * 256
    deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
    packed = deflater.compress(data) + deflater.flush()
    assert _read_all(_qcow2(_compressed(packed), packed)) == data
    packed = zstandard.ZstdCompressor().compress(data)
    assert _read_all(_qcow2(_compressed(packed), packed, zstd=True)) == data


def test_an_l2_entry_past_the_end_of_the_file_is_eio() -> None:
    with pytest.raises(OSError) as caught:
        _read_all(_qcow2((1 << 63) | 64 * CLUSTER))
    assert caught.value.errno == errno.EIO and "past the end of the file" in str(caught.value)


@pytest.mark.parametrize("zstd", [False, True])
def test_a_cluster_inflating_past_its_size_is_eio_in_bounded_memory(zstd: bool) -> None:
    huge = bytes(256 << 20)  # 256 MiB of zeros in a few KiB
    if zstd:
        packed = zstandard.ZstdCompressor(level=3).compress(huge)
    else:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -12)
        packed = deflater.compress(huge) + deflater.flush()
    del huge
    image = _qcow2(_compressed(packed), packed, zstd=zstd)
    tracemalloc.start()
    try:
        with pytest.raises(OSError) as caught:
            _read_all(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.errno == errno.EIO and "not the cluster size" in str(caught.value)
    assert peak < 4 * CLUSTER + len(image), peak  # a cluster and a bit, never the 256 MiB it claims


def test_a_backing_file_shows_the_metadata_and_says_why(caplog) -> None:
    top = type("Top", (), {"lookup": lambda self, path: None, "list": lambda self, path: {}})()
    with caplog.at_level(logging.WARNING):
        shown, tree = vm_root(top, io.BytesIO(_qcow2(0, backing=True)), "x.qcow2")
    assert tree is None and isinstance(shown.list("/"), dict) and NOTE in shown.list("/")
    assert b"backing file" in shown.read(shown.lookup(NOTE), 1000, 0)
    assert "backing file" in caplog.text


@pytest.fixture(scope="module")
def hostile_ext4(tmp_path_factory) -> dict[str, Path]:
    """An ext4 holding /a/b and a 200 kB /a/f: sound, with a/b/up linking back to /a (a loop), with
    /a/f's extent tree claiming depth 6, with its one index block pointing at itself, and with its
    one extent claiming 32,768 blocks, past the volume's end (the `ext4` package read it as zeros)."""
    work = tmp_path_factory.mktemp("ext4")
    (work / "t/a/b").mkdir(parents=True)
    (work / "t/a/f").write_bytes(b"f" * 200_000)
    sound = work / "sound.img"
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", "-d", str(work / "t"), str(sound), "8M"], check=True)
    images = {"sound": sound}
    first = int(subprocess.run(["debugfs", "-R", "bmap /a/f 0", str(sound)], capture_output=True, text=True,
                               check=True).stdout.split()[-1])  # /a/f's first block: its index node
    self_loop = ["sif /a/f block[0] 0x0001F30A", "sif /a/f block[1] 0x00010004", "sif /a/f block[3] 0",
                 f"sif /a/f block[4] {first}", "sif /a/f block[5] 0"]
    past = ["sif /a/f block[4] 32768"]  # its one extent (in the inode) claims 32,768 blocks: ee_len
    for name, commands in {"loop": ["link /a /a/b/up"], "deep": ["sif /a/f block[1] 0x00060004"],
                           "self": self_loop, "past": past}.items():
        images[name] = work / f"{name}.img"
        images[name].write_bytes(sound.read_bytes())
        subprocess.run(["debugfs", "-w", "-f", "-", str(images[name])], input="\n".join(commands).encode(),
                       check=True, capture_output=True)
    with open(images["self"], "r+b") as f:  # an index node of depth 1 pointing at itself
        f.seek(first * 1024)
        f.write(struct.pack("<HHHHIIIHH", 0xF30A, 1, 4, 1, 0, 0, first, 0, 0))
    return images


def _within(seconds: float, call):
    """`call`'s result or exception, failing the test if it has not returned (it loops)."""
    out: list = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as e:
            out.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, "still running: a loop"
    return out[0]


@pytest.mark.parametrize("case", ["loop", "deep", "self", "past"])
def test_a_hostile_ext4_is_eio_for_its_fault_alone_with_a_log_line(hostile_ext4, case, caplog) -> None:
    disk = io.BytesIO(hostile_ext4[case].read_bytes())
    tree = GuestTree("vm.qcow2", Ext4Rootfs(io.BufferedReader(disk)))  # type: ignore[arg-type]
    path = "/a/b/up/b" if case == "loop" else "/a/f"
    with caplog.at_level(logging.WARNING):
        got = _within(60, lambda: tree.read(tree.lookup(path), 300_000, 0))
    assert isinstance(got, OSError) and got.errno == errno.EIO, got
    assert {"loop": "directory loop", "deep": "depth 6", "self": "depth 1 where 0",
            "past": "an extent past the end of the filesystem"}[case] in caplog.text
    assert caplog.text.count("vm.qcow2") == 1
    assert tree.lookup("/a/b") is not None  # the rest reads on
    if case == "loop":
        assert tree.read(tree.lookup("/a/f"), 10, 0) == b"f" * 10
