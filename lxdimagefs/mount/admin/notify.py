"""systemd's readiness protocol (sd_notify(3)) for `Type=notify` under `-f`: READY=1 once the mount
answers a listing, STATUS= with what it serves, STOPPING=1 at the real exit. The protocol is one
datagram to the unix socket $NOTIFY_SOCKET names (abstract when it starts with `@`): a few lines,
no library (the Python ones are unmaintained wrappers of these lines).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STATUS_EVERY = 10.0  # seconds between STATUS= updates while serving


def notify(message: str) -> bool:
    """Send `message` (KEY=VALUE lines) to systemd; False when no socket is set or it is gone."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), address)
    except OSError as e:
        log.debug("NOTIFY_SOCKET: %s", e.strerror)
        return False
    return True


def listed(mountpoint: str) -> int:
    """The images the mount lists, found through the mount itself (a remote's or project's folder
    holds a by-fingerprint/ of its own): listing is what proves the mount answers."""
    count, folders = 0, [mountpoint]
    for _depth in range(3):
        deeper = []
        for folder in folders:
            names = os.listdir(folder)
            if "by-fingerprint" in names:
                count += len(os.listdir(os.path.join(folder, "by-fingerprint")))
            else:
                deeper += [os.path.join(folder, n) for n in names]
        folders = [f for f in deeper if os.path.isdir(f) and not os.path.islink(f)]
    return count


class Readiness:
    """Tells systemd the mount is ready once it lists, then what it serves every STATUS_EVERY s."""

    def __init__(self, mountpoint: str, status: Callable[[], str]) -> None:
        self.mountpoint, self.status = mountpoint, status
        self._stop = threading.Event()
        self._started = False

    def start(self) -> None:
        """In the foreground only: the daemon that forks is the one systemd must not wait for."""
        if os.environ.get("NOTIFY_SOCKET"):
            self._started = True
            threading.Thread(target=self._run, name="sd_notify", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():  # the folder lists before the mount is there: wait for it
            try:
                if os.path.ismount(self.mountpoint):
                    images = listed(self.mountpoint)
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            return
        notify(f"READY=1\nSTATUS={self._status(images)}\nMAINPID={os.getpid()}")
        # Later, what the daemon holds: listing through the mount again would hold it open, and an
        # unmount meanwhile would fail with EBUSY.
        while not self._stop.wait(STATUS_EVERY):
            notify(f"STATUS={self.status()}")

    def _status(self, images: int) -> str:
        return f"{images} images; {self.status()}"

    def stopping(self) -> None:
        self._stop.set()
        if self._started:
            notify("STOPPING=1")
