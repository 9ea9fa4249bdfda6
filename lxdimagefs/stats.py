"""What the daemon did and is doing, counted where it happens: one small table for the whole
process, read by `lxdimagefs stats` and the Prometheus text (mount/metrics.py).

Cheap enough for the read path: one add under one lock per block or per call (a read of a
verified block costs tens of microseconds; this, well under one). Nothing here logs or allocates
per call beyond the key tuple.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Key = tuple[str, tuple[tuple[str, str], ...]]

_lock = threading.Lock()
_counts: dict[Key, float] = {}
_times: dict[str, list[float]] = {}  # FUSE operation -> [calls, seconds]
_gauges: dict[str, Callable[[], list[tuple[dict[str, str], float]]]] = {}
_progress: dict[str, tuple[str, str, float]] = {}  # id -> (kind, name, fraction done, or -1)
_within = threading.local()  # the operations this thread runs, outermost first
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)%")


def key(name: str, **labels: str) -> Key:
    """The key of a counter, to be made once and given to `add_to` on a hot path."""
    return (name, tuple(sorted(labels.items())))


def add(name: str, value: float = 1, **labels: str) -> None:
    """Count `value` more of `name` (a counter: only ever grows)."""
    add_to(key(name, **labels), value)


def add_to(counter: Key, value: float = 1) -> None:
    with _lock:
        _counts[counter] = _counts.get(counter, 0) + value


def timed(operation: str, seconds: float) -> None:
    """One call of a FUSE operation and how long it took: one lock, one list (every call pays it)."""
    with _lock:
        times = _times.get(operation)
        if times is None:
            times = _times[operation] = [0, 0.0]
        times[0] += 1
        times[1] += seconds


def times() -> dict[str, tuple[int, float]]:
    """Each FUSE operation's (calls, seconds)."""
    with _lock:
        return {op: (int(t[0]), t[1]) for op, t in _times.items()}


def gauge(name: str, read: Callable[[], list[tuple[dict[str, str], float]]]) -> None:
    """A value read when asked (labels, value) pairs: the disk cache's use, things in flight."""
    _gauges[name] = read


@contextmanager
def underway(kind: str, name: str) -> Iterator[Callable[..., None]]:
    """A long operation (an import unpacked, a server-side copy, a refresh) while it runs; the
    function it yields records how far along it is (0..1)."""
    key = f"{kind}:{name}:{id(object())}:{time.monotonic()}"
    stack = _within.__dict__.setdefault("stack", [])
    outer = stack[0] if stack else None  # an import whose LXD operation this is: it shows its progress
    with _lock:
        _progress[key] = (kind, name, -1.0)
    stack.append(key)

    def say(fraction: float, what: str = "") -> None:
        fraction = max(-1.0, min(1.0, fraction))
        with _lock:
            if key in _progress:
                _progress[key] = (kind, what or name, fraction)
            if outer in _progress:
                _progress[outer] = (*_progress[outer][:2], fraction)

    try:
        yield say
    finally:
        stack.remove(key)
        with _lock:
            _progress.pop(key, None)


def fraction(metadata: object) -> float:
    """How far along an LXD operation says it is (`"download_progress": "rootfs: 45% (3 MB/s)"`,
    `"progress": {"percent": "45"}`): 0..1, or -1 when it says nothing."""
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if "progress" in str(key):
                if isinstance(value, dict) and "percent" in value:
                    value = f"{value['percent']}%"
                found = _PERCENT.search(str(value))
                if found:
                    return float(found.group(1)) / 100
    return -1.0


def progress(kind: str | None = None, name: str | None = None) -> list[tuple[str, str, float]]:
    """The long operations under way (of that kind and name): (kind, name, fraction done, or -1)."""
    with _lock:
        return [p for p in _progress.values() if kind in (None, p[0]) and name in (None, p[1])]


def snapshot() -> tuple[dict[Key, float], dict[str, list[tuple[dict[str, str], float]]]]:
    """(counters, gauges) as of now."""
    with _lock:
        counts = dict(_counts)
    values = {}
    for name, read in list(_gauges.items()):
        try:
            values[name] = read()
        except Exception:  # a gauge must never break the report
            values[name] = []
    return counts, values
