#!/usr/bin/env python3
"""Speed and memory of lxdimagefs, side by side with what a user would use instead.

Starts a private LXD (scripts/lxd_sandbox.py), makes a 1 GiB unified image
and 1,000 small ones, and prints one table of figures and ratios, all from
this one run. Needs root (a private LXD, /proc/sys/vm/drop_caches).

    .venv/bin/python scripts/benchmark.py [--many 1000] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from lxd_sandbox import Sandbox, make_split, make_unified

ROWS: list[tuple[str, str, str]] = []
CACHE_DIR = Path(tempfile.gettempdir())  # set per run in main(): spools and the layout journal


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what:<58} {value:>14}  {note}", flush=True)


def best(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def drops_by_others() -> int:
    """How many times anyone dropped the page cache so far (a shared machine: others' benchmarks do)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return 0


def forget_disk_cache() -> None:
    """A first read must fetch: the disk cache of verified exports (with the mounts' --cache-dir) goes."""
    shutil.rmtree(CACHE_DIR / f"lxdimagefs-cache-{os.getuid()}", ignore_errors=True)


def sh(*args: str, env: dict | None = None) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)


@contextlib.contextmanager
def mount(box: Sandbox, binding: str = "mfusepy", *opts: str, server: tuple[str, ...] = (),
          env_extra: dict[str, str] | None = None) -> Iterator[tuple[Path, subprocess.Popen, Path]]:
    where = Path(tempfile.mkdtemp(prefix="bench-mnt-"))
    log = where.with_suffix(".log")
    env = {**os.environ, "LXDIMAGEFS_FUSE": binding, **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--debug", "--log-file", str(log),
                             *(server or ("--socket", box.socket)), "--cache-dir", str(CACHE_DIR), *opts,
                             str(where)],
                            env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(where):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount with {binding} failed")
            time.sleep(0.05)
        yield where, proc, log
    finally:
        subprocess.run(["fusermount", "-u", str(where)], check=False)
        proc.wait(timeout=30)
        where.rmdir()
        log.unlink(missing_ok=True)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU the daemon has used so far (a fresh mount: all of it is the read)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WORKERS = ("hash", "fetch", "diskwrite")  # the daemon's threads that name themselves (threadname.py)
