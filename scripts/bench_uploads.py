"""Benchmark sections for issue 16: imports (item 7) and the server's own image files (item 4).

Used by scripts/benchmark.py (`--imports-only`, `--local-files-only`); the
helpers they share (mount, drop_caches, row) live there.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
from pathlib import Path

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


def bench_import_rounds(box: Sandbox, tarball: Path, rounds: int) -> None:
    """`cp` into import/ against `lxc image import`, interleaved, all caches dropped before each.

    Each round runs both (alternating which goes first) on a fresh mount
    with default options; the ratio is taken within the round, so a load
    that comes and goes on the machine touches both sides alike.
    """
    gib = tarball.stat().st_size / (1 << 30)
    print(f"\nImporting a {gib * 1024:.0f} MiB tarball, {rounds} interleaved rounds", flush=True)
    ratios, t_lxcs, t_cps, cpus = [], [], [], []
    for i in range(rounds):
        times = {}
        for side in (("lxc", "cp") if i % 2 == 0 else ("cp", "lxc")):
            if side == "lxc":
                b.drop_caches()
                t = time.perf_counter()
                fp = box.import_image(tarball)
                times["lxc"] = time.perf_counter() - t
            else:
                with b.mount(box) as (where, proc, _log):
                    b.drop_caches()
                    cpu0, threads0 = b._cpu_seconds(proc.pid), _threads_cpu(proc.pid)
                    with b.RSSWatch(proc.pid) as watch:
                        t = time.perf_counter()
                        b.sh("cp", str(tarball), str(where / "import" / tarball.name))
                        times["cp"] = time.perf_counter() - t
                    cpu = b._cpu_seconds(proc.pid) - cpu0
                    threads = _busiest(threads0, _threads_cpu(proc.pid))
                    fp = next(iter(os.listdir(where / "by-fingerprint")))
            box.lxc("image", "delete", fp)
        ratio = times["cp"] / times["lxc"]
        ratios.append(ratio)
        t_lxcs.append(times["lxc"])
        t_cps.append(times["cp"])
        cpus.append(cpu / gib)
        b.row(f"round {i + 1}: lxc image import / cp into import/",
              f"{times['lxc']:.2f} / {times['cp']:.2f} s",
              f"{ratio:.2f}x; daemon CPU {cpu / gib:.2f} s/GiB (threads user+sys: {threads}); "
              f"peak RSS {watch.peak / 1024:.0f} MiB")
    b.row("cp into import/ against lxc image import (median of the rounds)",
          f"{statistics.median(ratios):.2f}x",
          f"range {min(ratios):.2f}-{max(ratios):.2f}x; lxc {min(t_lxcs):.2f}-{max(t_lxcs):.2f} s, "
          f"cp {min(t_cps):.2f}-{max(t_cps):.2f} s; daemon CPU median "
          f"{statistics.median(cpus):.2f} s/GiB")


def _read_hashed(path: Path) -> str:
    """Read a file as the fetch path reads the socket: 1 MiB at a time into one buffer, hashed."""
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def bench_local_files(box: Sandbox, fp: str, rounds: int = 3) -> None:
    """Reading the server's own image file directly, against its export through the socket."""
    stored = box.lxd_dir / "images" / fp
    gib = stored.stat().st_size / (1 << 30)
    url = f"lxd/1.0/images/{fp}/export"
    print(f"\nThe server's own file ({gib * 1024:.0f} MiB) against its export, {rounds} rounds", flush=True)

    def curl_hashed() -> None:
        curl = subprocess.Popen(["curl", "-sf", "--unix-socket", box.socket, url], stdout=subprocess.PIPE)
        hashed = subprocess.run(["sha256sum"], stdin=curl.stdout, capture_output=True, check=True)
        assert curl.wait() == 0 and hashed.stdout.split()[0].decode() == fp

    def mount_read() -> None:
        with b.mount(box) as (where, _proc, _log):
            b.drop_caches()
            t = time.perf_counter()
            b.sh("cat", str(b.export_file(where, fp)))
            results.setdefault("mount", []).append(time.perf_counter() - t)

    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in (("file", lambda: _read_hashed(stored) == fp or _fail(stored)),
                         ("curl", curl_hashed)):
            b.drop_caches()
            t = time.perf_counter()
            fn()
            results.setdefault(name, []).append(time.perf_counter() - t)
        mount_read()
    for name, label in (("file", "the file in $LXD_DIR/images, 1 MiB reads + sha256 (Python)"),
                        ("curl", "curl --unix-socket on /export | sha256sum"),
                        ("mount", "cat of the export through a fresh mount")):
        t = statistics.median(results[name])
        b.row(label, f"{gib / t:.2f} GiB/s",
              f"median {t:.2f} s of {', '.join(f'{x:.2f}' for x in results[name])}; all caches dropped")


def _fail(path: Path) -> bool:
    raise AssertionError(f"{path} does not hash to its fingerprint")
