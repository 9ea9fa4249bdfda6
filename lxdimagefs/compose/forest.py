"""Several servers in one mount: one folder per remote at the root, each holding a whole tree.

The forest only dispatches by the first path component, as the tree does
by the second: each remote's `Tree` keeps its own catalog, reader and
events. Open files share one handle table. A remote that does not answer
shows as an empty folder (logged once) and is asked again every
`Slot.RETRY` seconds; a mount never fails because one server is away.
What spans remotes lives here too: `EXDEV` between them, and `ln -s`
into a remote's `import/` naming another remote's image (server-side copy).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable
from typing import Any

from lxdimagefs.compose.root import Tree
from lxdimagefs.errors import LXDTLSError, LXDUnreachable, fs_error
from lxdimagefs.fs.handles import Handle, HandleTable, OpenFiles
from lxdimagefs.fs.node import Attr, Context, Ownership
from lxdimagefs.servers.pull import Source
from lxdimagefs.tree.space import Usage

log = logging.getLogger(__name__)


class Slot:
    """One remote's (or project's) folder: its tree, and whether its server answers."""

    RETRY = 10.0  # seconds between attempts to reach a server that did not answer

    def __init__(self, name: str, tree: Tree | Forest, reachable: Callable[[], bool],
                 source: Callable[[str, str | None], Source] | None = None) -> None:
        self.name = name
        self.tree = tree
        self.reachable = reachable
        self.source = source  # (fingerprint, alias) -> how another server gets that image
        self.down = False
        self.refused: LXDTLSError | None = None  # down because TLS failed: its folder says so
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def up(self) -> bool:
        if not self.down:
            return True
        if not self._lock.acquire(blocking=False):
            return False  # another call is asking the server: this one does not wait for it
        try:
            if self.down and time.monotonic() >= self._retry_at:
                if self.reachable():
                    self.down, self.refused = False, None
                    self.tree.invalidate()
                    log.info("remote %s answers again", self.name)
                else:
                    self._retry_at = time.monotonic() + self.RETRY
        finally:
            self._lock.release()
        return not self.down

    def failed(self, e: Exception) -> None:
        with self._lock:
            if isinstance(e, LXDTLSError):
                if self.refused is None:
                    log.warning("remote %s: its folder answers EACCES until TLS with it succeeds", self.name)
                self.refused = e
            elif not self.down:
                log.warning("remote %s does not answer (%s): its folder is empty until it does", self.name, e)
            self.down = True
            self._retry_at = time.monotonic() + self.RETRY


class Forest(OpenFiles):
    def __init__(self, slots: list[Slot], handles: HandleTable, readonly: bool, mountpoint: str,
                 own: Ownership | None = None) -> None:
        self.slots = {s.name: s for s in slots}
        self.handles = handles
        own = own or Ownership()
        self.ctx = Context(readonly=readonly, mountpoint=mountpoint.rstrip("/"), own=own)
        self.uid: int = os.getuid() if own.uid is None else own.uid
        self.gid: int = os.getgid() if own.gid is None else own.gid

    @property
    def readonly(self) -> bool:
        return self.ctx.readonly

    def started(self, on_change: Callable[..., None]) -> None:
        for slot in self.slots.values():
            slot.tree.started(lambda path, wait=False, entry=True, name=slot.name:
                              on_change(f"/{name}{path}", wait, entry))

    def close(self) -> None:
        for slot in self.slots.values():
            slot.tree.close()

    def invalidate(self) -> None:
        """Forget every folder's listing (a server that answers again)."""
        for slot in self.slots.values():
            slot.tree.invalidate()

    # -- dispatch -------------------------------------------------------------------

    def _split(self, path: str) -> tuple[Slot | None, str]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return None, "/"
        slot = self.slots.get(parts[0])
        if slot is None:
            raise fs_error(errno.ENOENT, path)
        return slot, "/" + "/".join(parts[1:])

    def inside_image(self, path: str) -> bool:
        name, _, sub = path.lstrip("/").partition("/")
        slot = self.slots.get(name)
        return slot is not None and slot.tree.inside_image("/" + sub)

    def _in(self, path: str, call: str, *args: Any) -> Any:
        """`call` on the tree `path` is in, with the path below the remote's folder."""
        slot, sub = self._split(path)
        if slot is None:
            raise self.ctx.refusal(call, path, "the root holds one folder per remote")
        if not slot.up():
            if call == "statfs":  # unknown, never a full disk (and never a wait for the server)
                return Usage().statfs()
            if sub != "/":
                raise fs_error(errno.ENOENT, path)
            if call == "getattr":
                return self.ctx.dir(self.ctx.started)
            if slot.refused is not None:  # not an outage: say so, rather than show an empty folder
                raise fs_error(slot.refused.errno, path, slot.refused.message)
            if call == "readdir":
                return []
            if call == "listxattrs":
                return {}
            if call == "opendir":
                return self.handles.add(Handle(*args))
            raise fs_error(errno.ENOENT, path)
        try:
            return getattr(slot.tree, call)(sub, *args)
        except (LXDUnreachable, LXDTLSError) as e:
            slot.failed(e)
            raise

    def getattr(self, path: str) -> Attr:
        if path.strip("/") == "":
            return self.ctx.dir(self.ctx.started, 2 + len(self.slots))
        return self._in(path, "getattr")

    def readdir(self, path: str) -> list[str]:
        if path.strip("/") == "":
            return list(self.slots)
        return self._in(path, "readdir")

    def readlink(self, path: str) -> str:
        return self._in(path, "readlink")

    def statfs(self, path: str = "/") -> dict[str, int]:
        if path.strip("/") == "":  # the root: the first server that answers and takes images
            up = sorted((s for s in self.slots.values() if not s.down), key=lambda s: s.tree.readonly)
            return up[0].tree.statfs("/") if up else Usage().statfs()
        return self._in(path, "statfs")

    def getxattr(self, path: str, name: str) -> bytes:
        return self._in(path, "getxattr", name) if path.strip("/") else _no_attr(path)

    def listxattrs(self, path: str) -> dict[str, bytes]:
        return self._in(path, "listxattrs") if path.strip("/") else {}

    # -- open files: one table for every remote ------------------------------------------

    def open(self, path: str, flags: int, pid: int = 0) -> int:
        if path.strip("/") == "":
            raise fs_error(errno.EISDIR, path)
        return self._in(path, "open", flags, pid)

    def create(self, path: str, flags: int, pid: int = 0) -> int:
        return self._in(path, "create", flags, pid)

    def opendir(self, path: str, pid: int = 0) -> int:
        if path.strip("/") == "":
            return self.handles.add(Handle(pid))
        return self._in(path, "opendir", pid)

    # -- changes ----------------------------------------------------------------------

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._in(path, "truncate", length, fh)

    def mkdir(self, path: str) -> None:
        self._in(path, "mkdir")

    def rmdir(self, path: str) -> None:
        self._in(path, "rmdir")

    def unlink(self, path: str, pid: int = 0) -> None:
        self._in(path, "unlink", pid)

    def rename(self, old: str, new: str, pid: int = 0) -> None:
        (src, _), (dst, sub) = self._split(old), self._split(new)
        if src is not dst:
            raise self.ctx.refuse(errno.EXDEV, "rename", old, f"cannot move it to {new}")
        self._in(old, "rename", sub, pid)

    def set_attributes(self, path: str, op: str) -> None:
        self._in(path, "set_attributes", op)

    def setxattr(self, path: str, name: str, value: bytes | None, flags: int = 0) -> None:
        self._in(path, "setxattr", name, value, flags)

    def refusal(self, op: str, path: str, why: str) -> OSError:
        slot, sub = self._split(path)
        return self.ctx.refusal(op, path, why) if slot is None else slot.tree.refusal(op, sub, why)

    def symlink(self, path: str, target: str) -> None:
        """A link into a remote's import/ naming another remote's image asks for a server-side copy."""
        slot, sub = self._split(path)
        into = slot is not None and isinstance(slot.tree, Tree) and sub.startswith("/import/")
        source = self._source(path, target) if into else None
        if source is None or slot is None or not isinstance(slot.tree, Tree):
            self._in(path, "symlink", target)
            return
        self.ctx.writable(path, "symlink")
        slot.tree.imports.pull(sub.split("/")[2:], source)

    def _source(self, path: str, target: str) -> Source | None:
        """The image another remote's folder names, if `target` leads into one."""
        if target.startswith(("https://", "http://")):
            return None
        if target.startswith("/"):
            if not target.startswith(self.ctx.mountpoint + "/"):
                return None
            where = target[len(self.ctx.mountpoint):]
        else:
            where = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        parts = [p for p in where.split("/") if p]
        if len(parts) != 3 or parts[0] not in self.slots or parts[1] not in ("by-alias", "by-fingerprint"):
            return None
        slot = self.slots[parts[0]]
        if slot.source is None or not isinstance(slot.tree, Tree) or not slot.up():
            raise fs_error(errno.ENOENT, target)
        return slot.tree.source_of(parts[1], parts[2], slot.source)


def _no_attr(path: str) -> bytes:
    raise fs_error(errno.ENODATA, path)
