"""A simplestreams VM item (`disk-kvm.img`, a qcow2 beside `lxd.tar.xz`): its guest's files under
contents/ through the same disk path as a private LXD's VM image, read by HTTP range, not downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmdisk
from mounts import unmount, wait_mounted
from streams_server import Entry, LoopbackCA, StreamsServer, write_index

pytestmark = pytest.mark.lxd

NATIVE = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]


@pytest.fixture
def streams_vm(tmp_path: Path) -> Iterator[tuple[Path, StreamsServer, str]]:
    """A mount of a loopback simplestreams server holding one small VM image; its fingerprint."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text('ID=vmtest\nVERSION_ID="1"\n')
    root = vmdisk.root_tree(tree, tmp_path / "root")
    meta, disk = vmdisk.vm_image(tmp_path / "vm", root, vmdisk.esp_tree(tmp_path / "esp"), "zstd")
    ca = LoopbackCA.make(tmp_path / "ca")
    fps = write_index(tmp_path / "www", [Entry(f"vmos:1:{NATIVE}:default", NATIVE, "20261205_00:00",
                                               "vmos/1", (meta, disk))])
    streams = StreamsServer(tmp_path / "www", ca).start()
    env = {**os.environ, "LXD_CONF": str(tmp_path / "conf"), "INCUS_CONF": str(tmp_path / "no-incus"),
           "SSL_CERT_FILE": str(ca.bundle)}
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        subprocess.run(["lxc", "remote", "add", "sst", streams.url, "--protocol", "simplestreams",
                        "--public"],
                       env=env, check=True, capture_output=True)
        done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--log-file", str(tmp_path / "log"),
                               "--cache-dir", str(tmp_path), "sst", str(where)],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_mounted(where, timeout=1)
        yield where, streams, next(iter(fps.values()))
    finally:
        unmount(where)
        streams.stop()


def test_a_simplestreams_vm_items_guest_files(streams_vm: tuple[Path, StreamsServer, str]) -> None:
    where, streams, fp = streams_vm
    inside = where / "contents" / "by-fingerprint" / fp
    streams.requests.clear()
    assert (inside / "rootfs/etc/os-release").read_text() == 'ID=vmtest\nVERSION_ID="1"\n'
    assert (inside / "rootfs/boot/efi/EFI/BOOT/BOOTX64.EFI").stat().st_size == 150_000
    assert not (inside / "rootfs-not-shown.txt").exists()
    served = next((streams.root / "images").rglob("rootfs.img"))
    ranges = [r.split("range=bytes=")[1].split()[0] for r in streams.requests if "rootfs.img" in r]
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.split("-") for r in ranges if r.split("-")[1]))
    assert ranges and fetched < served.stat().st_size  # the clusters needed, not the whole disk
