"""A VM image's files: qcow2 → GPT → the ext4 Linux root, with the guest's /boot and /boot/efi
where its fstab puts them (contents/disk/guest.py); what cannot be shown is said in the log and
in NOTE beside rootfs/."""

from __future__ import annotations

import errno
import io
import logging
import stat
from typing import Any

from lxdimagefs.contents.disk import gpt, guest
from lxdimagefs.contents.disk.ext4root import Ext4Rootfs, place
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader

log = logging.getLogger(__name__)

NOTE = "rootfs-not-shown.txt"
NOTE_PLACE = 1 << 62  # past any tar header's offset
BUFFER = 1 << 16


class GuestTree:
    """The root filesystem with others mounted on its folders: each call goes to the filesystem
    that holds the path (the deepest mount point above it), as the guest's kernel would."""

    def __init__(self, name: str, root: Any, mounted: dict[str, tuple[int, Any]]) -> None:
        """`mounted`: each mount point's filesystem and the tag its entries' places carry."""
        self._name, self._root, self._mounted = name, root, {point: fs for point, (_, fs) in mounted.items()}
        self._by_tag = {tag >> 48: fs for tag, fs in mounted.values()}
        self._order = sorted(mounted, key=len, reverse=True)

    def _route(self, path: str) -> tuple[Any, str]:
        for point in self._order:
            if path == point or path.startswith(point + "/"):
                return self._mounted[point], path[len(point):] or "/"
        return self._root, path

    def _owner(self, info: Any) -> Any:
        return self._by_tag.get(int(info.userdata[-1].offsetheader) >> 48, self._root)

    def _fault(self, what: str, e: Exception) -> OSError:
        """Whatever a reader of the untrusted disk raises: EIO for this call, and a log line."""
        log.warning("%s: %s: %s: %s", self._name, what, type(e).__name__, e)
        return OSError(errno.EIO, f"{what}: {e}")

    def lookup(self, path: str, fileVersion: int = 0) -> Any:
        source, inner = self._route("/" + path.strip("/"))
        try:
            return source.lookup(inner)
        except Exception as e:
            raise self._fault(f"rootfs{path}", e) from None

    def list(self, path: str) -> Any:
        source, inner = self._route("/" + path.strip("/"))
        try:
            return source.list(inner)
        except Exception as e:
            raise self._fault(f"rootfs{path}/", e) from None

    def read(self, info: Any, size: int, offset: int) -> bytes:
        try:
            return bytes(self._owner(info).read(info, size, offset))
        except Exception as e:
            raise self._fault(f"{size} bytes at {offset} of a file", e) from None

    def nlink(self, info: Any) -> int:
        return int(self._owner(info).nlink(info))

    def device(self, info: Any) -> int:
        return int(self._owner(info).device(info))

    def __exit__(self, *exc: object) -> None:
        for fs in (self._root, *self._mounted.values()):
            fs.__exit__(None, None, None)


class WithNote:
    """A metadata tarball's source with NOTE added at its top, saying what of the disk is not shown."""

    def __init__(self, top: Any, text: str) -> None:
        self._top, self._text = top, text.encode()
        from ratarmountcore.mountsource.MountSource import FileInfo
        folder = top.lookup("/")  # the note has its folder's time
        self._info = FileInfo(size=len(self._text), mtime=folder.mtime if folder else 0,
                              mode=stat.S_IFREG | 0o444, linkname="", uid=0, gid=0,
                              userdata=[place(NOTE_PLACE)])

    def __getattr__(self, name: str) -> Any:  # the index (hard links) and the rest: the tarball's
        return getattr(self._top, name)

    def lookup(self, path: str, fileVersion: int = 0) -> Any:
        return self._info if path.strip("/") == NOTE else self._top.lookup(path)

    def list(self, path: str) -> Any:
        found = self._top.list(path)
        if path.strip("/") or found is None:
            return found
        return {**found, NOTE: self._info} if isinstance(found, dict) else [*found, NOTE]

    def read(self, info: Any, size: int, offset: int) -> bytes:
        return self._text[offset:offset + size] if info is self._info else self._top.read(info, size, offset)


def _filesystem(kind: str, disk: Qcow2Reader, part: gpt.Partition, options: dict[str, str], tag: int) -> Any:
    from lxdimagefs.contents.disk.fat import FatFs
    window = io.BufferedReader(gpt.Slice(disk, part.offset, part.length), BUFFER)  # type: ignore[arg-type]
    return FatFs(window, options, tag) if kind == "vfat" else Ext4Rootfs(window, tag)


def _guest(disk: Qcow2Reader, name: str, why: list[str]) -> GuestTree | None:
    parts = gpt.partitions(disk)  # type: ignore[arg-type]
    root = gpt.root_of(disk, parts)  # type: ignore[arg-type]
    if root is None or not gpt.has_ext4(disk, root):  # type: ignore[arg-type]
        raise OSError("no ext4 Linux root partition (LUKS, LVM, another filesystem?)")
    ext4 = Ext4Rootfs(io.BufferedReader(gpt.Slice(disk, root.offset, root.length), BUFFER))  # type: ignore[arg-type]
    fstab = ext4.lookup("/etc/fstab")
    text = ext4.read(fstab, min(fstab.size, guest.FSTAB_MAX), 0).decode("utf-8", "replace") if (
        fstab is not None and stat.S_ISREG(fstab.mode)) else ""
    shown, not_shown = guest.mounts(disk, parts, root, text)  # type: ignore[arg-type]
    why += not_shown
    mounted: dict[str, tuple[int, Any]] = {}
    for i, (point, kind, part, options) in enumerate(shown, 1):
        found = GuestTree(name, ext4, mounted).lookup(point)  # on what is mounted so far: /boot/efi on /boot
        if point in mounted or found is None or not stat.S_ISDIR(found.mode):
            why.append(f"{point}: no folder to mount {kind} on (or mounted twice)")
            continue
        try:
            mounted[point] = (i << 48, _filesystem(kind, disk, part, options, i << 48))
        except Exception as e:  # untrusted bytes: whatever the reader raises, the rest shows
            why.append(f"{point}: {kind} on partition {part.unique} not read: {e}")
    return GuestTree(name, ext4, mounted)


def vm_root(top: Any, part: Any, name: str) -> tuple[Any, GuestTree | None]:
    """The metadata tarball's source (with NOTE when some of the disk is not shown) and the guest's
    files read from `part` (the checked part reader), or None: a disk not understood never fails
    the image, its metadata still shows."""
    why: list[str] = []
    tree = None
    try:
        tree = _guest(Qcow2Reader(part), name, why)  # a bad cluster fails only its own reads
    except Exception as e:  # the disk is untrusted input: whatever a reader raises, the image still shows
        why.append(f"the VM disk's files are not shown: {e}")
    for line in why:
        log.warning("%s: %s", name, line)
    return (WithNote(top, "".join(f"{line}\n" for line in why)) if why else top), tree
