"""Issue 17.8, the parts that need no LXD: what a broken or hostile server's answers may cost."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time

import pytest
import websocket
from streams_server import LoopbackCA

from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.errors import IntegrityError, LXDError
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.servers.simplestreams import native_arch, parse_products
from lxdimagefs.wire.bounded import ERROR_BODY_CAP, FRAME_CAP, JSON_CAP, TooLarge, cap_frames
from lxdimagefs.wire.transport import Connection


def _h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _combined(label: str, **fields: object) -> dict:
    item = {"ftype": "lxd_combined.tar.gz", "path": f"images/{label}.tar.gz", "sha256": _h(label), "size": 5}
    item.update(fields)
    return item


def _product(alias: str, *items: dict) -> dict:
    return {"aliases": alias, "arch": native_arch(), "os": "X", "release": "1",
            "versions": {"20260303": {"items": {str(i): item for i, item in enumerate(items)}}}}


def test_a_malformed_simplestreams_item_is_skipped_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    bad_size, no_path = _combined("bad-size", size="big"), _combined("no-path")
    del no_path["path"]
    listing = parse_products({
        "good": _product("good", _combined("good")),
        "mixed": _product("mixed", bad_size, no_path, _combined("fine")),
        "not-an-object": ["a", "list"],
        "bad-versions": {"aliases": "v", "arch": native_arch(), "versions": {"20260303": "text"}},
    })
    assert {i.fingerprint for i in listing.images} == {_h("good"), _h("fine")}
    assert set(listing.paths) == {_h("good"), _h("fine")}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and all("skipped" in w for w in warned), warned


# -- a server on a unix socket that answers as told ------------------------------------------------

class _Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sent = 0

    def log_message(self, *args: object) -> None:
        pass

    def _endless(self, status: int, limit: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b" " * (1 << 20)
        try:
            while _Hostile.sent < limit:
                self.wfile.write(chunk)
                _Hostile.sent += len(chunk)
        except OSError:
            pass

    def do_GET(self) -> None:
        if self.path.startswith("/1.0/images?"):
            self._endless(200, JSON_CAP + (16 << 20))  # more than held, then not JSON either
        elif self.path.startswith(f"/1.0/images/{DECLARED}"):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        elif self.path.startswith(f"/1.0/images/{ERRING}"):
            self._endless(500, 1 << 30)
        elif self.path.startswith(f"/1.0/images/{DRIPPING}"):
            self._drip()
        elif self.path.startswith(f"/1.0/images/{SLOW}"):
            time.sleep(0.5)  # as LXD 5.0 takes ~1.2 ms an image to list them
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith((f"/1.0/images/{FP}/export", f"/1.0/images/{SPLIT}/export")):
            self._split_export()

    def _drip(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)  # each byte well within the 5 s read timeout
        except OSError:
            pass

    def _split_export(self) -> None:
        parts = [b"--B\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n\r\n%s\r\n"
                 % (n, n, b"x" * (1 << 20)) for n in (b"metadata", b"rootfs")]
        body = b"".join(parts) + b"--B--\r\n"
        self.send_response(200)
        self.send_header("Content-Type", "multipart/form-data; boundary=B")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


FP = "f" * 64
DECLARED = "1" * 64  # fingerprints the hostile server answers for badly
ERRING = "2" * 64
DRIPPING = "3" * 64
SLOW = "4" * 64
SPLIT = hashlib.sha256(b"x" * (2 << 20)).hexdigest()  # what _split_export's two parts hash to


@pytest.fixture()
def hostile(tmp_path):
    path = str(tmp_path / "hostile.socket")
    server = socketserver.ThreadingUnixStreamServer(path, _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hostile.sent = 0
    yield LXDClient(Connection(socket=path, timeout=(2.0, 5.0)))
    server.shutdown()
    server.server_close()


def test_an_endless_json_answer_is_refused_past_the_cap(hostile):
    with pytest.raises(TooLarge):
        hostile.images()
    assert _Hostile.sent < JSON_CAP + (8 << 20)  # the connection was dropped, not read to its end


def test_an_answer_declared_too_large_is_not_read(hostile):
    with pytest.raises(TooLarge, match="the answer says it is 1099511627776 bytes"):
        hostile.image(DECLARED)


def test_an_endless_error_body_gives_its_start_and_the_status(hostile):
    started = time.monotonic()
    with pytest.raises(LXDError) as e:
        hostile.image(ERRING)
    assert e.value.status == 500 and len(e.value.message) <= ERROR_BODY_CAP
    assert _Hostile.sent < (16 << 20) and time.monotonic() - started < 5


def test_a_dripping_answer_ends_at_the_calls_deadline(hostile):
    """A byte every 0.5 s resets the 5 s read timeout for 500 s; the call's deadline (the 5 s
    timeout + 1 s) ends it."""
    started = time.monotonic()
    with pytest.raises(LXDError, match="did not finish answering"):
        hostile.image(DRIPPING)
    assert time.monotonic() - started < 9


def test_a_call_without_retries_has_the_whole_timeout(hostile):
    """Mounting tries once (no budget to retry in): that one try used to get a 0.1 s read
    timeout, so a server with 1,000 images (1.2 s to list) could not be mounted."""
    hostile.patience = 0.0
    with pytest.raises(LXDError) as e:
        hostile.image(SLOW)
    assert e.value.status == 404  # its answer, not "did not answer"


def test_a_split_export_larger_than_its_record_is_refused_and_leaves_nothing(hostile, tmp_path):
    spool = SplitSpool(hostile, tmp_path / "spool")
    with pytest.raises(LXDError, match="larger than the 1000 bytes its record gives"):
        spool.paths(FP, (500, 500))
    assert not list((tmp_path / "spool").iterdir())


def test_split_parts_divided_elsewhere_than_the_layout_says_are_refused(hostile, tmp_path):
    """The fingerprint proves both parts' bytes together, not where the first ends: parts of the
    right bytes split elsewhere than this server's layout are never served (nor kept)."""
    spool, mib = SplitSpool(hostile, tmp_path / "spool"), 1 << 20
    with pytest.raises(IntegrityError):
        spool.paths(SPLIT, (mib - 10, mib + 10))
    assert not list((tmp_path / "spool").iterdir())
    meta, rootfs = spool.paths(SPLIT, (mib, mib))
    assert meta.stat().st_size == rootfs.stat().st_size == mib


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader may stop early: that is the point
        sock.sendall(data)


