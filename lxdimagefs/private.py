"""Files and folders of this user's inside shared folders ($TMPDIR, the cache folder).

Another local user may have made a name there first: a folder they own (to read what is
written into it), a symlink (to redirect a write), a FIFO (to stall an open for good). Each
is refused here, before anything is read or written through it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import threading
from pathlib import Path


def private_folder(path: Path) -> Path:
    """`path` made if missing (0700), and refused unless it is a folder, not a link, this user's
    alone: PermissionError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path} is not a folder only this user can use")
    return path


def open_own(path: Path | str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of a regular file of this user's: never follows a link, never waits (a FIFO
    or a device answers at once, refused), and a file another user owns is refused:
    PermissionError. `flags` as for os.open (O_CREAT to make it, 0600)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a regular file of this user's")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def alive(pid: int) -> bool:
    """Whether the process that claimed a folder here (its pid in it) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class Temporary:
    """A file written beside `final` (`.NAME.PID.TID`), then renamed over it, locked (flock) by its
    writer from the moment it exists until it is renamed or removed. A daemon killed while
    writing leaves it behind: `abandoned` tells the disk cache's scan it may go (its lock can be
    taken), which no other sign tells soundly (a pid may be reused, or another namespace's).
    Made 0600, anew (O_EXCL), never through a link; or a hard link to `src`, locked at once."""

    def __init__(self, final: Path, src: Path | None = None) -> None:
        self.path = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}")
        if src is not None:
            os.link(src, self.path)
        flags = os.O_RDONLY if src is not None else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            self.fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            self.path.unlink(missing_ok=True)
            raise
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # a scan that took it first removed the name: the rename fails

    @classmethod
    def of(cls, final: Path, src: Path) -> Temporary:
        """`src` linked beside `final`, or copied there when it is on another filesystem."""
        try:
            return cls(final, src)
        except OSError:
            made = cls(final)
            try:
                shutil.copyfile(src, made.path)
            except BaseException:
                made.__exit__()
                raise
            return made

    def __enter__(self) -> Temporary:
        return self

    def __exit__(self, *_: object) -> None:
        self.path.unlink(missing_ok=True)  # renamed already, unless it failed
        os.close(self.fd)


def abandoned(path: str) -> bool:
    """Whether a `Temporary` was left by a writer that is gone (no lock on it); if so it is removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # under its lock: a writer that takes it next finds its name gone
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def moved(fd: int, path: Path | str) -> bool:
    """Whether `path` no longer names the file open as `fd`: removed, or replaced (another daemon
    sharing the folder evicted it, and maybe made it again)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino)
