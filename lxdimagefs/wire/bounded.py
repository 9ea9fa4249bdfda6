"""What one answer of a server may cost: bytes held, and time.

A server that is broken or hostile decides how much it sends and how
slowly. Without bounds, an endless error body or JSON answer fills the
daemon's memory, and an answer trickled a byte at a time never trips a
read timeout (each byte resets it) while the call holds, say, the
catalog's lock. So bodies read into memory are capped, websocket frames
are capped, and every REST call has an overall deadline: a watchdog
shuts the call's connection down when it passes, which ends any read
blocked on it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
import websocket
from urllib3.connectionpool import HTTPSConnectionPool
from websocket._abnf import continuous_frame, frame_buffer

from lxdimagefs.errors import LXDError

ERROR_BODY_CAP = 64 << 10  # an error's message: LXD's are a line
JSON_CAP = 64 << 20  # a listing of ~30,000 images, or a simplestreams products file of 10x today's
FRAME_CAP = 1 << 20  # one lifecycle event is well under 4 KiB


class TooLarge(LXDError):
    """An answer larger than we hold in memory: EIO, not retried."""


class Overdue(LXDError):
    """A call whose answer did not end by its deadline (a trickle): EIO, not retried, since the
    deadline is the whole retry budget."""


def read_capped(resp: requests.Response, cap: int, what: str) -> bytes:
    """The body of a streamed response, refused past `cap` bytes (the connection is dropped)."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        resp.close()
        raise TooLarge(f"{what}: the answer says it is {int(declared)} bytes, more than the {cap} held")
    body = bytearray()
    for chunk in resp.iter_content(1 << 16):
        body += chunk
        if len(body) > cap:
            resp.close()
            raise TooLarge(f"{what}: the answer is more than the {cap} bytes held")
    return bytes(body)


def error_body(resp: requests.Response) -> bytes:
    """The start of an error answer (its message), the rest dropped with the connection."""
    try:
        body = resp.raw.read(ERROR_BODY_CAP, decode_content=True) or b""
    except Exception:  # the message is a courtesy: a broken one leaves the status
        body = b""
    resp.close()
    return body


class _Call:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[Any] = []
        self.expired = False
        self.over = False

    def cut(self) -> None:
        self.expired = True
        for conn in self.conns:
            sock = getattr(conn, "sock", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """One thread for the daemon: at each call's deadline, shuts the call's connections down."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Call]] = []
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def call(self, seconds: float) -> Iterator[_Call]:
        """The connections this thread takes from a watched pool within are cut after `seconds`."""
        call = _Call(time.monotonic() + seconds)
        outer = getattr(self._local, "call", None)
        self._local.call = call
        with self._cond:
            heapq.heappush(self._heap, (call.deadline, next(self._count), call))
            if self._thread is None:  # made on first use: the daemon forks after start-up
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is call:  # the earliest now: the thread sleeps until it (else: no wake)
                self._cond.notify()
        try:
            yield call
        finally:
            call.over = True
            self._local.call = outer

    def attach(self, conn: Any) -> None:
        """A connection the current call uses (from a watched pool)."""
        call = getattr(self._local, "call", None)
        if call is not None:
            call.conns.append(conn)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].over:
                    heapq.heappop(self._heap)
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is None or wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)[2].cut()


WATCHDOG = Watchdog()


class WatchedHTTPSPool(HTTPSConnectionPool):
    """urllib3's HTTPS pool, telling the watchdog which connection a call uses."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        WATCHDOG.attach(conn)
        return conn


def watch_pools(poolmanager: Any) -> None:
    """Make a requests adapter's pool manager hand out watched HTTPS pools."""
    poolmanager.pool_classes_by_scheme = {**poolmanager.pool_classes_by_scheme, "https": WatchedHTTPSPool}


class _CappedFrames(frame_buffer):
    def recv_length(self) -> None:
        super().recv_length()
        if self.length is not None and self.length > FRAME_CAP:
            raise websocket.WebSocketProtocolException(
                f"a websocket frame of {self.length} bytes, more than the {FRAME_CAP} held")


class _CappedMessages(continuous_frame):
    def add(self, frame: Any) -> None:
        super().add(frame)
        if self.cont_data and len(self.cont_data[1]) > FRAME_CAP:
            raise websocket.WebSocketProtocolException(f"a websocket message of more than {FRAME_CAP} bytes")


def cap_frames(ws: websocket.WebSocket) -> websocket.WebSocket:
    """A websocket that refuses (drops the connection on) a frame or message past FRAME_CAP."""
    skip = ws.frame_buffer.skip_utf8_validation
    ws.frame_buffer = _CappedFrames(ws._recv, skip)
    ws.cont_frame = _CappedMessages(ws.cont_frame.fire_cont_frame, skip)
    return ws
