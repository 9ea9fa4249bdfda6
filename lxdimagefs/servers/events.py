"""LXD's lifecycle events keep the mount fresh.

Every image or alias change LXD reports drops the cached listing, so the
next call sees LXD's state; while the stream is live, nothing else expires
it. Each time the stream opens, the listing is fetched again at once, in
the background, for what changed while it was closed. LXD sends no alias events when an image is deleted or
refreshed, nor for aliases made during an upload: dropping the whole
listing on every image event resyncs the aliases too. While the stream is
down, the metadata lifetime alone bounds staleness; it is reopened with a
bounded backoff.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import websocket

from lxdimagefs import stats
from lxdimagefs.keys import Fingerprint
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.wire.bounded import cap_frames

log = logging.getLogger(__name__)


# The lifecycle actions that change what the mount shows. Not `image-retrieved`: LXD
# sends it for every export, so each read would otherwise drop the listing.
CHANGES = frozenset({
    "image-created", "image-deleted", "image-updated", "image-refreshed",
    "image-alias-created", "image-alias-deleted", "image-alias-updated", "image-alias-renamed",
})


# A project made, deleted, renamed or changed (features.images): the list of projects changes.
PROJECT_CHANGES = frozenset({"project-created", "project-deleted", "project-renamed", "project-updated"})


ALIASES, IMAGES = "/1.0/images/aliases/", "/1.0/images/"


@dataclass(frozen=True)
class EventSubject:
    """What an image or alias event names: an alias, an image, or neither (a whole-listing change)."""

    action: str
    alias: str | None = None
    fingerprint: Fingerprint | None = None
    project: str = "default"  # where the change happened (a stream of all projects says which)

    @property
    def projects_changed(self) -> bool:
        return self.action in PROJECT_CHANGES

    @classmethod
    def of(cls, event: dict) -> EventSubject | None:
        """The subject of an LXD lifecycle event that changes what the mount shows, else None."""
        meta = event.get("metadata")
        if not isinstance(meta, dict) or meta.get("action") not in CHANGES | PROJECT_CHANGES:
            return None
        project = str(event.get("project") or "default")
        source = urllib.parse.urlsplit(str(meta.get("source", ""))).path
        if source.startswith(ALIASES):
            alias = urllib.parse.unquote(source.removeprefix(ALIASES))
            return cls(meta["action"], alias=alias, project=project)
        if source.startswith(IMAGES):  # a malformed one: a whole-listing change, named by nothing
            fp = Fingerprint.parse(source.removeprefix(IMAGES))
            return cls(meta["action"], fingerprint=fp, project=project)
        return cls(meta["action"], project=project)



class EventWatcher:
    MAX_BACKOFF = 30.0

    def __init__(self, client: LXDClient, on_image_event: Callable[[EventSubject], None],
                 on_connect: Callable[[], None], timeout: float = 30.0, ping: float = 10.0,
                 all_projects: bool = False, poll: float | None = None) -> None:
        self.client = client
        self.poll = poll  # while the stream is down, `on_connect` again every this many seconds
        self.all_projects = all_projects  # one stream for every project (and their own lifecycle)
        self.on_image_event = on_image_event
        self.on_connect = on_connect
        self.ping = ping  # seconds of silence before a ping; twice that unanswered ends the stream
        self.timeout = timeout
        self.live = threading.Event()  # set while the stream is open
        self._stop = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            ws.abort()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._ws = cap_frames(self.client.lifecycle_events(self.timeout, self.all_projects))
                self._ws.settimeout(self.ping)  # events come when they come; pings keep it honest
                self.live.set()
                stats.add("event_connects")
                self.on_connect()  # whatever changed before the stream opened
                log.info("listening to LXD's lifecycle events")
                backoff = 0.5
                self._listen(self._ws)
            except Exception as e:  # whatever happens, the thread lives on and reconnects
                if not self._stop.is_set():
                    log.warning("LXD's event stream is down (%s); retrying in %.1f s", e, backoff)
            finally:
                self.live.clear()
                if self._ws is not None:
                    self._ws.abort()
                    self._ws = None
            self._down_for(backoff)
            backoff = min(backoff * 2, self.MAX_BACKOFF)

    def _down_for(self, seconds: float) -> None:
        """Wait to reconnect. Meanwhile what the stream would have said comes from a full listing
        every `poll` seconds (the kernel keeps names for an hour while events flow, and only an
        invalidation, made from a listing's changes now, tells it)."""
        until = time.monotonic() + seconds
        while not self._stop.wait(min(self.poll or seconds, max(0.0, until - time.monotonic()))):
            if time.monotonic() >= until:
                return
            if self.poll is not None:
                self._down_since_poll()

    def _down_since_poll(self) -> None:
        """A listing, if the server answers (a reverse proxy without websockets, say): a server
        away altogether is left to the calls, which wait for it and give up (a listing in flight
        would answer them from the old one instead)."""
        try:
            if self.client.reachable():
                self.on_connect()
        except Exception as e:  # a server down altogether: the next try says so again
            log.debug("a listing while LXD's event stream is down failed: %s", e)

    def _listen(self, ws: websocket.WebSocket) -> None:
        """Hand image events on; a stream silent past two pings is taken as dropped.

        A remote host gone or a NAT that dropped its state leaves a socket that
        never says it closed: without this, the listing would never expire.
        """
        heard = time.monotonic()
        while not self._stop.is_set():
            try:
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                if time.monotonic() - heard > 2 * self.ping:
                    raise websocket.WebSocketConnectionClosedException(
                        f"no answer from LXD's event stream for {2 * self.ping:.0f} s") from None
                ws.ping()
                continue
            heard = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise websocket.WebSocketConnectionClosedException("LXD closed the event stream")
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._dispatch(frame.data)

    def _dispatch(self, message: bytes | str) -> None:
        """One message; a bad one is logged and skipped, never the end of the stream."""
        try:
            event = json.loads(message)
            subject = EventSubject.of(event) if isinstance(event, dict) else None
        except (ValueError, AttributeError, TypeError):
            log.warning("ignored an event that is not an LXD event: %.200r", message)
            return
        if subject is not None:
            log.debug("event %s", subject)
            try:
                self.on_image_event(subject)
            except Exception:
                log.exception("handling event %s failed", subject.action)
