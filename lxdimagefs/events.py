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
from collections.abc import Callable

import websocket

from .client import LXDClient
from .errors import LXDError

log = logging.getLogger(__name__)


# The lifecycle actions that change what the mount shows. Not `image-retrieved`: LXD
# sends it for every export, so each read would otherwise drop the listing.
CHANGES = frozenset({
    "image-created", "image-deleted", "image-updated", "image-refreshed",
    "image-alias-created", "image-alias-deleted", "image-alias-updated", "image-alias-renamed",
})


class EventWatcher:
    MAX_BACKOFF = 30.0

    def __init__(self, client: LXDClient, on_image_event: Callable[[dict], None],
                 on_connect: Callable[[], None], timeout: float = 30.0) -> None:
        self.client = client
        self.on_image_event = on_image_event
        self.on_connect = on_connect
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
                self._ws = self.client.lifecycle_events(self.timeout)
                self._ws.settimeout(None)  # events come when they come; pings keep it honest
                self.live.set()
                self.on_connect()  # whatever changed before the stream opened
                log.info("listening to LXD's lifecycle events")
                backoff = 0.5
                self._listen(self._ws)
            except (LXDError, OSError, websocket.WebSocketException) as e:
                if not self._stop.is_set():
                    log.warning("LXD's event stream is down (%s); retrying in %.1f s", e, backoff)
            finally:
                self.live.clear()
                if self._ws is not None:
                    self._ws.abort()
                    self._ws = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.MAX_BACKOFF)

    def _listen(self, ws: websocket.WebSocket) -> None:
        while not self._stop.is_set():
            message = ws.recv()
            if not message:
                raise websocket.WebSocketConnectionClosedException("LXD closed the event stream")
            try:
                event = json.loads(message)
            except ValueError:
                continue
            action = (event.get("metadata") or {}).get("action", "")
            if action in CHANGES:
                log.debug("event %s %s", action, (event.get("metadata") or {}).get("source", ""))
                self.on_image_event(event)
