"""What the daemon asks of the host it runs on: the mount's readahead, and glibc's allocator.

Threads start in `start`, called from FUSE's init: by then the daemon has
forked into the background (a thread started before the fork would not
exist in the daemon). Each setting's measurement is in docs/RELIABILITY.md
(the soak) or docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import time
from pathlib import Path

M_ARENA_MAX = -8  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_FROM = 1 << 20  # bytes from which an allocation is a mapping of its own, unmapped when freed
TRIM_EVERY = 2.0  # seconds between two malloc_trim calls


def start(mountpoint: str) -> None:
    """The mount is served from now on: raise its readahead, and keep handing freed memory back."""
    if mountpoint:  # in a thread: it waits for the kernel to attach the mount, after init
        threading.Thread(target=raise_readahead, args=(mountpoint,), daemon=True, name="readahead").start()
    libc = _glibc()
    if libc is not None:
        threading.Thread(target=_trim_forever, args=(libc,), daemon=True, name="malloc-trim").start()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc from giving each of the daemon's threads its own malloc arena.

    1 MiB blocks are allocated on fetch threads and freed on others; with an
    arena per thread, freed blocks linger in each. Measured with the soak:
    RSS 135-139 MiB with glibc's default, 97-107 MiB with two arenas.

    And allocations of MMAP_FROM and more (a block, libfuse's buffer for a 1 MiB read) are
    mappings of their own, handed back the moment they are freed: glibc's default raises that
    threshold to the size of the first one freed, after which they came from the heap and left
    holes in it until the next trim. contents/, `diff -r` of two images: RSS peak 106-111 -> 96-100
    MiB; the first mount (a .tar.gz decoded meanwhile) 128 -> 99-108 MiB. Each 1 MiB READ's
    buffer (libfuse's) is now faulted in afresh; blocks reuse evicted buffers (data/diskparts.py),
    so whole-tree reads are no slower (docs/PERFORMANCE.md).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


def _trim_forever(libc: ctypes.CDLL) -> None:
    """Hand freed heap pages back to the kernel every TRIM_EVERY seconds.

    glibc gives back only the free space at the top of a heap. The 1 MiB
    buffer libfuse allocates for each read and frees after the reply leaves
    holes between live blocks that stay resident: the soak's RSS after its
    first second sat at 93-102 MiB without this, 68-71 MiB with it. What a
    trim gives back is faulted in again at most once per period.
    """
    while True:
        time.sleep(TRIM_EVERY)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (others have no such knobs), else None."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        if libc.gnu_get_libc_version and libc.mallopt and libc.malloc_trim:
            return libc
    return None


def raise_readahead(mountpoint: str, kib: int = 1024, settle: float = 1.0) -> bool:
    """Let the kernel read ahead `kib` on this mount (root only), for files in the page cache.

    The kernel gives a FUSE mount 128 KiB of readahead; verified exports read through the page
    cache ask the daemon for 1 MiB at a time instead (docs/PERFORMANCE.md). The kernel sets the
    value again when the daemon's INIT answer arrives, which this thread cannot see without
    asking the mount: it writes until the value has held for `settle` seconds.
    """
    if os.geteuid() != 0:
        return False
    deadline = time.monotonic() + 10
    while (dev := mount_device(mountpoint)) is None:  # init runs before the kernel attaches the mount
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    knob = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    held = 0.0
    try:
        while held < settle and time.monotonic() < deadline:
            if knob.read_text().strip() != str(kib):
                knob.write_text(f"{kib}\n")
                held = 0.0
            time.sleep(0.1)
            held += 0.1
    except OSError:
        return False
    return held >= settle


def mount_device(mountpoint: str) -> str | None:
    """The FUSE mount's device ("0:N") on `mountpoint`, from /proc/self/mountinfo: asking the mount
    itself (a stat) would hold it while the daemon answers, and a `fusermount -u` made meanwhile
    failed with EBUSY (seen in CI right after a mount)."""
    where = os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):  # the newest mount on a path is listed last
        fields, _, kind = line.partition(" - ")
        parts = fields.split()
        unescaped = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        if unescaped == where and kind.startswith("fuse") and parts[2].startswith("0:"):
            return parts[2]
    return None
