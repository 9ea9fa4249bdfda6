"""A squashfs rootfs as ratarmountcore reads it, with what its rows leave out put back.

ratarmountcore 0.11 gives every squashfs entry uid and gid 0, ORs a file
type into a mode that already holds one (a character device became a
symlink, a FIFO or block device no valid type) and makes its root up
(0777, owned by the reader, dated now). PySquashfsImage, under it, has each
inode's own values: they go into the index as they are.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ratarmountcore.mountsource.formats.squashfs import SquashFSMountSource
from ratarmountcore.mountsource.MountSource import FileInfo
from ratarmountcore.SQLiteIndex import SQLiteIndex, SQLiteIndexedTarUserData

from lxdimagefs.contents.inodes import header

# Part of the index's file name: an index written from ratarmountcore's own rows is never read.
INDEX = "rootfs2"
BLOCKS_KEPT = 16


class SquashfsRootfs(SquashFSMountSource):
    """ratarmountcore's squashfs source with each inode's own type, owner, group and root."""

    def __init__(self, path: Any, **options: Any) -> None:
        super().__init__(path, **options)
        # PySquashfsImage keeps 256 decoded blocks (32 MiB of 128 KiB ones) for all images at
        # once: a few per image serve a reader in path order (a fragment holds many small files).
        decode = type(self.image)._read_data_block.__wrapped__.__get__(self.image)
        self.image._read_data_block = functools.lru_cache(maxsize=BLOCKS_KEPT)(decode)
        ref = self.image.sblk.root_inode
        root = self.image.read_inode(ref)
        place = SQLiteIndexedTarUserData(offset=0, offsetheader=ref, istar=False, issparse=False,
                                         isgenerated=False, recursiondepth=0)
        self.root_info = FileInfo(size=0, mtime=root.time, mode=root.mode, linkname="", uid=root.uid,
                                  gid=root.gid, userdata=[place])

    def _convert_to_row(self, inodeOffset: int, info: Any) -> tuple:
        row = list(super()._convert_to_row(inodeOffset, info))
        row[6], row[9], row[10] = info.mode, info.uid, info.gid  # PySquashfsImage's mode has the type
        return tuple(row)

    def lookup(self, path: str, fileVersion: int = 0) -> FileInfo | None:
        if SQLiteIndex.normpath(path) == "/":
            return self.root_info
        return super().lookup(path, fileVersion)

    def device(self, info: FileInfo) -> int:
        """A device's number; squashfs keeps it in the kernel's new_encode_dev form."""
        dev = self.image.read_inode(header(info)).rdev
        return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))

