"""What `df` reports: the size and free space of the storage that holds the server's images.

LXD keeps images in the volume `storage.images_volume` names, else in the
`images/` folder of its own directory. A local server's folder is measured
with statvfs; a pool through the API's resources. A remote server's
folder cannot be seen from here: its default profile's root pool stands in
(where LXD unpacks the images it uses), and with none, size and free are
0 (unknown), never a full disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from lxdimagefs.errors import LXDError
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.lxd import LXDClient

log = logging.getLogger(__name__)
UNIT = 1 << 20  # df's block: 1 MiB, the block the daemon reads in

# Where a server keeps images, for sockets whose folder is not the server's own (Incus's /run).
IMAGE_DIRS = {"/run/incus": "/var/lib/incus"}


@dataclass(frozen=True)
class Usage:
    total: int = 0  # bytes
    free: int = 0
    avail: int = 0  # free to an unprivileged writer (a filesystem's reserve excluded)
    files: int = 0
    files_free: int = 0
    where: str = "unknown"

    def statfs(self) -> dict[str, int]:
        return {"f_bsize": UNIT, "f_frsize": UNIT, "f_blocks": self.total // UNIT,
                "f_bfree": self.free // UNIT, "f_bavail": self.avail // UNIT,
                "f_files": self.files, "f_ffree": self.files_free, "f_favail": self.files_free,
                "f_namemax": 255}


def folder_usage(path: str) -> Usage:
    st = os.statvfs(path)
    return Usage(st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize,
                 st.f_files, st.f_favail, path)


def pool_usage(client: LXDClient, pool: str) -> Usage:
    space, inodes = client.pool_resources(pool)
    total, used = int(space.get("total") or 0), int(space.get("used") or 0)
    itotal, iused = int(inodes.get("total") or 0), int(inodes.get("used") or 0)
    free = max(total - used, 0)
    return Usage(total, free, free, itotal, max(itotal - iused, 0), f"pool {pool}")


class Space:
    """The usage of the server's image storage, asked at most every `ttl` seconds."""

    def __init__(self, catalog: Catalog, ttl: float = 5.0) -> None:
        self.catalog = catalog
        self.client = catalog.client
        self.ttl = ttl
        self._lock = threading.Lock()
        self._last = Usage()
        self._at = -ttl

    def usage(self) -> Usage:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._last = self._measure()
                except (LXDError, OSError) as e:  # df must not fail or hang for long: keep the last
                    log.info("cannot measure the image storage: %s", e)
                self._at = time.monotonic()
            return self._last

    def _measure(self) -> Usage:
        if not isinstance(self.client, LXDClient):  # an index: its images fill it, as a squashfs is full
            total = sum(i.size for i in self.catalog.snapshot().images.values())
            return Usage(total, 0, 0, where="simplestreams")
        volume = (self.client.server_info().get("config") or {}).get("storage.images_volume")
        if volume:
            return pool_usage(self.client, volume.split("/", 1)[0])
        folder = self.image_folder()
        if folder is not None:
            return folder_usage(folder)
        pool = self.client.default_root_pool()
        return pool_usage(self.client, pool) if pool else Usage()

    def image_folder(self) -> str | None:
        """The images/ folder of a server on a local socket (its own directory holds the socket)."""
        sock = self.client.conn.socket
        if not sock:
            return None
        home = os.path.dirname(sock)
        folder = os.path.join(IMAGE_DIRS.get(home, home), "images")
        return folder if os.path.isdir(folder) else None
