"""A VM's ext4 root filesystem as ratarmountcore reads it, with what its entries leave out put back.

ratarmountcore 0.11's EXT4MountSource (over the `ext4` package) gives no symlink target, only the
low 16 bits of an owner and group, no device number and no link count; its userdata is a bare
inode number where the rest of contents/ reads a squashfs-like place (inodes.header); its folder
listing gives names with trailing padding bytes. Each inode
has them all: they are put back here, so a VM's files look as a container's do.
"""

from __future__ import annotations

import os
import stat
from typing import IO, Any

import cachetools
from ratarmountcore.mountsource.formats.ext4 import EXT4MountSource
from ratarmountcore.mountsource.MountSource import FileInfo
from ratarmountcore.SQLiteIndex import SQLiteIndexedTarUserData

from lxdimagefs.contents.disk.ext4check import CheckedInodes, Ext4Fault


def place(number: int) -> SQLiteIndexedTarUserData:
    return SQLiteIndexedTarUserData(offset=0, offsetheader=number, istar=False, issparse=False,
                                    isgenerated=False, recursiondepth=0)


class Ext4Rootfs(EXT4MountSource):
    """ratarmountcore's ext4 source with full owners, symlink targets, devices and link counts."""

    def __init__(self, fileobj: Any, tag: int = 0) -> None:
        """`tag`: added to each inode number in an entry's place (another ext4 than the root's)."""
        super().__init__(fileobj)
        self._tag = tag
        self.fileSystem.inodes = CheckedInodes(self.fileSystem, fileobj)
        # entries a listing found, by path, for the lookups that follow it: the `ext4` package
        # resolves each path from the root again, reading every folder on the way
        self._known: cachetools.LRUCache[str, FileInfo] = cachetools.LRUCache(8192)
        self._convert_ext4_directory_entry_to_file_info = self._info

    def _info(self, inode: Any) -> FileInfo:
        high = inode.osd2.linux2
        mode = int(inode.i_mode.value if hasattr(inode.i_mode, "value") else inode.i_mode)
        link = os.fsdecode(inode.readlink()) if stat.S_ISLNK(mode) else ""
        return FileInfo(size=0 if stat.S_ISDIR(mode) else int(inode.i_size), mtime=int(inode.i_mtime),
                        mode=mode, linkname=link,
                        uid=int(inode.i_uid) | int(high.l_i_uid_high) << 16,
                        gid=int(inode.i_gid) | int(high.l_i_gid_high) << 16,
                        userdata=[place(self._tag | int(inode.i_no))])

    def _inode(self, info: FileInfo) -> Any:
        return self.fileSystem.inodes[int(info.userdata[-1].offsetheader) & 0xFFFFFFFF]

    def open(self, fileInfo: FileInfo, buffering: int = -1) -> IO[bytes]:
        return self._inode(fileInfo).open()

    def read(self, fileInfo: FileInfo, size: int, offset: int) -> bytes:
        with self.open(fileInfo) as f:
            f.seek(offset)
            return f.read(size)

    def nlink(self, info: FileInfo) -> int:
        """How many names a file has (a folder: 1, as for a squashfs root)."""
        return 1 if stat.S_ISDIR(info.mode) else int(self._inode(info).i_links_count)

    def device(self, info: FileInfo) -> int:
        """A device's number: the old 16-bit encoding in i_block[0], else the new one in i_block[1]."""
        block = self._inode(info).i_block
        if block[0]:
            return os.makedev((block[0] >> 8) & 0xFF, block[0] & 0xFF)
        dev = block[1]
        return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))

    def lookup(self, path: str, fileVersion: int = 0) -> FileInfo | None:
        """An entry; EIO where it is a folder that is one of the folders above it (a loop: the
        kernel looks up each folder of a path in turn, so a path through a loop meets this)."""
        path = "/" + path.strip("/")
        found = self._known.get(path) or super().lookup(path)
        if found is not None and stat.S_ISDIR(found.mode):
            parts = [p for p in path.split("/") if p]
            seen = {2}
            for depth in range(1, len(parts) + 1):
                above = "/" + "/".join(parts[:depth])
                known = self._known.get(above)
                number = self._number(known) if known else int(self.fileSystem.inode_at(above).i_no)
                if number in seen:
                    raise Ext4Fault(f"{path}: a directory loop (inode {number} is its own ancestor)")
                seen.add(number)
        return found

    def _number(self, info: FileInfo) -> int:
        return int(info.userdata[-1].offsetheader) & 0xFFFFFFFF

    def list(self, path: str) -> dict[str, FileInfo] | None:
        """A folder's entries; a name is its first name_len bytes (the `ext4` package's name runs
        on into the record's padding: `fifo\\x13`)."""
        try:
            folder = self.fileSystem.inode_at(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(self._info(folder).mode):
            return None
        found = {os.fsdecode(e.name[:e.name_len]): self._info(self.fileSystem.inodes[e.inode])
                 for e, _ in folder.opendir() if e.name[:e.name_len] not in (b".", b"..")}
        inside = "/" + path.strip("/")
        for name, info in found.items():  # `ls -l`, `find`: each name's lookup follows its listing
            self._known[f"{inside.rstrip('/')}/{name}"] = info
        return found
