"""Python thread states for the threads libfuse starts.

A callback on a thread Python did not start runs in a thread state ctypes
makes for it and deletes after it (PyGILState_Ensure / PyGILState_Release):
per request, a state and its 16 KiB frame stack mapped, then unmapped. That
was a third of the daemon's CPU for an `open` and `release` inside an image
(docs/PERFORMANCE.md, "The cost of a request").
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)


class ThreadStates:
    """One Python thread state per libfuse worker, kept for the worker's life.

    A worker's first callback takes one more hold on its state, so the ones after it reuse
    it. libfuse ends idle workers beyond max_idle_threads without telling us: the states of
    ended workers are deleted when the next worker keeps its own (so at most max_threads are
    ever kept).
    """

    def __init__(self) -> None:
        self._kept: dict[int, int] = {}  # native thread id -> its PyThreadState*
        self._mine = threading.local()  # lives in the thread state: set once it is kept
        self._main = threading.get_ident()  # `-s`: libfuse calls on Python's own main thread
        api = ctypes.pythonapi
        api.PyGILState_Ensure.restype, api.PyThreadState_Get.restype = ctypes.c_int, ctypes.c_void_p
        api.PyThreadState_Clear.argtypes = api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]

    def keep(self) -> None:
        if getattr(self._mine, "kept", False) or threading.get_ident() == self._main:
            return
        self._mine.kept = True
        api = ctypes.pythonapi
        me = threading.get_native_id()  # a state kept under this id is an ended worker's
        alive = {int(tid) for tid in os.listdir("/proc/self/task")} - {me}
        ended = [tid for tid in self._kept if tid not in alive]
        for tid in ended:  # the GIL is held: no other callback runs meanwhile
            state = self._kept.pop(tid)
            api.PyThreadState_Clear(state)
            api.PyThreadState_Delete(state)
        if ended:
            log.debug("deleted the Python thread states of %d ended libfuse workers", len(ended))
        api.PyGILState_Ensure()  # ctypes' release after this callback leaves the state alive
        self._kept[me] = api.PyThreadState_Get()


KEPT = ThreadStates()
