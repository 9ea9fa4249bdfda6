"""The listing a mount holds, and what one change does to it.

A snapshot is never changed in place (a `readdir` may be walking it): each
change makes a new one from the old, one image at a time, and says which
fingerprints and alias file names it touched, so that the kernel forgets
exactly those (compose/root.py) and nothing else is fetched again.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lxdimagefs.errors import LXDError
from lxdimagefs.names import alias_to_filename, fits
from lxdimagefs.servers.protocol import ImageServer
from lxdimagefs.servers.records import Image

log = logging.getLogger(__name__)
BURST = 64  # more changed images than this at once: one full listing costs less than one request each
SETTLE = 2.0  # seconds a listing waits at most for the events heard before it to be applied


@dataclass(frozen=True)
class Snapshot:
    images: dict[str, Image]
    aliases: dict[str, str]  # file name under by-alias/ -> fingerprint
    taken_at: float  # when the full listing it grew from was asked for


@dataclass(frozen=True)
class Changes:
    """What a change touched: images added, removed or edited; alias names made, dropped or moved."""

    images: frozenset[str] = field(default_factory=frozenset)
    aliases: frozenset[str] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.images or self.aliases)


def alias_names(image: Image) -> Iterable[str]:
    """The by-alias/ file names an image's aliases take (an alias no name can hold is not shown)."""
    return (n for n in map(alias_to_filename, image.aliases) if fits(n))


def build(images: list[Image], taken_at: float) -> Snapshot:
    aliases: dict[str, str] = {name: image.fingerprint for image in images for name in alias_names(image)}
    return Snapshot({i.fingerprint: i for i in images}, aliases, taken_at)


def upsert(snap: Snapshot, fp: str, image: Image | None) -> tuple[Snapshot, Changes]:
    """The snapshot with one image's record as LXD gave it now (None: it is gone).

    Its record names its aliases: those are set to it, and the names that
    pointed to it and no longer do are dropped. An alias the record names
    that pointed to another image moved here (LXD says so in the alias's
    own event, whose other image is asked again too).
    """
    old = snap.images.get(fp)
    if old is None and image is None:
        return snap, Changes()
    images, aliases = dict(snap.images), dict(snap.aliases)
    before = {n: aliases.get(n) for n in (*(alias_names(old) if old else ()),
                                           *(alias_names(image) if image else ()))}
    for name in alias_names(old) if old else ():
        if aliases.get(name) == fp:
            del aliases[name]
    if image is None:
        del images[fp]
    else:
        images[fp] = image
        aliases.update((name, fp) for name in alias_names(image))
    touched = {n for n, was in before.items() if aliases.get(n) != was}
    same = old is not None and image is not None and old.record == image.record
    return (Snapshot(images, aliases, snap.taken_at),
            Changes(frozenset(() if same else (fp,)), frozenset(touched)))


def diff(old: Snapshot, new: Snapshot) -> Changes:
    """What a full listing found changed (after the event stream was down, or a burst)."""
    images = old.images.keys() ^ new.images.keys()
    images |= {fp for fp in old.images.keys() & new.images.keys()
               if old.images[fp].record != new.images[fp].record}
    aliases = {n for n in old.aliases.keys() | new.aliases.keys() if old.aliases.get(n) != new.aliases.get(n)}
    return Changes(frozenset(images), frozenset(aliases))


