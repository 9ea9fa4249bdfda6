"""Putting a mount together: one tree per server, and a forest when there are several.

A tree needs a client (LXD's, or a simplestreams server's), a catalog, a
reader with its own spool folder, and for LXD an event watcher; a forest
needs, beside each tree, how to tell the server is back and how another
server pulls an image from it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from lxdimagefs.compose.forest import Forest, Slot
from lxdimagefs.compose.projects import Projects
from lxdimagefs.compose.root import Tree
from lxdimagefs.contents.archives import IndexFolder
from lxdimagefs.data.diskcache import DiskCache
from lxdimagefs.data.exports import Exports
from lxdimagefs.data.spool import SplitSpool
from lxdimagefs.errors import LXDError
from lxdimagefs.fs.handles import HandleTable
from lxdimagefs.fs.node import Ownership
from lxdimagefs.mount.remotes import Remote
from lxdimagefs.servers.catalog import Catalog, LayoutJournal
from lxdimagefs.servers.events import EventWatcher
from lxdimagefs.servers.localfiles import images_folder
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.servers.protocol import ImageSource
from lxdimagefs.servers.pull import from_lxd, from_simplestreams
from lxdimagefs.servers.simplestreams import StreamsClient
from lxdimagefs.wire.transport import Connection

log = logging.getLogger(__name__)

STREAMS_TTL = 300.0  # seconds a simplestreams index is trusted: such servers publish a few times a day


@dataclass
class Settings:
    mountpoint: str
    cache_root: Path
    readonly: bool
    metadata_ttl: float
    cache_bytes: int
    events: bool
    contents: bool
    all_projects: bool = False
    allow_delete: bool = False
    disk: DiskCache | None = None  # verified exports on disk, shared by every server's tree
    local_files: bool = True  # a local server's own image files read in place (-o nolocal: never)
    own: Ownership = field(default_factory=Ownership)  # -o uid=,gid=,file_mode=,dir_mode=
    inside: str = ""  # where a connection of its own serves contents/ (mount/inside.py)


@dataclass
class Built:
    remote: Remote
    tree: Tree | Projects
    events: EventWatcher | None
    slot: Slot
    client: LXDClient | None = None  # the server's, where the tree is not one project's


def build(remote: Remote, conn: Connection, settings: Settings, mountpoint: str,
          handles: HandleTable, cache_bytes: int) -> Built:
    spool = Path(tempfile.mkdtemp(prefix=SplitSpool.PREFIX, dir=settings.cache_root))
    index = None
    if settings.contents:  # kept across mounts and servers: keyed by fingerprint
        index = IndexFolder(settings.cache_root / f"lxdimagefs-index-{os.getuid()}")
    if remote.simplestreams:
        streams = StreamsClient(conn)
        catalog = Catalog(streams, ttl=max(settings.metadata_ttl, STREAMS_TTL))
        exports = Exports(streams, spool, capacity=cache_bytes, disk=settings.disk)
        exports.verification.remote = remote.name
        tree = Tree(catalog, exports, settings.own, readonly=True, mountpoint=mountpoint, index=index,
                    imports=False, handles=handles, served_at=served_at(settings, mountpoint))
        slot = Slot(remote.name, tree, streams.reachable, from_simplestreams(streams.base))
        return Built(remote, tree, None, slot)
    client = LXDClient(conn)
    journal = LayoutJournal(settings.cache_root / f"lxdimagefs-layouts-{os.getuid()}.jsonl", conn.identity())
    catalog = Catalog(client, ttl=settings.metadata_ttl, journal=journal)
    images = images_folder(conn.socket) if conn.socket and settings.local_files else None
    exports = Exports(client, spool, capacity=cache_bytes, disk=settings.disk, images=images)
    exports.verification.remote = remote.name  # the stats' label
    tree = Tree(catalog, exports, settings.own, readonly=settings.readonly, mountpoint=mountpoint,
                index=index, handles=handles, allow_delete=settings.allow_delete,
                served_at=served_at(settings, mountpoint))
    events = None
    if settings.events:
        events = EventWatcher(client, tree.changed_elsewhere, catalog.refresh, timeout=conn.timeout[1],
                              ping=min(10.0, conn.timeout[1]), poll=settings.metadata_ttl)
        catalog.events_live = events.live.is_set
    return Built(remote, tree, events, Slot(remote.name, tree, client.reachable, from_lxd(client)))


def served_at(settings: Settings, mountpoint: str) -> str:
    """This tree's contents/ on the inside connection (its remote's and project's names below that
    connection's root, as below the mount's)."""
    return f"{settings.inside}{mountpoint[len(settings.mountpoint):]}/contents" if settings.inside else ""


def build_projects(remote: Remote, conn: Connection, settings: Settings, mountpoint: str,
                   handles: HandleTable, cache_bytes: int) -> Built:
    """One folder per project of an LXD server, one event stream for them all."""
    client = LXDClient(conn)
    watcher: EventWatcher | None = None

    def make(name: str) -> Slot:
        own, where = replace(settings, events=False), f"{mountpoint}/{name}"
        # Each project's reader has its own block cache: a cache shared between readers that each check
        # their own copies would let one serve a block only the other admitted (issue 16's manifests).
        b = build(remote, replace(conn, project=name), own, where, handles, cache_bytes)
        if watcher is not None and isinstance(b.tree, Tree):
            b.tree.catalog.events_live = watcher.live.is_set
        return Slot(name, b.tree, b.slot.reachable, b.slot.source)

    projects = Projects(client.projects, make, handles, settings.readonly, mountpoint,
                        ttl=settings.metadata_ttl, own=settings.own)
    if settings.events:
        watcher = EventWatcher(client, projects.changed_elsewhere, projects.connected,
                               timeout=conn.timeout[1], ping=min(10.0, conn.timeout[1]), all_projects=True,
                               poll=settings.metadata_ttl)
        projects.events_live = watcher.live.is_set
    return Built(remote, projects, watcher, Slot(remote.name, projects, client.reachable), client)


def probe(built: Built) -> None:
    """List the server's images (or projects) once, without riding out an outage: raises LXDError at once."""
    client: ImageSource
    if built.client is not None:  # a server whose projects are each a tree
        client = built.client
    else:
        assert not isinstance(built.tree, Projects)  # built with its server's client
        client = built.tree.catalog.client
    patience, client.patience = client.patience, 0.0
    try:
        if isinstance(built.tree, Projects):
            built.tree.sync()
        else:
            built.tree.catalog.probe()  # reachable, and the project exists; listed at the first call
        if client.server_info().get("auth") != "trusted":
            log.warning("%s does not trust this client: only its public images are visible",
                        client.conn.describe())
    finally:
        client.patience = patience


