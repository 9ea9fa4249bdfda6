"""Benchmark sections for issue 16: imports (item 7) and the server's own image files (item 4).

Used by scripts/benchmark.py (`--imports-only`, `--local-files-only`); the
helpers they share (mount, drop_caches, row) live there.
"""

from __future__ import annotations

import hashlib
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import IO

import benchmark as b
from lxd_sandbox import Sandbox

BLOCK = 1 << 20  # the read path's block (data/blocks.py BLOCK): one read, one hash update


def _threads_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of a process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def _busiest(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> str:
    """The threads that worked during a run, as `user+sys` seconds, busiest first."""
    spent = []
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        if user + system - u0 - s0 >= 0.02:
            spent.append((user - u0, system - s0))
    spent.sort(key=lambda us: -(us[0] + us[1]))
    return ", ".join(f"{u:.2f}+{s:.2f}" for u, s in spent[:6]) or "none"


TREE = Path(__file__).resolve().parent.parent  # the daemon these scripts measure


def _import_with_lxc(box: Sandbox, tarball: Path) -> tuple[float, float, str]:
    """(seconds, lxc's own CPU seconds, fingerprint) of `lxc image import`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    fp = box.import_image(tarball)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, fp


def _import_with_cp(box: Sandbox, tarball: Path, tree: Path) -> tuple[float, float, str, str]:
    """(seconds, daemon CPU seconds, busiest threads, fingerprint) of `cp` into a fresh mount's import/."""
    with b.mount(box, env_extra={"PYTHONPATH": str(tree)}) as (where, proc, _log):
        b.drop_caches()
        cpu0, threads0 = b._cpu_seconds(proc.pid), _threads_cpu(proc.pid)
        with b.RSSWatch(proc.pid) as watch:
            t = time.perf_counter()
            b.sh("cp", str(tarball), str(where / "import" / tarball.name))
            elapsed = time.perf_counter() - t
        cpu = b._cpu_seconds(proc.pid) - cpu0
        threads = f"{_busiest(threads0, _threads_cpu(proc.pid))}, peak RSS {watch.peak / 1024:.0f} MiB"
        fp = next(iter(os.listdir(where / "by-fingerprint")))
    return elapsed, cpu, threads, fp


def bench_import_rounds(box: Sandbox, tarball: Path, rounds: int, baseline: Path | None = None) -> None:
    """`cp` into import/ against `lxc image import`, interleaved, all caches dropped before each.

    Each round runs every side once, in an order that rotates from round to
    round, `cp` on a fresh mount with default options; ratios are taken
    within a round, so a load that comes and goes touches all sides alike.
    `baseline`: another checkout of lxdimagefs, measured as a third side.
    """
    gib = tarball.stat().st_size / (1 << 30)
    sides = ["lxc", "cp", *(["base"] if baseline else [])]
    print(f"\nImporting a {gib * 1024:.0f} MiB tarball, {rounds} rounds of {', '.join(sides)}", flush=True)
    times: dict[str, list[float]] = {s: [] for s in sides}
    cpus: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(rounds):
        notes = []
        for side in sides[i % len(sides):] + sides[:i % len(sides)]:
            if side == "lxc":
                b.drop_caches()
                t, cpu, fp = _import_with_lxc(box, tarball)
            else:
                tree = baseline or TREE if side == "base" else TREE
                t, cpu, threads, fp = _import_with_cp(box, tarball, tree)
                notes.append(f"{side}: daemon threads user+sys {threads}")
            box.lxc("image", "delete", fp)
            times[side].append(t)
            cpus[side].append(cpu / gib)
        b.row(f"round {i + 1}: " + " / ".join(sides),
              " / ".join(f"{times[s][-1]:.2f}" for s in sides) + " s",
              "; ".join([f"{s} {times[s][-1] / times['lxc'][-1]:.2f}x" for s in sides[1:]]
                        + ["CPU s/GiB " + " / ".join(f"{cpus[s][-1]:.2f}" for s in sides)] + notes))
    for side in sides[1:]:
        ratios = [c / x for c, x in zip(times[side], times["lxc"], strict=True)]
        label = "cp into import/" + (" (baseline tree)" if side == "base" else "")
        b.row(f"{label} against lxc image import, median of {rounds} rounds",
              f"{statistics.median(ratios):.2f}x",
              f"range {min(ratios):.2f}-{max(ratios):.2f}x; {side} {min(times[side]):.2f}-"
              f"{max(times[side]):.2f} s, lxc {min(times['lxc']):.2f}-{max(times['lxc']):.2f} s; "
              f"CPU median: daemon {statistics.median(cpus[side]):.2f} s/GiB, "
              f"lxc {statistics.median(cpus['lxc']):.2f} s/GiB")


def _read_hashed(f: IO[bytes], hashed: bool = True) -> str:
    """Read to the end as the fetch path reads the socket: 1 MiB at a time into one buffer, hashed."""
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        if hashed:
            digest.update(view[:n])
    return digest.hexdigest()


def _all_cpu(pids: list[int]) -> float:
    """CPU seconds so far of this process, its waited-for children, and `pids` (LXD, a daemon)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + sum(map(b._cpu_seconds, pids))


def bench_local_files(box: Sandbox, fp: str, rounds: int = 3) -> None:
    """Reading the server's own image file directly, against its export through the socket.

    The same reads (1 MiB into one buffer) and the same hash (Python's
    hashlib) on both sides, with all caches dropped and with LXD's copy in
    the page cache; CPU counted for every process involved (this one,
    curl, LXD, the mount's daemon).
    """
    stored = box.lxd_dir / "images" / fp
    gib = stored.stat().st_size / (1 << 30)
    url = f"lxd/1.0/images/{fp}/export"
    print(f"\nThe server's own file ({gib * 1024:.0f} MiB) against its export, {rounds} rounds", flush=True)

    def from_file(hashed: bool) -> None:
        with open(stored, "rb", buffering=0) as f:
            assert _read_hashed(f, hashed) == fp or not hashed

    def from_socket(hashed: bool) -> None:
        curl = subprocess.Popen(["curl", "-sf", "--unix-socket", box.socket, url], stdout=subprocess.PIPE)
        assert curl.stdout is not None
        assert _read_hashed(curl.stdout, hashed) == fp or not hashed
        assert curl.wait() == 0

    def through_mount(cold: bool, *opts: str) -> tuple[float, float]:
        with b.mount(box, "mfusepy", *opts) as (where, proc, _log):
            path = b.export_file(where, fp)  # the one-byte layout probe, before the clock
            (b.drop_caches if cold else lambda: b.sh("cat", str(stored)))()
            cpu, t = _all_cpu([box.pid, proc.pid]), time.perf_counter()
            b.sh("cat", str(path))
            return time.perf_counter() - t, _all_cpu([box.pid, proc.pid]) - cpu

    ways = {"file": (lambda: from_file(False), "the file in $LXD_DIR/images, 1 MiB reads"),
            "file+sha": (lambda: from_file(True), "the file in $LXD_DIR/images, 1 MiB reads + sha256"),
            "cat": (lambda: b.sh("cat", str(stored)), "cat of the file in $LXD_DIR/images"),
            "curl": (lambda: from_socket(False), "curl on the socket's /export, 1 MiB reads of its output"),
            "curl+sha": (lambda: from_socket(True), "curl on the socket's /export, 1 MiB reads + sha256"),
            "mount": (None, "cat through a fresh mount, the server's own file (default; verified)"),
            "nolocal": (None, "cat through a fresh mount, -o nolocal: the socket (verified)")}
    for cold in (True, False):
        b.forget_disk_cache()
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for name, (fn, _label) in ways.items():
                if fn is None:
                    opts = ("-o", "nolocal") if name == "nolocal" else ()
                    results.setdefault(name, []).append(through_mount(cold, *opts))
                    b.forget_disk_cache()  # every mount's read is a first read
                    continue
                (b.drop_caches if cold else lambda: b.sh("cat", str(stored)))()
                cpu, t = _all_cpu([box.pid]), time.perf_counter()
                fn()
                results.setdefault(name, []).append((time.perf_counter() - t, _all_cpu([box.pid]) - cpu))
        median = {name: statistics.median(x[0] for x in results[name]) for name in ways}
        for name, (_fn, label) in ways.items():
            t = median[name]
            cpu = statistics.median(x[1] for x in results[name])
            ratios = "; the default mount: " + ", ".join(
                f"{median[other] / median['mount']:.2f}x {other}" for other in ("cat", "curl+sha", "nolocal")
            ) if name == "mount" else ""
            b.row(f"{label} ({'caches dropped' if cold else 'LXD warm'})", f"{gib / t:.2f} GiB/s",
                  f"median {t:.2f} s of {', '.join(f'{x[0]:.2f}' for x in results[name])}; "
                  f"CPU of all processes {cpu / gib:.2f} s/GiB{ratios}")