class Follows:
    """The part of the Catalog (servers/catalog.py) that applies LXD's events, one thread for them all."""

    _snap: Snapshot | None
    _lock: threading.Lock
    _fill: threading.Lock
    _queue: Changes
    _full_since: float | None
    _heard: list[Changes] | None
    _seq: int
    _done: int  # the events heard up to this one are applied
    _applied: threading.Condition  # on _lock: notified as each batch lands
    events_live: Callable[[], bool]
    _misses: dict[str, float]
    _wake: threading.Event
    _worker: threading.Thread | None
    _closed: bool
    listeners: list[Callable[[Changes], None]]
    _clock: Callable[[], float]

    @property
    def server(self) -> ImageServer:
        raise NotImplementedError

    def _list(self) -> Snapshot:
        raise NotImplementedError

    # -- events: one image asked again per change ---------------------------------------

    def heard(self, images: frozenset[str] = frozenset(), aliases: frozenset[str] = frozenset()) -> None:
        """An event named these images (fingerprints) or aliases (their names in LXD); neither: any."""
        with self._lock:
            self._seq += 1
            self._misses.clear()
            if not images and not aliases:
                self._full_since = self._clock()
            else:
                named = Changes(images, aliases)
                self._queue = merge(self._queue, named)
                if self._heard is not None:
                    self._heard.append(named)
        self._kick()

    def settled(self) -> None:
        """Wait (SETTLE at most) until the events heard before this call are applied, so that a
        listing made right after `lxc` returns shows its change. Only those: under a stream of
        events a listing waits for one batch, never for the stream to stop."""
        if not self.events_live():
            return
        deadline = time.monotonic() + SETTLE
        with self._applied:
            target = self._seq
            while self._done < target and (left := deadline - time.monotonic()) > 0:
                self._applied.wait(left)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _kick(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="listing", daemon=True)
            self._worker.start()
        self._wake.set()

    def _work(self) -> None:
        """Apply what events named, in order, one batch at a time; a failure is tried again later."""
        while True:
            self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            with self._lock:
                batch, self._queue, since, seq = self._queue, Changes(), self._full_since, self._seq
            try:
                if since is not None or len(batch.images) + 2 * len(batch.aliases) > BURST:
                    with self._fill:
                        snap = self._snap
                        if snap is None or since is None or snap.taken_at < since:
                            self._list()
                            batch = Changes()  # the listing began after these events
                for fp in self._images_of(batch):  # (a listing newer than `since` may be older than them)
                    self._put(fp, self._record(fp))
                with self._applied:
                    self._done = max(self._done, seq)
                    self._applied.notify_all()
            except Exception as e:  # LXD away: its stream is too, and reopening it lists again
                log.warning("could not apply LXD's events (%s); trying again", e)
                with self._lock:
                    self._queue = merge(self._queue, batch)
                time.sleep(1)
                self._wake.set()

    def _images_of(self, batch: Changes) -> set[str]:
        """The images to ask again: those named, and for an alias its image before and after."""
        snap = self._snap
        fps = set(batch.images)
        for named in batch.aliases:
            # LXD 5.0 quotes an alias's name twice in its event's source (churn/1 comes as
            # churn%252F1): the name once unquoted is the one asked for if the first is not found.
            for alias in dict.fromkeys((named, urllib.parse.unquote(named))):
                before = snap.aliases.get(alias_to_filename(alias)) if snap else None
                now = self.server.alias(alias)
                fps |= {fp for fp in (before, now) if fp}
                if now is not None:
                    break
        return fps

    def _record(self, fp: str) -> Image | None:
        try:
            return self.server.image(fp)
        except LXDError as e:
            if e.status == 404:
                return None
            raise

    def _put(self, fp: str, image: Image | None, seq: int | None = None) -> None:
        """One image's record as LXD gave it now, unless an event came after the question (seq)."""
        with self._lock:
            snap = self._snap
            if snap is None or (seq is not None and seq != self._seq):
                return
            self._snap, changes = upsert(snap, fp, image)
            if self._heard is not None:  # the full listing on its way may be older than this answer
                self._heard.append(Changes(frozenset((fp,))))
        self._tell(changes)

    def _tell(self, changes: Changes) -> None:
        if changes:
            for listener in self.listeners:
                listener(changes)


def merge(*changes: Changes) -> Changes:
    return Changes(frozenset().union(*(c.images for c in changes)),
                   frozenset().union(*(c.aliases for c in changes)))
