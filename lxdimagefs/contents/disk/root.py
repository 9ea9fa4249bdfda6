"""A VM image's root filesystem: qcow2 → GPT → the ext4 Linux root, or why it cannot be read."""

from __future__ import annotations

import io
import logging
from typing import Any

from lxdimagefs.contents.disk import gpt
from lxdimagefs.contents.disk.ext4root import Ext4Rootfs
from lxdimagefs.contents.disk.qcow2 import Qcow2Reader

log = logging.getLogger(__name__)


def vm_root(part: Any, name: str) -> Ext4Rootfs | None:
    """The ext4 root of a VM disk read from `part` (the checked part reader), or None with a log
    line saying why (a disk not understood never fails the image: its metadata still shows)."""
    try:
        disk = Qcow2Reader(part)  # unbuffered below the slice: a bad cluster fails only its own reads
        root = gpt.root_of(disk, gpt.partitions(disk))  # type: ignore[arg-type]
        if root is None or not gpt.has_ext4(disk, root):  # type: ignore[arg-type]
            raise OSError("no ext4 Linux root partition (LUKS, LVM, another filesystem?)")
        return Ext4Rootfs(io.BufferedReader(gpt.Slice(disk, root.offset, root.length), 1 << 16))  # type: ignore[arg-type]
    except (OSError, ValueError) as e:
        log.warning("%s: the VM disk's files are not shown: %s", name, e)
        return None
