"""Python threads named for the OS too, so per-thread CPU says whose it is.

Python 3.11 names threads for itself only; the kernel's name (`/proc/PID/task/TID/comm`, what
`top -H`, `perf` and scripts/benchmark.py --threads show) stays the process's. The threads that do
the work of a read name themselves: hash, fetch_N, diskwrite; the rest (FUSE's own) stay `python`.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


def name_this_thread() -> None:
    """Give the calling thread's OS thread its Python name (cut to the kernel's 15 bytes)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(threading.current_thread().name[:15])
