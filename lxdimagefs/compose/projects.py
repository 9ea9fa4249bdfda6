"""Every project of one LXD server in one mount: one folder per project, each a whole tree.

A forest whose folders follow LXD's projects: the list is fetched when the
mount starts, again on every project event (`project-created`,
`project-deleted`, … on the one event stream of all projects), and, while
that stream is down, when a listing of the root is older than the metadata
lifetime. Image and alias events name their project and go to its tree, and
to the trees of the projects that show its images (a project with
`features.images=false` shows the default project's, as LXD serves them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lxdimagefs.compose.forest import Forest, Slot
from lxdimagefs.compose.root import Tree
from lxdimagefs.errors import LXDError
from lxdimagefs.fs.handles import HandleTable
from lxdimagefs.fs.node import Attr, Ownership
from lxdimagefs.names import fits
from lxdimagefs.servers.events import EventSubject

log = logging.getLogger(__name__)


class Projects(Forest):
    def __init__(self, listing: Callable[[], dict[str, str]], make: Callable[[str], Slot],
                 handles: HandleTable, readonly: bool, mountpoint: str, ttl: float = 3.0,
                 own: Ownership | None = None) -> None:
        super().__init__([], handles, readonly, mountpoint, own)
        self._listing = listing  # project -> the project whose images it shows
        self._make = make  # a project's folder (its tree, not yet started)
        self.ttl = ttl
        self.events_live: Callable[[], bool] = lambda: False
        self.shows: dict[str, str] = {}
        self._synced_at: float | None = None
        self._on_change: Callable[..., None] | None = None
        self._lock = threading.Lock()

    def started(self, on_change: Callable[..., None]) -> None:
        self._on_change = on_change
        super().started(on_change)

    def close(self) -> None:
        with self._lock:
            super().close()

    def invalidate(self) -> None:
        self._synced_at = None  # the list of projects too
        super().invalidate()

    # -- following LXD's projects ---------------------------------------------------------

    def sync(self) -> None:
        """Fetch the list of projects; folders come and go with it."""
        shows = {name: own for name, own in self._listing().items()
                 if fits(name) and not name.startswith(".")}
        with self._lock:
            slots = dict(self.slots)
            changed = set(slots) ^ set(shows)
            for gone in set(slots) - set(shows):
                log.info("project %s is gone: its folder goes", gone)
                slots.pop(gone).tree.close()
            for new in set(shows) - set(slots):
                slots[new] = self._add(new)
            self.slots, self.shows = dict(sorted(slots.items())), shows
            self._synced_at = time.monotonic()
        if self._on_change is not None:
            for name in changed:
                self._on_change(f"/{name}")

    def _add(self, name: str) -> Slot:
        slot = self._make(name)
        if self._on_change is not None:
            on_change = self._on_change
            slot.tree.started(lambda path, wait=False, entry=True: on_change(f"/{name}{path}", wait, entry))
        return slot

    def _fresh(self) -> None:
        """The list as of now: fetched again if no event stream vouches for it and it is old."""
        at = self._synced_at
        if at is not None and (self.events_live() or time.monotonic() - at < self.ttl):
            return
        try:
            self.sync()
        except LXDError as e:
            if at is None:
                raise
            log.warning("the list of projects could not be fetched again (%s): keeping the last one", e)

    def readdir(self, path: str) -> list[str]:
        if path.strip("/") == "":
            self._fresh()
        return super().readdir(path)

    def getattr(self, path: str) -> Attr:
        name = path.strip("/").split("/", 1)[0]
        if name and name not in self.slots:
            self._fresh()  # a project made a moment ago, before its event came
        return super().getattr(path)

    # -- events: one stream for every project ---------------------------------------------

    def connected(self) -> None:
        """The event stream (re)opened: whatever changed while it was closed."""
        self.sync()
        for slot in list(self.slots.values()):
            if isinstance(slot.tree, Tree):
                slot.tree.catalog.refresh()

    def changed_elsewhere(self, subject: EventSubject) -> None:
        if subject.projects_changed:
            self.sync()
            return
        # A change made through a project without its own images is the default project's
        # (LXD names the project it was made through): every folder that shows them hears of it.
        where = self.shows.get(subject.project, subject.project)
        for name, own in list(self.shows.items()):
            slot = self.slots.get(name)
            if own == where and slot is not None and isinstance(slot.tree, Tree):
                slot.tree.changed_elsewhere(subject)
