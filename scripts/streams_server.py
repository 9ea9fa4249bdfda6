#!/usr/bin/env python3
"""A simplestreams image server on loopback, over HTTPS with a test CA, for tests and benchmarks.

It writes a real index (`streams/v1/index.json` and a products file) for
image files it is given, and serves the folder with Range support, as a
static web server would. It also answers `GET /url/<name>` the way LXD's
"url" image source expects (`LXD-Image-Hash` and `LXD-Image-URL` headers).
The CA is made here with openssl; LXD and Incus (Go) trust it through
SSL_CERT_FILE, Python's ssl through the same variable.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoopbackCA:
    folder: Path

    @property
    def cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def bundle(self) -> Path:
        """The system's CAs and this one: what SSL_CERT_FILE points to."""
        return self.folder / "bundle.crt"

    @classmethod
    def make(cls, folder: Path) -> LoopbackCA:
        folder.mkdir(parents=True, exist_ok=True)
        ca = cls(folder)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(folder / "ca.key"), "-out", str(ca.cert), "-days", "2",
                 "-subj", "/CN=lxdimagefs test CA")
        system = ssl.get_default_verify_paths().openssl_cafile
        with open(ca.bundle, "wb") as out:
            if system and os.path.exists(system):
                out.write(Path(system).read_bytes())
            out.write(ca.cert.read_bytes())
        return ca

    def issue(self, name: str, ip: str = "127.0.0.1") -> tuple[Path, Path]:
        """A server certificate for `ip`, signed by this CA."""
        key, csr, crt = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        ext = self.folder / f"{name}.ext"
        ext.write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert),
                 "-CAkey", str(self.folder / "ca.key"), "-CAcreateserial", "-out", str(crt),
                 "-days", "2", "-extfile", str(ext))
        return crt, key


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class Entry:
    """One image on the server: a unified tarball, or a metadata tarball and a rootfs."""

    product: str  # os:release:arch:variant
    arch: str  # as the index names it: amd64, arm64
    serial: str  # YYYYMMDD_HH:MM
    aliases: str
    files: tuple[Path, ...]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


ROOT_FTYPES = {".squashfs": "squashfs", ".qcow2": "disk-kvm.img", ".img": "disk-kvm.img"}


def write_index(root: Path, entries: list[Entry], fake_products: int = 0) -> dict[str, str]:
    """Write streams/v1/ for the entries (files copied under images/); returns alias -> fingerprint
    of the newest image per product. `fake_products` adds products whose files do not exist."""
    products: dict[str, dict] = {}
    fingerprints: dict[str, str] = {}
    for e in entries:
        os_, release, arch, variant = e.product.split(":")
        folder = root / "images" / os_ / release / arch / variant / e.serial.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        items = {}
        for f in e.files:
            shutil.copyfile(f, folder / f.name)
            digest = _sha(f)
            rel = str((folder / f.name).relative_to(root))
            if len(e.files) == 1:
                items["lxd_combined.tar.gz"] = {"ftype": "lxd_combined.tar.gz", "path": rel,
                                                "sha256": digest, "size": f.stat().st_size}
            elif f is e.files[0]:
                items["lxd.tar.xz"] = {"ftype": "lxd.tar.xz", "path": rel, "sha256": digest,
                                       "size": f.stat().st_size}
            else:
                ftype = ROOT_FTYPES[f.suffix]
                items[ftype] = {"ftype": ftype, "path": rel, "sha256": digest, "size": f.stat().st_size}
        if len(e.files) == 2:
            combined = hashlib.sha256(e.files[0].read_bytes() + e.files[1].read_bytes()).hexdigest()
            field_name = {"squashfs": "combined_squashfs_sha256",
                          "disk-kvm.img": "combined_disk-kvm-img_sha256"}[ROOT_FTYPES[e.files[1].suffix]]
            items["lxd.tar.xz"][field_name] = combined
            fp = combined
        else:
            fp = items["lxd_combined.tar.gz"]["sha256"]
        product = products.setdefault(e.product, {
            "aliases": e.aliases, "arch": arch, "os": os_, "release": release, "release_title": release,
            "variant": variant, "versions": {}})
        product["versions"][e.serial] = {"items": items}
        fingerprints[f"{e.product}@{e.serial}"] = fp
    for i in range(fake_products):
        digest = hashlib.sha256(f"fake{i}".encode()).hexdigest()
        products[f"fake:{i}:amd64:default"] = {
            "aliases": f"fake/{i}", "arch": "amd64", "os": "fake", "release": str(i), "release_title": str(i),
            "variant": "default", "versions": {"20260101_00:00": {"items": {"lxd_combined.tar.gz": {
                "ftype": "lxd_combined.tar.gz", "path": f"images/fake/{i}.tar.gz", "sha256": digest,
                "size": 1000 + i}}}}}
    streams = root / "streams" / "v1"
    streams.mkdir(parents=True, exist_ok=True)
    (streams / "images.json").write_text(json.dumps({
        "content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
        "products": products}))
    (streams / "index.json").write_text(json.dumps({"format": "index:1.0", "index": {"images": {
        "datatype": "image-downloads", "path": "streams/v1/images.json", "format": "products:1.0",
        "products": sorted(products)}}}))
    return fingerprints


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with single Range requests (206), as a web server answers them."""

    server: _Server

    def log_message(self, fmt: str, *args: object) -> None:
        headers = getattr(self, "headers", None) or {}
        self.server.requests.append(f"{self.requestline} range={headers.get('Range', '')} "
                                    f"agent={headers.get('User-Agent', '')}")

    def _url_source(self) -> bool:
        """LXD's "url" source (it asks with HEAD): the headers name the image and where its file is."""
        m = re.match(r"^/url/(.+)$", self.path)
        if not m:
            return False
        fp, _, file = self.server.urls.get(m.group(1), ("", "", ""))
        if not fp:
            self.send_error(404)
            return True
        self.send_response(200)
        self.send_header("LXD-Image-Hash", fp)
        self.send_header("LXD-Image-URL", f"{self.server.base}/{file}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self) -> None:
        if not self._url_source():
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._url_source():
            return
        path = Path(self.translate_path(self.path))
        rng = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if not path.is_file() or not rng:
            super().do_GET()
            return
        size = path.stat().st_size
        start, end = int(rng.group(1)), int(rng.group(2) or size - 1)
        end = min(end, size - 1)
        if start >= size:
            self.send_error(416)
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            with contextlib.suppress(OSError):  # the client went away midway (ssl.SSLError is one)
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    base: str
    requests: list[str]
    urls: dict[str, tuple[str, str, str]]


@dataclass
class StreamsServer:
    root: Path
    ca: LoopbackCA
    port: int = 0
    requests: list[str] = field(default_factory=list)
    urls: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # name -> (fp, _, file path)
    _server: _Server | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> StreamsServer:
        crt, key = self.ca.issue("streams")
        root = str(self.root)

        class Handler(_Handler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=root, **kw)

        server = _Server(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        server.base, server.requests, server.urls = self.url, self.requests, self.urls
        threading.Thread(target=server.serve_forever, daemon=True, name="streams-server").start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
