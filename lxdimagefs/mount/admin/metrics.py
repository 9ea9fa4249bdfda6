"""The stats of a running mount (stats.py) as Prometheus text, served on a unix socket only the
mounter can reach (no TCP port), and `lxdimagefs stats MOUNTPOINT`, which reads it.

The socket answers one HTTP/1.0 GET per connection, so `curl --unix-socket SOCK http://x/metrics`
(or a scraper behind a socket-to-TCP proxy) reads it as it would an exporter's /metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from lxdimagefs import stats

log = logging.getLogger(__name__)
PREFIX = "lxdimagefs_"
HELP = {
    "bytes": "bytes readers and the hash got, by source: server, memory, disk (cache), local "
             "(the server's own files)",
    "images_checked": "images whose whole-file sha256 was checked, by verdict",
    "retries": "requests tried again through an outage", "outages": "outages ridden out",
    "event_connects": "connections of LXD's event stream (the first, then reconnects)",
    "imports": "images created through import/, by result",
}


def runtime_dir() -> Path:
    """Where the sockets live: /run/lxdimagefs for root, else $XDG_RUNTIME_DIR or the temp folder."""
    if os.geteuid() == 0:
        return Path("/run/lxdimagefs")
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / f"lxdimagefs-{os.getuid()}"


def socket_for(mountpoint: str) -> Path:
    """The default metrics socket of a mount point (a name found again from the path alone)."""
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()
    return runtime_dir() / f"{digest[:24]}.sock"


class Collector:
    """stats.py's table as metric families."""

    def collect(self) -> Iterator[Any]:
        counts, gauges = stats.snapshot()
        families: dict[str, Any] = {}
        summary = SummaryMetricFamily(PREFIX + "operation_seconds", "FUSE calls and their time",
                                      labels=["operation"])
        for (name, labels), value in sorted(counts.items()):
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(PREFIX + name, HELP.get(name, name),
                                                              labels=[k for k, _ in labels])
            family.add_metric([v for _, v in labels], value)
        for op, (count, total) in sorted(stats.times().items()):
            summary.add_metric([op], count, total)
        yield from families.values()
        yield summary
        for name, values in gauges.items():
            gauge = GaugeMetricFamily(PREFIX + name, name.replace("_", " "),
                                      labels=sorted(values[0][0]) if values else [])
            for named, value in values:
                gauge.add_metric([named[k] for k in sorted(named)], value)
            yield gauge
        running = stats.progress()
        gauge = GaugeMetricFamily(PREFIX + "lxd_operation_progress", "LXD operations the mount "
                                  "waits for, and how far along each is (0..1; -1: not said)",
                                  labels=["operation", "kind"])
        for kind, name, done in running:
            gauge.add_metric([name, kind], done)
        yield gauge


def render() -> bytes:
    return generate_latest(Collector())


class MetricsSocket:
    """A unix socket (0600, in a 0700 folder) that answers each connection with the metrics."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def start(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()  # a daemon that died left it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(8)
        except OSError as e:
            log.warning("metrics: cannot listen on %s: %s", self.path, e.strerror)
            return
        self._sock = sock
        threading.Thread(target=self._serve, name="metrics", daemon=True).start()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    body = render()
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
                except OSError:
                    continue

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()


def fetch(path: Path, timeout: float = 10) -> str:
    """The metrics text from a mount's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    return raw.partition(b"\r\n\r\n")[2].decode()


def summary(text: str) -> str:
    """The metrics, as a person reads them: one line per value, grouped by metric."""
    lines = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = " ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            name = sample.name.removeprefix(PREFIX)
            lines.append(f"{name:32} {labels:48} {sample.value:g}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lxdimagefs stats", description="What a running mount did and "
                                "is doing: bytes by source, checks, retries, operations, the disk cache.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT|SOCKET",
                   help="a mount point, or the socket given as -o metrics=SOCKET")
    p.add_argument("--prometheus", action="store_true", help="print the Prometheus text as it is")
    args = p.parse_args(argv)
    where = Path(args.mountpoint)
    path = where if where.is_socket() else socket_for(args.mountpoint)
    try:
        text = fetch(path)
    except OSError as e:
        print(f"lxdimagefs stats: no running mount answers at {path} ({e.strerror or e}): is "
              f"{args.mountpoint} an lxdimagefs mount of this user's?", file=sys.stderr)
        return 1
    print(text if args.prometheus else summary(text), end="" if args.prometheus else "\n")
    return 0
