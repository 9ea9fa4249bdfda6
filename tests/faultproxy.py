"""A fault-injecting proxy between a mount and the real LXD.

It listens on its own unix socket and forwards every byte to LXD's. On
command it cuts a response after N bytes, delays one, or answers with an
HTTP error instead of forwarding, for requests whose request line holds a
given string. Used by the tests only; it runs in the test process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Rule:
    match: str  # a substring of the request line, e.g. "/export"
    cut_after: int | None = None  # response bytes to pass before closing both sides
    delay: float = 0.0  # seconds before the response starts
    status: int | None = None  # answer this instead of forwarding
    cut_request_after: int | None = None  # request bytes to pass (an upload) before closing both
    times: int = 1  # how many requests it applies to (-1: until cleared)
    before: Callable[[], object] | None = None  # run before the request is forwarded
    trickle: float = 0.0  # seconds between response bytes, each sent alone (a server that drips)


class FaultProxy:
    def __init__(self, upstream: str, path: str) -> None:
        self.upstream, self.path = upstream, path
        self.rules: list[Rule] = []
        self.applied: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(64)
        self._stop = threading.Event()
        self.frozen = threading.Event()  # while set, no byte passes either way: a half-open link
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _take(self, request_line: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.match in request_line and rule.times != 0:
                    rule.times -= 1
                    self.applied.append(request_line)
                    return rule
        return None

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self.upstream)
        except OSError:
            client.close()
            return
        state: dict = {"rule": None, "sent": 0, "up": 0}
        done = threading.Event()

        def upstream() -> None:  # client -> LXD, noting each request line
            try:
                while data := client.recv(1 << 16):
                    while self.frozen.is_set():
                        time.sleep(0.05)
                    head = data[:200].decode("latin-1")
                    if head.split(" ", 1)[0] in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
                        rule = self._take(head.split("\r\n", 1)[0])
                        state["rule"], state["sent"], state["up"] = rule, 0, 0
                        if rule is not None and rule.before is not None:
                            rule.before()
                        if rule is not None and rule.status is not None:
                            body = b'{"type":"error","error":"injected fault","error_code":%d}' % rule.status
                            client.sendall(b"HTTP/1.1 %d Injected\r\nContent-Type: application/json\r\n"
                                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                           % (rule.status, len(body), body))
                            break
                    rule = state["rule"]
                    if rule is not None and rule.cut_request_after is not None:
                        if state["up"] + len(data) >= rule.cut_request_after:
                            break
                        state["up"] += len(data)
                    server.sendall(data)
            except OSError:
                pass
            finally:
                done.set()
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    server.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=upstream, daemon=True).start()
        try:
            while data := server.recv(1 << 16):
                while self.frozen.is_set():
                    time.sleep(0.05)
                rule: Rule | None = state["rule"]
                if rule is not None and rule.delay and state["sent"] == 0:
                    time.sleep(rule.delay)
                if rule is not None and rule.trickle:
                    for i in range(len(data)):
                        client.sendall(data[i:i + 1])
                        time.sleep(rule.trickle)
                    continue
                if rule is not None and rule.cut_after is not None:
                    room = rule.cut_after - state["sent"]
                    if room <= len(data):
                        client.sendall(data[:max(room, 0)])
                        break
                client.sendall(data)
                state["sent"] = state.get("sent", 0) + len(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
