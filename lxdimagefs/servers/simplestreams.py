"""A simplestreams image server (`images:`, `ubuntu:`), read straight from its static index.

No LXD is involved: `streams/v1/index.json` names the products file, whose
products, versions and items become image records the way LXD's own
simplestreams client makes them (fingerprints are the combined hashes the
index carries; aliases per architecture as `lxc image list` shows them).
Each file is then read lazily with Range requests, and the reader checks it
against the sha256 the index gives, so a file's sha256 is its key in the
block cache.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.keys import BadKey, FileDigest, Fingerprint
from lxdimagefs.servers.records import ExportLayout, ExportPart, Image, warn_once
from lxdimagefs.wire.bounded import JSON_CAP, WATCHDOG, Overdue, read_capped
from lxdimagefs.wire.tls import ContextAdapter, tls_error, tls_refusal
from lxdimagefs.wire.transport import (
    Backoff,
    Connection,
    ExportStream,
    RawConnections,
)

log = logging.getLogger(__name__)

INDEX = "streams/v1/index.json"
ROOT_TYPES = {  # rootfs item type -> (the metadata item's combined-hash field, export extension)
    "squashfs": ("combined_squashfs_sha256", "squashfs"),
    "root.tar.xz": ("combined_rootxz_sha256", "tar.xz"),
    "disk-kvm.img": ("combined_disk-kvm-img_sha256", "qcow2"),
    "disk1.img": ("combined_disk1-img_sha256", "qcow2"),
    "uefi1.img": ("combined_uefi1-img_sha256", "qcow2"),
}
VM_TYPES = {"disk-kvm.img", "disk1.img", "uefi1.img"}
ZERO_TIME = "1970-01-01T00:00:00Z"  # LXD gives this expiry to images without an EOL
NEVER = "0001-01-01T00:00:00Z"  # Go's zero time: never used

# Debian/Ubuntu architecture names as the index uses them -> LXD's (uname) names.
ARCHES = {"amd64": "x86_64", "i386": "i686", "arm64": "aarch64", "armhf": "armv7l", "ppc64el": "ppc64le",
          "s390x": "s390x", "riscv64": "riscv64"}


def native_arch() -> str:
    return platform.machine()


@dataclass(frozen=True)
class Listing:
    images: list[Image]
    layouts: dict[Fingerprint, ExportLayout]
    paths: dict[FileDigest, str]  # a file's claimed sha256 -> its path on the server


class StreamsClient:
    """Reads one simplestreams server; the reader's data path uses it as it uses LXDClient."""

    def __init__(self, conn: Connection) -> None:
        assert conn.url
        self.conn = conn
        self.base = conn.url.rstrip("/")
        self.patience = conn.timeout[1]
        self._raw = RawConnections(conn, 8)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "lxdimagefs"
        self._session.mount("https://", ContextAdapter(self._raw.context))
        self._paths: dict[FileDigest, str] = {}
        self._layouts: dict[Fingerprint, ExportLayout] = {}
        self._lock = threading.Lock()

    def _get(self, path: str) -> Any:
        backoff = Backoff(self.patience)
        while True:
            log.debug("GET %s/%s", self.base, path)
            url = f"{self.base}/{path}"
            with WATCHDOG.call(max(backoff.left(), self.conn.timeout[1])) as call:  # a trickle: cut
                try:
                    resp = self._session.get(url, timeout=backoff.clamp(self.conn.timeout), stream=True)
                    body = read_capped(resp, JSON_CAP, url) if resp.status_code == 200 else b""
                except requests.RequestException as e:
                    if (refused := tls_refusal(e)) is not None:
                        raise tls_error(self.base, refused) from e
                    if call.expired:
                        raise Overdue(f"{url} did not finish answering in time (-o timeout)") from e
                    backoff.pause(LXDUnreachable(f"{self.base} did not answer: {e}"), f"GET {path}")
                    continue
            resp.close()
            if resp.status_code in (502, 503, 504):
                backoff.pause(LXDError(f"{self.base}/{path}: {resp.status_code}", resp.status_code), path)
                continue
            if resp.status_code != 200:
                raise LXDError(f"{self.base}/{path}: {resp.status_code} {resp.reason}", resp.status_code)
            try:
                return json.loads(body)
            except ValueError as e:
                raise LXDError(f"{self.base}/{path} is not JSON", 500) from e

    def reachable(self) -> bool:
        try:
            self._session.head(f"{self.base}/{INDEX}", timeout=self.conn.timeout[0])
        except requests.RequestException:
            return False
        return True

    def listing(self) -> Listing:
        index = self._get(INDEX)
        products: dict[str, Any] = {}
        for entry in (index.get("index") or {}).values():
            if entry.get("datatype") == "image-downloads" and entry.get("path"):
                products.update(self._get(entry["path"]).get("products") or {})
        listing = parse_products(products, self.base)
        with self._lock:  # kept, not replaced: a file open while its version left the index reads on
            self._paths.update(listing.paths)
            self._layouts = listing.layouts
        return listing

    def images(self) -> list[Image]:
        return self.listing().images

    def layout(self, fingerprint: str) -> ExportLayout:
        """From the index last read: a simplestreams server is never asked for a layout."""
        key = Fingerprint.parse(fingerprint)
        with self._lock:
            layout = self._layouts.get(key) if key else None
        if layout is None:
            raise OSError(2, "no such image", fingerprint)
        return layout

    def image_exists(self, fingerprint: str) -> bool:
        return False  # the index is the whole truth: nothing exists that the listing lacks

    def alias_exists(self, name: str) -> bool:
        return False

    def server_info(self) -> dict[str, Any]:
        return {"auth": "trusted", "environment": {"server": "simplestreams"}, "config": {}}

    def open_export(self, key: str, start: int, end: int | None = None,
                    backoff: Backoff | None = None) -> ExportStream:
        """Bytes [start, end) of the file whose sha256 is `key`, as a raw stream."""
        with self._lock:
            digest = FileDigest.parse(key)
            path = self._paths.get(digest) if digest else None
        if path is None:
            raise LXDError(f"no file with sha256 {key} in {self.base}'s index", 404)
        quoted = urllib.parse.quote(path, safe="/-._~")  # a `?` or `#` in a path is the path's own
        return self._raw.open_range(f"{_path_of(self.base)}/{quoted}", start, end,
                                    backoff or Backoff(self.patience), path)

    def export_stream(self, fingerprint: str) -> requests.Response:
        raise LXDError("a simplestreams server has no whole export: its files are read one by one", 501)


