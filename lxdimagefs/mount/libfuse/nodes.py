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
    """The kernel's node ids and the paths they stand for, with the lookups it holds of each."""

    def __init__(self) -> None:
        self._paths: dict[int, str] = {ROOT: "/"}
        self._ids: dict[str, int] = {"/": ROOT}
        self._counts: dict[int, int] = {}
        self._next = ROOT + 1
        self._lock = threading.Lock()

    def path(self, node: int) -> str:
        try:
            return self._paths[node]
        except KeyError:
            raise fs_error(errno.ESTALE, f"node {node}") from None

    def known(self, path: str) -> int | None:
        return self._ids.get(path)

    def node(self, path: str) -> int:
        with self._lock:
            node = self._ids.get(path)
            if node is None:
                node, self._next = self._next, self._next + 1
                self._ids[path], self._paths[node] = node, path
            return node

    def looked_up(self, nodes: list[int]) -> None:
        with self._lock:
            for node in nodes:
                self._counts[node] = self._counts.get(node, 0) + 1

    def forget(self, node: int, count: int) -> None:
        with self._lock:
            left = self._counts.get(node, 0) - count
            if left > 0 or node == ROOT:
                self._counts[node] = left
                return
            self._counts.pop(node, None)
            path = self._paths.pop(node, None)
            if path is not None and self._ids.get(path) == node:
                del self._ids[path]

    def under(self, path: str) -> list[int]:
        with self._lock:
            return [n for p, n in self._ids.items() if p == path or p.startswith(path + "/")]
