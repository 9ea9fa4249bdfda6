"""chmod, chown, utimensat and extended attributes across the root's subtrees (compose/root.py).

Modes and times here are LXD's: each subtree says where it takes such a call
anyway (what is being written, a record kept as attributes, `touch` as a
refresh); everywhere else the call is refused.
"""

from __future__ import annotations

import errno

from lxdimagefs.errors import fs_error
from lxdimagefs.fs.node import Attr, Context, Node

USER = "user."  # the only namespace any node keeps (user.lxd.*, user.lxdimagefs.progress)


class Attributes:
    """The part of the Tree that answers attribute calls, handing each to the subtree it is in."""

    ctx: Context

    def getattr(self, path: str) -> Attr:
        raise NotImplementedError

    def _node(self, path: str) -> tuple[Node | None, list[str]]:
        raise NotImplementedError

    def set_attributes(self, path: str, op: str) -> None:
        """chmod, chown, utimensat, setxattr: modes and times here are LXD's, not the user's.

        Accepted and ignored on what is being written (imports, editors' scratch
        files, metadata.json) so that `cp -p`, `touch`, `sed -i` and vim work;
        refused everywhere else.
        """
        self.getattr(path)
        node, rest = self._node(path)
        if node is not None and node.read_only:
            raise self.ctx.refuse(errno.EROFS, op, path, f"{node.name}/ is read-only")
        if not self.ctx.readonly and node is not None and node.accepts_attributes(rest):
            return
        if op == "utimens" and not self.ctx.readonly and node is not None and node.touch(rest):
            return
        raise self.ctx.refusal(op, path, "modes, owners, times and attributes are LXD's")

    def getxattr(self, path: str, name: str) -> bytes:
        if not name.startswith(USER):  # security.selinux, system.posix_acl_*: asked by ls -l of every entry
            self.getattr(path)
            raise fs_error(errno.ENODATA, path)
        value = self.listxattrs(path).get(name)
        if value is None:
            raise fs_error(errno.ENODATA, path)
        return value

    def listxattrs(self, path: str) -> dict[str, bytes]:
        node, rest = self._node(path)
        if node is None:
            return {}
        return node.xattrs(rest)

    def setxattr(self, path: str, name: str, value: bytes | None, flags: int = 0) -> None:
        """Set (value None: remove) an extended attribute, where a node keeps them; else as chmod."""
        self.getattr(path)
        node, rest = self._node(path)
        if node is not None and not node.read_only and not self.ctx.readonly \
                and node.set_xattr(rest, name, value, flags):
            return
        self.set_attributes(path, "setxattr" if value is not None else "removexattr")
