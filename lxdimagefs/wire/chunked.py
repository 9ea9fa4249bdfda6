"""A request body sent while it is being written: HTTP/1.1 chunked encoding on a raw connection.

An import's size is not known until its writer closes it, so its body is
chunked. requests (through urllib3) frames each chunk by copying it into a
new bytes object and sends it with three more Python calls; here a chunk
goes to the socket as it is, its framing beside it, in one `sendmsg` on the
unix socket (no copy, one system call). See docs/PERFORMANCE.md, issue 16.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Mapping
from typing import Any

from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.wire.transport import error_from_body

_END = b"0\r\n\r\n"
SEND_BUFFER = 8 << 20  # bytes sent and not yet read by LXD, at most: 8 FUSE writes of 1 MiB


class ChunkedPost:
    """One POST whose body is sent chunk by chunk, then its answer read."""

    def __init__(self, http_conn: http.client.HTTPConnection, target: str,
                 headers: Mapping[str, str | bytes]) -> None:
        self._conn = http_conn
        try:
            http_conn.putrequest("POST", target, skip_accept_encoding=True)
            for name, value in headers.items():
                http_conn.putheader(name, value)
            http_conn.putheader("Transfer-Encoding", "chunked")
            http_conn.endheaders()  # connects, and sends the request line and headers
        except (OSError, http.client.HTTPException) as e:
            http_conn.close()
            raise LXDUnreachable(f"LXD did not take the upload: {e}") from e
        sock = http_conn.sock
        self._gather = sock is not None and sock.family == socket.AF_UNIX  # TLS has no sendmsg
        if sock is not None:
            _grow_send_buffer(sock)

    def send(self, data: bytes | memoryview) -> None:
        """One chunk of the body; LXD's refusal if it answered instead of reading on."""
        if not len(data):
            return  # an empty chunk would end the body
        parts = [b"%x\r\n" % len(data), data, b"\r\n"]
        try:
            if self._gather:
                _sendmsg_all(self._conn.sock, parts)
            else:
                for part in parts:
                    self._conn.sock.sendall(part)
        except OSError as e:
            raise self._refusal(e) from e

    def finish(self) -> dict[str, Any]:
        """End the body; LXD's JSON answer (an async operation, for an image)."""
        try:
            self._conn.sock.sendall(_END)
        except OSError as e:
            raise self._refusal(e) from e
        status, reason, body = self._answer()
        if status >= 400:
            raise error_from_body(status, reason, body)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise LXDError("LXD sent an answer to the upload that is not a JSON object", status)
        if answer.get("type") == "error":
            raise LXDError(answer.get("error") or "unknown LXD error", answer.get("error_code") or 500)
        return answer

    def close(self) -> None:
        """Drop the connection: a body cut short, which LXD discards.

        Safe from another thread while a send waits for room: shutdown wakes it (EPIPE),
        where closing the descriptor alone would leave it waiting for its timeout.
        """
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()

    def _answer(self) -> tuple[int, str, bytes]:
        try:
            resp = self._conn.getresponse()
            return resp.status, resp.reason, resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            raise LXDUnreachable(f"LXD did not answer the upload: {e}") from e
        finally:
            self._conn.close()

    def _refusal(self, error: OSError) -> LXDError:
        """Why sending failed: LXD's own answer if it sent one before closing, else the socket's."""
        try:
            status, reason, body = self._answer()
        except LXDError:
            return LXDUnreachable(f"the connection to LXD dropped during the upload: {error}")
        if status >= 400:
            return error_from_body(status, reason, body)
        return LXDUnreachable(f"LXD stopped reading the upload: {error}")


def _grow_send_buffer(sock: socket.socket) -> None:
    """Let the socket hold SEND_BUFFER bytes LXD has not read yet: the upload's only queue.

    The writer's write returns once its chunk is in this buffer, so the next
    chunk is read and written while LXD drains the last. Root may pass the
    system's cap (net.core.wmem_max); others get what the cap allows.
    """
    for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if option is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return


def _sendmsg_all(sock: socket.socket, parts: list[Any]) -> None:
    """sendmsg until every byte of `parts` is sent (a socket with a timeout may send part)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
