"""What one LXD server says of itself: its name and certificate, where it is reached, its
projects and storage pools, its event stream, and trust given for a token.

`LXDClient` (lxd.py) adds the image and alias endpoints on top; the two halves share one
REST session (rest.py), so nothing here builds a request the other does not see.
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any

import websocket

from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.wire.rest import RestSession
from lxdimagefs.wire.tls import pin_matches
from lxdimagefs.wire.transport import Connection


class LXDServer(RestSession):
    """One LXD (or Incus) server and project, as it describes itself."""

    def __init__(self, conn: Connection, pool_size: int = 16) -> None:
        super().__init__(conn, pool_size)
        self._product: str | None = None

    def server_info(self) -> dict[str, Any]:
        info = self._sync("GET", "")
        self._product = (info.get("environment") or {}).get("server") or self._product
        return info

    @property
    def product(self) -> str:
        """"lxd" or "incus": Incus speaks LXD's API, with its own name in headers."""
        if self._product is None:
            self.server_info()
        return self._product or "lxd"

    def https_address(self) -> str | None:
        """Where other servers reach this one: the URL it is reached on, else its core.https_address."""
        if self.conn.url:
            return self.conn.url.rstrip("/")
        addresses = (self.server_info().get("environment") or {}).get("addresses") or []
        return f"https://{addresses[0]}" if addresses else None

    def trust_with_token(self, token: str) -> None:
        """Have the server trust this client's certificate in exchange for a trust token, once.

        The whole token, as lxc sends it: LXD 5.0 reads it from `password`, later
        LXDs from `trust_token`; each finds the secret inside and matches it to its
        pending token. Never retried: a token is good for one use.
        """
        self._sync("POST", "/certificates", json={"type": "client", "password": token, "trust_token": token},
                   retry="none")

    def server_certificate(self) -> str:
        return (self.server_info().get("environment") or {}).get("certificate", "")

    def projects(self) -> dict[str, str]:
        """Every project this client may see, each with the project whose images it shows.

        A project without its own images (features.images=false) shows the
        default project's, as LXD serves them for it.
        """
        found = {}
        for rec in self._sync("GET", "/projects", params={"recursion": "1"}) or []:
            name = str(rec.get("name") or "")
            own = name == "default" or str((rec.get("config") or {}).get("features.images")).lower() == "true"
            if name:
                found[name] = name if own else "default"
        return found

    def images_project(self) -> str:
        """The project whose images this one shows, and so whose events tell of them: LXD tags an
        image event with the project that holds the image (default's, for a project without
        features.images). Asked at each (re)connect; this project's own if it cannot be read."""
        name = self.conn.project or "default"
        if name == "default":
            return name
        try:
            rec = self._sync("GET", f"/projects/{quote(name)}", retry="none") or {}
        except LXDError:
            return name
        return name if str((rec.get("config") or {}).get("features.images")).lower() == "true" else "default"

    # -- storage (what df reports) ------------------------------------------------

    def pool_resources(self, pool: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A storage pool's (space, inodes): each with total and used."""
        res = self._sync("GET", f"/storage-pools/{quote(pool)}/resources") or {}
        return res.get("space") or {}, res.get("inodes") or {}

    def default_root_pool(self) -> str | None:
        """The pool of the default profile's root disk, if it has one."""
        try:
            devices = (self._sync("GET", "/profiles/default") or {}).get("devices") or {}
        except LXDError as e:
            if e.status in (403, 404):
                return None
            raise
        roots = [d.get("pool") for d in devices.values() if d.get("type") == "disk" and d.get("path") == "/"]
        return roots[0] if roots else None

    # -- events ---------------------------------------------------------------

    def lifecycle_events(self, timeout: float, all_projects: bool = False) -> websocket.WebSocket:
        """A websocket of LXD's lifecycle events for this project, or all of them (unix socket or HTTPS)."""
        scope = {"all-projects": "true"} if all_projects else {"project": self.images_project()}
        query = urllib.parse.urlencode({"type": "lifecycle", **scope})
        try:
            if self.conn.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(self.conn.socket)
                return websocket.create_connection(f"ws://localhost/1.0/events?{query}", socket=sock,
                                                   timeout=timeout)
            url = self._base.replace("https://", "wss://", 1) + f"/events?{query}"
            sslopt: dict[str, Any] = {"certfile": self.conn.cert[0], "keyfile": self.conn.cert[1]} \
                if self.conn.cert else {}
            if self.conn.pinned:
                sslopt.update(cert_reqs=ssl.CERT_NONE, check_hostname=False)
            ws = websocket.create_connection(url, timeout=timeout, sslopt=sslopt)
            tls = ws.sock
            assert isinstance(tls, ssl.SSLSocket)  # wss://: the websocket's socket is TLS
            if self.conn.pinned and not pin_matches(tls.getpeercert(binary_form=True), self.conn.pinned):
                ws.close()
                raise LXDUnreachable("the event stream's server certificate is not the pinned one")
            return ws
        except (OSError, websocket.WebSocketException) as e:
            raise LXDUnreachable(f"LXD's event stream did not open: {e}") from e


def quote(name: str) -> str:
    """A name as one URL path segment."""
    return urllib.parse.quote(name, safe="")
