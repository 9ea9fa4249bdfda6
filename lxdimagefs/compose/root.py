"""The directory tree of a mount, as plain Python: it knows nothing of FUSE.

The root only dispatches: each top-level name is a `Node` of its own
(by-fingerprint, by-alias, import), handed the path below that name. Here
live only the rules that span subtrees: the checks every call makes first,
`EXDEV` for a rename across them, the open-file table, what an LXD event
means for the kernel's caches; attribute calls in compose/attributes.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from lxdimagefs.compose.attributes import Attributes
from lxdimagefs.contents.archives import IndexFolder
from lxdimagefs.contents.node import CONTENTS_DIR, SERVED, ContentsNode, ServedElsewhere
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import fs_error
from lxdimagefs.fs.handles import Handle, HandleTable, OpenFiles
from lxdimagefs.fs.node import Attr, Context, Node, Ownership
from lxdimagefs.names import METADATA, filename_to_alias
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.events import EventSubject
from lxdimagefs.servers.listing import Changes
from lxdimagefs.servers.pull import Source
from lxdimagefs.tree.aliases import ALIAS_DIR, AliasesNode
from lxdimagefs.tree.images import FP_DIR, ImagesNode
from lxdimagefs.tree.import_dir import IMPORT_DIR, ImportsNode
from lxdimagefs.tree.space import Space


class Tree(Attributes, OpenFiles):
    """The mount's root: dispatches each call to its subtree; compose/attributes.py the attribute calls."""

    def __init__(self, catalog: Catalog, exports: Exports, own: Ownership | None = None,
                 readonly: bool = True, mountpoint: str = "", spool_dir: Path | None = None,
                 index: IndexFolder | None = None, imports: bool = True,
                 handles: HandleTable | None = None, allow_delete: bool = False, served_at: str = "") -> None:
        self.catalog, self.exports = catalog, exports
        own = own or Ownership()
        self.uid = os.getuid() if own.uid is None else own.uid
        self.gid = os.getgid() if own.gid is None else own.gid
        self.ctx = Context(readonly=readonly, allow_delete=allow_delete, mountpoint=mountpoint.rstrip("/"),
                           own=own)
        self.images = ImagesNode(self.ctx, catalog, exports)
        self.nodes: dict[str, Node] = {FP_DIR: self.images,
                                       ALIAS_DIR: AliasesNode(self.ctx, catalog, self.images)}
        if imports:  # a server that takes images (a simplestreams server does not)
            self.imports = ImportsNode(self.ctx, catalog, spool_dir or exports.spool.directory)
            self.nodes[IMPORT_DIR] = self.imports
        self.contents: Node | None = None
        if index is not None:  # what is inside images; `-o nocontents` leaves it out
            self.contents = ContentsNode(self.ctx, catalog, exports, self.images, index)
            self.nodes[CONTENTS_DIR] = self.contents
            if served_at:  # by a connection of its own (mount/inside.py), which asks for it as SERVED
                self.nodes[CONTENTS_DIR] = ServedElsewhere(self.ctx, served_at)
        self.handles = handles or HandleTable()
        self.space = Space(catalog)
        catalog.listeners.append(self._changed)

    @property
    def readonly(self) -> bool:
        return self.ctx.readonly

    def started(self, on_change: Callable[..., None]) -> None:
        """The mount is live (the daemon has forked): paths that change are told to `on_change`."""
        self.ctx.on_change = on_change
        self.exports.spool.claim()

    def close(self) -> None:
        self.catalog.close()
        self.exports.close()

    def invalidate(self) -> None:
        self.catalog.invalidate()

    def _node(self, path: str) -> tuple[Node | None, list[str]]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return None, []
        node = self.contents if parts[0] == SERVED else self.nodes.get(parts[0])
        if node is None:
            raise fs_error(errno.ENOENT, path)
        return node, parts[1:]

    def inside_image(self, path: str) -> bool:
        """Whether `path` is inside an image under contents/ (never changes, nothing is written)."""
        parts = path.split("/", 4)
        return len(parts) > 3 and parts[1] == CONTENTS_DIR and parts[2] == FP_DIR and parts[3] != "" \
            and CONTENTS_DIR in self.nodes

    # -- reading --------------------------------------------------------------------

    def getattr(self, path: str) -> Attr:
        node, rest = self._node(path)
        if node is None:
            return self.ctx.dir(self.ctx.started, 2 + len(self.nodes))
        return node.getattr(rest)

    def readdir(self, path: str) -> list[str]:
        node, rest = self._node(path)
        return list(self.nodes) if node is None else node.readdir(rest)

    def readlink(self, path: str) -> str:
        node, rest = self._node(path)
        if node is None:
            raise fs_error(errno.EINVAL, path)
        return node.readlink(rest)

    def open(self, path: str, flags: int, pid: int = 0) -> int:
        if stat.S_ISDIR(self.getattr(path).mode):
            raise fs_error(errno.EISDIR, path)
        node, rest = self._node(path)
        assert node is not None
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            self._changing(path, "open for writing")
        return self.handles.add(node.open(rest, flags, pid))

    def opendir(self, path: str, pid: int = 0) -> int:
        """A folder opened, to list or to empty it: a handle, so that its close is known."""
        node, rest = self._node(path)
        return self.handles.add(Handle(pid) if node is None else node.opendir(rest, pid))

    def statfs(self, path: str = "/") -> dict[str, int]:
        return self.space.usage().statfs()

    def source_of(self, folder: str, name: str, make: Callable[[str, str | None], Source]) -> Source:
        """How another server gets the image `by-alias/NAME` or `by-fingerprint/FP` names here."""
        if folder == ALIAS_DIR:
            fp = self.catalog.alias_target(name)
            if fp is None:
                raise fs_error(errno.ENOENT, f"/{folder}/{name}")
            return make(fp, filename_to_alias(name))
        return make(self.images.image(name, f"/{folder}/{name}").fingerprint, None)

    # -- changes ----------------------------------------------------------------------

    def _changing(self, path: str, op: str) -> tuple[Node, list[str]]:
        self.ctx.writable(path, op)
        try:
            node, rest = self._node(path)
        except FileNotFoundError:
            node = None  # a new top-level name: the mount's own, like the root
        if node is None:
            raise self.ctx.refuse(errno.EPERM if op != "rmdir" else errno.EBUSY, op, path,
                                  "the root is the mount's own")
        if node.read_only:
            raise self.ctx.refuse(errno.EROFS, op, path, f"{node.name}/ is read-only")
        return node, rest

    def create(self, path: str, flags: int, pid: int = 0) -> int:
        node, rest = self._changing(path, "create")
        try:
            self.getattr(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            return self.handles.add(node.create(rest, flags, pid))
        if flags & os.O_EXCL:
            raise fs_error(errno.EEXIST, path)
        return self.open(path, flags | os.O_WRONLY, pid)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self.ctx.writable(path, "truncate")
        if fh is not None and self.handles.has(fh):
            self.handles.get(fh).truncate(length)
            return
        self.getattr(path)
        node, rest = self._changing(path, "truncate")
        node.truncate(rest, length)

    def mkdir(self, path: str) -> None:
        node, rest = self._changing(path, "mkdir")
        node.mkdir(rest)

    def rmdir(self, path: str) -> None:
        self.ctx.writable(path, "rmdir")
        self.getattr(path)
        node, rest = self._changing(path, "rmdir")
        node.rmdir(rest)

    def unlink(self, path: str, pid: int = 0) -> None:
        node, rest = self._changing(path, "unlink")
        if stat.S_ISDIR(self.getattr(path).mode):
            raise fs_error(errno.EISDIR, path)
        node.unlink(rest, pid)

    def symlink(self, path: str, target: str) -> None:
        node, rest = self._changing(path, "symlink")
        node.symlink(rest, target)

    def rename(self, old: str, new: str, pid: int = 0) -> None:
        src_node, src = self._changing(old, "rename")
        self.getattr(old)
        dst_node, dst = self._node(new)
        if dst_node is not src_node:
            raise self.ctx.refuse(errno.EXDEV, "rename", old, f"cannot move it to {new}")
        src_node.rename(src, dst, pid)

    def refusal(self, op: str, path: str, why: str) -> OSError:
        """A change no subtree makes (link, mknod): EROFS where the subtree or mount is read-only."""
        node, _ = self._node(path)
        if node is not None and node.read_only:
            return self.ctx.refuse(errno.EROFS, op, path, f"{node.name}/ is read-only")
        return self.ctx.refusal(op, path, why)

    # -- what LXD's events mean here ---------------------------------------------------

    def changed_elsewhere(self, subject: EventSubject) -> None:
        """An image or alias changed in LXD: the catalog asks for that one again (in the background)."""
        images: frozenset[str] = frozenset((subject.fingerprint,)) if subject.fingerprint else frozenset()
        aliases = frozenset((subject.alias,)) if subject.alias is not None else frozenset()
        if subject.action == "image-refreshed":
            images = aliases = frozenset()  # a new image took its place, announced by nothing else
        self.catalog.heard(images, aliases)

    def _changed(self, changes: Changes) -> None:
        """What the catalog found changed: the kernel forgets exactly those names (from the
        catalog's thread, never a FUSE request's, which may hold their folder)."""
        tops = [""] + ([f"/{CONTENTS_DIR}"] if CONTENTS_DIR in self.nodes else [])  # contents/ mirrors
        names = [f"/{FP_DIR}/{fp}/{METADATA}" for fp in changes.images]  # an open metadata.json's too
        listed = getattr(self.catalog.cached(), "images", {})  # still listed: the same insides, kept
        kept = [f"{top}/{FP_DIR}/{fp}" for fp in changes.images if fp in listed for top in tops[1:]]
        names += [p for p in (f"{t}/{FP_DIR}/{fp}" for fp in changes.images for t in tops) if p not in kept]
        names += [f"{top}/{ALIAS_DIR}/{name}" for name in changes.aliases for top in tops]
        folders = [f"{top}/{d}" for d, hit in ((FP_DIR, changes.images), (ALIAS_DIR, changes.aliases))
                   if hit for top in tops]
        for path in names:  # each name goes, and every name below it (all an image's folder holds)
            self.ctx.on_change(path)
        for path in folders + kept:  # their listings changed: they keep their names
            self.ctx.on_change(path, entry=False)
