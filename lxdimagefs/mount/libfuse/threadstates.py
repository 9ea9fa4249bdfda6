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
    it. libfuse ends idle workers beyond max_idle_threads without telling us: when the states
    kept pass twice the number left after the last sweep (32 at least), those of workers
    whose thread id is gone are deleted. A thread id is looked up one by one (a listing of
    /proc/self/task can miss a live thread while another exits), under one lock with every
    registration (an id is reused at once: the new worker's state replaces the old).
    """

    SWEEP_AT = 32

    def __init__(self) -> None:
        self._kept: dict[int, int] = {}  # native thread id -> its PyThreadState*
        self._mine = threading.local()  # lives in the thread state: set once it is kept
        self._main = threading.get_ident()  # `-s`: libfuse calls on Python's own main thread
        self._lock = threading.Lock()
        self._sweep_at = self.SWEEP_AT
        api = ctypes.pythonapi
        api.PyGILState_Ensure.restype, api.PyThreadState_Get.restype = ctypes.c_int, ctypes.c_void_p
        api.PyThreadState_Clear.argtypes = api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
        os.register_at_fork(after_in_child=self._kept.clear)  # the child has no other thread

    def keep(self) -> None:
        if getattr(self._mine, "kept", False) or threading.get_ident() == self._main:
            return
        self._mine.kept = True  # one try per thread: on failure, ctypes' state per call as before
        try:
            self._keep(threading.get_native_id())
        except Exception:  # never into libfuse's answer to this call
            log.exception("keeping a libfuse worker's Python thread state failed")

    def _keep(self, me: int) -> None:
        api = ctypes.pythonapi
        with self._lock:
            sweep = len(self._kept) >= self._sweep_at
            ended = [tid for tid in list(self._kept)
                     if tid == me or (sweep and not os.path.exists(f"/proc/self/task/{tid}"))]
            for tid in ended:  # no thread uses these: a state under our own id is a dead one's
                state = self._kept.pop(tid, None)
                if state is not None:
                    api.PyThreadState_Clear(state)
                    api.PyThreadState_Delete(state)
            if sweep:
                self._sweep_at = max(self.SWEEP_AT, 2 * len(self._kept))
            if ended:
                log.debug("deleted the Python thread states of %d ended libfuse workers", len(ended))
            api.PyGILState_Ensure()  # ctypes' release after this callback leaves the state alive
            self._kept[me] = api.PyThreadState_Get()


KEPT = ThreadStates()