THREADS = False  # --threads: the daemon's CPU of each first read, by thread


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """User and system CPU so far of a process's threads, summed by name: hash, fetch (all
    workers), diskwrite, and FUSE's threads with everything else."""
    out: dict[str, tuple[float, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = re.sub(r"_\d+$", "", (task / "comm").read_text().strip())
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            key = name if name in WORKERS else "FUSE and the rest"
            user, sys_ = out.get(key, (0.0, 0.0))
            out[key] = (user + int(fields[11]) / tick, sys_ + int(fields[12]) / tick)
    return out


def by_thread(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
              gib: float) -> str:
    """CPU-s/GiB of each thread group between two `thread_cpu` snapshots (sys in brackets)."""
    parts = []
    for key in (*WORKERS, "FUSE and the rest"):
        user, sys_ = after.get(key, (0.0, 0.0))
        user0, sys0 = before.get(key, (0.0, 0.0))
        if user + sys_ - user0 - sys0 > 0:
            parts.append(f"{key} {(user + sys_ - user0 - sys0) / gib:.2f} (sys {(sys_ - sys0) / gib:.2f})")
    return ", ".join(parts)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RSSWatch:
    """Samples a process's resident set while something runs (VmHWM would count start-up too)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]))
            time.sleep(0.01)

    def __enter__(self) -> RSSWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def export_file(where: Path, fp: str) -> Path:
    folder = where / "by-fingerprint" / fp
    return next(p for p in folder.iterdir() if p.name != "metadata.json")


def folio_pages(path: Path, limit: int = 1 << 18) -> float:
    """Mean size, in 4 KiB pages, of the page-cache folios that hold `path` (root: pagemap and
    kpageflags). Maps the file shared, touches each page (already cached: nothing is read), and
    counts compound heads and tails (kpageflags bits 15 and 16) against order-0 pages."""
    import ctypes
    import struct

    page, size = os.sysconf("SC_PAGE_SIZE"), path.stat().st_size
    count = min(size // page, limit)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        base = libc.mmap(None, count * page, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        mapped = (ctypes.c_char * (count * page)).from_address(base)
        for i in range(count):
            mapped[i * page]  # fault the cached page in
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            pm.seek(base // page * 8)
            entries = struct.unpack(f"{count}Q", pm.read(count * 8))
            folios = pages = 0
            for entry in entries:
                if entry >> 63:  # present
                    kf.seek((entry & ((1 << 55) - 1)) * 8)
                    flags = struct.unpack("Q", kf.read(8))[0]
                    pages += 1
                    folios += not flags & (1 << 16)  # a compound tail belongs to its head's folio
        libc.munmap(ctypes.c_void_p(base), count * page)
    finally:
        os.close(fd)
    return pages / max(folios, 1)


def fs_type(path: Path) -> str:
    out = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


DEFAULT = "default: as root, the server's own file"


def bench_sequential(box: Sandbox, fp: str, size: int) -> None:
    gib = size / (1 << 30)
    url = f"lxd/1.0/images/{fp}/export"
    stored = box.lxd_dir / "images" / fp
    print(f"\nSequential read of a {size / (1 << 20):.0f} MiB unified image", flush=True)

    def curl() -> None:
        sh("curl", "-sf", "--unix-socket", box.socket, url, "-o", "/dev/null")

    def curl_dgst() -> None:
        sh("sh", "-c", f"curl -sf --unix-socket {box.socket} {url} | openssl dgst -sha256")

    def lxc_export() -> None:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as out:
            sh("lxc", "image", "export", fp, out + "/", env=box.env())

    def pylxd_export() -> None:
        import pylxd

        data = pylxd.Client(endpoint=box.socket).images.get(fp).export()
        data.seek(0, 2)
        assert data.tell() == size

    results: dict[str, float] = {}
    for scenario in ("server-warm", "all caches dropped"):
        cold = scenario != "server-warm"
        print(f" {scenario}:")

        def prepare(cold: bool = cold) -> None:
            if cold:
                drop_caches()
            else:
                sh("cat", str(stored))  # LXD's own copy in the page cache, as for every tool

        def timed(fn: Callable[[], None], runs: int = 3, cold: bool = cold,
                  prepare: Callable[[], None] = prepare) -> float:
            times = []
            for _ in range(1 if cold else runs):
                prepare()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        results[f"curl {scenario}"] = t_curl = timed(curl)
        row(f"curl --unix-socket ({scenario})", f"{gib / t_curl:.2f} GiB/s", f"{t_curl:.2f} s")
        t_dgst = timed(curl_dgst)
        row(f"curl | openssl dgst -sha256 ({scenario}): a verified read without the mount",
            f"{gib / t_dgst:.2f} GiB/s", f"{t_dgst:.2f} s")
        for binding, opts, label in (("mfusepy", (), DEFAULT),  # as root: the server's own file
                                     ("mfusepy", ("-o", "nolocal"), "-o nolocal: the socket")):
            times = []
            peak = 0.0
            cpu, start_up = [], []  # the read's daemon CPU; what the mount and the look-up cost before it
            threads: list[tuple[float, str]] = []
            for _ in range(1 if cold else 3):
                forget_disk_cache()
                with mount(box, binding, *opts) as (where, proc, _log):
                    path = export_file(where, fp)
                    prepare()
                    before, start_up_cpu = thread_cpu(proc.pid), _cpu_seconds(proc.pid)
                    with RSSWatch(proc.pid) as watch:
                        t = time.perf_counter()
                        sh("cat", str(path))
                        times.append(time.perf_counter() - t)
                    cpu.append(_cpu_seconds(proc.pid) - start_up_cpu)
                    start_up.append(start_up_cpu)
                    threads.append((cpu[-1], by_thread(before, thread_cpu(proc.pid), gib)))
                    peak = max(peak, watch.peak / 1024)
                    if not cold and len(times) == 1:
                        again = best(1, lambda p=path: sh("cat", str(p)))
                        row("  cat again through the same mount", f"{gib / again:.2f} GiB/s", "")
            t = min(times)
            results[f"{label} {scenario}"] = t
            row(f"lxdimagefs, cat ({label}, {scenario})", f"{gib / t:.2f} GiB/s",
                f"{t:.2f} s, {t_curl / t:.2f}x curl, {t_dgst / t:.2f}x curl | openssl, "
                f"peak RSS {peak:.0f} MiB, daemon CPU {min(cpu) / gib:.2f} s/GiB for the read "
                f"(and {min(start_up):.2f} s to start, mount and look the image up before it)")
            if THREADS:
                row(f"  daemon CPU-s/GiB by thread ({label}, {scenario})", "", min(threads)[1])
        t = timed(lxc_export)
        row(f"lxc image export ({scenario}, to /dev/shm)", f"{gib / t:.2f} GiB/s",
            f"{t:.2f} s; lxdimagefs is {t / results[f'{DEFAULT} {scenario}']:.1f}x faster")
        t = timed(pylxd_export, runs=1)
        row(f"pylxd Image.export() ({scenario})", f"{gib / t:.2f} GiB/s",
            f"{t:.2f} s; lxdimagefs is {t / results[f'{DEFAULT} {scenario}']:.1f}x faster")


def bench_rereads(box: Sandbox, fp: str, size: int, work: Path) -> None:
    """Reading a verified image again: on the same mount (the page cache), and through a new mount
    with every cache dropped (the disk cache), against the file `lxc image export` wrote."""
    gib = size / (1 << 30)
    print(f"\nReading a verified {size / (1 << 20):.0f} MiB image again", flush=True)
    out = work / "exported"
    out.mkdir(exist_ok=True)
    sh("lxc", "image", "export", fp, str(out) + "/", env=box.env())
    copy = next(out.iterdir())
    forget_disk_cache()
    with mount(box, "mfusepy", "-o", "nolocal") as (where, proc, _log):  # the socket: kept on disk
        path = export_file(where, fp)
        # Each side's second read (the first one after the read that filled the page cache: the
        # kernel moves its pages to the active list then), and the best of three after it.
        drop_caches()
        sh("cat", str(copy))
        copies = {"the second read": best(1, lambda: sh("cat", str(copy))),
                  "best of the 3 after it": best(3, lambda: sh("cat", str(copy)))}
        sh("cat", str(path))  # the first read: fetched and verified, through the page cache
        for label, t_copy in copies.items():
            runs = 1 if label == "the second read" else 3
            cpu, drops = _cpu_seconds(proc.pid), drops_by_others()
            t = best(runs, lambda: sh("cat", str(path)))
            cpu, drops = (_cpu_seconds(proc.pid) - cpu) / runs, drops_by_others() - drops
            row(f"cat of the exported file, from the page cache ({label})", f"{gib / t_copy:.2f} GiB/s",
                f"{t_copy:.2f} s")
            row(f"lxdimagefs, cat again through the same mount ({label})", f"{gib / t:.2f} GiB/s",
                f"{t:.2f} s, {t_copy / t:.2f}x the exported file, daemon CPU {cpu / gib:.3f} s/GiB"
                + (f" ({drops} drop_caches by others meanwhile)" if drops else ""))
        # FUSE's page cache holds 4 KiB folios on this kernel, ext4's about 1 MiB ones; a copy on
        # tmpfs (4 KiB pages too, without huge=) is the same kernel path with the same page size.
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            on_tmpfs = Path(shm) / copy.name
            shutil.copyfile(copy, on_tmpfs)
            sh("cat", str(on_tmpfs))
            t_shm = best(3, lambda: sh("cat", str(on_tmpfs)))
            t = best(3, lambda: sh("cat", str(path)))
            row("cat of a copy on tmpfs, from the page cache (best of 3)", f"{gib / t_shm:.2f} GiB/s",
                f"{t_shm:.2f} s; lxdimagefs the same minute: {gib / t:.2f} GiB/s, {t_shm / t:.2f}x")
            row("page-cache folio size, in 4 KiB pages (mean)", "",
                f"exported file on {fs_type(copy)}: {folio_pages(copy):.1f}; through the mount: "
                f"{folio_pages(path):.1f}; the copy on tmpfs: {folio_pages(on_tmpfs):.1f}")
    drop_caches()
    t_copy = best(1, lambda: sh("cat", str(copy)))
    row("cat of the exported file, all caches dropped", f"{gib / t_copy:.2f} GiB/s", f"{t_copy:.2f} s")
    for label, opts in (("the disk cache, -o nolocal", ("-o", "nolocal")), ("the server's own file", ())):
        if not opts:  # as a first read by default leaves it: the manifest kept, not the bytes
            forget_disk_cache()
            with mount(box, "mfusepy") as (where, _proc, _log):
                sh("cat", str(export_file(where, fp)))
        runs: list[tuple[float, float, float]] = []  # (ratio, seconds, daemon CPU-s during the read)
        fetched = 0.0
        for _ in range(3):  # each against `cat` of the exported copy just before: a shared disk varies
            drop_caches()
            t_copy = best(1, lambda: sh("cat", str(copy)))
            with mount(box, "mfusepy", *opts) as (where, proc, log):
                path = export_file(where, fp)
                drop_caches()
                cpu = _cpu_seconds(proc.pid)
                t = best(1, lambda path=path: sh("cat", str(path)))
                runs.append((t_copy / t, t, _cpu_seconds(proc.pid) - cpu))
                fetched += _mib_received(log, fp)
        ratio, t, cpu = sorted(runs)[1]
        row(f"lxdimagefs, a new mount, all caches dropped ({label})", f"{gib / t:.2f} GiB/s",
            f"{t:.2f} s, median {ratio:.2f}x the exported file read just before "
            f"({', '.join(f'{r:.2f}' for r, _, _ in runs)}), {fetched:.0f} MiB fetched from the server, "
            f"daemon CPU {cpu / gib:.2f} s/GiB during the read")
    shutil.rmtree(out)


def bench_random(box: Sandbox, fp: str, size: int) -> None:
    offset = min(900 << 20, size - 4096)
    print(f"\nRandom 4 KiB read at offset {offset >> 20} MiB", flush=True)
    drop_caches()
    with mount(box) as (where, _proc, log):
        t = time.perf_counter()
        path = export_file(where, fp)  # a cold mount: this also learns the export's name and size
        fd = os.open(path, os.O_RDONLY)
        t_open = time.perf_counter()
        data = os.pread(fd, 4096, offset)
        t_read = time.perf_counter()
        os.close(fd)
        assert len(data) == 4096
        ranged = sum(1 for line in log.read_text().splitlines()
                     if f"lxdimagefs.client: GET /images/{fp}/export" in line)
    row(f"4 KiB at {offset >> 20} MiB: the read itself", f"{(t_read - t_open) * 1000:.1f} ms", "")
    row(f"4 KiB at {offset >> 20} MiB: lookup + open + read, cold mount", f"{(t_read - t) * 1000:.1f} ms",
        f"{ranged} export request(s): the Range request, plus a layout probe unless journaled")


def first_reads(box: Sandbox, fp: str, server: tuple[str, ...], *opts: str,
                before: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """The best of three first `cat`s of an export, each through a fresh mount of `server` with an
    empty disk cache (else a read after the first is the disk cache's), `before` each: (seconds,
    the daemon's CPU seconds)."""
    times, cpu = [], []
    for _ in range(3):
        forget_disk_cache()
        with mount(box, "mfusepy", *opts, server=server) as (where, proc, _log):
            path = export_file(where, fp)
            before()
            t = time.perf_counter()
            sh("cat", str(path))
            times.append(time.perf_counter() - t)
            cpu.append(_cpu_seconds(proc.pid))
    return min(times), min(cpu)


def bench_https(box: Sandbox, fp: str, size: int, work: Path) -> None:
    """The same image from the same LXD over HTTPS with a client certificate, on loopback."""
    print("\nSequential read over HTTPS (127.0.0.1, TLS client certificate), server-warm", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    crt, key = work / "client.crt", work / "client.key"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=bench")
    box.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
    box.lxc("config", "trust", "add", str(crt))
    base = f"https://127.0.0.1:{port}"
    gib = size / (1 << 30)
    sh("cat", str(box.lxd_dir / "images" / fp))
    t_curl = best(3, lambda: sh("curl", "-sfk", "--cert", str(crt), "--key", str(key),
                                f"{base}/1.0/images/{fp}/export", "-o", "/dev/null"))
    row("curl, HTTPS with the client certificate", f"{gib / t_curl:.2f} GiB/s", f"{t_curl:.2f} s")
    server = ("--url", base, "--cert", str(crt), "--key", str(key),
              "--server-cert", str(box.lxd_dir / "server.crt"))
    for label, opts in (("", ()), (", -o cache_max=0 (no disk cache)", ("-o", "cache_max=0"))):
        t, cpu = first_reads(box, fp, server, *opts)
        row(f"lxdimagefs over HTTPS, cat{label}", f"{gib / t:.2f} GiB/s",
            f"{t:.2f} s, {t_curl / t:.2f}x curl, daemon CPU {cpu / gib:.2f} s/GiB")
    box.lxc("config", "unset", "core.https_address")


def bench_split(box: Sandbox, work: Path, size_mib: int = 512) -> None:
    """A split image: the first read fills the spool from LXD's multipart stream."""
    print(f"\nSplit image ({size_mib} MiB squashfs rootfs), server-warm", flush=True)
    tree = work / "split" / "rootfs"
    tree.mkdir(parents=True)
    with open(tree / "blob", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    squash, meta = work / "split" / "rootfs.squashfs", work / "split" / "meta.tar.xz"
    sh("mksquashfs", str(tree), str(squash), "-noappend", "-quiet", "-noI", "-noD", "-noF", "-noX")
    shutil.rmtree(tree)
    with tarfile.open(meta, "w:xz") as tar:
        data = b"architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: split bench\n"
        info = tarfile.TarInfo("metadata.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fp = box.import_image(meta, squash, alias="split-bench")
    squash.unlink()
    for p in (box.lxd_dir / "images").glob(fp + "*"):
        sh("cat", str(p))
    gib = (size_mib << 20) / (1 << 30)
    t_curl = best(3, lambda: sh("curl", "-sf", "--unix-socket", box.socket,
                                f"lxd/1.0/images/{fp}/export", "-o", "/dev/null"))
    row("curl --unix-socket, the multipart export", f"{gib / t_curl:.2f} GiB/s", f"{t_curl:.2f} s")
    firsts, agains = [], []
    for _ in range(3):
        with mount(box) as (where, _proc, _log):
            path = next(p for p in (where / "by-fingerprint" / fp).iterdir() if p.suffix == ".squashfs")
            t = time.perf_counter()
            sh("cat", str(path))
            firsts.append(time.perf_counter() - t)
            agains.append(best(1, lambda p=path: sh("cat", str(p))))
    t = min(firsts)
    row("lxdimagefs, first cat of the rootfs (spool filled, verified)", f"{gib / t:.2f} GiB/s",
        f"{t:.2f} s, {t_curl / t:.2f}x curl")
    row("lxdimagefs, cat again (from the spool)", f"{gib / min(agains):.2f} GiB/s", f"{min(agains):.2f} s")
    box.lxc("image", "delete", fp)


def _contents_images(box: Sandbox, work: Path, size_mib: int) -> dict[str, str]:
    """Images of `size_mib` MiB whose rootfs/etc/os-release comes after a large file."""
    tree = work / "inside"
    (tree / "rootfs/etc").mkdir(parents=True)
    (tree / "metadata.yaml").write_bytes(b"architecture: x86_64\ncreation_date: 1700000000\n")
    with open(tree / "rootfs/blob", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    (tree / "rootfs/etc/os-release").write_text('PRETTY_NAME="Bench OS"\n')
    for i in range(2000):  # a few thousand entries, as an image has
        (tree / "rootfs/etc" / f"f{i}").write_text(str(i))
    plain = work / "inside.tar"
    sh("tar", "-C", str(tree), "-cf", str(plain), "metadata.yaml", "rootfs/blob", "rootfs/etc")
    sh("sh", "-c", f"gzip -1 -c {plain} > {plain}.gz")
    sh("sh", "-c", f"xz -0 -T1 -c {plain} > {plain}.xz")  # one block: xz's own default layout
    sh("sh", "-c", f"zstd -q -1 -T1 -c {plain} > {plain}.zst")  # one frame, as zstd makes it
    squash = work / "inside.squashfs"
    sh("mksquashfs", str(tree / "rootfs"), str(squash), "-noappend", "-quiet", "-noI", "-noD", "-noF", "-noX")
    meta = work / "inside-meta.tar"
    sh("tar", "-C", str(tree), "-cf", str(meta), "metadata.yaml")
    shutil.rmtree(tree)
    fps = {"tar": box.import_image(plain), "tar.gz": box.import_image(Path(f"{plain}.gz")),
           "tar.xz": box.import_image(Path(f"{plain}.xz")), "tar.zst": box.import_image(Path(f"{plain}.zst")),
           "squashfs (split)": box.import_image(meta, squash)}
    for p in (plain, Path(f"{plain}.gz"), Path(f"{plain}.xz"), Path(f"{plain}.zst"), squash, meta):
        p.unlink()
    return fps


def bench_contents(box: Sandbox, work: Path, size_mib: int = 512) -> None:
    """contents/: one small file behind a large one, and a whole listing, against the alternatives."""
    print(f"\nInside images ({size_mib} MiB, rootfs/etc/os-release after a {size_mib} MiB file)", flush=True)
    import ratarmountcore.mountsource.factory as rmc

    fps = _contents_images(box, work, size_mib)
    index = work / "contents-cache"
    index.mkdir()
    for kind, fp in fps.items():
        for p in (box.lxd_dir / "images").glob(fp + "*"):
            sh("cat", str(p))  # LXD's copy warm, for every tool alike
        times, received = [], []
        for _ in range(2):  # a fresh mount each time; the second has the first's index
            with mount(box, "mfusepy", "--cache-dir", str(index)) as (where, proc, log):
                t = time.perf_counter()
                sh("cat", str(where / "contents/by-fingerprint" / fp / "rootfs/etc/os-release"))
                times.append(time.perf_counter() - t)
                received.append(_mib_received(log, fp))
                if len(times) == 2:
                    t = time.perf_counter()
                    listing = f"find {where}/contents/by-fingerprint/{fp}/rootfs | wc -l"
                    out = subprocess.run(listing, shell=True, capture_output=True, text=True,
                                         check=True).stdout.strip()
                    t_find = time.perf_counter() - t
                    peak = peak_rss_mib(proc.pid)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as out_dir:
            t = time.perf_counter()
            sh("lxc", "image", "export", fp, out_dir + "/", env=box.env())
            t_export = time.perf_counter() - t
            exported = sorted(Path(out_dir).iterdir(), key=lambda p: p.stat().st_size)[-1]
            t = time.perf_counter()
            if kind.startswith("squashfs"):
                sh("unsquashfs", "-q", "-d", out_dir + "/x", str(exported), "etc/os-release")
            else:
                sh("tar", "-xf", str(exported), "-C", out_dir, "rootfs/etc/os-release")
            t_extract = time.perf_counter() - t
            t = time.perf_counter()
            with rmc.open_mount_source(str(exported)) as source:
                inner = "/etc/os-release" if kind.startswith("squashfs") else "/rootfs/etc/os-release"
                with source.open(source.lookup(inner)) as f:
                    f.read()
            t_rmc = time.perf_counter() - t
            t = time.perf_counter()
            if not kind.startswith("squashfs"):
                sh("sh", "-c", f"tar -tf {exported} | wc -l")
            t_list = time.perf_counter() - t
        row(f"cat os-release, {kind}: fresh mount, first time", f"{times[0] * 1000:.0f} ms",
            f"{received[0]:.1f} MiB received")
        row(f"cat os-release, {kind}: fresh mount, index kept", f"{times[1] * 1000:.0f} ms",
            f"{received[1]:.1f} MiB received; daemon peak RSS {peak:.0f} MiB")
        row(f"  lxc image export + extract that file, {kind}", f"{(t_export + t_extract) * 1000:.0f} ms",
            f"ratarmountcore on the exported file: +{t_rmc * 1000:.0f} ms after the export")
        row(f"  find contents/…/rootfs | wc -l ({out} entries), {kind}", f"{t_find * 1000:.0f} ms",
            "" if kind.startswith("squashfs") else f"tar -tf of the export: {t_list * 1000:.0f} ms")
        if kind.startswith("squashfs"):
            _split_from_disk_cache(box, fp, index)
    for fp in fps.values():
        box.lxc("image", "delete", fp)


def _split_from_disk_cache(box: Sandbox, fp: str, index: Path) -> None:
    """The same look with -o nolocal: the split parts from the disk cache's copy, not the server's."""
    times = []
    for _ in range(2):  # the first downloads and keeps the parts; the second finds them
        with mount(box, "mfusepy", "--cache-dir", str(index), "-o", "nolocal") as (where, _proc, _log):
            t = time.perf_counter()
            sh("cat", str(where / "contents/by-fingerprint" / fp / "rootfs/etc/os-release"))
            times.append(time.perf_counter() - t)
    row("cat os-release, squashfs (split), -o nolocal: fresh mount, parts and index kept",
        f"{times[1] * 1000:.0f} ms", f"first -o nolocal mount (downloads them): {times[0] * 1000:.0f} ms")


def _mib_received(log: Path, fp: str) -> float:
    """MiB of the image's export the daemon fetched (its debug log notes every block; a split
    image's export is spooled whole). An empty `fp`: every image's."""
    got = 0
    block = re.compile(rf"block \d+ of {fp or '[0-9a-f]+'} in \(|spooled {fp or '[0-9a-f]+'} \(")
    for line in log.read_text().splitlines():
        if block.search(line):
            got += int(line.rsplit("(", 1)[1].split()[0])
    return got / (1 << 20)


def make_many(box: Sandbox, count: int) -> None:
    import pylxd

    existing = len(box.rest("/1.0/images"))
    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    todo = list(range(count))
    lock = threading.Lock()

    def worker() -> None:
        client = pylxd.Client(endpoint=box.socket)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            path = make_unified(work / f"m{i}.tar.gz", rootfs_bytes=64, seed=f"many-{i}-{time.time_ns()}")
            client.images.create(path.read_bytes(), wait=True)
            path.unlink()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    work.rmdir()
    assert len(box.rest("/1.0/images")) >= existing + count


def bench_listing(box: Sandbox, count: int) -> None:
    import pylxd

    print(f"\nListing {count} images", flush=True)
    t_lxc = best(3, lambda: sh("lxc", "image", "list", "--format", "csv", env=box.env()))
    row("lxc image list --format csv", f"{t_lxc * 1000:.0f} ms", "")
    t_py = best(3, lambda: pylxd.Client(endpoint=box.socket).images.all())
    row("pylxd client.images.all()", f"{t_py * 1000:.0f} ms", "")
    # no_events: with a live event stream the listing never expires, and this would measure nothing
    with mount(box, "mfusepy", "-o", "metadata_ttl=2,no_events") as (where, _proc, log):
        def listings() -> int:
            return sum(1 for line in log.read_text().splitlines()
                       if "lxdimagefs.client: GET" in line and line.endswith("GET /images"))

        time.sleep(2.1)  # the listing made at mount time has expired: this ls pays for one
        before = listings()
        t = time.perf_counter()
        sh("ls", "-l", str(where / "by-fingerprint"))
        t_cold = time.perf_counter() - t
        row("ls -l by-fingerprint, listing not cached", f"{t_cold * 1000:.0f} ms",
            f"{t_lxc / t_cold:.2f}x lxc's speed; {listings() - before} listing request(s)")
        t_warm = best(3, lambda: sh("ls", "-l", str(where / "by-fingerprint")))
        row("ls -l by-fingerprint, listing cached (metadata_ttl)", f"{t_warm * 1000:.0f} ms",
            f"{t_lxc / t_warm:.1f}x faster than lxc")
    with mount(box, "mfusepy", "-o", "metadata_ttl=60") as (where, _proc, log):
        lines_before = len(log.read_text().splitlines())
        t = time.perf_counter()
        sh("find", str(where / "by-fingerprint"), "-mindepth", "2", "-printf", "%s\n")
        t_find = time.perf_counter() - t
        new = log.read_text().splitlines()[lines_before:]
        ours = [line for line in new if "lxdimagefs.client: GET" in line]
        probes = sum(1 for line in ours if line.endswith("/export"))
        n_listings = sum(1 for line in ours if line.endswith("GET /images"))
        row("stat every file (find -printf %s), first time", f"{t_find * 1000:.0f} ms",
            f"{probes} layout probes, {n_listings} listing requests")
        t_find2 = best(3, lambda: sh("find", str(where / "by-fingerprint"), "-mindepth", "2",
                                     "-printf", "%s\n"))
        row("stat every file, again", f"{t_find2 * 1000:.0f} ms", "layouts cached: no request")
    with mount(box, "mfusepy", "-o", "metadata_ttl=60") as (where, _proc, log):
        t = time.perf_counter()
        sh("find", str(where / "by-fingerprint"), "-mindepth", "2", "-printf", "%s\n")
        t_new = time.perf_counter() - t
        probes = sum(1 for line in log.read_text().splitlines()
                     if "lxdimagefs.client: GET" in line and line.endswith("/export"))
        row("stat every file on a new mount", f"{t_new * 1000:.0f} ms",
            f"layouts from the journal: {probes} probes")


class Churn:
    """Images created (and, with `delete`, deleted again) `at_once` at a time through pylxd, until stopped."""

    def __init__(self, box: Sandbox, at_once: int, delete: bool = False, count: int | None = None) -> None:
        self.box, self.delete, self.left = box, delete, count
        self.made: list[str] = []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._work = Path(tempfile.mkdtemp(prefix="bench-churn-"))
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(at_once)]

    def _run(self, k: int) -> None:
        import pylxd

        client, i = pylxd.Client(endpoint=self.box.socket), 0
        while not self._stop.is_set():
            with self._lock:
                if self.left is not None:
                    if self.left <= 0:
                        return
                    self.left -= 1
            i += 1
            seed = f"churn-{k}-{i}-{time.time_ns()}"
            path = make_unified(self._work / f"c{k}-{i}.tar", rootfs_bytes=64, seed=seed)
            image = client.images.create(path.read_bytes(), wait=True)
            path.unlink()
            if self.delete:
                image.delete(wait=True)
            else:
                self.made.append(image.fingerprint)

    def __enter__(self) -> Churn:
        for t in self._threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.join()
        shutil.rmtree(self._work, ignore_errors=True)


def _timed(*cmd: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    sh(*cmd, env=env)
    return time.perf_counter() - t


def bench_listings(box: Sandbox, count: int) -> None:
    """Issue 28: listings at scale and while images keep arriving, beside `lxc image list`."""
    lxc = ("lxc", "image", "list", "--format", "csv")
    t = time.perf_counter()
    make_many(box, count)
    print(f"\nListings, {count} images (made in {time.perf_counter() - t:.0f} s, 4 at a time)", flush=True)
    curl = ("curl", "-s", "-o", "/dev/null", "--unix-socket", box.socket, "http://lxd/1.0/images?recursion=1")
    t_curl = min(_timed(*curl) for _ in range(3))
    row("one curl of /1.0/images?recursion=1", f"{t_curl * 1000:.0f} ms", "")
    drop_caches()
    t = time.perf_counter()
    with mount(box) as (where, proc, log):
        t_mount = time.perf_counter() - t
        t = time.perf_counter()
        os.listdir(where / "by-fingerprint")
        t_first = time.perf_counter() - t
        row("fresh mount (until mounted), then its first listing",
            f"{t_mount * 1000:.0f} + {t_first * 1000:.0f} ms",
            f"{(t_mount + t_first) / t_curl:.2f}x one curl; python start-up included")
        listings = sum(1 for line in log.read_text().splitlines() if "recursion=1 HTTP" in line)
        row("full listings made by the mount so far", f"{listings}", "")
        for folder in ("by-fingerprint", "by-alias"):
            t_ls, t_lxc = _timed("ls", "-l", str(where / folder)), _timed(*lxc, env=box.env())
            row(f"quiet: ls -l {folder} / lxc image list", f"{t_ls * 1000:.0f} / {t_lxc * 1000:.0f} ms",
                f"{t_ls / t_lxc:.2f}x lxc")
        for at_once in (2, 4):
            cpu0, events0 = _cpu_seconds(proc.pid), log.read_text().count("event EventSubject")
            ratios = []
            with Churn(box, at_once) as churn:
                time.sleep(1)
                for _ in range(5):
                    t_ls = _timed("ls", "-l", str(where / "by-fingerprint"))
                    ratios.append((t_ls, _timed(*lxc, env=box.env())))
                t_find = _timed("find", str(where), "-maxdepth", "3")
            events = log.read_text().count("event EventSubject") - events0
            cpu = _cpu_seconds(proc.pid) - cpu0
            worst = max(ratios, key=lambda r: r[0] / r[1])
            row(f"{at_once} imports at a time: ls -l by-fingerprint / lxc (median ratio)",
                f"{statistics.median(r[0] for r in ratios) * 1000:.0f} / "
                f"{statistics.median(r[1] for r in ratios) * 1000:.0f} ms",
                f"{statistics.median(r[0] / r[1] for r in ratios):.2f}x lxc, "
                f"worst {worst[0] / worst[1]:.2f}x; "
                f"find -maxdepth 3 {t_find * 1000:.0f} ms")
            row(f"  daemon CPU per event ({events} events, {len(churn.made)} images made)",
                f"{cpu / max(events, 1) * 1000:.2f} ms", "ls -l and find included")
            for fp in churn.made:
                box.lxc("image", "delete", fp, check=False)
        storm = []
        for reader in (False, True):
            stop = threading.Event()

            def read(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    subprocess.run(["ls", "-l", str(where / "by-fingerprint")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)

            looper = threading.Thread(target=read, daemon=True)
            if reader:
                looper.start()
            lxd0, t = _cpu_seconds(box.pid), time.perf_counter()
            ours0, events0 = _cpu_seconds(proc.pid), log.read_text().count("event EventSubject")
            with Churn(box, 4, delete=True, count=100) as churn:
                churn.join()
            storm.append((_cpu_seconds(box.pid) - lxd0, time.perf_counter() - t))
            time.sleep(1)  # the last events applied
            if not reader:
                events = log.read_text().count("event EventSubject") - events0
                row(f"  daemon CPU per event, nothing read ({events} events)",
                    f"{(_cpu_seconds(proc.pid) - ours0) / max(events, 1) * 1000:.2f} ms", "")
            stop.set()
            if reader:
                looper.join()
        row("100+100 create/delete storm: LXD CPU without / with an ls -l loop",
            f"{storm[0][0]:.1f} / {storm[1][0]:.1f} s", f"{storm[1][0] / storm[0][0]:.2f}x; wall "
            f"{storm[0][1]:.1f} / {storm[1][1]:.1f} s")
        miss = where / "by-fingerprint" / "0123456789abcdef"
        times = []
        for _ in range(5):
            t = time.perf_counter()
            with contextlib.suppress(FileNotFoundError):
                os.stat(miss)
            times.append(time.perf_counter() - t)
        row("stat of a short fingerprint that matches nothing", f"{max(times) * 1000:.1f} ms", "worst of 5")
        row("daemon peak RSS", f"{peak_rss_mib(proc.pid):.0f} MiB", f"{count} images")


def setup_image(box: Sandbox, tarball: Path) -> str:
    print("\nSetting up", flush=True)
    t = time.perf_counter()
    fp = box.import_image(tarball, alias="big")
    row("lxc image import of the 1 GiB tarball (set-up)", f"{time.perf_counter() - t:.2f} s", "")
    return fp


def bench_import(box: Sandbox, tarball: Path) -> None:
    import pylxd

    size = tarball.stat().st_size
    gib = size / (1 << 30)
    print(f"\nImporting a {size / (1 << 20):.0f} MiB tarball", flush=True)
    fp = None

    def delete() -> None:
        if fp:
            box.lxc("image", "delete", fp)

    sh("cat", str(tarball))  # the source file in the page cache, for every tool alike
    t = time.perf_counter()
    fp = box.import_image(tarball)
    t_lxc = time.perf_counter() - t
    row("lxc image import", f"{gib / t_lxc:.2f} GiB/s", f"{t_lxc:.2f} s")
    delete()
    t = time.perf_counter()
    with open(tarball, "rb") as f:
        pylxd.Client(endpoint=box.socket).images.create(f.read(), wait=True)
    t_py = time.perf_counter() - t
    row("pylxd Image.create() (reads the file into memory)", f"{gib / t_py:.2f} GiB/s", f"{t_py:.2f} s")
    delete()
    with mount(box) as (where, proc, _log):
        io_before = _io_written(proc.pid)
        with RSSWatch(proc.pid) as watch:
            t = time.perf_counter()
            sh("cp", str(tarball), str(where / "import" / tarball.name))
            t_cp = time.perf_counter() - t
        written = _io_written(proc.pid) - io_before
        assert fp in os.listdir(where / "by-fingerprint")
    row("lxdimagefs: cp into import/", f"{gib / t_cp:.2f} GiB/s",
        f"{t_cp:.2f} s, {t_cp / t_lxc:.2f}x lxc's time, {t_cp / t_py:.2f}x pylxd's; "
        f"peak RSS {watch.peak / 1024:.0f} MiB; {written / (1 << 20):.1f} MiB written to local disk")
    delete()


def bench_freshness(box: Sandbox, fp: str, samples: int = 20) -> None:
    print("\nA change made with lxc, until the mount shows it", flush=True)

    def measure(opts: tuple[str, ...], n: int) -> list[float]:
        times = []
        with mount(box, "mfusepy", *opts) as (where, _proc, log):
            deadline = time.monotonic() + 10
            events = not any("no_events" in o for o in opts)
            while events and "listening to LXD's lifecycle events" not in log.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for i in range(n):
                os.listdir(where / "by-alias")  # the listing is cached now
                name = f"fresh{i}"
                box.lxc("image", "alias", "create", name, fp)
                t = time.perf_counter()
                while name not in os.listdir(where / "by-alias"):
                    time.sleep(0.002)
                times.append(time.perf_counter() - t)
                box.lxc("image", "alias", "delete", name)
        return sorted(times)

    def pct(times: list[float], q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] * 1000

    live = measure(("-o", "metadata_ttl=3"), samples)
    row("alias made with lxc, visible through the mount (events)",
        f"p50 {pct(live, 0.5):.0f} ms", f"p95 {pct(live, 0.95):.0f} ms, {samples} changes")
    fallback = measure(("-o", "metadata_ttl=3,no_events"), samples // 2)
    row("the same without events (metadata_ttl=3 alone)",
        f"p50 {pct(fallback, 0.5):.0f} ms", f"p95 {pct(fallback, 0.95):.0f} ms, {samples // 2} changes")


def _io_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def bench_remotes(work: Path, size_mib: int, products: int = 1200) -> None:
    """Server-side copies between two LXDs, and listing a large simplestreams index."""
    from streams_server import Entry, LoopbackCA, StreamsServer, write_index

    print(f"\nRemotes: a {size_mib} MiB image copied between two private LXDs; a simplestreams index "
          f"of {products} products", flush=True)
    ca = LoopbackCA.make(work / "ca")
    small = make_unified(work / "small.tar.gz")
    meta, rootfs = make_split(work / "remote-split", rootfs_bytes=size_mib << 20)
    fps = write_index(work / "www", [
        Entry("small:1:amd64:default", "amd64", "20261101_00:00", "small", (small,)),
        Entry("big:1:amd64:default", "amd64", "20261101_00:00", "big", (meta, rootfs))],
        fake_products=products)
    big_fp = fps["big:1:amd64:default@20261101_00:00"]
    rootfs_mib = rootfs.stat().st_size / (1 << 20)
    shutil.rmtree(work / "remote-split")
    streams = StreamsServer(work / "www", ca).start()
    trust = {"SSL_CERT_FILE": str(ca.bundle)}
    a = b = None
    try:
        a, b = Sandbox.start(extra_env=trust), Sandbox.start(extra_env=trust)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        b.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
        b.lxc("config", "set", "core.trust_password", "bench")
        a_port = port + 1 if port < 65000 else port - 1
        a.lxc("config", "set", "core.https_address", f"127.0.0.1:{a_port}")
        a.lxc("config", "set", "core.trust_password", "bench")
        env = {**os.environ, **trust, "LXD_CONF": str(work / "lxc-conf"), "INCUS_CONF": str(work / "none"),
               "LXD_DIR": str(a.lxd_dir)}
        for name, url in (("a", f"https://127.0.0.1:{a_port}"), ("b", f"https://127.0.0.1:{port}")):
            sh("lxc", "remote", "add", name, url, "--accept-certificate", "--password", "bench", env=env)
        sh("lxc", "remote", "add", "sst", streams.url, "--protocol", "simplestreams", "--public", env=env)
        sh("lxc", "remote", "remove", "images", env=env)
        big = make_unified(work / "copy.tar", rootfs_bytes=(size_mib << 20) - (16 << 10))
        fp = b.import_image(big)
        big.unlink()

        def timed(copy: Callable[[], object]) -> float:
            t = time.perf_counter()
            copy()
            spent = time.perf_counter() - t
            a.lxc("image", "delete", fp)
            return spent

        sh("cat", str(b.lxd_dir / "images" / fp))  # the source's file in the page cache for every run
        t_lxc, t_ln = [], []
        with mount(a, "mfusepy", server=("--all-remotes",), env_extra=env) as (where, _proc, _log):
            for i in range(2):  # alternated, so that neither gains from the other's warm caches
                t_lxc.append(timed(lambda: sh("lxc", "image", "copy", f"b:{fp}", "a:", env=env)))
                t_ln.append(timed(lambda i=i: os.symlink(f"../../b/by-fingerprint/{fp}",
                                                         where / "a" / "import" / f"c{i}")))
            t_cp = timed(lambda: sh("cp", "-r", str(where / "b" / "by-fingerprint" / fp),
                                    str(where / "a" / "import") + "/"))
        row(f"lxc image copy b: a: ({size_mib} MiB)", f"{min(t_lxc):.2f} s",
            f"the target pulls it; runs {', '.join(f'{t:.2f}' for t in t_lxc)} s")
        row("lxdimagefs: ln -s b/by-fingerprint/FP a/import/ (server-side)", f"{min(t_ln):.2f} s",
            f"{min(t_lxc) / min(t_ln):.2f}x lxc image copy; runs {', '.join(f'{t:.2f}' for t in t_ln)} s")
        row("lxdimagefs: cp -r b/by-fingerprint/FP a/import/ (through the mount)", f"{t_cp:.2f} s",
            f"{min(t_lxc) / t_cp:.2f}x lxc image copy, {t_cp / min(t_ln):.1f}x the server-side copy's time")

        first_ls = []

        def ls_mount() -> None:
            with mount(a, "mfusepy", server=("sst",), env_extra=env) as (where, _p, _l):
                t = time.perf_counter()  # the first listing: the index fetched and parsed
                count = len(os.listdir(where / "by-alias"))
                first_ls.append(time.perf_counter() - t)
                assert count >= products, count
        t_ours = best(3, ls_mount)

        def lxc_list() -> None:  # as cold as the mount's first listing: without lxc's own cache
            shutil.rmtree(work / "lxc-conf" / "cache", ignore_errors=True)
            sh("lxc", "image", "list", "sst:", "--format", "csv", env=env)
        t_lxc_list = best(3, lxc_list)
        row(f"lxc image list sst: ({products} products)", f"{t_lxc_list:.2f} s", "lxc's simplestreams client")
        from lxdimagefs.servers.catalog import Catalog
        from lxdimagefs.servers.simplestreams import StreamsClient
        from lxdimagefs.wire.transport import Connection

        os.environ["SSL_CERT_FILE"] = str(ca.bundle)
        catalog = Catalog(StreamsClient(Connection(url=streams.url)), ttl=0)
        catalog.refresh()
        t_parse = best(3, catalog.refresh)  # what a daemon does for a listing once the index is stale
        row("lxdimagefs: the index fetched and parsed into a listing", f"{t_parse:.3f} s",
            f"{t_lxc_list / t_parse:.2f}x lxc image list; the daemon's share of a stale listing")
        row("lxdimagefs sst: first ls by-alias/ of a new mount", f"{min(first_ls):.3f} s",
            "the listing the mount made as it started")
        row("lxdimagefs sst: mount + ls by-alias/ + unmount", f"{t_ours:.2f} s",
            f"{t_lxc_list / t_ours:.2f}x lxc image list (the daemon's start-up included)")
        print(f"\nInside a {rootfs_mib:.0f} MiB split image on the simplestreams server", flush=True)
        inside = []
        for _ in range(2):
            with mount(a, "mfusepy", server=("sst",), env_extra=env) as (where, _p, log):
                t = time.perf_counter()
                sh("cat", str(where / "contents" / "by-fingerprint" / big_fp / "rootfs" / "etc" / "hostname"))
                inside.append((time.perf_counter() - t, _mib_received(log, "")))
        out = work / "remote-export"

        def export_and_extract() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            sh("lxc", "image", "export", f"sst:{big_fp}", str(out) + "/", env=env)
            squash = next(out.glob("*.squashfs"))
            sh("unsquashfs", "-q", "-d", str(out / "x"), str(squash), "etc/hostname")
        t_export = best(1, export_and_extract)
        shutil.rmtree(out, ignore_errors=True)
        (t1, mib1), (t2, mib2) = inside
        row("lxdimagefs: cat sst/contents/…/rootfs/etc/hostname, first mount", f"{t1 * 1000:.0f} ms",
            f"{mib1:.1f} MiB fetched of {rootfs_mib:.0f}; {t_export / t1:.1f}x lxc export + unsquashfs")
        row("the same, a new mount with the index kept", f"{t2 * 1000:.0f} ms", f"{mib2:.1f} MiB fetched")
        row("lxc image export sst:FP + unsquashfs of that file", f"{t_export:.2f} s",
            "the whole image downloaded")
    finally:
        streams.stop()
        for box in (a, b):
            if box is not None:
                box.stop()


def bench_incus(work: Path, size_mib: int) -> None:
    """Incus mounted as LXD is: a sequential read against curl on its socket; attributes and df."""
    print(f"\nIncus 6.0: a {size_mib} MiB image, read and described", flush=True)
    box = Sandbox.start(product="incus")
    try:
        tarball = make_unified(work / "incus.tar", rootfs_bytes=(size_mib << 20) - (16 << 10))
        fp = box.import_image(tarball)
        tarball.unlink()
        size = (box.lxd_dir / "images" / fp).stat().st_size
        gib = size / (1 << 30)
        sh("cat", str(box.lxd_dir / "images" / fp))  # Incus's copy in the page cache for every tool
        t_curl = best(3, lambda: sh("curl", "-sf", "--unix-socket", box.socket,
                                    f"http://incus/1.0/images/{fp}/export", "-o", "/dev/null"))
        row("curl on Incus's socket", f"{gib / t_curl:.2f} GiB/s", f"{t_curl:.2f} s")
        out = work / "incus-export"
        out.mkdir()

        def export() -> None:
            sh("incus", "image", "export", fp, str(out) + "/", env=box.env())
            for f in out.iterdir():
                f.unlink()
        t_export = best(2, export)
        row("incus image export", f"{gib / t_export:.2f} GiB/s", f"{t_export:.2f} s")
        times = []
        for _ in range(3):
            with mount(box, "mfusepy") as (where, _proc, _log):
                path = export_file(where, fp)
                t = time.perf_counter()
                sh("cat", str(path))
                times.append(time.perf_counter() - t)
        t = min(times)
        row("lxdimagefs on Incus, cat (first read of a fresh mount)", f"{gib / t:.2f} GiB/s",
            f"{t:.2f} s, {t_curl / t:.2f}x curl, {t_export / t:.2f}x incus image export")
        with mount(box, "mfusepy") as (where, _proc, _log):
            folder = where / "by-fingerprint" / fp
            sh("getfattr", "-d", str(folder))
            t_attr = best(5, lambda: sh("getfattr", "-d", str(folder)))
            t_show = best(5, lambda: sh("incus", "image", "show", fp, env=box.env()))
            row("getfattr -d by-fingerprint/FP (the record as user.lxd.*)", f"{t_attr * 1000:.1f} ms",
                f"incus image show: {t_show * 1000:.1f} ms, {t_show / t_attr:.1f}x")
            t_df = best(5, lambda: sh("df", str(where)))
            row("df on the mount (the image folder's filesystem, cached 5 s)", f"{t_df * 1000:.1f} ms", "")
    finally:
        box.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--many", type=int, default=1000, help="images for the listing benchmark")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the large image")
    p.add_argument("--reads-only", action="store_true", help="only the sequential and random reads")
    p.add_argument("--sequential-only", action="store_true",
                   help="only the first read of the large image and reading it again")
    p.add_argument("--contents-only", action="store_true", help="only what is inside images")
    p.add_argument("--contents", action="store_true", help="only whole-tree commands inside a real "
                   "Debian 12 image, against lxc image export + extract (scripts/bench_inside.py)")
    p.add_argument("--vm", action="store_true", help="only contents/ of a real VM image (qcow2, GPT, ext4, "
                   "FAT ESP) against qemu-img convert + debugfs (scripts/bench_vm.py)")
    p.add_argument("--requests", action="store_true", help="only the cost of a request inside an image "
                   "(scripts/bench_requests.py; with --baseline, another checkout beside it)")
    p.add_argument("--split-only", action="store_true", help="only reads of a split image's rootfs")
    p.add_argument("--https-only", action="store_true", help="only the sequential read over HTTPS")
    p.add_argument("--cluster-only", action="store_true",
                   help="only reads through a cluster member that does not hold the image")
    p.add_argument("--listing-only", action="store_true", help="only listing --many images")
    p.add_argument("--listings-only", action="store_true",
                   help="only issue 28's listings: fresh, during imports, a storm, a miss (--many images)")
    p.add_argument("--remotes-only", action="store_true",
                   help="only copies between servers, simplestreams, and Incus")
    p.add_argument("--imports-only", action="store_true",
                   help="only cp into import/ against lxc image import, interleaved (issue 16, item 7)")
    p.add_argument("--local-files-only", action="store_true",
                   help="only the server's own image file against its export (issue 16, item 4)")
    p.add_argument("--threads", action="store_true",
                   help="with the sequential read: the daemon's CPU by thread (hash, fetch, diskwrite, FUSE)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved sections")
    p.add_argument("--only", help="with --contents: only the commands whose label holds this text")
    p.add_argument("--baseline", type=Path, help="another checkout's lxdimagefs, as a third side of "
                   "--imports-only or --requests (run from a folder without lxdimagefs/ in it)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    print(f"lxdimagefs benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, kernel {os.uname().release}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still stop the private LXD
    box = Sandbox.start()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/var/tmp"))
    global CACHE_DIR
    CACHE_DIR = work / "cache"
    CACHE_DIR.mkdir()
    try:
        if args.contents_only:
            bench_contents(box, work)
        elif args.contents:
            sys.modules.setdefault("benchmark", sys.modules[__name__])  # one ROWS, whichever way it runs
            from bench_inside import bench_inside

            bench_inside(box, work, args.rounds, args.baseline, args.only)
        elif args.vm:
            sys.modules.setdefault("benchmark", sys.modules[__name__])
            from bench_vm import bench_vm

            bench_vm(box, work, args.baseline, args.rounds)
        elif args.requests:
            sys.modules.setdefault("benchmark", sys.modules[__name__])
            from bench_requests import bench_requests

            bench_requests(box, work, args.baseline)
        elif args.split_only:
            bench_split(box, work)
        elif args.cluster_only:
            bench_cluster_section(work, args.size_mib)
        elif args.listings_only:
            bench_listings(box, args.many)
        elif args.listing_only:
            make_many(box, args.many)
            bench_listing(box, args.many)
        elif args.remotes_only:
            bench_remotes(work, args.size_mib)
            bench_incus(work, args.size_mib)
        elif args.imports_only or args.local_files_only:
            run_issue16(box, work, args)
        else:
            run_all(box, work, args)
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| what | figure | note |\n|---|---|---|")
    for what, value, note in ROWS:
        print(f"| {what.strip()} | {value} | {note} |")
    return 0


def run_issue16(box: Sandbox, work: Path, args: argparse.Namespace) -> None:
    sys.modules.setdefault("benchmark", sys.modules[__name__])  # one ROWS, whichever way it runs
    import bench_uploads

    tarball = make_unified(work / "big.tar", rootfs_bytes=(args.size_mib << 20) - (16 << 10),
                           description="benchmark image")
    if args.imports_only:
        bench_uploads.bench_import_rounds(box, tarball, args.rounds, args.baseline)
    if args.local_files_only:
        bench_uploads.bench_local_files(box, box.import_image(tarball), args.rounds)


def run_all(box: Sandbox, work: Path, args: argparse.Namespace) -> None:
    tarball = make_unified(work / "big.tar", rootfs_bytes=(args.size_mib << 20) - (16 << 10),
                           description="benchmark image")
    fp = setup_image(box, tarball)
    size = (box.lxd_dir / "images" / fp).stat().st_size
    if not (args.reads_only or args.sequential_only):
        box.lxc("image", "delete", fp)
        bench_import(box, tarball)
        fp = box.import_image(tarball, alias="big")
    tarball.unlink()
    if args.https_only:
        bench_https(box, fp, size, work)
        return
    bench_sequential(box, fp, size)
    bench_rereads(box, fp, size, work)
    if args.sequential_only:
        return
    forget_disk_cache()
    bench_random(box, fp, size)
    bench_https(box, fp, size, work)
    bench_split(box, work)
    bench_contents(box, work)
    if not args.reads_only:
        bench_freshness(box, fp)
        make_many(box, args.many)
        bench_listing(box, args.many)
        bench_remotes(work, args.size_mib)
        bench_incus(work, args.size_mib)
        bench_cluster_section(work, args.size_mib)


def bench_cluster_section(work: Path, size_mib: int) -> None:
    """Throughput through a cluster member that does not hold the image (scripts/bench_cluster.py)."""
    from bench_cluster import bench_cluster

    bench_cluster(work, size_mib, row, sh, first_reads)


if __name__ == "__main__":
    sys.exit(main())
