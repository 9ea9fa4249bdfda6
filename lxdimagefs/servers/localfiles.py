"""A local server's own image files, read in place instead of through its socket.

LXD and Incus keep each image in their images folder (`$LXD_DIR/images`,
`/var/lib/incus/images`): a unified image's export is exactly the file
`<fp>`; a split image's export is a multipart stream whose two parts are
exactly `<fp>` (the metadata tarball) and `<fp>.rootfs`. Where the daemon
may read that folder (root on the server's host), the files give the bytes
with no request and no copy through the server, a split image's exact part
sizes and random access without spooling it, and nothing needs a second
copy in the local cache. They are a source like any other: the caller checks
what it reads against the fingerprint and the block checksums, as it checks
the socket's bytes. A file that is not owned and guarded as the server's
own is not used (the caller keeps the socket).

A verified image is read from a local file (the server's, here, or the disk
cache's) one 1 MiB block per FUSE request, two or three at a time: the
kernel's own readahead on the file is too short to keep the disk busy, and
`posix_fadvise(WILLNEED)` in the request's thread puts the page allocations
on the reader's path. `ReadAhead` asks on a thread of its own, a window
ahead, so the requests find their pages in memory (docs/PERFORMANCE.md,
"a new mount").
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lxdimagefs.keys import BadKey, Fingerprint

log = logging.getLogger(__name__)

MIB = 1 << 20
LEAD = 16 * MIB  # how far ahead of a sequential reader the disk is asked
STEP = 4 * MIB  # asked at a time, at least
SLACK = 4 * MIB  # how far a read may land from the last and still count as sequential (the
# kernel's readahead requests arrive out of order)
FILES = 64  # files followed at once
ROOTFS_SUFFIX = ".rootfs"
INCUS_RUN_SOCKET = "/run/incus/unix.socket"
INCUS_IMAGES = "/var/lib/incus/images"
OPEN_IMAGES = 8  # unified images' files kept open by LocalImages
_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO must not hang us


def images_folder(socket_path: str) -> Path:
    """The images folder of the server behind a local socket (`unix.socket` sits in its LXD_DIR)."""
    if os.path.realpath(socket_path) == INCUS_RUN_SOCKET:
        return Path(INCUS_IMAGES)
    return Path(socket_path).parent / "images"


class LocalFile:
    """One of the server's image files, open for reading at any offset."""

    def __init__(self, fd: int, name: str, size: int) -> None:
        self.fd, self.name, self.size = fd, name, size

    def readinto(self, offset: int, buffer: memoryview | bytearray) -> int:
        """Fill `buffer` from `offset` (less only at the end of the file); the bytes read."""
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalImage:
    """An image's file(s) in its server's folder: `parts` is (export,) or (metadata, rootfs)."""

    def __init__(self, fingerprint: Fingerprint, parts: tuple[LocalFile, ...]) -> None:
        self.fingerprint, self.parts = fingerprint, parts

    @property
    def split(self) -> bool:
        return len(self.parts) == 2

    @property
    def size(self) -> int:
        """The export's size as LXD's record gives it (for a split image, both parts')."""
        return sum(p.size for p in self.parts)

    def readinto(self, offset: int, buffer: memoryview | bytearray, part: int = 0) -> int:
        """Bytes of the unified export (or of part 0 = metadata, 1 = rootfs) from `offset`."""
        return self.parts[part].readinto(offset, buffer)

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def __enter__(self) -> LocalImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalImages:
    """The unified images of a server's folder, opened once and read from any thread: what serves a
    verified image's blocks in a reader's own thread, asking the disk ahead of a sequential one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ahead = ReadAhead()
        self._open: dict[str, LocalImage | None] = {}  # opened (or found unusable), oldest first
        self._lock = threading.Lock()

    def opened(self, fingerprint: str, size: int) -> int | None:
        """A descriptor of our own (the caller closes it: another thread may close the image
        meanwhile) on the unified export's file, or None where it cannot be used."""
        found = self._dup(fingerprint, size)
        return None if found is None else found[0]

    def _dup(self, fingerprint: str, size: int) -> tuple[int, LocalImage] | None:
        with self._lock:
            if fingerprint not in self._open:
                image = open_image(self.folder, fingerprint, size=size)
                if image is not None and image.split:  # a split image's parts are the spool's
                    image.close()
                    image = None
                self._open[fingerprint] = image
                while len(self._open) > OPEN_IMAGES:
                    old = self._open.pop(next(iter(self._open)))
                    if old is not None:
                        old.close()
            image = self._open[fingerprint]
            if image is None or image.size != size:
                return None
            return os.dup(image.parts[0].fd), image

    def readinto(self, fingerprint: str, size: int, offset: int, buffer: memoryview) -> bool:
        """Fill `buffer` with the export's bytes at `offset`; False where the file cannot give them."""
        found = self._dup(fingerprint, size)
        if found is None:
            return False
        fd, image = found
        try:
            if LocalFile(fd, "", size).readinto(offset, buffer) == len(buffer):
                self.ahead.note(fingerprint, fd, offset, len(buffer), size)
                return True
            log.warning("image file %s ended early at offset %d: reading the socket",
                        fingerprint[:12], offset)
        except OSError as e:
            log.warning("image file %s unreadable at offset %d (%s): reading the socket",
                        fingerprint[:12], offset, e.strerror)
        finally:
            os.close(fd)
        self._give_up(fingerprint, image)
        return False

    def _give_up(self, fingerprint: str, image: LocalImage) -> None:
        """A short read or an error: the file is not read again (until it leaves the open set)."""
        with self._lock:
            if self._open.get(fingerprint) is image:
                self._open[fingerprint] = None
                image.close()

    def close(self) -> None:
        with self._lock:
            for image in self._open.values():
                if image is not None:
                    image.close()
            self._open.clear()


