"""by-alias/: one relative symlink per alias; ln -s, rm, mv and ln -sfn change them in LXD."""

from __future__ import annotations

import errno
import posixpath
import stat
from typing import NoReturn

from lxdimagefs.errors import fs_error
from lxdimagefs.fs.node import Attr, Context, Node, check_name
from lxdimagefs.names import filename_to_alias, fits, valid
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.tree.images import FP_DIR, ImagesNode

ALIAS_DIR = "by-alias"


class AliasesNode(Node):
    """Stateless beyond the catalog: every change goes to LXD at once."""

    def __init__(self, ctx: Context, catalog: Catalog, images: ImagesNode) -> None:
        super().__init__(ctx, ALIAS_DIR)
        self.catalog = catalog
        self.images = images

    def getattr(self, rest: list[str]) -> Attr:
        t = self.ctx.started
        if not rest:
            return self.ctx.dir(t, writable=True)
        target = self.readlink(rest)
        return Attr(stat.S_IFLNK | 0o777, len(target.encode()), t, t, t)

    def readdir(self, rest: list[str]) -> list[str]:
        if rest:
            self.getattr(rest)
            raise fs_error(errno.ENOTDIR, self.path(rest))
        return sorted(self.catalog.listing().aliases)

    def readlink(self, rest: list[str]) -> str:
        if len(rest) == 1 and fits(rest[0]) and valid(rest[0]):
            fp = self.catalog.alias_target(rest[0])
            if fp is not None:
                return f"../{FP_DIR}/{fp}"
        if not rest:
            raise fs_error(errno.EINVAL, self.path(rest))
        raise fs_error(errno.ENOENT, self.path(rest))

    def open(self, rest: list[str], flags: int, pid: int) -> NoReturn:
        raise fs_error(errno.ENOENT, self.path(rest))

    def _target(self, content: str, path: str) -> str:
        """The fingerprint a symlink's content names: an image folder, a prefix or an alias."""
        mountpoint = self.ctx.mountpoint
        if content.startswith("/"):
            if not mountpoint or not content.startswith(mountpoint + "/"):
                raise self.ctx.refuse(errno.EINVAL, "symlink", path, f"target {content} is outside the mount")
            rel = "/" + content[len(mountpoint) + 1:]
        else:
            rel = posixpath.join("/" + ALIAS_DIR, content)
        parts = [p for p in posixpath.normpath(rel).split("/") if p]
        if len(parts) == 2 and parts[0] == FP_DIR:
            return self.images.image(parts[1], path).fingerprint
        if len(parts) == 2 and parts[0] == ALIAS_DIR:
            fp = self.catalog.snapshot().aliases.get(parts[1])
            if fp is not None:
                return fp
            if "/" not in content:  # `ln -s <fingerprint> by-alias/NAME`
                return self.images.image(content, path).fingerprint
            raise fs_error(errno.ENOENT, path, f"no alias {parts[1]}")
        raise self.ctx.refuse(errno.EINVAL, "symlink", path, f"target {content} is not an image of the mount")

    def symlink(self, rest: list[str], target: str) -> None:
        if len(rest) != 1:
            super().symlink(rest, target)
        path = self.path(rest)
        check_name(rest[0], path)
        self.catalog.invalidate()
        fp = self._target(target, path)
        if rest[0] in self.catalog.snapshot().aliases:
            raise fs_error(errno.EEXIST, path)
        self.catalog.server.add_alias(filename_to_alias(rest[0]), fp)
        self.catalog.invalidate()

    def unlink(self, rest: list[str], pid: int = 0) -> None:
        self.catalog.server.delete_alias(filename_to_alias(rest[0]))
        self.catalog.invalidate()

    def rename(self, src: list[str], dst: list[str], pid: int) -> None:
        if len(src) != 1 or len(dst) != 1:
            super().rename(src, dst, pid)
        check_name(dst[0], self.path(dst))
        self.catalog.invalidate()
        aliases = self.catalog.snapshot().aliases
        old, new = filename_to_alias(src[0]), filename_to_alias(dst[0])
        if src[0] not in aliases:
            raise fs_error(errno.ENOENT, self.path(dst))
        if dst[0] in aliases:  # `mv a b` onto an existing b, and `ln -sfn`: b now points where a did
            self.catalog.server.retarget_alias(new, aliases[src[0]])
            self.catalog.server.delete_alias(old)
        else:
            self.catalog.server.rename_alias(old, new)
        self.catalog.invalidate()
