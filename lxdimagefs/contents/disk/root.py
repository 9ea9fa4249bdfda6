"""A VM image's files: qcow2 → GPT → the ext4 Linux root, with the guest's /boot and /boot/efi
where its fstab puts them (contents/disk/guest.py); what cannot be shown is said in the log and
in NOTE beside rootfs/."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import stat
from collections.abc import Callable
from typing import Any

from lxdimagefs.contents.disk import gpt, guest
from lxdimagefs.contents.disk.ext4root import Ext4Rootfs, place
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader

log = logging.getLogger(__name__)

NOTE = "rootfs-not-shown.txt"
NOTE_PLACE = 1 << 62  # past any tar header's offset


class GuestTree:
    """The root filesystem with others mounted on its folders: each call goes to the filesystem
    that holds the path (the deepest mount point above it), as the guest's kernel would. A mounted
    filesystem is opened when a path at or under its mount point is first reached (the ESP's FAT
    is read whole when opened: a `cat` in /etc need not pay for it); if it cannot be, each call
    there is EIO with the reason in the log."""

    def __init__(self, name: str, root: Any) -> None:
        self._name, self._root = name, root
        self._openers: dict[str, Callable[[], Any]] = {}
        self._by_tag: dict[int, str] = {}
        self._order: list[str] = []
        self._open: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    def mount(self, point: str, tag: int, opener: Callable[[], Any]) -> None:
        """`opener` makes the filesystem on `point` when first reached; `tag` is in its entries' places."""
        self._openers[point], self._by_tag[tag >> 48] = opener, point
        self._order = sorted(self._openers, key=len, reverse=True)

    @property
    def points(self) -> list[str]:
        return self._order

    def _mounted(self, point: str) -> Any:
        found = self._open.get(point)
        if found is None:
            if point in self._failed:
                raise OSError(errno.EIO, self._failed[point])
            try:
                found = self._open[point] = self._openers[point]()
            except Exception as e:  # untrusted bytes: whatever the reader raises, the rest shows
                self._failed[point] = f"{point} not read: {type(e).__name__}: {e}"
                log.warning("%s: %s", self._name, self._failed[point])
                raise OSError(errno.EIO, self._failed[point]) from None
            log.info("%s: %s opened", self._name, point)
        return found

    def _route(self, path: str) -> tuple[Any, str]:
        for point in self._order:
            if path == point or path.startswith(point + "/"):
                return self._mounted(point), path[len(point):] or "/"
        return self._root, path

    def _owner(self, info: Any) -> Any:
        point = self._by_tag.get(int(info.userdata[-1].offsetheader) >> 48)
        return self._root if point is None else self._mounted(point)

    def _fault(self, what: str, e: Exception) -> OSError:
        """Whatever a reader of the untrusted disk raises: EIO for this call, and a log line."""
        log.warning("%s: %s: %s: %s", self._name, what, type(e).__name__, e)
        return OSError(errno.EIO, f"{what}: {e}")

    def lookup(self, path: str, fileVersion: int = 0) -> Any:
        try:
            source, inner = self._route("/" + path.strip("/"))
            return source.lookup(inner)
        except Exception as e:
            raise self._fault(f"rootfs{path}", e) from None

    def list(self, path: str) -> Any:
        """A folder's entries; a mount point among them is the root of what is mounted on it (as
        its stat is), so listing /boot opens the ESP; one that cannot be opened keeps the folder's."""
        path = "/" + path.strip("/")
        try:
            source, inner = self._route(path)
            found = source.list(inner)
        except Exception as e:
            raise self._fault(f"rootfs{path}/", e) from None
        for point in self._order if isinstance(found, dict) else ():
            above, _, name = point.rpartition("/")
            if (above or "/") == path and name in found:
                with contextlib.suppress(OSError):  # said in the log, and EIO at its own lookup
                    found[name] = self._mounted(point).lookup("/")
        return found

    def complete(self, folder: Any) -> bool:
        """Whether a folder's last listing held every entry (a filesystem that cannot tell: yes)."""
        return bool(getattr(self._owner(folder), "complete", lambda _: True)(folder))

    def read(self, info: Any, size: int, offset: int) -> bytes | bytearray:
        try:
            return self._owner(info).read(info, size, offset)
        except Exception as e:
            raise self._fault(f"{size} bytes at {offset} of a file", e) from None

    def nlink(self, info: Any) -> int:
        return int(self._owner(info).nlink(info))

    def device(self, info: Any) -> int:
        return int(self._owner(info).device(info))

    def __exit__(self, *exc: object) -> None:
        for fs in (self._root, *self._open.values()):
            fs.__exit__(None, None, None)


class WithNote:
    """A metadata tarball's source with NOTE added at its top, saying what of the disk is not shown."""

    def __init__(self, top: Any, text: str) -> None:
        self._top, self._text, self._made = top, text.encode(), None

    @property
    def _info(self) -> Any:
        """The note's entry, with its folder's time: made at its first look (the tarball's source
        is made then: archives.Deferred)."""
        if self._made is None:
            from ratarmountcore.mountsource.MountSource import FileInfo
            folder = self._top.lookup("/")
            self._made = FileInfo(size=len(self._text), mtime=folder.mtime if folder else 0,
                                  mode=stat.S_IFREG | 0o444, linkname="", uid=0, gid=0,
                                  userdata=[place(NOTE_PLACE)])
        return self._made

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
        return self._text[offset:offset + size] if info is self._made else self._top.read(info, size, offset)

    def __exit__(self, *exc: object) -> None:
        self._top.__exit__(None, None, None)


def _filesystem(kind: str, disk: Qcow2Reader, part: gpt.Partition, options: dict[str, str], tag: int) -> Any:
    window = gpt.Window(disk, part.offset, part.length)  # type: ignore[arg-type]
    if kind == "vfat":
        from lxdimagefs.contents.disk.fat import FatFs
        return FatFs(window, options, tag)
    return Ext4Rootfs(window, tag)


def _guest(disk: Qcow2Reader, name: str, why: list[str]) -> GuestTree | None:
    parts = gpt.partitions(disk)  # type: ignore[arg-type]
    root = gpt.root_of(disk, parts)  # type: ignore[arg-type]
    if root is None or not gpt.has_ext4(disk, root):  # type: ignore[arg-type]
        raise OSError("no ext4 Linux root partition (LUKS, LVM, another filesystem?)")
    ext4 = Ext4Rootfs(gpt.Window(disk, root.offset, root.length))  # type: ignore[arg-type]
    fstab = ext4.lookup("/etc/fstab")
    text = ext4.read(fstab, min(fstab.size, guest.FSTAB_MAX), 0).decode("utf-8", "replace") if (
        fstab is not None and stat.S_ISREG(fstab.mode)) else ""
    shown, not_shown = guest.mounts(disk, parts, root, text)  # type: ignore[arg-type]
    why += not_shown
    tree = GuestTree(name, ext4)
    for i, (point, kind, part, options) in enumerate(shown, 1):
        try:  # on what is mounted so far: /boot/efi on /boot
            found = tree.lookup(point)
        except OSError:
            found = None
        if point in tree.points or found is None or not stat.S_ISDIR(found.mode):
            why.append(f"{point}: no folder to mount {kind} on (or mounted twice)")
            continue
        tree.mount(point, i << 48, functools.partial(_filesystem, kind, disk, part, options, i << 48))
    return tree


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
