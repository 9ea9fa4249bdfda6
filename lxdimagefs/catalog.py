"""What images and aliases LXD holds, cached for a short lifetime.

One `GET /1.0/images?recursion=1` answers every listing and `stat` for a
whole metadata lifetime: the records carry their aliases, so no request is
made per image. Export layouts (file names and sizes) are fixed by the
fingerprint, so they are cached for good.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

from .client import ExportLayout, Image, LXDClient
from .names import alias_to_filename, filename_to_alias, fits

MIN_PREFIX = 12


@dataclass(frozen=True)
class Snapshot:
    images: dict[str, Image]
    aliases: dict[str, str]  # file name under by-alias/ -> fingerprint
    taken_at: float


class Catalog:
    def __init__(self, client: LXDClient, ttl: float = 3.0, clock=None) -> None:
        self.client = client
        kwargs = {"timer": clock} if clock else {}
        self._snapshots: TTLCache[str, Snapshot] = TTLCache(maxsize=1, ttl=ttl, **kwargs)
        self._layouts: LRUCache[str, ExportLayout] = LRUCache(maxsize=100_000)
        self._lock = threading.Lock()
        self._layout_locks: dict[str, threading.Lock] = {}
        self._clock = clock or time.monotonic

    def snapshot(self) -> Snapshot:
        with self._lock:  # one fill at a time: a burst of stat() makes one request
            snap = self._snapshots.get("s")
            if snap is None:
                snap = self._build(self.client.images())
                self._snapshots["s"] = snap
            return snap

    def _build(self, images: list[Image]) -> Snapshot:
        aliases: dict[str, str] = {}
        for image in images:
            for alias in image.aliases:
                name = alias_to_filename(alias)
                if fits(name):
                    aliases[name] = image.fingerprint
        return Snapshot({i.fingerprint: i for i in images}, aliases, self._clock())

    def invalidate(self) -> None:
        with self._lock:
            self._snapshots.clear()

    def resolve(self, name: str) -> Image:
        """A full fingerprint, or a unique prefix of at least 12 hex digits."""
        snap = self.snapshot()
        image = snap.images.get(name)
        if image is None and len(name) == 64 and self.client.image_exists(name):
            # Made a moment ago elsewhere (lxc, another mount): the listing is out of date.
            self.invalidate()
            image = self.snapshot().images.get(name)
        if image is not None:
            return image
        if len(name) < MIN_PREFIX or len(name) > 64 or any(c not in "0123456789abcdef" for c in name):
            raise OSError(errno.ENOENT, "no such image", name)
        found = [img for fp, img in snap.images.items() if fp.startswith(name)]
        if len(found) != 1:
            raise OSError(errno.ENOENT, "no image, or more than one, has this prefix", name)
        return found[0]

    def alias_target(self, filename: str) -> str | None:
        """The fingerprint an alias (by its file name) points to, asking LXD on a miss."""
        fp = self.snapshot().aliases.get(filename)
        if fp is None and self.client.alias_exists(filename_to_alias(filename)):
            self.invalidate()
            fp = self.snapshot().aliases.get(filename)
        return fp

    def layout(self, fingerprint: str) -> ExportLayout:
        layout = self._layouts.get(fingerprint)
        if layout is not None:
            return layout
        with self._lock:
            lock = self._layout_locks.setdefault(fingerprint, threading.Lock())
        with lock:  # concurrent lookups of one image share one probe
            layout = self._layouts.get(fingerprint)
            if layout is None:
                layout = self.client.export_layout(fingerprint)
                self._layouts[fingerprint] = layout
        with self._lock:
            self._layout_locks.pop(fingerprint, None)
        return layout
