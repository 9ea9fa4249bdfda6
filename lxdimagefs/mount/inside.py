"""What is inside images, on a FUSE connection of its own, so that the kernel keeps it.

Inside an image nothing changes (its name is its fingerprint), yet on the mount's own connection
every file opened there costs an OPEN and a RELEASE and every folder an OPENDIR and a RELEASEDIR:
a repeat `grep -r` or `find` was those round trips (docs/PERFORMANCE.md). Those calls cannot be
spared for part of a connection, so contents/ is served by a second one (`libfuse/lowlevel.py`),
which answers neither: the kernel keeps names, attributes, listings and pages inside images for
the mount's life, and is told to drop them when an image goes or fails its check.

It is mounted in a private folder (`libfuse/folders.py`); `contents` in the mount (at the root, or
below a remote's and a project's folder) is a link to `<that folder>/<the same path>/contents`
(contents/node.py `ServedElsewhere`). Its folders above a contents/ list nothing.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cachetools import LRUCache

from lxdimagefs.compose.forest import Forest
from lxdimagefs.compose.root import SERVED, Tree
from lxdimagefs.contents.node import CONTENTS_DIR
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import Caching
from lxdimagefs.fs.node import Listing
from lxdimagefs.keys import Fingerprint
from lxdimagefs.mount.fuse_ops import LXDImageOps, _stat, to_errno
from lxdimagefs.mount.libfuse.drops import Drops
from lxdimagefs.mount.libfuse.folders import release, where
from lxdimagefs.mount.libfuse.lowlevel import Connection, Entry
from lxdimagefs.mount.libfuse.nodes import Nodes
from lxdimagefs.mount.tuning import raise_readahead
from lxdimagefs.stats import timed
from lxdimagefs.tree.images import FP_DIR

log = logging.getLogger(__name__)

FOREVER = 365 * 86400.0  # what is inside an image: the kernel keeps it until told otherwise
UNKNOWN = {"st_ino": 0xFFFFFFFF}  # a name whose attributes could not be had: the kernel asks
ROWS_KEPT = 16  # folders whose listing is under way, each listed once (a reply holds some 25 rows)


class Inside:
    """The handler of the connection: its paths are the mount's (`depth` names, a remote's and a
    project's, above each `contents/`), and the tree is asked for `contents/` as SERVED. Mounted
    before the daemon forks (`mounted`), answering after (`start`): the kernel waits meanwhile."""

    root: Tree | Forest
    depth: int
    timeout: float  # for what may change here: all but what is inside an image
    shallow: frozenset[str] = frozenset()  # remotes one name less deep (simplestreams: no projects)

    def __init__(self, folder: Path, connection_options: list[str], claim: int = -1) -> None:
        self.folder, self._claim = folder, claim  # claim: the lock that marks the folder in use
        self.nodes = Nodes()
        self._rows: LRUCache[int, tuple[list[str], dict[str, int]]] = LRUCache(ROWS_KEPT)  # under way
        self._lock = threading.Lock()
        self.connection = Connection(self, connection_options)
        self.drops = Drops(self.connection, self.nodes, self._forgotten)

    def start(self) -> None:
        """Answering from now on; the listings that can change (contents/, by-fingerprint/,
        by-alias/, the folders above) are dropped every `timeout`, as the mount's own names
        expire: what events tell of is dropped at once (`changed`), the rest within that time."""
        self.drops.start(self.timeout, self.depth + 2)
        self.connection.serve()
        threading.Thread(target=raise_readahead, args=(str(self.folder),), daemon=True,
                         name="readahead").start()  # as the mount's own

    def stop(self) -> None:
        log.debug("unmounting contents' connection on %s", self.folder)
        self.connection.stop()
        claim, self._claim = self._claim, -1
        if claim >= 0:
            release(self.folder, claim)

    # -- paths ---------------------------------------------------------------------------

    def _depth(self, parts: list[str]) -> int:
        """How many names (a remote's, a project's) come before its contents/ under this path's remote
        (a simplestreams remote has no projects: found by review)."""
        return self.depth - 1 if parts and parts[0] in self.shallow else self.depth

    def _tree_path(self, path: str) -> str | None:
        """The tree's path for ours; None for a folder above a contents/ (a remote's, a project's)."""
        parts = path.split("/")[1:] if path != "/" else []
        d = self._depth(parts)
        if len(parts) <= d:
            return None
        if parts[d] != CONTENTS_DIR:
            raise fs_error(errno.ENOENT, path)
        return "/" + "/".join([*parts[:d], SERVED, *parts[d + 1:]])

    def _seconds(self, path: str) -> float:
        """How long the kernel keeps a name: what is inside an image (under its full fingerprint)
        for good, the rest (which changes with the images and aliases) as the mount's own names."""
        parts = path.split("/")[1:]
        d = self._depth(parts)
        inside = len(parts) > d + 3 and parts[d + 1] == FP_DIR and Fingerprint.parse(parts[d + 2]) is not None
        return FOREVER if inside else self.timeout

    def _entry(self, path: str) -> Entry:
        tree_path = self._tree_path(path)
        if tree_path is None:
            if path != "/":  # a remote's or project's folder: the mount's
                self.root.getattr(path)
            attrs = _stat(self.root.ctx.dir(self.root.ctx.started), self.root.uid, self.root.gid, path)
            return Entry(self.nodes.node(path), attrs, self.timeout, self.timeout, (path, None))
        return self._found(path, tree_path, self._seconds(path))

    def _found(self, path: str, tree_path: str, seconds: float) -> Entry:
        attr = self.root.getattr(tree_path)
        key = path  # a link that can change (an alias) is a new node when it does: the kernel then
        if seconds != FOREVER and stat.S_ISLNK(attr.mode):  # drops the target it kept as a page
            key = f"{path}\0{self.root.readlink(tree_path)}"
        attrs = _stat(attr, self.root.uid, self.root.gid, tree_path)
        return Entry(self.nodes.node(path, key), attrs, seconds, seconds, (path, key))

    @staticmethod
    def _join(folder: str, name: str) -> str:
        return f"{folder.rstrip('/')}/{name}"

    # -- the kernel's calls (lowlevel.Handler) ----------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Entry:
        started = time.perf_counter()
        try:
            entry = self._entry(self._join(self.nodes.path(parent), os.fsdecode(name)))
        finally:
            timed("getattr", time.perf_counter() - started)  # as the mount's LOOKUP is counted
        return entry

    def forget(self, node: int, count: int) -> None:
        self.nodes.forget(node, count)

    def getattr(self, node: int) -> Entry:
        started = time.perf_counter()
        try:
            return self._entry(self.nodes.path(node))
        finally:
            timed("getattr", time.perf_counter() - started)

    def readlink(self, node: int) -> bytes:
        tree_path = self._tree_path(self.nodes.path(node))
        if tree_path is None:
            raise fs_error(errno.EINVAL, self.nodes.path(node))
        return os.fsencode(self.root.readlink(tree_path))

    def read(self, node: int, offset: int, size: int) -> bytes | memoryview:
        started, tree_path = time.perf_counter(), self._tree_path(self.nodes.path(node))
        if tree_path is None:
            raise fs_error(errno.EISDIR, self.nodes.path(node))
        fh = self.root.open(tree_path, os.O_RDONLY, 0)
        try:
            return self.root.read(fh, offset, size)
        finally:
            self.root.release(fh)
            timed("read", time.perf_counter() - started)

    def listing(self, node: int, offset: int) -> Iterator[tuple[bytes, Entry, int]]:
        """A folder's rows from `offset` on, each with its attributes (READDIRPLUS)."""
        path = self.nodes.path(node)
        tree_path = self._tree_path(path)
        rows, kinds = self._rows_of(node, offset, tree_path)
        seconds = self._seconds(self._join(path, "-"))  # the same for every name here
        for at in range(offset + 1, len(rows) + 1):
            name = rows[at - 1]
            if name in (".", ".."):
                yield name.encode(), Entry(0, {**UNKNOWN, "st_mode": stat.S_IFDIR}, 0, 0), at
                continue
            try:
                assert tree_path is not None  # above a contents/, folders list nothing
                entry = self._found(self._join(path, name), f"{tree_path}/{name}", seconds)
            except Exception:  # its stat failed: its type alone, the kernel asks for the rest
                entry = Entry(0, {**UNKNOWN, "st_mode": kinds.get(name, 0)}, 0, 0)
            yield os.fsencode(name), entry, at
        if offset >= len(rows):  # the kernel has them all
            with self._lock:
                self._rows.pop(node, None)

    def _rows_of(self, node: int, offset: int, tree_path: str | None) -> tuple[list[str], dict[str, int]]:
        """A folder's rows, listed at its first reply and kept for the next (listed again at each, a
        folder of 30,000 names took 50 s: found by review)."""
        with self._lock:
            kept = self._rows.get(node) if offset else None
        if kept is None:
            started = time.perf_counter()
            names = Listing([], {}) if tree_path is None else self.root.readdir(tree_path)
            kept = [".", "..", *names], names.kinds if isinstance(names, Listing) else {}
            timed("readdir", time.perf_counter() - started)
            with self._lock:
                self._rows[node] = kept
        return kept

    def held(self, entries: list[Entry]) -> None:
        """The kernel took these names (a lookup's, a listing's rows)."""
        self.nodes.looked_up([(entry.node, *entry.ref) for entry in entries])

    def listed(self, node: int, offset: int) -> None:
        """A listing that left names out (a guest's disk read that failed) is dropped just after it
        is sent: the next listing asks again. One from bytes whose check is under way is kept: if
        the check fails, `changed` drops the whole image."""
        tree_path = None if offset else self._tree_path(self.nodes.path(node))  # a listing's first reply
        if tree_path is not None and not self._whole(tree_path):
            self.drops.node(node)

    def _whole(self, tree_path: str) -> bool:
        try:
            fh = self.root.opendir(tree_path, 0)
        except OSError:
            return False
        try:
            return self.root.caching(fh) is not Caching.DIRECT
        finally:
            self.root.release(fh)

    def statfs(self, node: int) -> dict[str, int]:
        return self.root.statfs("/")

    def errno_of(self, op: str, node: int, exc: BaseException) -> int:
        try:
            named: object = self.nodes.path(node)
        except OSError:
            named = node
        return to_errno(op, (named,), exc)

    # -- changes ---------------------------------------------------------------------------

    def changed(self, path: str, wait: bool = False, entry: bool = True) -> None:
        """A path of the mount changed: under a contents/, the kernel drops its name (with `entry`)
        or its listing, and what it keeps below it."""
        parts = path.split("/")[1:]
        d = self._depth(parts)
        if len(parts) <= d or parts[d] != CONTENTS_DIR:
            return
        self.drops.path(path, entry)

    def _forgotten(self, node: int) -> None:
        with self._lock:
            self._rows.pop(node, None)


