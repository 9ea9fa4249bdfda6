"""What every reader under contents/ shares: a read-only file of `size` bytes, seekable.

ratarmountcore and the ext4 library take file objects; an export, a qcow2 disk and a partition
of it are each one, differing only in how `readinto` finds the bytes at `_pos`.
"""

from __future__ import annotations

import errno
import io


class Seekable(io.RawIOBase):
    size: int
    _pos: int = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos
