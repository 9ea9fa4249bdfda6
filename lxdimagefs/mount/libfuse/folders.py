"""The private folders a connection of the daemon's own is mounted in (mount/inside.py).

Each is claimed by a lock its daemon holds for its life (`contents-XXXX.lock` beside it, flock): a
daemon that was killed leaves its mount there dead ("Transport endpoint is not connected") with
the lock free, and the next daemon of the user unmounts it (lazily) and removes it. A lock that
cannot be taken is a live daemon's, whose mount is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2


def where(allow_other: bool) -> tuple[Path, int]:
    """A new folder to mount on and the descriptor of its lock (held until closed), in a folder the
    user alone may list: $XDG_RUNTIME_DIR (if the user's, and not with allow_other: others may not
    pass through it), /run for root, else the temporary folder. Others may pass through it (never
    list it) once a mount lets them in: never taken back (an earlier mount's links lead through it)."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    own = bool(runtime) and not allow_other and os.path.isdir(runtime) and os.stat(runtime).st_uid == uid
    base = Path(runtime) / "lxdimagefs" if own else \
        Path("/run/lxdimagefs") if uid == 0 else Path(tempfile.gettempdir()) / f"lxdimagefs-{uid}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise OSError(errno.EPERM, f"{base} is not a folder of this user's")
    os.chmod(base, 0o711 if allow_other else stat.S_IMODE(st.st_mode) & 0o711)
    sweep(base)
    fd, claim = tempfile.mkstemp(dir=base)  # locked before it bears a name the sweep takes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        folder = Path(tempfile.mkdtemp(prefix="contents-", dir=base))
        os.rename(claim, f"{folder}.lock")
    except BaseException:
        os.close(fd)
        Path(claim).unlink(missing_ok=True)
        raise
    return folder, fd


def release(folder: Path, fd: int) -> None:
    """The folder removed (unless something still holds it) and its claim with it."""
    try:
        folder.rmdir()
    except OSError as e:  # still held (lazily unmounted): left for the next sweep
        log.info("the inside connection's folder %s stays: %s", folder, e.strerror)
        os.close(fd)
        return
    Path(f"{folder}.lock").unlink(missing_ok=True)
    os.close(fd)


def sweep(base: Path) -> None:
    """What killed daemons left in `base`: their mounts unmounted, their folders removed."""
    for lock in base.glob("contents-*.lock"):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its daemon lives
            os.close(fd)
            continue
        folder = lock.with_suffix("")
        try:
            _unmount(folder)
            folder.rmdir()
        except FileNotFoundError:  # a claim whose folder was never made or is gone: the claim goes
            pass
        except OSError as e:
            log.info("%s, left by a daemon that did not unmount, stays: %s", folder, e.strerror)
            os.close(fd)
            continue
        try:
            lock.unlink()
            log.info("removed %s, left by a daemon that did not unmount", folder)
        except OSError as e:
            log.info("%s, left by a daemon that did not unmount, stays: %s", folder, e.strerror)
        finally:
            os.close(fd)


def _unmount(folder: Path) -> None:
    """Lazily (a dead connection answers nothing); nothing if nothing is mounted there."""
    if os.getuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(folder), MNT_DETACH)  # EINVAL: not mounted
    else:
        subprocess.run(["fusermount3", "-u", "-z", "-q", str(folder)], capture_output=True, check=False)
