"""What images and aliases LXD holds, cached.

One `GET /1.0/images?recursion=1` answers every listing and `stat`: the
records carry their aliases, so no request is made per image. While LXD's
event stream is live the listing is kept until an event says it changed;
while it is down, for the metadata lifetime only. Export layouts (file
names and sizes) are fixed by the fingerprint, so they are cached for good,
and journaled for the next mount.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from lxdimagefs.errors import fs_error
from lxdimagefs.keys import Fingerprint, ObjectKey
from lxdimagefs.names import alias_to_filename, filename_to_alias, fits, is_fingerprint
from lxdimagefs.servers.protocol import ImageServer, ImageSource
from lxdimagefs.servers.records import ExportLayout, ExportPart, Image, part_name

MIN_PREFIX = 12


@dataclass(frozen=True)
class Snapshot:
    images: dict[str, Image]
    aliases: dict[str, str]  # file name under by-alias/ -> fingerprint
    taken_at: float


class LayoutJournal:
    """Export layouts learned by earlier mounts: a fingerprint's layout never changes.

    One JSON line per image, appended as layouts are learned, in a file only
    its owner can write; a file that is not ours, or a line that does not
    parse, is ignored. Without it, a new mount asks LXD once per image again.
    Each line is named by its key (server and fingerprint): one server's
    lines never answer for another's images.
    """

    def __init__(self, path: Path, server: str) -> None:
        self.path = path
        self.server = server
        self._lock = threading.Lock()

    def _open(self, flags: int) -> int | None:
        try:
            # Never waits: in a shared folder another user's FIFO at this name would stall the
            # mount for good (a FIFO opens at once non-blocking, or ENXIO, and is refused below).
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        st = os.fstat(fd)
        # Ours alone: not a link to another file (hard links survive O_NOFOLLOW), nobody else's.
        if (st.st_uid != os.getuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode)
                or st.st_nlink != 1):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd

    def _key(self, fingerprint: str) -> str:
        return ObjectKey(Fingerprint(fingerprint), "layout", self.server).filename

    def load(self) -> dict[Fingerprint, ExportLayout]:
        fd = self._open(os.O_RDONLY)
        if fd is None:
            return {}
        layouts = {}
        with os.fdopen(fd, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    fp = Fingerprint(entry["fp"])
                    if entry["key"] != self._key(fp):
                        continue  # another server's, or a line from before keys
                    layouts[fp] = ExportLayout(bool(entry["split"]), tuple(
                        ExportPart(part_name(str(n), fp), int(z)) for n, z in entry["parts"]))
                except (ValueError, KeyError, TypeError):  # BadKey is a ValueError
                    continue
        return layouts

    def add(self, fingerprint: Fingerprint, layout: ExportLayout) -> None:
        line = json.dumps({"key": self._key(fingerprint), "fp": fingerprint, "split": layout.split,
                           "parts": [[p.name, p.size] for p in layout.parts]}) + "\n"
        with self._lock:
            fd = self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            if fd is not None:
                with os.fdopen(fd, "ab") as f:
                    f.write(line.encode())


class Catalog:
    def __init__(self, client: ImageSource, ttl: float = 3.0, clock: Callable[[], float] = time.monotonic,
                 journal: LayoutJournal | None = None) -> None:
        self.client = client
        self.journal = journal
        self.ttl = ttl
        self.events_live: Callable[[], bool] = lambda: False  # set by whoever follows LXD's events
        self._snap: Snapshot | None = None
        self._layouts: LRUCache[Fingerprint, ExportLayout] = LRUCache(maxsize=100_000)
        if journal is not None:
            self._layouts.update(journal.load())
        self._lock = threading.Lock()
        self._layouts_lock = threading.Lock()
        self._layout_locks: dict[str, threading.Lock] = {}
        self._clock = clock

    @property
    def server(self) -> ImageServer:
        """The same server, for the changes only LXD and Incus take; an index refuses them."""
        if not isinstance(self.client, ImageServer):
            raise fs_error(errno.EROFS, "", "this server is an index to read, it takes no changes")
        return self.client

    def snapshot(self) -> Snapshot:
        with self._lock:  # one fill at a time: a burst of stat() makes one request
            snap = self._snap
            if snap is None or (not self.events_live() and self._clock() - snap.taken_at >= self.ttl):
                snap = self._snap = self._build(self._fetch())
            return snap

    def cached(self) -> Snapshot | None:
        """The listing held now, if any, without asking LXD."""
        return self._snap

    def refresh(self) -> None:
        """Fetch the listing now (from a background thread, so that no call waits for it)."""
        with self._lock:
            self._snap = self._build(self._fetch())

    def _fetch(self) -> list[Image]:
        return self.client.images()

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
            self._snap = None

    def resolve(self, name: str) -> Image:
        """A full fingerprint, or a unique prefix of at least 12 hex digits."""
        snap = self.snapshot()
        image = snap.images.get(name)
        if image is None and Fingerprint.parse(name) is not None and self.client.image_exists(name):
            # Made a moment ago elsewhere (lxc, another mount): the listing is out of date.
            self.invalidate()
            image = self.snapshot().images.get(name)
        if image is not None:
            return image
        if not is_fingerprint(name, MIN_PREFIX):
            raise OSError(errno.ENOENT, "no such image", name)
        found = [img for fp, img in snap.images.items() if fp.startswith(name)]
        if not found and len(name) < 64:  # perhaps made a moment ago, before its event arrived
            self.invalidate()
            found = [img for fp, img in self.snapshot().images.items() if fp.startswith(name)]
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

    def layout(self, fingerprint: Fingerprint) -> ExportLayout:
        with self._layouts_lock:  # an LRU reorders itself on every get: not thread-safe alone
            layout = self._layouts.get(fingerprint)
        if layout is not None:
            return layout
        with self._lock:
            lock = self._layout_locks.setdefault(fingerprint, threading.Lock())
        with lock:  # concurrent lookups of one image share one probe
            with self._layouts_lock:
                layout = self._layouts.get(fingerprint)
            if layout is None:
                layout = self.client.layout(fingerprint)
                with self._layouts_lock:
                    self._layouts[fingerprint] = layout
                if self.journal is not None:
                    self.journal.add(fingerprint, layout)
        with self._lock:
            self._layout_locks.pop(fingerprint, None)
        return layout
