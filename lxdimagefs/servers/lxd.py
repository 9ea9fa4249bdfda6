"""The one client for LXD: its image and alias endpoints, as typed records.

Everything else gets these records and `LXDError`s carrying LXD's own
message; no other module builds a URL (rest.py, its base, sends them).
What the server says of itself (info, projects, pools, events, trust) is
its base class, `LXDServer` (lxdserver.py).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import requests

from lxdimagefs.errors import LXDError
from lxdimagefs.keys import BadKey, Fingerprint
from lxdimagefs.names import is_fingerprint
from lxdimagefs.servers.lxdserver import LXDServer, quote
from lxdimagefs.servers.records import ExportLayout, ExportPart, Image, images_from, part_name
from lxdimagefs.wire.chunked import ChunkedPost
from lxdimagefs.wire.multipart import first_part_and_next_name
from lxdimagefs.wire.rest import json_body
from lxdimagefs.wire.transport import Backoff, ExportStream

log = logging.getLogger(__name__)
LISTING_DEADLINE = 10  # the whole listing may take ten timeouts; a silent server is given up on after one
request_log = logging.getLogger("lxdimagefs.client")  # request lines under one name, as rest.py


class LXDClient(LXDServer):
    """Typed access to the image endpoints of one LXD server and project."""

    # -- images -----------------------------------------------------------

    def upload_headers(self, name: str, public: bool = False,
                       properties: dict[str, str] | None = None) -> dict[str, str | bytes]:
        """The headers of an image upload, as the server's own client sends them."""
        prefix = "X-Incus-" if self.product == "incus" else "X-LXD-"
        # The name's UTF-8 bytes, as lxc sends it (Python would encode a str as Latin-1, or fail).
        headers: dict[str, str | bytes] = {"Content-Type": "application/octet-stream",
                                           prefix + "filename": name.encode("utf-8", "surrogateescape"),
                                           prefix + "public": "1" if public else "0"}
        if properties:
            headers[prefix + "properties"] = urllib.parse.urlencode(properties)
        return headers

    def images(self) -> list[Image]:
        """Every image of the project, in one request.

        LXD spends about 1.6 ms of CPU per image on this answer: a server of tens of thousands
        takes longer than `-o timeout`, so this one call has LISTING_DEADLINE timeouts of its own.
        """
        records = self._sync("GET", "/images", params={"recursion": "1"},
                             answer_within=LISTING_DEADLINE * self.conn.timeout[1]) or ()
        return images_from(records, self.conn.describe())

    def count_images(self) -> int:
        """How many images the project has: the cheap answer (10 ms for 2,000) that proves it is there."""
        return len(self._sync("GET", "/images") or ())

    def image(self, fingerprint: str) -> Image:
        return Image.from_record(self._sync("GET", _image(fingerprint)))

    def image_by_prefix(self, prefix: str) -> Image | None:
        """The one image whose fingerprint starts with `prefix` (LXD matches a unique prefix itself,
        as `lxc image info` does); None if none or several do."""
        if not is_fingerprint(prefix, 12):
            return None
        try:
            image = Image.from_record(self._sync("GET", f"/images/{prefix}"))
        except LXDError as e:
            if 400 <= e.status < 500:
                return None
            raise
        return image if image.fingerprint.startswith(prefix) else None

    def image_exists(self, fingerprint: str) -> bool:
        try:
            path = _image(fingerprint)
        except BadKey:
            return False
        return self._exists(path)

    def alias_exists(self, name: str) -> bool:
        return self._exists(f"/images/aliases/{quote(name)}")

    def alias(self, name: str) -> str | None:
        """The fingerprint an alias points to; None if there is no such alias."""
        try:
            record = self._sync("GET", f"/images/aliases/{quote(name)}") or {}
        except LXDError as e:
            if e.status == 404:
                return None
            raise
        return str(record.get("target") or "") or None

    def _exists(self, path: str) -> bool:
        try:
            self._sync("GET", path)
        except LXDError as e:
            if e.status == 404:
                return False
            raise
        return True

    def layout(self, fingerprint: str) -> ExportLayout:
        """Learn an export's file names and sizes without downloading it.

        A unified export answers a one-byte Range request with its name and total size. A split
        export ignores Range and streams multipart: its metadata part is read to learn its size,
        then the stream is dropped.
        """
        with self._request("GET", _image(fingerprint, "/export"), stream=True,
                           headers={"Range": "bytes=0-0"}) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("multipart/"):
                name = part_name(_filename(resp.headers.get("Content-Disposition")) or "", fingerprint)
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else int(resp.headers.get("Content-Length", 0))
                return ExportLayout(False, (ExportPart(name, size),))
            meta_name, meta_size, rootfs_name = first_part_and_next_name(ctype, self.iter_chunks(resp))
        rest = self.image(fingerprint).size - meta_size
        return ExportLayout(True, (ExportPart(part_name(meta_name, f"meta-{fingerprint}"), meta_size),
                                   ExportPart(part_name(rootfs_name, fingerprint), rest)))

    def open_export(self, fingerprint: str, start: int, end: int | None = None,
                    backoff: Backoff | None = None) -> ExportStream:
        """Bytes [start, end) of a unified export (to its end if `end` is None), as a raw stream.

        The data path bypasses requests: the body is read with `readinto`
        straight into the caller's buffers. Retried like a GET.
        """
        return self._raw.open_range(self._target(_image(fingerprint, "/export")), start, end,
                                    backoff or Backoff(self.patience), _image(fingerprint, "/export"))

    def export_stream(self, fingerprint: str) -> requests.Response:
        """The whole export as one streaming response (multipart for split images)."""
        return self._request("GET", _image(fingerprint, "/export"), stream=True)

    # -- changes ------------------------------------------------------------

    def image_with_etag(self, fingerprint: str) -> tuple[Image, str]:
        resp = self._request("GET", _image(fingerprint))
        return Image.from_record(resp.json()["metadata"]), resp.headers.get("ETag", "")

    def update_image(self, fingerprint: str, fields: dict[str, Any], etag: str) -> None:
        """Save editable fields; LXD refuses with 412 if the record changed since `etag`."""
        self._sync("PUT", _image(fingerprint), json=fields,
                   headers={"If-Match": etag} if etag else None)

    def delete_image(self, fingerprint: str) -> None:
        self.wait(self._sync_or_async("DELETE", _image(fingerprint)))

    def create_image(self, body: Any, headers: Mapping[str, str | bytes]) -> str:
        """Upload an image (bytes, a file or an iterator of chunks); returns its fingerprint
        once LXD's operation has finished."""
        # urllib3 holds a request body to the connect timeout: give it the read timeout, as a
        # busy LXD may stop reading for a while (the writer's own pauses cost no socket time).
        read = self.conn.timeout[1]
        op = self._sync_or_async("POST", "/images", data=body, headers=headers, timeout=(read, read),
                                 retry="none")  # the body is a stream: it cannot be sent twice
        result = self.wait(op)
        return (result or {}).get("fingerprint", "")

    def start_upload(self, headers: Mapping[str, str | bytes]) -> ChunkedPost:
        """Begin `POST /images` with a body sent as it is written (an import of unknown size).

        On a raw connection of its own, given the read timeout to connect too (a busy LXD may be
        slow to accept); never retried, as the body cannot be sent twice.
        """
        read = self.conn.timeout[1]
        request_log.debug("POST /images (streamed)")
        return ChunkedPost(self._raw.fresh((read, read)), self._target("/images"),
                           {"User-Agent": "lxdimagefs", **headers})

    def finish_upload(self, post: ChunkedPost) -> str:
        """End the body and wait for LXD's operation; the new image's fingerprint."""
        result = self.wait(post.finish().get("operation") or None)
        return (result or {}).get("fingerprint", "")

    def create_from_source(self, source: dict[str, Any], aliases: list[str], public: bool = False) -> str:
        """Have the server fetch an image itself (pylxd's create_from_*, Image.copy); its fingerprint."""
        body = {"source": source, "public": public, "aliases": [{"name": a} for a in aliases]}
        result = self.wait(self._sync_or_async("POST", "/images", json=body))
        return (result or {}).get("fingerprint", "")

    def refresh_image(self, fingerprint: str) -> bool:
        """`lxc image refresh`: whether a newer image replaced this one."""
        result = self.wait(self._sync_or_async("POST", _image(fingerprint, "/refresh")))
        return bool((result or {}).get("refreshed"))

    def image_secret(self, fingerprint: str) -> str:
        """A one-time secret another server uses to pull this private image."""
        body = json_body(self._request("POST", _image(fingerprint, "/secret"), json={}), "secret")
        return ((body.get("metadata") or {}).get("metadata") or {}).get("secret", "")

    def add_alias(self, name: str, target: str, description: str = "") -> None:
        self._sync("POST", "/images/aliases", json={"name": name, "target": target,
                                                     "description": description})

    def delete_alias(self, name: str) -> None:
        self._sync("DELETE", f"/images/aliases/{quote(name)}")

    def rename_alias(self, old: str, new: str) -> None:
        self._sync("POST", f"/images/aliases/{quote(old)}", json={"name": new})

    def retarget_alias(self, name: str, target: str, description: str = "") -> None:
        self._sync("PUT", f"/images/aliases/{quote(name)}", json={"target": target,
                                                                   "description": description})


def _image(fingerprint: str, tail: str = "") -> str:
    """An image's URL path: only a valid fingerprint is ever placed in one (BadKey otherwise)."""
    return f"/images/{Fingerprint(fingerprint)}{tail}"


def _filename(disposition: str | None) -> str | None:
    if not disposition:
        return None
    m = re.search(r'filename="?([^";]+)"?', disposition)
    return m.group(1) if m else None
