"""What the kernel of a low-level connection is told to drop, and when.

Never from a request's thread (the kernel may hold, for the request, what a drop waits on): one
thread of its own does it. A change is dropped at once and once more SETTLE seconds later, for an
answer made before the change that the kernel took in after it (it keeps what it parses after a
drop). What can change without anyone saying so is dropped every `every` seconds.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable

from lxdimagefs.mount.libfuse.lowlevel import Connection
from lxdimagefs.mount.libfuse.nodes import Nodes

SETTLE = 0.1  # seconds for the kernel to take in an answer before what it keeps of it is dropped
EVERY = 1.0  # at least as long between sweeps (`-o entry_timeout=0` spun a core: found by review)


class Drops:
    def __init__(self, connection: Connection, nodes: Nodes, forgotten: Callable[[int], None]) -> None:
        self.connection, self.nodes, self.forgotten = connection, nodes, forgotten  # forgotten: ours too
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()

    def start(self, every: float, level: int) -> None:
        """From now on; the nodes at most `level` names deep dropped every `every` seconds."""
        threading.Thread(target=self._drain, daemon=True, name="inside-drop").start()
        threading.Thread(target=self._sweep, args=(every, level), daemon=True, name="inside-sweep").start()

    def node(self, node: int) -> None:
        """A node's pages, listing and attributes, once the answer being sent is taken in."""
        self._later(functools.partial(self.connection.drop, node))

    def path(self, path: str, entry: bool) -> None:
        """`path`'s name and all the kernel keeps below it (with `entry`); else its listing alone:
        a folder whose names changed (by-fingerprint/) keeps what is below the names that did
        not (another image's pages: they went at each import elsewhere, found by review)."""
        self._queue.put(functools.partial(self._drop, path, entry, entry))
        self._later(functools.partial(self._drop, path, False, entry))

    def _drop(self, path: str, entry: bool, below: bool) -> None:
        folder, _, name = path.rpartition("/")
        parent = self.nodes.known(folder or "/")
        if entry and parent is not None:
            self.connection.forget_name(parent, os.fsencode(name))
        for node in self.nodes.under(path) if below else [n for n in [self.nodes.known(path)] if n]:
            self.forgotten(node)
            self.connection.drop(node)

    def _later(self, drop: Callable[[], None]) -> None:
        timer = threading.Timer(SETTLE, self._queue.put, args=(drop,))
        timer.daemon = True
        timer.start()

    def _drain(self) -> None:
        while True:
            self._queue.get()()

    def _sweep(self, every: float, level: int) -> None:
        while True:
            time.sleep(max(every, EVERY))
            for node in self.nodes.within(level):
                self._queue.put(functools.partial(self.connection.drop, node))
