"""Real mounts for the tests: lxdimagefs as a child process we own, stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lxd_sandbox import Sandbox


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"lxdimagefs exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    raise TimeoutError(f"{path} was not mounted within {timeout}s")


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount", "-u", str(path)], check=False)
        if os.path.ismount(path):
            subprocess.run(["fusermount", "-uz", str(path)], check=False)


@contextlib.contextmanager
def mounted(sandbox: Sandbox, where: Path, *args: str, server: tuple[str, ...] = ()) -> Iterator[Mount]:
    """lxdimagefs in the foreground, as a child we own and stop by its pid (on the socket, or `server`)."""
    where.mkdir(parents=True, exist_ok=True)
    log = where.parent / f"{where.name}.log"
    if "--cache-dir" not in args:  # spools and the layout journal go with the test's own files
        args = ("--cache-dir", str(where.parent), *args)
    where_from = server or ("--socket", sandbox.socket)
    proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--debug", *where_from,
                             "--log-file", str(log), *args, str(where)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    inside = None
    try:
        wait_mounted(where, proc)
        inside = inside_of(where)
        yield Mount(where, proc, log)
    finally:
        stop(where, proc, inside)


def socket_mounted(sandbox: Sandbox, where: Path, *args: str) -> contextlib.AbstractContextManager[Mount]:
    """A mount that reads LXD's socket, never the server's own files (the daemon, as root, reads
    them in place by default: tests/data/test_localreads.py): for tests that judge the socket's path."""
    return mounted(sandbox, where, "-o", "nolocal", *args)


def inside_of(where: Path) -> Path | None:
    """Where contents' own connection (mount/inside.py) of a live mount is mounted (asked of the mount:
    only while its daemon answers)."""
    try:
        return Path(os.readlink(where / "contents")).parent
    except OSError:
        return None


def stop(where: Path, proc: subprocess.Popen, inside: Path | None = None) -> None:
    """Unmount, then wait for the daemon to exit (it should at once); killed by its pid if not, and
    then contents' own connection, `inside`, unmounted too."""
    unmount(where)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if inside is not None:
        unmount(inside)


def alias_made_elsewhere_shows(sandbox: Sandbox, m: Mount, fp: str, name: str, within: float = 1.0) -> None:
    """The server's own client makes an alias; the mount must list it within `within` seconds."""
    sandbox.lxc("image", "alias", "create", name, fp)
    try:
        started = time.monotonic()
        while name not in os.listdir(m.path / "by-alias"):
            assert time.monotonic() - started < within, f"{name} not visible within {within} s"
            time.sleep(0.01)
    finally:
        sandbox.lxc("image", "alias", "delete", name)
