"""Names in import/ that just became images, as the tools that wrote them still see them.

`rsync`, `install` and `tar -x` go on after closing a file: they set its
times, modes and owners by name, rename it from a temporary name into
place, and set the times of the folders they made when they end. By then
the file (or folder) has become an image and left import/. Such a name is
not listed any more, but for a while it still answers lookups, takes those
changes (and ignores them), can be renamed and removed: restoring a backup
into import/ works with the tools' defaults.
"""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import dataclass, field

from cachetools import TTLCache

from lxdimagefs.fs.node import Attr

LANDED_FOR = 600.0  # seconds: tar sets its folders' times only once the whole archive is out
LANDED_MOST = 4096


@dataclass(frozen=True)
class Landing:
    """What a name was when it became an image: a file's size, or a folder's files and sizes."""

    size: int = 0
    files: dict[str, int] | None = None  # a folder
    at: float = field(default_factory=time.time)


class Landed:
    def __init__(self) -> None:
        self._names: TTLCache[str, Landing] = TTLCache(LANDED_MOST, LANDED_FOR)
        self._lock = threading.Lock()

    def add(self, name: str, landing: Landing) -> None:
        with self._lock:
            self._names[name] = landing

    def get(self, name: str) -> Landing | None:
        with self._lock:
            return self._names.get(name)

    def attr(self, rest: list[str]) -> Attr | None:
        """The attributes of a landed file, folder or file in a landed folder; None if none."""
        landing = self.get(rest[0]) if rest else None
        if landing is None:
            return None
        if len(rest) == 1 and landing.files is None:
            return Attr(stat.S_IFREG | 0o600, landing.size, landing.at, landing.at, landing.at)
        if len(rest) == 1:
            return Attr(stat.S_IFDIR | 0o700, 0, landing.at, landing.at, landing.at, 2)
        if len(rest) == 2 and landing.files is not None and rest[1] in landing.files:
            return Attr(stat.S_IFREG | 0o600, landing.files[rest[1]], landing.at, landing.at, landing.at)
        return None

    def rename(self, src: list[str], dst: list[str]) -> bool:
        """Move a landed name (rsync's temporary name into place); False if `src` is none."""
        with self._lock:
            landing = self._names.get(src[0])
            if landing is None:
                return False
            if len(src) == len(dst) == 1:
                self._names[dst[0]] = self._names.pop(src[0])
                return True
            if len(src) == len(dst) == 2 and src[0] == dst[0] and landing.files is not None:
                files = dict(landing.files)
                files[dst[1]] = files.pop(src[1], 0)
                self._names[src[0]] = Landing(landing.size, files, landing.at)
                return True
            return False

    def discard(self, rest: list[str]) -> bool:
        """Forget a landed name (or a file of a landed folder): `rm`, `rmdir`, a new import."""
        with self._lock:
            landing = self._names.get(rest[0]) if rest else None
            if landing is None:
                return False
            if len(rest) == 1:
                del self._names[rest[0]]
            elif landing.files is not None and rest[1] in landing.files:
                files = {k: v for k, v in landing.files.items() if k != rest[1]}
                self._names[rest[0]] = Landing(landing.size, files, landing.at)
            else:
                return False
            return True