def _path_of(url: str) -> str:
    after_host = url.split("://", 1)[-1]
    return "/" + after_host.split("/", 1)[1].strip("/") if "/" in after_host else ""


@functools.lru_cache(maxsize=1024)  # a server's versions share a few dates
def _time(serial: str) -> str:
    """A version's date (its name starts YYYYMMDD, as LXD reads it) in RFC 3339; "" if it does not."""
    try:
        day = datetime(int(serial[:4]), int(serial[4:6]), int(serial[6:8]), tzinfo=UTC)
    except ValueError:
        return ""
    return day.strftime("%Y-%m-%dT%H:%M:%SZ") if serial[:8].isdigit() else ""


Found = tuple[str, dict[str, Any], dict[str, Any], ExportLayout]  # (created, product, record, layout)


def parse_products(products: dict[str, Any], where: str = "the index") -> Listing:
    """Image records, export layouts and file paths from a products file's `products`.

    An item whose hashes are not sha256s, or that lacks a field, is skipped with a warning, and
    so is a product the index describes badly: the rest of the listing stands.
    """
    found: list[Found] = []
    paths: dict[FileDigest, str] = {}
    for name, product in products.items():
        try:
            _add_product(product, found, paths, where)
        except (KeyError, ValueError, TypeError, AttributeError) as e:  # not an object where one belongs
            warn_once(f"skipped product {name} of {where}, which the index describes badly: {e!r}")
    return _with_aliases(found, paths)


