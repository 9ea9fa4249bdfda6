"""`lxdimagefs cache [--cache-dir DIR] du | ls | verify | prune [--max SIZE] [FINGERPRINT…]`: what
the daemons keep on disk for which image, checked against its manifest, removed.

It names and drops files as the daemon does (data/diskcache.py: `DiskCache.drop`, the least
recently used first), so it is safe while mounts use the folder: a daemon reading a dropped file
goes on with the descriptor it holds or fetches again, and checks every block either way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.diskcache import MAGIC, DiskCache
from lxdimagefs.data.manifest import DIGEST, Manifest, digest
from lxdimagefs.keys import Sha256
from lxdimagefs.mount.options import UsageError, parse_size

# What each kept file is, and whose: the disk cache's (diskcache._NAME) and contents/' indexes.
_KIND = re.compile(r"(export|manifest|part|index)-(?:[0-9a-f]{16}-)?([0-9a-f]{64})(?:[.-].*)?")
COMMANDS = ("du", "ls", "verify", "prune")


def disk_cache_root(cache_dir: str | None) -> Path:
    """Where verified exports are kept: beside --cache-dir's other files, else the user's cache."""
    if cache_dir:
        return Path(cache_dir) / f"lxdimagefs-cache-{os.getuid()}"
    if os.geteuid() == 0:
        return Path("/var/cache/lxdimagefs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lxdimagefs"


def made_cache_dir(path: str) -> None:
    """--cache-dir made when it does not exist (0700, this user's); an existing one is left as it is."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"cache folder {path} is not a folder")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cache folder {path}: {e.strerror}") from None


@dataclass
class Held:
    """What is kept for one image: bytes on disk by kind, and when it was last used."""

    sizes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    used: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def holdings(folders: list[Path]) -> dict[str, Held]:
    found: dict[str, Held] = defaultdict(Held)
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _KIND.fullmatch(entry.name)
            if match is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # dropped meanwhile
            held = found[match.group(2)]
            held.sizes[match.group(1)] += st.st_blocks * 512
            held.used = max(held.used, st.st_mtime)
    return found


def _check(path: Path, manifest: Manifest) -> tuple[int, int]:
    """(blocks that match, blocks that do not) of a kept file; holes (never fetched) are neither."""
    good = bad = 0
    buf = bytearray(BLOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 0
    try:
        for index in range(manifest.blocks):
            offset = index * BLOCK
            try:
                if os.lseek(fd, offset, os.SEEK_DATA) != offset:
                    continue
            except OSError:  # ENXIO: nothing past here
                break
            n = os.preadv(fd, [buf], offset)
            length = min(BLOCK, manifest.total - offset)
            ok = n >= length and manifest.admit(index, memoryview(buf)[:length])
            good, bad = good + ok, bad + (not ok)
    finally:
        os.close(fd)
    return good, bad


def verify(cache: DiskCache, fp: str) -> tuple[int, int]:
    """(blocks that match, blocks that do not) of one image's kept export and parts, each against
    its sealed manifest: `manifest-FP` the export's, `manifest-[SERVER-]FP.N` part N's."""
    good = bad = 0
    for path in cache.root.glob(f"manifest-*{Sha256(fp)}*"):
        found = re.fullmatch(rf"manifest-(?:[0-9a-f]{{16}}-)?{fp}(?:\.(\d))?", path.name)
        if found is None:
            continue
        data = cache.export(fp) if found.group(1) is None else cache.part(fp, int(found.group(1)))
        manifest = _read(fp, path)
        if manifest is None:
            bad += 1  # a manifest that does not read: the daemon drops it
            continue
        g, b = _check(data, manifest)
        good, bad = good + g, bad + b
    return good, bad


def _read(fp: str, path: Path) -> Manifest | None:
    """A sealed manifest as diskcache.seal wrote it (magic, size, digests, its own digest)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    body, trailer, head = raw[:-DIGEST], raw[-DIGEST:], len(MAGIC) + 8
    if not body.startswith(MAGIC) or digest(body) != trailer:
        return None
    try:
        return Manifest(fp, int.from_bytes(body[len(MAGIC):head], "little"), body[head:])
    except ValueError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lxdimagefs cache", description="What lxdimagefs keeps on disk "
                                "(verified exports, split parts, decoded tarballs, contents/ indexes).")
    p.add_argument("--cache-dir", metavar="DIR", help="as given to the mounts (default: $TMPDIR, and "
                   "the disk cache in ~/.cache/lxdimagefs, /var/cache/lxdimagefs for root)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("du", help="bytes kept, by folder")
    sub.add_parser("ls", help="one line per image: bytes kept, by kind, and when last used")
    sub.add_parser("verify", help="check every kept block against its image's manifest (exit 1 "
                   "if one does not match)")
    prune = sub.add_parser("prune", help="remove the images named, and/or the least recently used "
                           "until --max is met (safe while mounts use the folder)")
    prune.add_argument("--max", metavar="SIZE", type=parse_size, help="keep at most SIZE (K, M, G)")
    prune.add_argument("fingerprints", nargs="*", metavar="FINGERPRINT")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cache_dir and not os.path.isdir(args.cache_dir):
        print(f"lxdimagefs cache: {args.cache_dir} does not exist", file=sys.stderr)
        return 2
    base = Path(args.cache_dir or tempfile.gettempdir())
    disk_root, index_root = disk_cache_root(args.cache_dir), base / f"lxdimagefs-index-{os.getuid()}"
    folders = [disk_root, index_root]
    if args.command == "du":
        for folder in folders:
            print(f"{_size(sum(h.total for h in holdings([folder]).values()))}\t{folder}")
        journal = base / f"lxdimagefs-layouts-{os.getuid()}.jsonl"
        if journal.exists():
            print(f"{_size(journal.stat().st_size)}\t{journal}")
        return 0
    held = holdings(folders)
    if args.command == "ls":
        for fp, h in sorted(held.items(), key=lambda kv: -kv[1].used):
            kinds = ",".join(f"{k}={_size(v)}" for k, v in sorted(h.sizes.items()))
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(h.used))
            print(f"{fp}  {_size(h.total):>7}  {when}  {kinds}")
        return 0
    if args.command == "prune" and (wrong := _unprunable(args.fingerprints, args.max)):
        print(f"lxdimagefs cache prune: {wrong}", file=sys.stderr)
        return 2
    if not disk_root.is_dir():
        return 0  # nothing kept
    cache = DiskCache(disk_root)
    if args.command == "verify":
        damaged = 0
        for fp in sorted(held):
            good, bad = verify(cache, fp)
            if good or bad:
                print(f"{fp}  {'DAMAGED' if bad else 'ok'}  {good} blocks match, {bad} do not")
            damaged += bad > 0
        return 1 if damaged else 0
    return prune(cache, index_root, held, args.fingerprints, args.max)


def _unprunable(named: list[str], max_bytes: int | None) -> str | None:
    if not named and max_bytes is None:
        return "name FINGERPRINTs, or give --max SIZE (--max 0 empties it)"
    wrong = [fp for fp in named if not re.fullmatch(r"[0-9a-f]{64}", fp)]
    return f"not a fingerprint: {wrong[0]}" if wrong else None


def prune(cache: DiskCache, index_root: Path, held: dict[str, Held], named: list[str],
          max_bytes: int | None) -> int:
    order = named + [fp for fp, _ in sorted(held.items(), key=lambda kv: kv[1].used) if fp not in named]
    total = sum(h.total for h in held.values())
    for fp in order:
        if fp not in named and (max_bytes is None or total <= max_bytes):
            break
        cache.drop(fp)  # as the daemon's eviction does
        for index in index_root.glob(f"index-*{fp}*"):
            index.unlink(missing_ok=True)
        total -= held[fp].total if fp in held else 0
        print(f"removed {fp}")
    return 0
