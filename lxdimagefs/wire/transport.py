"""The export data path's HTTP: raw connections over the unix socket or TLS, and backoff.

requests is used for LXD's JSON API; export bytes go through plain
http.client connections, read with `readinto` straight into the caller's
buffers. Request targets come from the client (servers/lxd.py), which alone
builds LXD's URLs.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from lxdimagefs import stats
from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.wire.tls import client_context, pin_matches, tls_error, tls_refusal

log = logging.getLogger(__name__)
request_log = logging.getLogger("lxdimagefs.client")  # request lines under the client's name, as rest.py

DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds


@dataclass
class Connection:
    """Where LXD is and how to authenticate; never logged whole."""

    socket: str | None = None
    url: str | None = None
    cert: tuple[str, str] | None = None
    pinned: str | None = None  # sha256 of the server certificate to trust, else the system's CAs
    project: str = "default"
    timeout: tuple[float, float] = DEFAULT_TIMEOUT

    def describe(self) -> str:
        return self.socket or self.url or "?"

    def identity(self) -> str:
        """Which server and project: the `server` of every key for what is stored about its images."""
        where = f"unix:{self.socket}" if self.socket else (self.url or "").rstrip("/")
        return f"{where} project={self.project}"


class Backoff:
    """Exponential backoff with jitter, for as long as a time budget lasts.

    An LXD that restarts (a snap refresh, a cluster member failing over)
    refuses connections or answers 503 for a few seconds: callers wait that
    out instead of failing. Past the budget the last error is raised.
    """

    FIRST, MOST = 0.1, 2.0

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.delay = self.FIRST
        self.tries = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def clamp(self, timeout: tuple[float, float]) -> tuple[float, float]:
        """A (connect, read) timeout that ends no later than the budget (a frozen LXD: one timeout).

        The first try always gets its whole timeout: a budget of 0 (no retries, as when
        mounting) must not make it a 0.1 s one, which a busy server or a cluster member
        that forwards the request misses.
        """
        if self.tries == 0:
            return timeout
        left = max(self.left(), 0.1)
        return min(timeout[0], left), min(timeout[1], left)

    def pause(self, err: LXDError, what: str) -> None:
        left = self.left()
        if left <= 0:
            raise err
        if self.tries == 0:
            log.warning("%s: %s; retrying for up to %.0f s", what, err.message, left)
            stats.add("outages")
        stats.add("retries")
        self.tries += 1
        time.sleep(min(self.delay * random.uniform(0.5, 1.0), left))
        self.delay = min(self.delay * 2, self.MOST)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: tuple[float, float]) -> None:
        super().__init__("localhost", timeout=timeout[0])
        self._path, self._read_timeout = path, timeout[1]

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self._read_timeout)
        self.sock = sock


class _TLSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, context: ssl.SSLContext, pinned: str | None,
                 timeout: tuple[float, float]) -> None:
        super().__init__(host, port, timeout=timeout[0], context=context)
        self._pinned, self._read_timeout = pinned, timeout[1]

    def connect(self) -> None:
        super().connect()
        if self._pinned and not pin_matches(self.sock.getpeercert(binary_form=True), self._pinned):
            self.close()
            raise ssl.SSLError("the server's certificate is not the pinned one")
        self.sock.settimeout(self._read_timeout)


class RawConnections:
    """http.client connections for the export data path, kept alive and reused when idle."""

    def __init__(self, conn: Connection, size: int) -> None:
        self.conn = conn
        self._idle: list[http.client.HTTPConnection] = []
        self._size = size
        self._lock = threading.Lock()
        self.context = client_context(conn.cert, conn.pinned) if conn.url else None

    def _new(self, timeout: tuple[float, float]) -> http.client.HTTPConnection:
        if self.conn.socket:
            return _UnixConnection(self.conn.socket, timeout)
        url = urllib.parse.urlsplit(self.conn.url or "")
        assert self.context is not None
        return _TLSConnection(url.hostname or "", url.port, self.context, self.conn.pinned, timeout)

    def fresh(self, timeout: tuple[float, float]) -> http.client.HTTPConnection:
        """A connection of its own, never pooled: for a request that keeps it to its end (an upload)."""
        return self._new(timeout)

    def open(self, target: str, headers: dict[str, str], start: int, end: int | None,
             timeout: tuple[float, float]) -> ExportStream:
        with self._lock:
            http_conn = self._idle.pop() if self._idle else None
        fresh = http_conn is None
        if http_conn is None:
            http_conn = self._new(timeout)
        elif http_conn.sock is not None:
            http_conn.sock.settimeout(timeout[1])
        try:
            http_conn.request("GET", target, headers=headers)
            resp = http_conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            http_conn.close()
            if (refused := tls_refusal(e)) is not None:
                raise tls_error(self.conn.describe(), refused) from e
            if not fresh:  # an idle connection the server had closed: try once on a new one
                return self.open(target, headers, start, end, timeout)
            raise LXDUnreachable(f"LXD at {self.conn.describe()} did not answer: {e}") from e
        if resp.status != 206:
            body = resp.read(1 << 16)
            http_conn.close()
            raise error_from_body(resp.status, resp.reason, body)
        total = resp.getheader("Content-Range", "").rpartition("/")[2]
        return ExportStream(self, http_conn, resp, start, end if end is not None else int(total))

    def open_range(self, target: str, start: int, end: int | None, backoff: Backoff, label: str
                   ) -> ExportStream:
        """Bytes [start, end) of `target` (to its end if `end` is None), through transient refusals."""
        rng = f"bytes={start}-{'' if end is None else end - 1}"
        while True:
            request_log.debug("GET %s %s", label, rng)
            try:
                return self.open(target, {"Range": rng, "User-Agent": "lxdimagefs"}, start, end,
                                 backoff.clamp(self.conn.timeout))
            except LXDError as e:
                if not e.transient:
                    raise
                backoff.pause(e, label)

    def give_back(self, http_conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(http_conn)
                return
        http_conn.close()


class ExportStream:
    """Bytes [start, end) of an export, read with `readinto` into the caller's buffers."""

    def __init__(self, pool: RawConnections, http_conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, start: int, end: int) -> None:
        self._pool, self._resp = pool, resp
        self._conn: http.client.HTTPConnection | None = http_conn
        self.pos, self.end = start, end

    def readinto(self, view: memoryview) -> int:
        """Fills `view` (or up to the end); raises LXDUnreachable if the stream breaks first."""
        want = min(len(view), self.end - self.pos)
        got = 0
        try:
            while got < want:
                n = self._resp.readinto(view[got:want])
                if not n:
                    raise LXDUnreachable(f"the export stream ended {self.end - self.pos - got} bytes early")
                got += n
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise LXDUnreachable(f"the connection to LXD dropped: {e}") from e
        finally:
            self.pos += got
        return got

    def close(self) -> None:
        conn, self._conn = self._conn, None  # the stream holds it no more: closing twice is nothing
        if conn is None:
            return
        if self.pos >= self.end and self._resp.isclosed() and not self._resp.will_close:
            self._pool.give_back(conn)  # read to its end: the connection can serve again
        else:
            conn.close()  # an open-ended stream left midway: LXD stops when the socket closes

    def __enter__(self) -> ExportStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_from_body(status: int, reason: str, body: bytes) -> LXDError:
    """LXD's refusal from a response body: its JSON "error", else the text, else the reason."""
    try:
        message = json.loads(body).get("error") or reason
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace").strip() or reason
    return LXDError(message, status)