def _ws(frames: bytes) -> websocket.WebSocket:
    ours, theirs = socket.socketpair()
    threading.Thread(target=lambda: _send(theirs, frames), daemon=True).start()
    ws = websocket.WebSocket()
    ws.sock, ws.connected = ours, True
    return cap_frames(ws)


def test_a_websocket_frame_past_the_cap_is_refused_before_it_is_read():
    ws = _ws(b"\x81\x7f" + struct.pack("!Q", FRAME_CAP + 1))
    with pytest.raises(websocket.WebSocketProtocolException):
        ws.recv_data_frame(control_frame=True)


def test_a_websocket_message_in_fragments_past_the_cap_is_refused():
    piece = b"x" * (FRAME_CAP // 2 + 1)
    frames = b"".join(bytes([op]) + b"\x7f" + struct.pack("!Q", len(piece)) + piece
                      for op in (0x01, 0x00, 0x80))  # text, continued, continued and final
    with pytest.raises(websocket.WebSocketProtocolException):
        _ws(frames).recv_data_frame(control_frame=True)


# -- redirects -----------------------------------------------------------------------------------

def _tls_server(ca: LoopbackCA, name: str, ip: str, answer) -> tuple[http.server.ThreadingHTTPServer, list]:
    """An HTTPS server on `ip` that notes whether each client showed a certificate."""
    seen: list[bool] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(bool(self.connection.getpeercert()))
            answer(self)

    server = http.server.ThreadingHTTPServer((ip, 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*ca.issue(name, ip))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(str(ca.cert))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_a_redirect_to_another_host_does_not_carry_the_client_certificate(tmp_path, monkeypatch):
    ca = LoopbackCA.make(tmp_path / "ca")
    client_cert = ca.issue("client", "127.0.0.9")

    def listing(h: http.server.BaseHTTPRequestHandler) -> None:
        body = b'{"type": "sync", "metadata": []}'
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    other, other_saw = _tls_server(ca, "other", "127.0.0.2", listing)

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", f"https://127.0.0.2:{other.server_address[1]}{h.path}")
        h.send_header("Content-Length", "0")
        h.end_headers()

    own, own_saw = _tls_server(ca, "own", "127.0.0.1", redirect)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))
    try:
        client = LXDClient(Connection(url=f"https://127.0.0.1:{own.server_address[1]}",
                                      cert=(str(client_cert[0]), str(client_cert[1])), timeout=(2.0, 5.0)))
        assert client.images() == []
        assert own_saw == [True]  # the server itself gets the certificate
        assert other_saw == [False]  # the host it redirected to does not
    finally:
        for s in (own, other):
            s.shutdown()
            s.server_close()
