"""The cost of a request inside an image (issue 24): the system calls whole-tree commands repeat,
timed through contents/ and on the unpacked tree, in one run.

On a repeat pass the kernel keeps names, attributes and pages, and still asks the daemon at each
`open` and `close` of a file (OPEN, RELEASE) and each listing of a folder (OPENDIR, READDIRPLUS,
READDIR, RELEASEDIR): what `find`, `diff -r` and `grep -r` cost then is those requests times what
one costs. Each loop runs on a mount that has seen the tree once (as a repeat pass does):

    .venv/bin/python scripts/benchmark.py --requests [--baseline DIR]

`--baseline DIR`: another checkout's lxdimagefs as a second mount side by side (run from a folder
without lxdimagefs/ in it, so that each side imports its own).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from benchmark import _cpu_seconds, mount, row, sh
from lxd_sandbox import Sandbox, pack_unified

FOLDERS, FILES, WIDE = 20, 50, 300  # 20 folders of 50 files, and one folder of 300 names


def _tree(work: Path) -> Path:
    root = work / "requests" / "rootfs"
    for d in range(FOLDERS):
        (root / f"d{d:02}").mkdir(parents=True)
        for f in range(FILES):
            (root / f"d{d:02}" / f"f{f:03}").write_bytes(os.urandom(2048))
    (root / "wide").mkdir()
    for f in range(WIDE):
        (root / "wide" / f"name-{f:04}").write_bytes(b"x")
    return root


def _loops(root: Path) -> list[tuple[str, int, Callable[[], object]]]:
    one, small, wide = root / "d00" / "f000", root / "d00", root / "wide"
    return [("open + close of a file", 5000, lambda: os.close(os.open(one, os.O_RDONLY))),
            (f"listing of a folder of {FILES} files", 2000, lambda: os.listdir(small)),
            (f"listing of a folder of {WIDE} names", 1000, lambda: os.listdir(wide)),
            (f"find over {FOLDERS * (FILES + 1) + WIDE + 2} entries", 20, lambda: sh("find", str(root)))]


def _per_call(n: int, call: Callable[[], object], pid: int | None = None) -> tuple[float, float]:
    """Microseconds per call, wall and (with `pid`) the daemon's CPU, best of three runs of `n`."""
    for _ in range(min(n, 50)):
        call()
    best = (float("inf"), 0.0)
    for _ in range(3):
        cpu = _cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        for _ in range(n):
            call()
        took = (time.perf_counter() - started) / n * 1e6
        if took < best[0]:
            best = (took, ((_cpu_seconds(pid) - cpu) / n * 1e6) if pid else 0.0)
    return best


def bench_requests(box: Sandbox, work: Path, baseline: Path | None = None) -> None:
    source = _tree(work)
    fp = box.import_image(pack_unified(source, work / "requests.tar"))
    sides = [("lxdimagefs", {})] + ([("baseline", {"PYTHONPATH": str(baseline)})] if baseline else [])
    print("\nThe cost of a request inside an image, against the same calls on the unpacked tree", flush=True)
    unpacked = {what: _per_call(n, call)[0] for what, n, call in _loops(source)}
    for side, env in sides:
        with mount(box, "mfusepy", env_extra=env) as (where, proc, _log):
            inside = where / "contents" / "by-fingerprint" / fp / "rootfs"
            sh("find", str(inside))  # the tree seen once, as before a repeat pass
            for what, n, call in _loops(inside):
                wall, cpu = _per_call(n, call, proc.pid)
                row(f"{what}, {side}", f"{wall:.0f} us (daemon CPU {cpu:.0f} us)",
                    f"{wall / unpacked[what]:.1f}x the unpacked tree's {unpacked[what]:.1f} us")
    shutil.rmtree(work / "requests", ignore_errors=True)
