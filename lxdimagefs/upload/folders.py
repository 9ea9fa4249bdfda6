"""Split images and copied image folders, written under import/ as folders of files.

A split image cannot be streamed as it is written: LXD wants the metadata
part first and the user may write either first. Its parts are spooled to
local files, then sent as one multipart upload.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
from pathlib import Path

from requests_toolbelt import MultipartEncoder

from lxdimagefs.errors import ImportFailed, LXDError
from lxdimagefs.keys import Fingerprint
from lxdimagefs.names import METADATA
from lxdimagefs.servers.protocol import ImageServer
from lxdimagefs.upload.ending import ending
from lxdimagefs.upload.streamed import ROOTFS_KINDS, SNIFF_BYTES, already_held, failure, sniff

log = logging.getLogger(__name__)


class FolderImport:
    """A folder under import/: the two parts of a split image, or a copied image folder.

    Parts are spooled to local files; the image is created once two image
    files are written and closed. A folder named by a fingerprint is a copy
    of an image folder (`cp -r MOUNT/by-fingerprint/<fp> import/`): it is
    created once its export file(s) and its metadata.json are closed, with
    the `public` flag and `properties` of that record; a rootfs part
    (squashfs, qcow2) or a `meta-` tarball means two export files, in
    whichever order they arrive. Files whose names start with a dot are
    temporary names (rsync's), not parts, until renamed.
    """

    def __init__(self, client: ImageServer, name: str, spool: Path) -> None:
        self.client = client
        self.name = name
        self.spool = spool
        self.files: dict[str, int] = {}  # name -> size written
        self.open_files: set[str] = set()
        self.fingerprint: str | None = None
        self.lock = threading.Lock()
        self.finishing = False  # one close, of however many at once, finishes the folder

    def path(self, name: str) -> Path:
        return self.spool / name

    def _parts(self) -> list[str]:
        return [n for n in self.files if n != METADATA and not n.startswith(".")]

    def _kind(self, name: str) -> str | None:
        with open(self.path(name), "rb") as f:
            return sniff(f.read(SNIFF_BYTES))

    def ready(self) -> bool:
        closed = [n for n in self.files if n not in self.open_files]
        images = [n for n in self._parts() if n in closed]
        if Fingerprint.parse(self.name) is not None:  # a copied image folder: its record comes with it
            split = any(n.startswith("meta-") for n in self._parts()) or any(
                self._kind(n) in ROOTFS_KINDS for n in images)
            return METADATA in closed and len(images) >= (2 if split else 1)
        return len(images) >= 2

    def rename(self, old: str, new: str) -> None:
        """A part renamed within the folder (rsync's temporary name into place)."""
        with self.lock:
            self.path(old).rename(self.path(new))
            self.files[new] = self.files.pop(old)

    def commit(self) -> str:
        if Fingerprint.parse(self.name) is not None and self.client.image_exists(self.name):
            log.info("import folder %s: LXD holds this image already: nothing to do", self.name)
            return self.name
        parts = self._parts()
        kinds = {}
        for n in parts:
            with open(self.path(n), "rb") as f:
                kinds[n] = sniff(f.read(SNIFF_BYTES))
            if kinds[n] is None:
                raise ImportFailed(errno.EINVAL, f"{self.name}/{n} is not an image file")
            early = _ended_early(self.path(n), str(kinds[n]))
            if early:  # its writer failed part-way and closed: LXD would take a cut tarball
                raise ImportFailed(errno.EINVAL, f"{self.name}/{n}: {early}: not a whole image file, "
                                                 "nothing was created")
        public, properties = False, None
        if METADATA in self.files:
            public, properties = _copied_record(self.name, self.path(METADATA).read_bytes())
        headers = self.client.upload_headers(self.name, public, properties)
        try:
            if len(parts) == 1:
                with open(self.path(parts[0]), "rb") as f:
                    self.fingerprint = self.client.create_image(f, headers)
                return self.fingerprint
            rootfs = [n for n in parts if kinds[n] in ROOTFS_KINDS]
            meta = [n for n in parts if n not in rootfs]
            if len(rootfs) != 1 or len(meta) != 1:
                raise ImportFailed(errno.EINVAL, f"{self.name}: a split image is one metadata tarball "
                                                 "and one squashfs or qcow2 rootfs")
            with open(self.path(meta[0]), "rb") as m, open(self.path(rootfs[0]), "rb") as r:
                field = "rootfs.img" if kinds[rootfs[0]] == "qcow2" else "rootfs"
                form = MultipartEncoder(fields={
                    "metadata": (meta[0], m, "application/octet-stream"),
                    field: (rootfs[0], r, "application/octet-stream")})
                headers["Content-Type"] = form.content_type
                self.fingerprint = self.client.create_image(form, headers)
            return self.fingerprint
        except LXDError as e:
            if already_held(e):
                log.info("import folder %s: LXD holds this image already: nothing to do", self.name)
                return ""
            raise failure(e) from e

    def remove_spool(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)


def _ended_early(path: Path, kind: str) -> str | None:
    """Why a spooled part does not end as its format ends (upload/ending.py), or None."""
    end, total = ending(kind), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            end.feed(chunk)
            total += len(chunk)
    return end.ended_early(total)


def _copied_record(folder: str, data: bytes) -> tuple[bool, dict[str, str] | None]:
    """The public flag and properties of a copied image folder's metadata.json, checked as LXD would."""
    try:
        record = json.loads(data)
    except ValueError as e:
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json is not JSON: {e}") from None
    if not isinstance(record, dict):
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json: json: cannot unmarshal "
                                         f"{type(record).__name__} into an image record")
    properties = record.get("properties") or None
    if properties is not None and (not isinstance(properties, dict)
                                   or not all(isinstance(v, str) for v in properties.values())):
        raise ImportFailed(errno.EINVAL, f"{folder}/metadata.json: properties must be an object "
                                         "of strings")
    return bool(record.get("public")), properties