def assemble(servers: list[tuple[Remote, Connection]], settings: Settings, forest: bool
             ) -> tuple[Tree | Forest, list[Built]]:
    """The root of the mount: the one server's tree, or a forest of one folder per remote.

    A lone server that does not answer is an error (LXDError); in a forest,
    it is an empty folder that fills once the server answers.
    """
    for stale in SplitSpool.sweep(settings.cache_root):
        log.info("removed %s, left by a daemon that did not unmount", stale)
    handles = HandleTable()
    share = max(8 << 20, settings.cache_bytes // len(servers))  # the cache cap is for the whole daemon
    built = []
    for remote, conn in servers:
        where = f"{settings.mountpoint}/{remote.name}" if forest else settings.mountpoint
        lxd = settings.all_projects and not remote.simplestreams
        built.append((build_projects if lxd else build)(remote, conn, settings, where, handles, share))
    if not forest:
        try:
            probe(built[0])
        except LXDError:
            built[0].tree.close()
            raise
        return built[0].tree, built
    for b in built:
        try:
            probe(b)
        except LXDError as e:
            b.slot.failed(e)
    root = Forest([b.slot for b in built], handles, settings.readonly, settings.mountpoint, settings.own)
    return root, built


# How long the kernel keeps a name and its attributes where every server follows LXD's events:
# each change those carry reaches the kernel as an invalidation of exactly the names it touched
# (compose/root.py), and what is inside an image never changes. Elsewhere (-o no_events, a
# simplestreams index) freshness rests on metadata_ttl, and the kernel keeps names 1 s, as libfuse
# does by default.
FOLLOWED = 3600.0
UNFOLLOWED = 1.0


def kernel_timeouts(built: list[Built], settings: Settings) -> dict[str, float]:
    """The FUSE options for the kernel's entry and attribute caches (-o entry_timeout=… sets others)."""
    seconds = FOLLOWED if followed(built, settings) else UNFOLLOWED
    return {"entry_timeout": seconds, "attr_timeout": seconds}


def followed(built: list[Built], settings: Settings) -> bool:
    """Whether every server's changes are heard of as they happen (LXD's events)."""
    return settings.events and all(not b.remote.simplestreams for b in built)
