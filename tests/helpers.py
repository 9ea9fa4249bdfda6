"""What many tests ask of files, the private LXD and a mount, written once."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lxd_sandbox import make_unified


def sha(*paths: Path | str) -> str:
    """The sha256 of these files' bytes, one after the other (a split image's fingerprint)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def big_tarball(where: Path, label: str, size: int = 768 << 20) -> tuple[Path, str]:
    """An uncompressed image tarball of `size` bytes of zeros (a sparse blob: quick to make) that
    LXD takes more than a second to unpack, and its fingerprint; `label` makes it an image of its own."""
    blob, meta = where / "blob", where / "metadata.yaml"
    with open(blob, "wb") as f:
        f.truncate(size)
    meta.write_text("architecture: x86_64\ncreation_date: 1700000000\n"
                    f"properties:\n  description: {label} {os.getpid()} {where.name}\n")
    tarball = where / "big.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(meta, "metadata.yaml")
        tar.add(blob, "rootfs/blob")
    blob.unlink()
    return tarball, sha(tarball)


def zeros_tar_zst(where: Path, zeros: int, noise: int = 64 << 10) -> Path:
    """`where` (.tar.zst): an image whose rootfs holds `zeros` bytes of zeros beside `noise` bytes
    of noise, at zstd -19: a few KiB for hundreds of MiB (a decode stops past 200 times the
    export's size: noise keeps it under that where a test needs the whole decode)."""
    import subprocess

    tar = make_unified(where.with_suffix(""), rootfs_bytes=noise)
    blank = where.with_name(where.name + ".zeros")
    with open(blank, "wb") as f:
        f.truncate(zeros)
    with tarfile.open(tar, "a") as t:
        t.add(blank, "rootfs/zeros")
    blank.unlink()
    subprocess.run(["zstd", "-q", "-19", str(tar), "-o", str(where)], check=True)
    tar.unlink()
    return where


def lxd_fps(sandbox: Any) -> set[str]:
    """The fingerprints the private LXD holds, asked of LXD itself."""
    return {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}


def within(check: Callable[[], object], seconds: float = 1.0) -> float:
    """Seconds until `check()` holds; fails past `seconds`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - started


def export_of(mount: Any, fp: str) -> Path:
    """The (first) export file in a mount's folder of an image."""
    folder = mount.path / "by-fingerprint" / fp
    return folder / next(n for n in sorted(os.listdir(folder)) if n != "metadata.json")


def imported_unified(sandbox: Any, path: Path, rootfs_bytes: int) -> Iterator[str]:
    """A unified image of one test's own in the private LXD, for a fixture: deleted after it."""
    with deleting(sandbox, {"": sandbox.import_image(make_unified(path, rootfs_bytes=rootfs_bytes))}) as fps:
        yield fps[""]


@contextlib.contextmanager
def deleting(sandbox: Any, fps: dict[str, str]) -> Iterator[dict[str, str]]:
    """Images a fixture imported (more may be added inside): deleted from LXD when it ends."""
    try:
        yield fps
    finally:
        for fp in fps.values():
            sandbox.lxc("image", "delete", fp, check=False)


def resident_pages(path: Path, start: int, end: int) -> int:
    """Pages of [start, end) of a file in the page cache (mincore: looking does not read them in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        at = ctypes.c_char.from_buffer(mapped)
        pages = (ctypes.c_ubyte * ((end - start) // 4096))()
        address = ctypes.c_void_p(ctypes.addressof(at) + start)
        done = libc.mincore(address, ctypes.c_size_t(end - start), pages)
        del at
        assert done == 0, os.strerror(ctypes.get_errno())
        return sum(p & 1 for p in pages)


def evict(path: Path) -> None:
    """Write the file out and drop it from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
