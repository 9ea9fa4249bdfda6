"""What images and aliases LXD holds, cached.

One `GET /1.0/images?recursion=1` answers every listing and `stat`: the
records carry their aliases, so no request is made per image. While LXD's
event stream is live that listing is kept, and each event is applied to it:
the image it names (or the alias's old and new image) is asked again, by
one thread in the background, so no call waits for it; a burst too large
for that is one full listing. While the stream is down, the listing lives
the metadata lifetime, and whoever finds it old lists again while the
others are answered from the old one. A miss is remembered until the next
event or the lifetime's end. Export layouts (file names and sizes) are
fixed by the fingerprint, so they are cached for good, and journaled for
the next mount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cachetools import LRUCache

from lxdimagefs.errors import fs_error
from lxdimagefs.keys import Fingerprint, ObjectKey
from lxdimagefs.names import filename_to_alias, is_fingerprint
from lxdimagefs.servers.listing import Changes, Follows, Snapshot, build, diff, merge
from lxdimagefs.servers.protocol import ImageServer, ImageSource
from lxdimagefs.servers.records import ExportLayout, ExportPart, Image, part_name

log = logging.getLogger(__name__)

MIN_PREFIX = 12
MISSES = 4096  # names remembered as missing, at most


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


class Catalog(Follows):
    def __init__(self, client: ImageSource, ttl: float = 3.0, clock: Callable[[], float] = time.monotonic,
                 journal: LayoutJournal | None = None) -> None:
        self.client = client
        self.journal = journal
        self.ttl = ttl
        self.events_live: Callable[[], bool] = lambda: False  # set by whoever follows LXD's events
        self.listeners: list[Callable[[Changes], None]] = []  # told what each change touched
        self._snap: Snapshot | None = None
        self._layouts: LRUCache[Fingerprint, ExportLayout] = LRUCache(maxsize=100_000)
        if journal is not None:
            self._layouts.update(journal.load())
        self._fill = threading.Lock()  # one full listing at a time
        self._lock = threading.Lock()  # the snapshot's swaps, the queue of changes, the misses
        self._asked = self._listed = 0  # own changes asked for a new listing / the last one covered
        self._queue = Changes()  # images and aliases events named, not asked yet
        self._full_since: float | None = None  # a full listing is due, newer than this
        self._heard: list[Changes] | None = None  # what events named while a full listing was on the way
        self._seq = 0  # events heard: a lookup's answer older than the last event is not kept
        self._done = 0
        self._applied = threading.Condition(self._lock)
        self._misses: dict[str, float] = {}
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._layouts_lock = threading.Lock()
        self._layout_locks: dict[str, threading.Lock] = {}
        self._clock = clock

    @property
    def server(self) -> ImageServer:
        """The same server, for the changes only LXD and Incus take; an index refuses them."""
        if not isinstance(self.client, ImageServer):
            raise fs_error(errno.EROFS, "", "this server is an index to read, it takes no changes")
        return self.client

    def probe(self) -> None:
        """The server answers and the project exists: LXD's cheap list, not the full one (which a
        server too large for `-o timeout` may not give in time); an index is read whole."""
        if isinstance(self.client, ImageServer):
            self.client.count_images()
        else:
            self.snapshot()

    def snapshot(self) -> Snapshot:
        """The listing: fetched if there is none, or it is older than the lifetime and no event stream
        vouches for it; then only by the first caller, the others answered from the old one."""
        snap = self._snap
        if snap is not None and not self._stale(snap):
            return snap
        if snap is not None and self._asked == self._listed and not self._fill.acquire(blocking=False):
            return snap  # someone is listing already: not waited for
        if snap is None or self._asked != self._listed:
            self._fill.acquire()  # nothing to answer from, or our own change to see
        try:
            snap = self._snap
            return self._list() if snap is None or self._stale(snap) else snap
        finally:
            self._fill.release()

    def listing(self) -> Snapshot:
        """The listing for a `readdir`: with the events heard so far applied (Follows.settled)."""
        self.settled()
        return self.snapshot()

    def _stale(self, snap: Snapshot) -> bool:
        return self._asked != self._listed or (not self.events_live()
                                               and self._clock() - snap.taken_at >= self.ttl)

    def cached(self) -> Snapshot | None:
        """The listing held now, if any, without asking LXD."""
        return self._snap

    def refresh(self) -> None:
        """The event stream (re)opened: what changed while it was closed comes with one full
        listing, in the background (none if one started since)."""
        with self._lock:
            self._full_since = self._clock()
        self._kick()

    def invalidate(self) -> None:
        """Our own change: the next call lists again, and sees it."""
        with self._lock:
            self._asked += 1
            self._misses.clear()

    def _list(self) -> Snapshot:
        """A full listing (with _fill held); events heard meanwhile are asked again after it."""
        with self._lock:
            asked, self._heard = self._asked, []
        started = self._clock()
        try:
            new = build(self.client.images(), started)
        finally:
            with self._lock:
                heard, self._heard = self._heard or [], None
                self._queue = merge(self._queue, *heard)
        with self._lock:
            old, self._snap, self._listed = self._snap, new, max(self._listed, asked)
            if self._full_since is not None and self._full_since <= started:
                self._full_since = None
        if heard:
            self._kick()
        if old is not None:
            self._tell(diff(old, new))
        return new

    # -- lookups ------------------------------------------------------------------------

    def _missing(self, name: str) -> bool:
        at = self._misses.get(name)
        return at is not None and self._clock() - at < self.ttl

    def _miss(self, name: str) -> None:
        with self._lock:
            if len(self._misses) >= MISSES:
                self._misses.clear()
            self._misses[name] = self._clock()

    def resolve(self, name: str) -> Image:
        """A full fingerprint, or a unique prefix of at least 12 hex digits."""
        snap = self.snapshot()
        image = snap.images.get(name)
        if image is not None:
            return image
        if not is_fingerprint(name, MIN_PREFIX):
            raise OSError(errno.ENOENT, "no such image", name)
        found = [img for fp, img in snap.images.items() if fp.startswith(name)] if len(name) < 64 else []
        if not found and (looked := self._look_up(name)) is not None:
            found = [looked]  # made a moment ago elsewhere, before its event came
        if len(found) != 1:
            raise OSError(errno.ENOENT, "no image, or more than one, has this prefix", name)
        return found[0]

    def _look_up(self, name: str) -> Image | None:
        """An image the listing lacks, by fingerprint or prefix: one small request to LXD, a miss
        remembered (an index has nothing it does not list)."""
        if self._missing(name) or not isinstance(self.client, ImageServer):
            return None
        seq = self._seq
        image = self.client.image_by_prefix(name)
        if image is None:
            self._miss(name)
        else:
            self._put(image.fingerprint, image, seq)
        return image

    def alias_target(self, filename: str) -> str | None:
        """The fingerprint an alias (by its file name) points to, asking LXD on a miss."""
        fp = self.snapshot().aliases.get(filename)
        if fp is not None or self._missing("alias:" + filename) or not isinstance(self.client, ImageServer):
            return fp
        seq = self._seq
        fp = self.client.alias(filename_to_alias(filename))
        image = self._record(fp) if fp else None
        if image is None:
            self._miss("alias:" + filename)
            return None
        self._put(image.fingerprint, image, seq)
        return image.fingerprint

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