def _add_product(product: dict[str, Any], found: list[Found], paths: dict[FileDigest, str],
                 where: str) -> None:
    """One product's images into `found`, their files into `paths`; a malformed item is skipped."""
    arch = ARCHES.get(product.get("arch", ""), product.get("arch", ""))
    for serial, version in (product.get("versions") or {}).items():
        created = _time(serial)
        if not created:
            continue
        items = version.get("items") or {}
        for meta in items.values():
            pairs: list[tuple[dict[str, Any], dict[str, Any] | None]]
            if meta.get("ftype") == "lxd_combined.tar.gz":
                pairs = [(meta, None)]
            elif meta.get("ftype") == "lxd.tar.xz":
                pairs = [(meta, root) for root in items.values()  # a root that is no object is no part
                         if isinstance(root, dict) and root.get("ftype") in ROOT_TYPES]
            else:
                continue
            for m, root in pairs:
                try:
                    made = _image(product, arch, serial, created, version, m, root)
                except (BadKey, KeyError, TypeError, ValueError, AttributeError) as e:  # one bad item
                    warn_once(f"skipped an item of {where} (version {serial}): {e}")
                    continue
                found.append((created, product, *made))
                for part in made[1].parts:
                    if part.key is not None:  # every part of an index's image has its sha256
                        paths[part.key] = part.path


def _image(product: dict[str, Any], arch: str, serial: str, created: str, version: dict[str, Any],
           meta: dict[str, Any], root: dict[str, Any] | None) -> tuple[dict[str, Any], ExportLayout]:
    """One image of a version; BadKey, KeyError or ValueError where an item is malformed."""
    fp = Fingerprint(meta["sha256"] if root is None else meta[ROOT_TYPES[root["ftype"]][0]])
    meta_ext = meta["ftype"].split(".", 1)[1]  # lxd.tar.xz, lxd_combined.tar.gz: what the bytes are
    first = _part(f"{fp}.{meta_ext}" if root is None else f"meta-{fp}.{meta_ext}", meta)
    if root is None:
        layout = ExportLayout(False, (first,))
    else:
        layout = ExportLayout(True, (first, _part(f"{fp}.{ROOT_TYPES[root['ftype']][1]}", root)))
    description = f"{product.get('os', '')} {product.get('release_title', '')} {product.get('arch', '')}"
    if version.get("label"):
        description += f" ({version['label']})"
    props = {"os": product.get("os", ""), "release": product.get("release", ""),
             "version": product.get("version", ""), "architecture": product.get("arch", ""),
             "label": version.get("label", ""), "serial": serial, "description": f"{description} ({serial})",
             "variant": product.get("variant", ""), "type": root["ftype"] if root else "tar.gz"}
    props.update({f"requirements.{k}": str(v) for k, v in (product.get("lxd_requirements") or {}).items()})
    eol = product.get("support_eol", "")
    record = {
        "aliases": [], "architecture": arch, "auto_update": False, "cached": False,
        "created_at": created, "expires_at": f"{eol}T00:00:00Z" if eol else ZERO_TIME,
        "filename": meta["path"].rsplit("/", 1)[-1], "fingerprint": fp, "last_used_at": NEVER,
        "properties": {k: v for k, v in props.items() if v}, "public": True,
        "size": sum(p.size for p in layout.parts),
        "type": "virtual-machine" if root is not None and root["ftype"] in VM_TYPES else "container",
        "uploaded_at": created,
    }
    return record, layout


def _part(name: str, item: dict[str, Any]) -> ExportPart:
    """An item as an export file: its sha256 a claim the reader checks, its path the server's."""
    path = item["path"]
    if not isinstance(path, str) or not path:
        raise ValueError(f"no path for {name}")
    return ExportPart(name, int(item["size"]), FileDigest(item["sha256"]), path)


def _with_aliases(found: list[tuple[str, dict[str, Any], dict[str, Any], ExportLayout]],
                  paths: dict[FileDigest, str]) -> Listing:
    """Aliases as LXD's client gives them: newest image first; the plain name for this machine's
    architecture, `NAME/ARCH` for every one; containers before VMs take a shared name."""
    found.sort(key=lambda f: f[0], reverse=True)
    found.sort(key=lambda f: f[2]["type"] != "container")
    taken: set[str] = set()
    images, layouts = [], {}
    native = native_arch()
    for _, product, record, layout in found:
        names = []
        for alias in filter(None, (product.get("aliases") or "").split(",")):
            wanted = [alias] if record["architecture"] == native else []
            wanted.append(f"{alias}/{product.get('arch', '')}")
            names += [n for n in wanted if n not in taken]
            taken.update(wanted)
        record["aliases"] = [{"name": n, "description": ""} for n in names]
        images.append(Image.from_record(record))
        layouts[record["fingerprint"]] = layout
    return Listing(images, layouts, paths)
