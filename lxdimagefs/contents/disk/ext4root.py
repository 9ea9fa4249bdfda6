"""A VM's ext4 filesystems as contents/ reads a source, its entries as complete as a container's.

ratarmountcore 0.11's EXT4MountSource (over the `ext4` package), used before, gave no symlink
target, only the low 16 bits of an owner and group, whole seconds, no device number and no link
count, and found each path from the root again (reading every folder on the way). Here an entry's
stat, a folder's names and a file's bytes are read from the inode itself (ext4check.CheckedInodes),
a path from its parent folder's names (kept by inode number, bounded), as the kernel does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import stat
import struct
from array import array
from collections.abc import Iterator
from typing import Any, NamedTuple

import cachetools
from ratarmountcore.mountsource.MountSource import FileInfo

from lxdimagefs.contents.disk.ext4check import CheckedInodes
from lxdimagefs.contents.disk.ext4map import Ext4Fault

log = logging.getLogger(__name__)

ROOT = 2
KINDS = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                   stat.S_IFSOCK})
LINK_MAX = 4096  # PATH_MAX: no longer target is read
_HEAD = struct.Struct("<HHI8xi4xHH")  # i_mode, i_uid, i_size_lo, i_mtime, i_gid, i_links_count
_HIGH = struct.Struct("<I8xHH")  # at 0x6C: i_size_high; at 0x78: the owner's and group's high 16 bits
_EXTRA = struct.Struct("<H6xI")  # at 0x80: i_extra_isize; at 0x88: i_mtime_extra


class Place(NamedTuple):
    """Where an entry is (contents/inodes.header reads `offsetheader`): a tuple, not the 6-field
    dataclass a tarball's entry carries, for thousands of entries kept."""

    offsetheader: int


def place(number: int) -> Place:
    return Place(number)


class Packed:
    """A large folder's names, sorted and packed (their bytes end to end, two 4-byte numbers a
    name, not a dict of objects): kept alone, so the lookups after its listing (`ls -l`) do not
    read it again."""

    def __init__(self, names: dict[bytes, int]) -> None:
        order = sorted(names)
        self._blob = b"".join(order)
        self._ends = array("I", itertools.accumulate(map(len, order)))
        self._numbers = array("I", (names[name] for name in order))

    def __len__(self) -> int:
        return len(self._ends)

    def _name(self, i: int) -> bytes:
        return self._blob[self._ends[i - 1] if i else 0:self._ends[i]]

    def get(self, name: bytes) -> int | None:
        lo, hi = 0, len(self._ends)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self._name(mid) < name else (lo, mid)
        return self._numbers[lo] if lo < len(self._ends) and self._name(lo) == name else None

    def items(self) -> Iterator[tuple[bytes, int]]:
        return ((self._name(i), self._numbers[i]) for i in range(len(self._ends)))


@dataclasses.dataclass
class Ext4Info(FileInfo):
    """An entry with what FileInfo has no field for: its exact time, link count and device."""

    mtime_ns: int = 0
    nlink: int = 1
    rdev: int = 0


