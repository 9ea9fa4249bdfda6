"""Talking REST to LXD: one session over the unix socket or HTTPS, retries, operations.

The base of `LXDClient` (client.py): together they are the one client for
LXD, and no other module builds a URL. Here is how a request travels and
what an answer means; there, which endpoints the filesystem uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
import urllib.parse
from collections.abc import Iterator
from typing import Any

import requests
import requests.adapters
import requests_unixsocket
import urllib3.exceptions
from requests_unixsocket.adapters import UnixHTTPConnectionPool
from urllib3.connectionpool import HTTPConnectionPool

from lxdimagefs import stats
from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.wire.bounded import JSON_CAP, WATCHDOG, Overdue, error_body, read_capped
from lxdimagefs.wire.tls import ContextAdapter, tls_error, tls_refusal
from lxdimagefs.wire.transport import (
    Backoff,
    Connection,
    RawConnections,
    error_from_body,
)

# Every request line (--debug) carries one logger name, whichever module sends it: the client.
log = logging.getLogger("lxdimagefs.client")

OPERATION_POLL = 5  # seconds LXD holds one wait for a running operation: its progress is read as often
DEADLINE_GRACE = 1.0  # seconds past the retry budget: an operation wait LXD ends at the timeout itself


def certificate_fingerprint(pem_file: str) -> str:
    """sha256 of a PEM certificate's DER bytes, as urllib3 pins it."""
    with open(pem_file) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


class _Session(requests.Session):
    """The client certificate goes to the server's own URL alone, so a redirect to another host
    carries none; another host is verified with the system's CAs even where the server's own
    certificate is pinned instead."""

    def __init__(self, own: str, cert: tuple[str, str] | None) -> None:
        super().__init__()
        self.own, self.client_cert = own, cert

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if (request.url or "").startswith(self.own):
            kwargs["cert"] = self.client_cert
        else:
            kwargs["cert"], kwargs["verify"] = None, True
        return super().send(request, **kwargs)


class _SocketPool(UnixHTTPConnectionPool):
    def __init__(self, socket_url: str, timeout: float, maxsize: int) -> None:
        HTTPConnectionPool.__init__(self, "localhost", timeout=timeout, maxsize=maxsize)
        self.socket_path = socket_url
        self.timeout = timeout

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        WATCHDOG.attach(conn)  # the call's deadline can cut it
        return conn


class _SocketAdapter(requests_unixsocket.UnixAdapter):
    """requests-unixsocket's adapter, with one pool per socket instead of per URL.

    Its own keys pools by the whole URL and keeps one connection in each,
    so parallel Range reads of one image would reconnect every time.
    """

    def __init__(self, size: int) -> None:
        super().__init__(pool_connections=4)
        self._size = size

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        key = urllib.parse.urlparse(url).netloc
        with self.pools.lock:
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = _SocketPool(url, self.timeout, self._size)
        return pool


