"""A small in-memory stand-in for LXDClient, for tests of the tree's logic only.

It answers the calls the tree makes with LXD's shapes and status codes;
the real LXD, through real mounts, stays the judge of behaviour.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import requests

from lxdimagefs.errors import LXDError
from lxdimagefs.servers.records import ExportLayout, ExportPart, Image, images_from, part_name
from lxdimagefs.wire.chunked import ChunkedPost
from lxdimagefs.wire.transport import Backoff, Connection, ExportStream

if TYPE_CHECKING:
    from lxdimagefs.servers.protocol import ImageServer


class FakeLXD:
    def __init__(self) -> None:
        self.conn = Connection(socket="/nonexistent")
        self.patience = 0.0
        self.records: dict[str, dict[str, Any]] = {}
        self.etags = itertools.count(1)
        self.etag: dict[str, str] = {}
        self.calls: list[str] = []

    def add(self, data: bytes, aliases: tuple[str, ...] = ()) -> str:
        fp = hashlib.sha256(data).hexdigest()
        self.records[fp] = {"fingerprint": fp, "size": len(data), "public": False, "auto_update": False,
                            "properties": {}, "profiles": ["default"], "expires_at": "0001-01-01T00:00:00Z",
                            "uploaded_at": "2026-11-01T00:00:00Z", "filename": f"{fp}.tar",
                            "aliases": [{"name": a, "description": ""} for a in aliases]}
        self.etag[fp] = str(next(self.etags))
        return fp

    def _record(self, fp: str) -> dict[str, Any]:
        if fp not in self.records:
            raise LXDError("Image not found", 404)
        return self.records[fp]

    def _alias_owner(self, name: str) -> str:
        for fp, rec in self.records.items():
            if any(a["name"] == name for a in rec["aliases"]):
                return fp
        raise LXDError("Alias not found", 404)

    # -- what the tree asks --------------------------------------------------------

    def images(self) -> list[Image]:
        return images_from(copy.deepcopy(list(self.records.values())), "the stand-in")

    def image(self, fp: str) -> Image:
        return Image.from_record(copy.deepcopy(self._record(fp)))

    def image_exists(self, fp: str) -> bool:
        return fp in self.records

    def image_by_prefix(self, prefix: str) -> Image | None:
        found = [fp for fp in self.records if fp.startswith(prefix)]
        return self.image(found[0]) if len(found) == 1 else None

    def alias(self, name: str) -> str | None:
        try:
            return self._alias_owner(name)
        except LXDError:
            return None

    def count_images(self) -> int:
        return len(self.records)

    def alias_exists(self, name: str) -> bool:
        try:
            self._alias_owner(name)
        except LXDError:
            return False
        return True

    def layout(self, fp: str) -> ExportLayout:
        """A unified export: the name its record gives (checked as LXD's answer is), and its size."""
        rec = self._record(fp)
        return ExportLayout(False, (ExportPart(part_name(rec["filename"], fp), rec["size"]),))

    def reachable(self) -> bool:
        return True

    def server_info(self) -> dict[str, Any]:
        return {"auth": "trusted", "environment": {"server": "lxd"}, "config": {}}

    # Export bytes, uploads, pulls and refreshes are LXD's work, tested through real mounts only.
    def open_export(self, key: str, start: int, end: int | None = None,
                    backoff: Backoff | None = None) -> ExportStream:
        raise LXDError("the stand-in holds no export bytes", 501)

    def export_stream(self, fingerprint: str) -> requests.Response:
        raise LXDError("the stand-in holds no export bytes", 501)

    def upload_headers(self, name: str, public: bool = False,
                       properties: dict[str, str] | None = None) -> dict[str, str | bytes]:
        return {}

    def create_image(self, body: Any, headers: Mapping[str, str | bytes]) -> str:
        raise LXDError("the stand-in takes no uploads", 501)

    def start_upload(self, headers: Mapping[str, str | bytes]) -> ChunkedPost:
        raise LXDError("the stand-in takes no uploads", 501)

    def finish_upload(self, post: ChunkedPost) -> str:
        raise LXDError("the stand-in takes no uploads", 501)

    def create_from_source(self, source: dict[str, Any], aliases: list[str], public: bool = False) -> str:
        raise LXDError("the stand-in pulls nothing", 501)

    def refresh_image(self, fingerprint: str) -> bool:
        raise LXDError("the stand-in refreshes nothing", 501)

    def image_with_etag(self, fp: str) -> tuple[Image, str]:
        return self.image(fp), self.etag[fp]

    def update_image(self, fp: str, fields: dict[str, Any], etag: str) -> None:
        self.calls.append(f"PUT {fp}")
        if etag and etag != self.etag[fp]:
            raise LXDError("ETag doesn't match", 412)
        self._record(fp).update(fields)
        self.etag[fp] = str(next(self.etags))

    def edit_elsewhere(self, fp: str, **fields: Any) -> None:
        """A change made by someone else (lxc, another mount)."""
        self._record(fp).update(fields)
        self.etag[fp] = str(next(self.etags))

    def delete_image(self, fp: str) -> None:
        self._record(fp)
        del self.records[fp]

    def add_alias(self, name: str, target: str, description: str = "") -> None:
        if self.alias_exists(name):
            raise LXDError("Alias already exists", 409)
        self._record(target)["aliases"].append({"name": name, "description": description})

    def delete_alias(self, name: str) -> None:
        rec = self._record(self._alias_owner(name))
        rec["aliases"] = [a for a in rec["aliases"] if a["name"] != name]

    def rename_alias(self, old: str, new: str) -> None:
        fp = self._alias_owner(old)
        self.delete_alias(old)
        self.add_alias(new, fp)

    def retarget_alias(self, name: str, target: str, description: str = "") -> None:
        self.delete_alias(name)
        self.add_alias(name, target, description)


if TYPE_CHECKING:
    def _is_an_image_server(fake: FakeLXD) -> ImageServer:  # mypy checks the stand-in keeps up
        return fake