class Ext4Rootfs:
    """An ext4 volume as contents/ reads a source: lookup, list, read, with full owners, ns times,
    symlink targets, devices and link counts."""

    NAMES = 1 << 16

    def __init__(self, fileobj: Any, tag: int = 0) -> None:
        """`tag`: added to each inode number in an entry's place (another ext4 than the root's)."""
        self._tag = tag
        self._inodes = CheckedInodes(fileobj)
        self._known: cachetools.LRUCache[str, Ext4Info] = cachetools.LRUCache(2048)  # by path
        self._left_out: set[int] = set()  # folders whose last listing left entries out
        # each folder's names and their inode numbers, by the folder's inode number, NAMES in all
        self._names: cachetools.LRUCache[int, dict[bytes, int]] = cachetools.LRUCache(
            self.NAMES, getsizeof=lambda names: max(1, len(names)))
        self._large: tuple[int, Packed] | None = None  # the last folder of more than NAMES names

    def _info(self, number: int) -> Ext4Info:
        """An entry as inode `number`'s own bytes say (the kernel's reading of its fields)."""
        raw = self._inodes.raw(number)
        mode, uid, size, mtime, gid, nlink = _HEAD.unpack_from(raw)
        if stat.S_IFMT(mode) not in KINDS or not nlink:
            raise Ext4Fault(f"inode {number}: unknown file type {mode:#o}, or no link (a deleted inode)")
        size_high, uid_high, gid_high = _HIGH.unpack_from(raw, 0x6C)
        size |= size_high << 32
        ns = 0
        if len(raw) >= 0x8C:  # a large inode's first RECORD bytes
            extra_size, extra = _EXTRA.unpack_from(raw, 0x80)
            if 12 <= extra_size <= self._inodes.inode_size - 128:  # i_mtime_extra is in the inode
                mtime, ns = mtime + ((extra & 3) << 32), extra >> 2
        link = ""
        if stat.S_ISLNK(mode):
            if size > LINK_MAX:
                raise Ext4Fault(f"inode {number}: a symlink target of {size} bytes")
            link = os.fsdecode(bytes(self._inodes.data(number, 0, size)))
        rdev = 0
        if stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK):
            # the old 16-bit encoding in i_block[0], else the new one in i_block[1]
            old, new = struct.unpack_from("<II", raw, 0x28)
            rdev = os.makedev((old >> 8) & 0xFF, old & 0xFF) if old else os.makedev(
                (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
        # by position (size, mtime, mode, linkname, uid, gid, userdata, mtime_ns, nlink, rdev): one
        # for each name a listing gives
        return Ext4Info(0 if stat.S_ISDIR(mode) else size, mtime + ns / 1e9, mode, link,
                        uid | uid_high << 16, gid | gid_high << 16, [Place(self._tag | number)],
                        mtime * 1_000_000_000 + ns, nlink, rdev)

    def _entries(self, number: int) -> dict[bytes, int] | Packed:
        found: dict[bytes, int] | Packed | None = self._names.get(number)
        if found is None and self._large is not None and self._large[0] == number:
            found = self._large[1]
        if found is None:
            names = self._inodes.entries(number)
            if len(names) <= self.NAMES:
                found = self._names[number] = names
            else:  # packed, in a slot of its own: one large folder is kept at a time
                self._large = None  # the last one let go before this one is packed
                found = Packed(names)
                del names
                self._large = (number, found)
        return found

    def _number(self, info: FileInfo) -> int:
        return int(info.userdata[-1].offsetheader) & 0xFFFFFFFF

    def lookup(self, path: str, fileVersion: int = 0) -> Ext4Info | None:
        """An entry, found from its parent folder as the kernel does; EIO where a folder on the way
        is one of the folders above it (a loop)."""
        parts = [p for p in path.split("/") if p]
        info = self._known.get("/" + "/".join(parts))
        if info is not None and not stat.S_ISDIR(info.mode):
            return info
        info, seen, at = self._root(), {ROOT}, ""
        for name in parts:
            if not stat.S_ISDIR(info.mode):
                return None
            at += "/" + name
            found = self._known.get(at)
            if found is None:
                number = self._entries(self._number(info)).get(os.fsencode(name))
                if number is None:
                    return None
                found = self._known[at] = self._info(number)
            if stat.S_ISDIR(found.mode):
                if self._number(found) in seen:
                    raise Ext4Fault(f"{path}: a directory loop (inode {self._number(found)} is its own "
                                    "ancestor)")
                seen.add(self._number(found))
            info = found
        return info

    def _root(self) -> Ext4Info:
        found = self._known.get("/")
        if found is None:
            found = self._known["/"] = self._info(ROOT)
            if not stat.S_ISDIR(found.mode):
                raise Ext4Fault("the root inode is no folder")
        return found

    def list(self, path: str) -> dict[str, FileInfo] | None:
        """A folder's entries; its folders are kept by path, for the paths below them (`find`): a
        file's entry is the caller's to keep (contents/node.py keeps a listing's)."""
        folder = self.lookup(path)
        if folder is None or not stat.S_ISDIR(folder.mode):
            return None
        inside = "/" + "/".join(p for p in path.split("/") if p)
        found: dict[str, FileInfo] = {}
        folder_number, whole = self._number(folder), True
        for name, number in self._entries(folder_number).items():
            text = os.fsdecode(name)
            try:
                info = self._info(number)
            except OSError as e:  # that entry's own lookup is EIO; the folder lists on
                log.warning("%s/%s left out of its folder's listing: %s", inside.rstrip("/"), text, e)
                whole = False
                continue
            if stat.S_ISDIR(info.mode):
                self._known[f"{inside.rstrip('/')}/{text}"] = info
            found[text] = info
        (self._left_out.discard if whole else self._left_out.add)(folder_number)
        return found

    def complete(self, folder: FileInfo) -> bool:
        """Whether the folder's last listing held every entry: one that left some out (a read
        that failed, perhaps for a moment) is not for the kernel to keep."""
        return self._number(folder) not in self._left_out

    def read(self, fileInfo: FileInfo, size: int, offset: int) -> bytes | bytearray:
        return self._inodes.data(self._number(fileInfo), offset, size)  # handed to FUSE as it is

    def nlink(self, info: FileInfo) -> int:
        """How many names a file has (a folder: 1, as for a squashfs root)."""
        return 1 if stat.S_ISDIR(info.mode) else int(getattr(info, "nlink", 1))

    def device(self, info: FileInfo) -> int:
        return int(getattr(info, "rdev", 0))

    def __exit__(self, *exc: object) -> None:
        """Nothing to release: the partition's file belongs to the disk's reader."""

