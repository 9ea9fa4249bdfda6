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
import threading
import time

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
TRIM_EVERY = 2.0  # seconds between two malloc_trim calls


def start(mountpoint: str) -> None:
    """The mount is served from now on: raise its readahead, and keep handing freed memory back."""
    if mountpoint:  # in a thread: the stat it makes must be answered by this daemon, after init
        threading.Thread(target=raise_readahead, args=(mountpoint,), daemon=True, name="readahead").start()
    libc = _glibc()
    if libc is not None:
        threading.Thread(target=_trim_forever, args=(libc,), daemon=True, name="malloc-trim").start()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc from giving each of the daemon's threads its own malloc arena.

    1 MiB blocks are allocated on fetch threads and freed on others; with an
    arena per thread, freed blocks linger in each. Measured with the soak:
    RSS 135-139 MiB with glibc's default, 97-107 MiB with two arenas.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


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


def raise_readahead(mountpoint: str, kib: int = 1024) -> bool:
    """Let the kernel read ahead `kib` on this mount (root only), for files in the page cache.

    The kernel gives a FUSE mount 128 KiB of readahead; verified exports read through the page
    cache ask the daemon for 1 MiB at a time instead (docs/PERFORMANCE.md). Must not be called
    from a FUSE callback: the stat asks this daemon.
    """
    if os.geteuid() != 0:
        return False
    deadline = time.monotonic() + 10
    while not os.path.ismount(mountpoint):  # init runs before the kernel attaches the mount
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    dev = os.stat(mountpoint).st_dev
    if os.major(dev) != 0:  # a FUSE mount's device is anonymous: never touch a disk's setting
        return False
    knob = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(f"{kib}\n")
    except OSError:
        return False
    return True