def open_image(folder: Path, fingerprint: str, size: int | None = None, owner: int = 0) -> LocalImage | None:
    """The server's own file(s) of an image, or None where they cannot be used as its bytes.

    None when the folder or file cannot be read (not root, not this host), a
    file is not a regular one owned by `owner` and closed to other writers, or
    `size` (the image record's) is not theirs: the caller reads the socket. A
    rootfs that is there but cannot be used fails the whole image: a split
    image is never read half from its files.
    """
    try:
        fp = Fingerprint(fingerprint)
    except BadKey:
        return None
    opened: list[LocalFile] = []
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.debug("images folder %s not readable: %s", folder, e.strerror)
        return None
    try:
        if not _guarded(os.fstat(dir_fd), owner):
            log.debug("images folder %s is not the server's own: not used", folder)
            return None
        for name in (fp, fp + ROOTFS_SUFFIX):
            part = _open_part(dir_fd, name, owner)
            if part is None:
                break
            opened.append(part)
        image = LocalImage(fp, tuple(opened)) if opened else None
        if image is not None and size is not None and image.size != size:
            log.debug("image files of %s do not match the record: not used", fp)
            image = None
        if image is None:
            for p in opened:
                p.close()
        return image
    except OSError as e:
        for p in opened:
            p.close()
        log.debug("image files of %s not readable: %s", fp, e.strerror)
        return None
    finally:
        os.close(dir_fd)


def _open_part(dir_fd: int, name: str, owner: int) -> LocalFile | None:
    try:
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _guarded(st, owner):
        os.close(fd)
        raise PermissionError(0, f"{name} is not the server's own file")
    return LocalFile(fd, name, st.st_size)


def _guarded(st: os.stat_result, owner: int) -> bool:
    """Owned by the server's user and writable by nobody else."""
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class ReadAhead:
    """Local files being read in order (by key), and how far ahead of each the disk was asked."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int]] = {}  # key -> (where the last read ended, asked up to)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def note(self, key: str, fd: int, offset: int, size: int, total: int) -> None:
        """A read of [offset, offset + size) of the file `fd` (of `total` bytes) was made."""
        end = offset + size
        with self._lock:
            last, asked = self._files.pop(key, (0, 0))
            if abs(offset - last) > SLACK:  # not sequential: no window, and start over
                self._files[key] = (end, end)
                return
            start, stop = max(asked, end), min(total, end + LEAD)
            if stop - start < STEP and stop < total:
                start = stop  # not enough missing yet: ask in larger pieces
            self._files[key] = (max(last, end), max(asked, stop if start < stop else asked))
            while len(self._files) > FILES:
                del self._files[next(iter(self._files))]
            if start >= stop:
                return
            if self._pool is None:  # made on first use: the daemon forks after start-up
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="readahead")
            pool = self._pool
        pool.submit(_advise, os.dup(fd), start, stop - start)


def _advise(fd: int, offset: int, length: int) -> None:
    """WILLNEED, a piece at a time: the kernel reads at most the device's largest I/O per call."""
    try:
        with contextlib.suppress(OSError):
            for at in range(offset, offset + length, STEP):
                os.posix_fadvise(fd, at, min(STEP, offset + length - at), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
