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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from lxdimagefs.errors import LXDError, LXDUnreachable
from lxdimagefs.names import is_fingerprint
from lxdimagefs.servers.bounded import JSON_CAP, WATCHDOG, Overdue, read_capped
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.lxd import ExportLayout, ExportPart, Image
from lxdimagefs.servers.transport import (
    Backoff,
    Connection,
    ContextAdapter,
    ExportStream,
    RawConnections,
    tls_error,
    tls_refusal,
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
    layouts: dict[str, ExportLayout]
    paths: dict[str, str]  # a file's sha256 -> its path on the server


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
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()
        self.product = "simplestreams"

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
        listing = parse_products(products)
        with self._lock:  # kept, not replaced: a file open while its version left the index reads on
            self._paths.update(listing.paths)
        return listing

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
            path = self._paths.get(key)
        if path is None:
            raise LXDError(f"no file with sha256 {key} in {self.base}'s index", 404)
        return self._raw.open_range(f"{_path_of(self.base)}/{path}", start, end,
                                    backoff or Backoff(self.patience), path)


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


def parse_products(products: dict[str, Any]) -> Listing:
    """Image records, export layouts and file paths from a products file's `products`."""
    found: list[Found] = []
    paths: dict[str, str] = {}
    for name, product in products.items():
        try:
            _add_product(product, found, paths)
        except (KeyError, ValueError, TypeError, AttributeError) as e:  # not an object where one belongs
            log.warning("simplestreams: skipped product %s, which the index describes badly: %r", name, e)
    return _with_aliases(found, paths)


def _add_product(product: dict[str, Any], found: list[Found], paths: dict[str, str]) -> None:
    """One product's images into `found`, their files into `paths`; a malformed item is skipped."""
    arch = ARCHES.get(product.get("arch", ""), product.get("arch", ""))
    for serial, version in (product.get("versions") or {}).items():
        created = _time(serial)
        if not created:
            continue
        items = version.get("items") or {}
        for meta in items.values():
            if meta.get("ftype") == "lxd_combined.tar.gz":
                pairs = [(meta, None)]
            elif meta.get("ftype") == "lxd.tar.xz":
                pairs = [(meta, root) for root in items.values() if root.get("ftype") in ROOT_TYPES]
            else:
                continue
            for m, root in pairs:
                try:
                    made = _image(product, arch, serial, created, version, m, root)
                    files = {i["sha256"]: str(i["path"]) for i in (m, root) if i is not None}
                except (KeyError, ValueError, TypeError, AttributeError) as e:  # one bad item, not all
                    log.warning("simplestreams: skipped %s %s, an item the index describes badly: %r",
                                product.get("aliases", "?"), serial, e)
                    continue
                if made is not None:
                    found.append((created, product, *made))
                    paths.update(files)


def _image(product: dict[str, Any], arch: str, serial: str, created: str, version: dict[str, Any],
           meta: dict[str, Any], root: dict[str, Any] | None) -> tuple[dict[str, Any], ExportLayout] | None:
    fp = meta.get("sha256", "") if root is None else meta.get(ROOT_TYPES[root["ftype"]][0], "")
    if not is_fingerprint(fp, 64) or not meta.get("sha256") or (root is not None and not root.get("sha256")):
        return None
    meta_ext = meta["ftype"].split(".", 1)[1]  # lxd.tar.xz, lxd_combined.tar.gz: what the bytes are
    if root is None:
        layout = ExportLayout(False, (ExportPart(f"{fp}.{meta_ext}", int(meta["size"]), meta["sha256"]),))
    else:
        layout = ExportLayout(True, (
            ExportPart(f"meta-{fp}.{meta_ext}", int(meta["size"]), meta["sha256"]),
            ExportPart(f"{fp}.{ROOT_TYPES[root['ftype']][1]}", int(root["size"]), root["sha256"])))
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


def _with_aliases(found: list[tuple[str, dict[str, Any], dict[str, Any], ExportLayout]],
                  paths: dict[str, str]) -> Listing:
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


class StreamsCatalog(Catalog):
    """The catalog of a simplestreams server: its listing and layouts come from the index."""

    def __init__(self, client: StreamsClient, ttl: float) -> None:
        super().__init__(client, ttl=ttl)  # type: ignore[arg-type]
        self.streams = client
        self._known: dict[str, ExportLayout] = {}

    def _fetch(self) -> list[Image]:
        listing = self.streams.listing()
        self._known = listing.layouts
        return listing.images

    def layout(self, fingerprint: str) -> ExportLayout:
        layout = self._known.get(fingerprint)
        if layout is None:
            raise OSError(2, "no such image", fingerprint)
        return layout