class RestSession:
    """Requests to one LXD server and project: URLs, retries through outages, operations."""

    def __init__(self, conn: Connection, pool_size: int = 16) -> None:
        self.conn = conn
        self._verify: bool | None = None  # None: requests' default, the system's CAs
        self._raw = RawConnections(conn, pool_size)
        if conn.socket:
            root = "http+unix://" + urllib.parse.quote(conn.socket, safe="")
            self._session = _Session(root + "/", None)
            self._session.mount("http+unix://", _SocketAdapter(pool_size))
        elif conn.url:
            root = conn.url.rstrip("/")
            self._session = _Session(root + "/", conn.cert)
            # Pinned: like lxc, trust exactly the server certificate the user gave, whatever name it bears.
            self._verify = False if conn.pinned else None
            own = ContextAdapter(self._raw.context, conn.pinned, pool_maxsize=pool_size)
            # Any other host (a redirect's): the system's CAs, and no client key in the TLS context.
            self._session.mount("https://", ContextAdapter(ssl.create_default_context()))
            self._session.mount(root + "/", own)  # the longest prefix wins: the server's own URLs
        else:
            raise ValueError("either a socket or a URL is needed")
        self._base = root + "/1.0"
        # Seconds to ride out an outage before failing (none while mounting: say so at once).
        self.patience = conn.timeout[1]
        self._session.headers["User-Agent"] = "lxdimagefs"

    # -- plumbing ---------------------------------------------------------

    def _url(self, path: str, **params: str) -> str:
        return f"{self._base}{path}?{self._query(params)}"

    def _target(self, path: str, **params: str) -> str:
        """The request target (path and query) for raw connections."""
        return f"{urllib.parse.urlsplit(self._base).path}{path}?{self._query(params)}"

    def _query(self, params: dict[str, str]) -> str:
        return urllib.parse.urlencode({"project": self.conn.project, **params})

    def _request(self, method: str, path: str, *, stream: bool = False,
                 headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                 retry: str = "", patience: float | None = None, answer_within: float | None = None,
                 **kwargs: Any) -> requests.Response:
        """One request, retried through an outage shorter than the timeout.

        `retry`: "all" (the default for GET) retries refused or dropped
        connections and 502/503/504; "connect" (other methods) only failures
        to connect, where the request cannot have reached LXD; "none".
        `patience`: seconds this request may take, outages included (default: the timeout).
        `answer_within`: seconds an answer that is coming may take in all (a long listing), while
        a server that says nothing is still given up on after `patience`.
        """
        retry = retry or ("all" if method == "GET" else "connect")
        url = self._url(path, **(params or {}))
        backoff = Backoff(patience or self.patience)
        while True:
            log.debug("%s %s", method, path)
            kwargs["timeout"] = backoff.clamp(kwargs.get("timeout") or self.conn.timeout)
            try:
                # An upload's body may take minutes to send: it has the per-read timeout alone.
                whole = max(backoff.left(), answer_within or self.conn.timeout[1]) + DEADLINE_GRACE
                seconds = None if "data" in kwargs else whole
                resp = self._send(method, url, stream, seconds, headers=headers, **kwargs)
            except requests.RequestException as e:
                if (refused := tls_refusal(e)) is not None:
                    raise tls_error(self.conn.describe(), refused) from e
                err: LXDError = LXDUnreachable(f"LXD at {self.conn.describe()} did not answer: {e}")
                if retry == "all" or (retry == "connect" and _not_connected(e)):
                    backoff.pause(err, f"{method} {path}")
                    continue
                raise err from e
            if resp.status_code < 400:
                return resp
            err = _error_from(resp)
            if retry == "all" and err.transient:
                backoff.pause(err, f"{method} {path}")
                continue
            raise err

    def _send(self, method: str, url: str, stream: bool, seconds: float | None, **kwargs: Any
              ) -> requests.Response:
        """One try: its answer, and its body unless streamed, within `seconds` (else Overdue)."""
        with WATCHDOG.call(seconds) if seconds else contextlib.nullcontext(None) as call:
            try:
                resp = self._session.request(method, url, stream=True, verify=self._verify, **kwargs)
                if resp.status_code >= 400:  # the message, read within the deadline too
                    resp._content = error_body(resp)
                elif not stream:
                    resp._content = read_capped(resp, JSON_CAP, f"{method} {url}")
            except requests.RequestException as e:
                if call is not None and call.expired:
                    raise self._overdue(seconds) from e
                raise
            if call is not None and call.expired:  # an error body cut short: the deadline, not the status
                raise self._overdue(seconds)
            return resp

    def _overdue(self, seconds: float | None) -> Overdue:
        return Overdue(f"LXD at {self.conn.describe()} did not finish answering within "
                       f"{seconds or 0:.0f} s (-o timeout)")

    def _sync(self, method: str, path: str, **kwargs: Any) -> Any:
        body = json_body(self._request(method, path, **kwargs), path)
        if body.get("type") == "error":
            raise LXDError(body.get("error") or "unknown LXD error", body.get("error_code") or 500)
        return body.get("metadata")

    def _sync_or_async(self, method: str, path: str, **kwargs: Any) -> str | None:
        """Send a request that may start an operation; returns the operation's path."""
        body = json_body(self._request(method, path, **kwargs), path)
        return body.get("operation") or None if body.get("type") == "async" else None

    def wait(self, operation: str | None) -> dict[str, Any] | None:
        """Wait for an operation to end, however long LXD says it runs; a failed one raises
        with LXD's message.

        A long operation (a large import, a pull, a refresh) is not an outage: LXD is asked
        to answer within `OPERATION_POLL` seconds, and the timeout counts from then, so only
        a server that does not answer fails the wait.
        """
        if not operation:
            return None
        op_id = operation.rstrip("/").rsplit("/", 1)[-1]
        poll = min(OPERATION_POLL, max(1, int(self.conn.timeout[1])))
        budget = poll + self.conn.timeout[1]
        with stats.underway("lxd_operation", op_id) as say:  # its progress, for stats and STATUS=
            while True:
                meta = self._sync("GET", f"/operations/{op_id}/wait", params={"timeout": str(poll)},
                                  timeout=(self.conn.timeout[0], budget), patience=budget)
                status = meta.get("status_code", 0)
                if status == 200:
                    return meta.get("metadata")
                if status >= 400 or meta.get("status") in ("Failure", "Cancelled"):
                    raise LXDError(meta.get("err") or f"LXD's operation {op_id} failed", 400)
                say(stats.fraction(meta.get("metadata")), str(meta.get("description") or op_id))

    @staticmethod
    def iter_chunks(resp: requests.Response, size: int = 1 << 20) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(size)
        except requests.RequestException as e:
            raise LXDUnreachable(f"the connection to LXD dropped: {e}") from e

    def reachable(self) -> bool:
        """One quick try, no retries: for a remote marked away."""
        try:
            self._request("GET", "", retry="none", timeout=(self.conn.timeout[0], self.conn.timeout[0]))
        except LXDError:
            return False
        return True


def _error_from(resp: requests.Response) -> LXDError:
    return error_from_body(resp.status_code, resp.reason, resp.content)  # read by _send, capped


def json_body(resp: requests.Response, path: str) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError as e:
        raise LXDError(f"LXD sent a response that is not JSON for {path}", resp.status_code) from e
    if not isinstance(body, dict):
        raise LXDError(f"LXD sent a response that is not a JSON object for {path}", resp.status_code)
    return body


def _not_connected(exc: BaseException) -> bool:
    """Whether a request failed before reaching LXD (so any request may be sent again)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionRefusedError, FileNotFoundError, requests.ConnectTimeout,
                             urllib3.exceptions.NewConnectionError)):
            return True
        nested = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = nested[0] if nested else (seen.__cause__ or seen.__context__)
    return False
