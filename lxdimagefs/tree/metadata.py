"""metadata.json: the image record as a file, and saving edits of it without losing others'.

A save is compared with the record the saving process last read through
the mount (editors read and write from one process), then sent with LXD's
ETag, so a change made elsewhere in between is refused, not overwritten.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache

from lxdimagefs.errors import LXDError
from lxdimagefs.fs.node import Context
from lxdimagefs.names import METADATA
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.records import Image

log = logging.getLogger(__name__)

EDITABLE = ("auto_update", "expires_at", "profiles", "properties", "public")


def render(image: Image) -> bytes:
    """The image record: pretty-printed, stable key order, trailing newline."""
    return (json.dumps(image.record, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


class Records:
    def __init__(self, catalog: Catalog, ctx: Context) -> None:
        self.catalog = catalog
        self.ctx = ctx
        self._read: LRUCache[tuple[str, int], dict] = LRUCache(maxsize=4096)  # (fp, pid) -> record
        self._lock = threading.Lock()

    def read(self, image: Image, pid: int) -> bytes:
        """The record as listed; remembered as this process's base for a later save."""
        if not self.ctx.readonly:
            with self._lock:
                self._read[(image.fingerprint, pid)] = image.record
        return render(image)

    def opened_for_writing(self, image: Image, pid: int) -> None:
        """A process that writes without having read: its base is the record at this open."""
        with self._lock:
            self._read.setdefault((image.fingerprint, pid), image.record)

    def save(self, fp: str, data: bytes, pid: int) -> None:
        """Save the editable fields, unless LXD's changed since this process read them."""
        where = f"{fp}/{METADATA}"
        try:
            new = json.loads(data)
        except ValueError as e:
            raise self.ctx.refuse(errno.EINVAL, "write", where, f"not valid JSON: {e}") from None
        if not isinstance(new, dict):
            raise self.ctx.refuse(errno.EINVAL, "write", where, "not a JSON object")
        current, etag = self.catalog.server.image_with_etag(fp)
        record = current.record
        with self._lock:
            base = self._read.get((fp, pid), record)
        for key, value in new.items():
            if key not in EDITABLE and value not in (record.get(key, ...), base.get(key, ...)):
                raise self.ctx.refuse(errno.EINVAL, "write", where,
                                      f"{key} is read-only (editable: {', '.join(EDITABLE)})")
        fields = {k: new.get(k, record.get(k)) for k in EDITABLE}
        if fields == {k: record.get(k) for k in EDITABLE}:
            return
        if any(base.get(k) != record.get(k) for k in EDITABLE):
            raise self._stale(where)
        try:
            self.catalog.server.update_image(fp, fields, etag)
        except LXDError as e:
            if e.status == 412:
                raise self._stale(where) from None
            raise
        with self._lock:  # saved: this process's next save starts from what it saved
            self._read.pop((fp, pid), None)
        log.info("saved %s of image %s", ", ".join(k for k in EDITABLE if k in new), fp)

    def update(self, fp: str, change: Callable[[dict[str, Any]], None], what: str) -> None:
        """Change editable fields of the record as it is now (an xattr set), guarded by its ETag."""
        current, etag = self.catalog.server.image_with_etag(fp)
        before = {k: current.record.get(k) for k in EDITABLE}
        fields = copy.deepcopy(before)
        change(fields)
        if fields == before:
            return
        try:
            self.catalog.server.update_image(fp, fields, etag)
        except LXDError as e:
            if e.status == 412:
                raise self._stale(f"{fp} ({what})") from None
            raise
        log.info("saved %s of image %s", what, fp)

    def _stale(self, where: str) -> OSError:
        return self.ctx.refuse(errno.ESTALE, "write", where,
                               "the record changed since it was read: read it again")
