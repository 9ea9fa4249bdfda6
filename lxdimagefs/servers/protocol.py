"""What the catalog and the data path need of a server: one protocol, three implementations.

`LXDClient` (LXD and Incus over their REST API), `StreamsClient` (a simplestreams server's
static index) and the tests' in-memory stand-in all satisfy it; mypy checks that they do
wherever one is passed for an `ImageSource`. What only LXD can do (uploads, edits, aliases,
pulls) stays on `LXDClient`, and the tree asks for that type where it needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import requests

from lxdimagefs.servers.records import ExportLayout, Image
from lxdimagefs.wire.chunked import ChunkedPost
from lxdimagefs.wire.transport import Backoff, Connection, ExportStream


class ImageSource(Protocol):
    conn: Connection
    patience: float  # seconds an outage is ridden out before a call fails

    def reachable(self) -> bool: ...

    def server_info(self) -> dict[str, Any]: ...

    def images(self) -> list[Image]:
        """Every image, in one answer."""
        ...

    def image_exists(self, fingerprint: str) -> bool:
        """Asked on a listing's miss: made a moment ago elsewhere?"""
        ...

    def alias_exists(self, name: str) -> bool: ...

    def layout(self, fingerprint: str) -> ExportLayout:
        """The export's file names and sizes, learned without downloading it."""
        ...

    def open_export(self, key: str, start: int, end: int | None = None,
                    backoff: Backoff | None = None) -> ExportStream:
        """Bytes [start, end) of a unified export or of one keyed part, as a raw stream."""
        ...

    def export_stream(self, fingerprint: str) -> requests.Response:
        """The whole export in one answer (multipart for a split image)."""
        ...


@runtime_checkable
class ImageServer(ImageSource, Protocol):
    """A server that takes changes: LXD and Incus (`LXDClient`), and the tests' stand-in.

    A simplestreams index is an `ImageSource` only; `Catalog.server` refuses its changes.
    """

    def image(self, fingerprint: str) -> Image:
        """One image's record (LXDError 404 if there is none): what an event about it changed."""
        ...

    def image_by_prefix(self, prefix: str) -> Image | None:
        """The one image a fingerprint or a unique prefix of it names, else None."""
        ...

    def alias(self, name: str) -> str | None:
        """The fingerprint an alias points to, None if there is no such alias."""
        ...

    def count_images(self) -> int:
        """How many images there are, in the cheapest answer (the mount's first call)."""
        ...

    def image_with_etag(self, fingerprint: str) -> tuple[Image, str]: ...

    def update_image(self, fingerprint: str, fields: dict[str, Any], etag: str) -> None:
        """Save editable fields; refused (412) if the record changed since `etag`."""
        ...

    def delete_image(self, fingerprint: str) -> None: ...

    def refresh_image(self, fingerprint: str) -> bool:
        """Whether a newer image replaced this one."""
        ...

    def add_alias(self, name: str, target: str, description: str = "") -> None: ...

    def delete_alias(self, name: str) -> None: ...

    def rename_alias(self, old: str, new: str) -> None: ...

    def retarget_alias(self, name: str, target: str, description: str = "") -> None: ...

    def upload_headers(self, name: str, public: bool = False,
                       properties: dict[str, str] | None = None) -> dict[str, str | bytes]: ...

    def create_image(self, body: Any, headers: Mapping[str, str | bytes]) -> str:
        """Upload an image whose body is known (a file, a multipart form); its fingerprint."""
        ...

    def start_upload(self, headers: Mapping[str, str | bytes]) -> ChunkedPost:
        """Begin an upload whose body is sent as it is written."""
        ...

    def finish_upload(self, post: ChunkedPost) -> str:
        """End the body and wait for the server's verdict; the new image's fingerprint."""
        ...

    def create_from_source(self, source: dict[str, Any], aliases: list[str], public: bool = False) -> str:
        """Have the server fetch an image itself; its fingerprint."""
        ...
