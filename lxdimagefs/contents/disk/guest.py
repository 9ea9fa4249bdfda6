"""A guest's other filesystems where its /etc/fstab puts them (/boot, /boot/efi), found as the
guest finds them: by filesystem UUID or label, GPT partition UUID or name, or device path.

Only what a reader can show is mounted: ext2/3/4 and vfat on a folder the root has. Every line
that names such a mount and cannot be followed is a reason, for the log and the note beside
rootfs/ (contents/disk/root.py).
"""

from __future__ import annotations

import posixpath
import uuid
from typing import BinaryIO

from lxdimagefs.contents.disk import gpt

MOUNTED = ("/boot", "/boot/efi", "/efi")
FSTAB_MAX = 64 << 10
EXT = ("ext2", "ext3", "ext4")


def _at(disk: BinaryIO, offset: int, length: int) -> bytes:
    disk.seek(offset)
    return disk.read(length)


def identity(disk: BinaryIO, part: gpt.Partition) -> tuple[str | None, dict[str, str]]:
    """A partition's filesystem ("ext4", "vfat" or None) and the names the guest may know it by."""
    names = {"PARTUUID": str(part.unique), "PARTLABEL": part.name}
    head = _at(disk, part.offset, 2048) if part.length >= 2048 else b""
    if head[1080:1082] == b"\x53\xef":
        names["UUID"] = str(uuid.UUID(bytes=head[1024 + 104:1024 + 120]))
        names["LABEL"] = head[1024 + 120:1024 + 136].split(b"\0")[0].decode("utf-8", "replace")
        return "ext4", names
    if head[510:512] == b"\x55\xaa" and head[11:13] in (b"\0\2", b"\0\4", b"\0\x08", b"\0\x10"):
        at = 0x43 if head[0x52:0x57] == b"FAT32" else 0x27  # the FAT32 or FAT12/16 extended BPB
        serial = int.from_bytes(head[at:at + 4], "little")
        names["UUID"] = f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
        names["LABEL"] = head[at + 4:at + 15].decode("latin-1").rstrip()
        return "vfat", names
    return None, names


def fstab_lines(text: str) -> list[tuple[str, str, str, dict[str, str]]]:
    """(spec, mount point, type, options) of each mount in an fstab."""
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 3:
            words = (fields[3] if len(fields) > 3 else "").split(",")
            options = dict([*o.split("=", 1), ""][:2] for o in words)
            found.append((fields[0], posixpath.normpath(fields[1]), fields[2], options))
    return found


def _matches(spec: str, names: dict[str, str]) -> bool:
    for key, folder in (("UUID", "by-uuid"), ("LABEL", "by-label"), ("PARTUUID", "by-partuuid"),
                        ("PARTLABEL", "by-partlabel")):
        for prefix in (f"{key}=", f"/dev/disk/{folder}/"):
            if spec.startswith(prefix) and key in names:
                want, have = spec[len(prefix):].strip('"'), names[key]
                return want.lower() == have.lower() if "UUID" in key else want == have
    return False


def mounts(disk: BinaryIO, parts: list[gpt.Partition], root: gpt.Partition,
           fstab: str) -> tuple[list[tuple[str, str, gpt.Partition, dict[str, str]]], list[str]]:
    """The (mount point, filesystem, partition, options) to show, outer ones first (/boot before
    /boot/efi), and why any other is not."""
    shown, why = [], []
    known = [(p, *identity(disk, p)) for p in parts if p != root]
    for spec, point, kind, options in fstab_lines(fstab):
        if point not in MOUNTED:
            continue
        part = next(((p, fs) for p, fs, names in known if _matches(spec, names)), None)
        if part is None:
            why.append(f"{point}: {spec} is no partition of this disk (or not one read here)")
        elif part[1] is None or (kind not in ("auto", part[1]) and not (kind in EXT and part[1] == "ext4")):
            why.append(f"{point}: {spec} holds no filesystem read here (fstab says {kind})")
        else:
            shown.append((point, part[1], part[0], options))
    return sorted(shown, key=lambda m: m[0].count("/")), why
