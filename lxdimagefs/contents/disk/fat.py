"""A VM's EFI system partition (FAT12/16/32) as the guest's kernel shows it, over ratarmountcore's
own copy of pyfatfs (MIT: no new dependency; PyPI's pyfatfs pulls in PyFilesystem2, and this copy
is a private module of ratarmountcore's: pyproject.toml keeps ratarmountcore below 0.12 for it); not
over its FAT source, whose module imports its format detection (rapidgzip and the rest: 90 ms of a
`find` with the page cache cold).

pyfatfs reads the boot sector and the FAT (4 bytes a cluster: 100 KiB for a 100 MiB ESP) when
opened, directories as they are looked in, files cluster by cluster: lazy enough over the qcow2
reader. FAT keeps no owner, mode or link; Linux's vfat makes them from the mount's options
(uid=, gid=, umask=, fmask=, dmask=; root and umask 022 without them), and reads its times
(2-second steps, no zone) as UTC: so are they here.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import stat
import sys
from array import array
from typing import IO, Any

from ratarmountcore._external.pyfatfs import PyFATException
from ratarmountcore._external.pyfatfs.FATDirectoryEntry import FATLongDirectoryEntry
from ratarmountcore._external.pyfatfs.FatIO import FatIO
from ratarmountcore._external.pyfatfs.PyFat import PyFat
from ratarmountcore.mountsource.MountSource import FileInfo

from lxdimagefs.contents.disk.ext4root import place


def _octal(options: dict[str, str], name: str, default: int) -> int:
    try:
        return int(options[name], 8) & 0o777 if name in options else default
    except ValueError:
        return default


def name_of(entry: Any) -> str:
    """An entry's name as Linux shows it: its long name, else its 8.3 name with the case the NT
    flags ask for (0x08: the base in lower case, 0x10: the extension), as mtools and Windows write."""
    if entry.lfn_entry is not None:
        return str(entry.lfn_entry)
    base, dot, ext = entry.get_short_name().partition(".")
    return (base.lower() if entry.ntres & 0x08 else base) + dot + (ext.lower() if entry.ntres & 0x10 else ext)


FAT_MAX = 16 << 20  # a FAT read at most: 4 Mi clusters of FAT32 (a 16 GiB ESP of 4 KiB clusters)
_LOW_NIBBLE = bytes(i & 0x0F for i in range(256))
FAT12_MAX = 64 << 10  # 4,084 clusters' FAT is 6 KiB: pyfatfs reads each of up to 255 copies of it
DIR_MAX = 2 << 20  # a folder's bytes at most: Linux's vfat makes none larger (65,536 entries)


class _PyFat(PyFat):
    """pyfatfs with its FAT read at once and kept packed (4 bytes a FAT32 cluster, not an int
    object's 36): its own parse unpacks entry by entry (90 ms of a `find` for a 34 MiB ESP) and
    reads every copy of the FAT to compare them (a warning only); a FAT over FAT_MAX is refused
    (a hostile boot sector's claim: pyfatfs read it whole). FAT12 (4,084 clusters) is left to it,
    up to FAT12_MAX."""

    def _parse_fat(self) -> None:
        bpb = self.bpb_header
        size = bpb["BPB_BytsPerSec"] * self._fat_size
        if size > FAT_MAX:
            raise PyFATException(f"a FAT of {size} bytes, over the {FAT_MAX} read here")
        if self.fat_type == self.FAT_TYPE_FAT12:
            if size > FAT12_MAX:  # a hostile claim (255 copies of 16 MiB: 4 GiB read)
                raise PyFATException(f"a FAT12 of {size} bytes, over the {FAT12_MAX} read here")
            return super()._parse_fat()
        if bpb["BPB_NumFATs"] < 1:
            raise PyFATException("Invalid number of FATs configured, cannot continue")
        with self._PyFat__lock:
            self._PyFat__seek(bpb["BPB_RsvdSecCnt"] * bpb["BPB_BytsPerSec"])
            raw = bytearray(self._PyFat__fp.read(size))
        self.bytes_per_cluster = bpb["BPB_BytsPerSec"] * bpb["BPB_SecPerClus"]
        if len(raw) != size:
            raise PyFATException("Invalid length of FAT")
        if self.fat_type == self.FAT_TYPE_FAT32:  # its entries are 28 bits: the top four are reserved
            raw[3::4] = raw[3::4].translate(_LOW_NIBBLE)
        entries = array("H" if self.fat_type == self.FAT_TYPE_FAT16 else "I")
        entries.frombytes(raw[:size - size % entries.itemsize])
        if sys.byteorder == "big":
            entries.byteswap()
        self.fat = entries

    def parse_dir_entries_in_cluster_chain(self, cluster: int) -> list[Any]:
        """pyfatfs's own, but a folder's chain followed for DIR_MAX bytes at most: one that loops
        back (a hostile FAT's) was followed for ever, its entries piling up, the image's lock held."""
        found: list[Any] = []
        lfn, size, at = FATLongDirectoryEntry(), self.bytes_per_cluster, None
        for n, at in enumerate(self.get_cluster_chain(cluster)):
            if n * size >= DIR_MAX:
                raise PyFATException(f"a folder of over {DIR_MAX} bytes (its cluster chain loops?)")
            start = self.get_data_cluster_address(at)
            entries, lfn = self.parse_dir_entries_in_address(start, start + size, lfn)
            found += entries
        if at is not None and not self._last(at):  # pyfatfs stops where the chain leaves the FAT
            raise PyFATException("a folder's cluster chain runs past the end of its FAT")
        return found

    def _last(self, cluster: int) -> bool:
        """Whether the FAT ends a chain at `cluster` (an end-of-chain mark)."""
        values, value = self.FAT_CLUSTER_VALUES[self.fat_type], self.fat[cluster]
        return bool(values["END_OF_CLUSTER_MIN"] <= value <= values["END_OF_CLUSTER_MAX"]
                    or (self.fat_type == self.FAT_TYPE_FAT12 and value == self.FAT12_SPECIAL_EOC))


class FatFs:
    """One FAT filesystem; `options` are its fstab options (`umask=0077`, …); `tag` is added to
    each entry's place, so that its inode numbers are its own."""

    def __init__(self, fileobj: Any, options: dict[str, str], tag: int) -> None:
        self.fileSystem = _PyFat()
        self.fileSystem.set_fp(fileobj)
        umask = _octal(options, "umask", 0o022)
        self._fmode = stat.S_IFREG | (0o777 & ~_octal(options, "fmask", umask))
        self._dmode = stat.S_IFDIR | (0o777 & ~_octal(options, "dmask", umask))
        self._uid, self._gid = int(options.get("uid", "0") or 0), int(options.get("gid", "0") or 0)
        self._tag = tag

    def _info(self, entry: Any, path: str) -> FileInfo:
        """`path`: the entry's names as Linux shows them; its first userdata, the names pyfatfs finds
        it by (the 8.3 names in upper case)."""
        when = entry.get_mtime() if path != "/" else datetime.datetime(1970, 1, 1)
        number = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=5).digest(), "big")
        return FileInfo(size=0 if entry.is_directory() else int(entry.filesize),
                        mtime=int(when.replace(tzinfo=datetime.UTC).timestamp()),
                        mode=self._dmode if entry.is_directory() else self._fmode, linkname="",
                        uid=self._uid, gid=self._gid,
                        userdata=["/" + entry.get_full_path().lstrip("/"), place(self._tag | number)])

    def _entries(self, folder: Any) -> dict[str, Any]:
        try:
            dirs, files, _ = folder.get_entries()
        except PyFATException as e:
            raise OSError(errno.EIO, f"FAT: {e}") from e
        return {name: e for e in dirs + files if (name := name_of(e)) not in (".", "..")}

    def _entry(self, path: str) -> Any:
        """The entry at a path, each name matched as Linux's vfat does (exactly, else ignoring case)."""
        entry = self.fileSystem.root_dir
        for name in filter(None, path.split("/")):
            if not entry.is_directory():
                return None
            found = self._entries(entry)
            entry = found.get(name) or next((e for n, e in found.items() if n.casefold() == name.casefold()),
                                            None)
            if entry is None:
                return None
        return entry

    def lookup(self, path: str, fileVersion: int = 0) -> FileInfo | None:
        path = "/" + path.strip("/")
        entry = self._entry(path)
        return None if entry is None else self._info(entry, path)

    def list(self, path: str) -> dict[str, FileInfo] | None:
        path = "/" + path.strip("/")
        folder = self._entry(path)
        if folder is None or not folder.is_directory():
            return None
        inside = path.rstrip("/")
        return {name: self._info(e, f"{inside}/{name}") for name, e in self._entries(folder).items()}

    def open(self, fileInfo: FileInfo, buffering: int = -1) -> IO[bytes]:
        return FatIO(self.fileSystem, fileInfo.userdata[0])

    def read(self, fileInfo: FileInfo, size: int, offset: int) -> bytes:
        with self.open(fileInfo) as f:
            f.seek(offset)
            return f.read(size)

    def nlink(self, info: FileInfo) -> int:
        return 1

    def device(self, info: FileInfo) -> int:
        return 0

    def __exit__(self, *exc: object) -> None:
        self.fileSystem.close()
