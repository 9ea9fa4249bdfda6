"""A small in-memory stand-in for LXDClient, for tests of the tree's logic only.

It answers the calls the tree makes with LXD's shapes and status codes;
the real LXD, through real mounts, stays the judge of behaviour.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import types
from typing import Any

from lxdimagefs.errors import LXDError
from lxdimagefs.servers.lxd import Image, images_from
from lxdimagefs.servers.transport import Connection


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

    def alias_exists(self, name: str) -> bool:
        try:
            self._alias_owner(name)
        except LXDError:
            return False
        return True

    def export_probe(self, fp: str) -> contextlib.nullcontext:
        """A unified export's answer to `Range: bytes=0-0`: its name and size in the headers."""
        rec = self._record(fp)
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"bytes 0-0/{rec['size']}",
                   "Content-Disposition": f"attachment; filename={rec['filename']}"}
        return contextlib.nullcontext(types.SimpleNamespace(headers=headers))

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
