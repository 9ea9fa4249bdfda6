"""What ratarmountcore (0.11) leaves out of an entry inside an image, put back.

Its index keeps a path's mode, owner, size, time and link target, but not
a device's number nor how many names a file has, and a tar block device
has no file type in it. What the index lacks is read from the archive's own
header or inode, only for the few entries that need it (devices); link
counts come from one query of the index when the archive is opened.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ratarmountcore is imported on the first look inside an image (archives.py)
    from ratarmountcore.mountsource.MountSource import FileInfo, MountSource

DEVICES = stat.S_IFCHR, stat.S_IFBLK


def header(info: FileInfo) -> int:
    """Where an entry's header (tar) or inode (squashfs) is: what tells one file from another."""
    return int(info.userdata[-1].offsetheader)


def generated(info: FileInfo) -> bool:
    """A folder ratarmountcore made up (the archive's root, a parent no header names)."""
    return bool(getattr(info.userdata[-1], "isgenerated", False))


def tar_header(source: Any, info: FileInfo) -> tarfile.TarInfo:
    """An entry's own tar header, read again from the (decompressed) archive."""
    raw = source.tarFileObject
    raw.seek(header(info))
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        found = tar.next()
    if found is None:
        raise ValueError(f"no tar header at offset {header(info)}")
    return found


def tar_special(source: Any, info: FileInfo) -> tuple[int, int]:
    """A tar device's (mode, number): the index has no block device type and no numbers."""
    found = tar_header(source, info)
    kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
            tarfile.FIFOTYPE: stat.S_IFIFO}.get(found.type, stat.S_IFREG)
    rdev = os.makedev(found.devmajor, found.devminor) if kind in DEVICES else 0
    return kind | stat.S_IMODE(found.mode), rdev


def tar_links(source: MountSource) -> dict[str, int]:
    """How many names each hard-linked file of a tarball has, keyed by its path ("/rootfs/...")."""
    rows = source.index.get_connection().execute(
        'SELECT linkname, COUNT(*) FROM "files" WHERE linkname != \'\' AND (mode & 61440) = 0 '
        'GROUP BY linkname').fetchall()
    return {inside(name): count + 1 for name, count in rows}


def squashfs_links(source: MountSource) -> dict[int, int]:
    """How many names each hard-linked inode of a squashfs has, keyed by its inode's place."""
    rows = source.index.get_connection().execute(
        'SELECT offsetheader, COUNT(*) FROM "files" WHERE (mode & 61440) != 16384 '
        'GROUP BY offsetheader HAVING COUNT(*) > 1').fetchall()
    return {int(offset): count for offset, count in rows}


def inside(name: str) -> str:
    """A tar link target (relative to the archive's root, maybe with ./) as an absolute path."""
    return posixpath.normpath("/" + name.lstrip("/"))
