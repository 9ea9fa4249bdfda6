"""Whole files in the disk cache: a split image's parts, and unified exports a decoder reads by
file descriptor (`.tar.zst`, `.tar.lzma` inside contents/), each checked once per daemon.

LXD serves a split export only whole, so its verified parts are kept whole
(hard-linked from the mount's spool when on the same filesystem), beside a
sums file: each part's size and XXH3-128, then the XXH3-128 of those. A
daemon reads both parts through once before using them (about 20 ms per
100 MB from the page cache); parts that do not match are dropped and the
image is downloaded again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.manifest import DIGEST, Manifest, digest

if TYPE_CHECKING:
    from lxdimagefs.data.diskcache import DiskCache

log = logging.getLogger(__name__)

MAGIC = b"lxdimagefs parts 1\n"


def file_digest(path: Path) -> bytes:
    h = xxhash.xxh3_128()
    buf = bytearray(4 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.digest()


def kept(cache: DiskCache, fp: str) -> list[Path] | None:
    """Both parts, if kept and found intact (checked once per daemon); else None."""
    paths = [cache.part(fp, 0), cache.part(fp, 1)]
    if fp in cache.intact:
        return paths if all(p.exists() for p in paths) else None
    try:
        raw = cache.part(fp, "sum").read_bytes()
    except OSError:
        return None
    body, trailer = raw[:-DIGEST], raw[-DIGEST:]
    want = [(int.from_bytes(body[i:i + 8], "little"), body[i + 8:i + 8 + DIGEST])
            for i in range(len(MAGIC), len(body), 8 + DIGEST)]
    if not body.startswith(MAGIC) or digest(body) != trailer or len(want) != 2:
        log.warning("disk cache: the part sums of %s are damaged; dropped", fp)
        cache.drop(fp)
        return None
    try:
        got = [(p.stat().st_size, file_digest(p)) for p in paths]
    except OSError:
        return None
    if got != want:
        log.warning("disk cache: the parts of %s do not match their sums (damaged or edited); "
                    "fetched again", fp)
        cache.drop(fp)
        return None
    cache.intact.add(fp)
    for p in paths:
        with contextlib.suppress(OSError):
            os.utime(p)
    return paths


def keep(cache: DiskCache, fp: str, verified: list[Path]) -> None:
    """Link (or copy) both parts in, then their sums, by rename: readers see all or nothing."""
    body = bytearray(MAGIC)
    try:
        for index, src in enumerate(verified):
            body += src.stat().st_size.to_bytes(8, "little") + file_digest(src)
            dst = cache.part(fp, index)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}")
            try:
                os.link(src, tmp)  # the spool's file itself, when on the same filesystem
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        sums = cache.part(fp, "sum")
        tmp = sums.with_name(f".{sums.name}.{os.getpid()}")
        tmp.write_bytes(bytes(body) + digest(body))
        os.replace(tmp, sums)
    except OSError as e:
        log.warning("disk cache: cannot keep the parts of %s: %s", fp, e.strerror)


def whole(cache: DiskCache, fp: str, size: int) -> Path | None:
    """A unified export kept whole, if its manifest is sealed and every block matches it."""
    path = cache.export(fp)
    if fp in cache.intact:
        return path if path.exists() else None
    manifest = cache.manifest(fp, size)
    if manifest is None:
        return None
    buf = bytearray(BLOCK)
    try:
        with open(path, "rb", buffering=0) as f:
            for index in range(manifest.blocks):
                n = f.readinto(buf)
                if n != min(BLOCK, size - index * BLOCK) or not manifest.admit(index, memoryview(buf)[:n]):
                    return None  # a block missing (never fetched) or not matching: not whole
    except OSError:
        return None
    cache.intact.add(fp)
    return path


def keep_whole(cache: DiskCache, fp: str, verified: Path) -> None:
    """Keep an export just checked against the fingerprint: the file, then its manifest."""
    size = verified.stat().st_size
    sums = bytearray()
    buf = bytearray(BLOCK)
    dst = cache.export(fp)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(verified, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                sums += digest(memoryview(buf)[:n])
        try:
            os.link(verified, tmp)
        except OSError:
            shutil.copyfile(verified, tmp)
        cache.forget_fd(fp)
        os.replace(tmp, dst)
        cache.seal(Manifest(fp, size, bytes(sums)))
    except OSError as e:
        log.warning("disk cache: cannot keep the export of %s: %s", fp, e.strerror)
        tmp.unlink(missing_ok=True)
