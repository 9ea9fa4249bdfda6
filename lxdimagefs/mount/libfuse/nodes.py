"""The kernel's node ids of a low-level connection, and the paths they stand for.

A low-level file system names each file to the kernel by a node id of its own, which the kernel
holds (a lookup count) until it forgets it; the ids here are never reused, so no generation
number is needed.
"""

from __future__ import annotations

import errno
import threading

from lxdimagefs.errors import fs_error
from lxdimagefs.mount.libfuse.lowlevel import ROOT


class Nodes:
    """The kernel's node ids and the paths they stand for, with the lookups it holds of each.

    A path's node is found by its key (the path, or more where a new node should stand for a
    path whose answer changed). A node the kernel forgets goes; one it learns of again in a
    reply made meanwhile (a lookup racing the forget) is put back by `looked_up`.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, tuple[str, str]] = {ROOT: ("/", "/")}  # node -> (path, key)
        self._ids: dict[str, int] = {"/": ROOT}
        self._counts: dict[int, int] = {}
        self._next = ROOT + 1
        self._lock = threading.Lock()

    def path(self, node: int) -> str:
        try:
            return self._nodes[node][0]
        except KeyError:
            raise fs_error(errno.ESTALE, f"node {node}") from None

    def known(self, key: str) -> int | None:
        return self._ids.get(key)

    def node(self, path: str, key: str | None = None) -> int:
        with self._lock:
            node = self._ids.get(key or path)
            if node is None:
                node, self._next = self._next, self._next + 1
                self._ids[key or path], self._nodes[node] = node, (path, key or path)
            return node

    def looked_up(self, nodes: list[tuple[int, str, str | None]]) -> None:
        """The kernel holds one more lookup of each (node, path, key)."""
        with self._lock:
            for node, path, key in nodes:
                left = self._counts.get(node, 0) + 1
                if node not in self._nodes:  # forgotten while the reply naming it was made
                    self._nodes[node] = (path, key or path)
                    self._ids.setdefault(key or path, node)
                if left == 0 and node != ROOT:  # its FORGET came first (the reply taken, then let go)
                    self._drop(node)
                else:
                    self._counts[node] = left

    def forget(self, node: int, count: int) -> None:
        """Below 0: it forgets lookups of replies not counted yet (`looked_up` is on its way),
        so the node stays until they are (before: put back for good, found by review)."""
        with self._lock:
            left = self._counts.get(node, 0) - count
            if left != 0 or node == ROOT:
                self._counts[node] = left
                return
            self._drop(node)

    def _drop(self, node: int) -> None:
        self._counts.pop(node, None)
        _path, key = self._nodes.pop(node, ("", ""))
        if self._ids.get(key) == node:
            del self._ids[key]

    def under(self, path: str) -> list[int]:
        """The nodes of `path` and of everything below it."""
        with self._lock:
            return [n for n, (p, _) in self._nodes.items() if p == path or p.startswith(path + "/")]

    def within(self, level: int) -> list[int]:
        """The nodes at most `level` names deep (the root: 0)."""
        with self._lock:
            return [n for n, (p, _) in self._nodes.items() if (p != "/") * p.count("/") <= level]