def mounted(fuse_opts: dict[str, object]) -> Inside | None:
    """The inside connection, mounted in a new private folder with the mount's own access options
    (before the daemon forks); None if that cannot be done: contents/ is then served whole by the
    mount itself, as without it (slower repeats, the same answers)."""
    allow_other = bool(fuse_opts.get("allow_other") or fuse_opts.get("allow_root"))
    options = ["ro", "fsname=lxdimagefs-contents", "subtype=lxdimagefs"]
    options += [key for key in ("allow_other", "allow_root", "debug") if fuse_opts.get(key)]
    options += ["default_permissions"] if allow_other else []  # an image's own modes, for others
    try:
        folder, claim = where(allow_other)
    except OSError as e:
        log.warning("contents/ is served by the mount itself: no folder for its own connection (%s)", e)
        return None
    inside = Inside(folder, ["-o", ",".join(options)], claim)
    if not inside.connection.mount(str(folder)):
        inside.stop()
        log.warning("contents/ is served by the mount itself: its own connection could not be mounted")
        return None
    atexit.register(inside.stop)  # the daemon's end, or a failure before it forks (not the parent's
    return inside  # exit after the fork: libfuse's _exit)


def attach(inside: Inside, ops: LXDImageOps, root: Tree | Forest, depth: int, timeout: float,
           followed: bool, shallow: frozenset[str] = frozenset()) -> None:
    """`inside` serves `root`'s contents/ once the daemon has forked, told of what changes. The
    `contents` links in the mount are then kept by the kernel as pages, so that a path through one
    is the kernel's alone; the alias links too, which is safe where every change is heard of
    (`followed`: it is dropped then)."""
    inside.root, inside.depth, inside.timeout, inside.shallow = root, depth, timeout, shallow
    ops.told.append(inside.changed)
    ops.on_init.append(inside.start)
    ops.cache_symlinks = followed  # read by fusebind at the mount's init
