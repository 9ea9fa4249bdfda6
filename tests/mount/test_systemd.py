"""Under systemd: readiness told through $NOTIFY_SOCKET, and the unit files shipped with the package."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mounts import stop

import lxdimagefs.mount

UNITS = Path(lxdimagefs.mount.__file__).parent / "systemd"


def messages(sock: socket.socket, timeout: float = 20) -> list[str]:
    sock.settimeout(timeout)
    return sock.recv(4096).decode().split("\n")


@pytest.mark.lxd
@pytest.mark.parametrize("abstract", [False, True])
def test_ready_only_once_the_mount_lists_then_stopping_at_exit(sandbox, images, tmp_path, abstract):
    where = tmp_path / "mnt"
    where.mkdir()
    address = f"@lxdimagefs-test-{os.getpid()}-{tmp_path.name}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + address[1:] if abstract else address)
        proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--socket", sandbox.socket,
                                 "--cache-dir", str(tmp_path), str(where)],
                                env={**os.environ, "NOTIFY_SOCKET": address},
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            said = messages(sock)
            # Told ready: the mount is there and lists the server's images at that moment.
            assert "READY=1" in said, said
            assert os.path.ismount(where)
            assert images.fps["gz"] in os.listdir(where / "by-fingerprint")
            status = next(m for m in said if m.startswith("STATUS="))
            assert " images" in status and "from " in status, status
            assert f"MAINPID={proc.pid}" in said
        finally:
            stop(where, proc)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        sock.settimeout(5)
        rest = []
        while "STOPPING=1" not in rest:
            rest = messages(sock, 5)  # STATUS= updates may come first
        assert "STOPPING=1" in rest


def test_no_notify_socket_no_message(tmp_path, monkeypatch):
    from lxdimagefs.mount.admin.notify import notify
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not notify("READY=1")  # systemd went away: the daemon serves on


@pytest.mark.parametrize("unit", ["lxdimagefs@.service", "srv-images.mount"])
def test_shipped_units_verify(unit, tmp_path):
    """systemd-analyze checks the units as systemd would load them (offline: no systemd runs here).
    The service names `lxdimagefs` as systemd's own PATH finds it: here, a stand-in that runs it."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/install.sh installs systemd"
    name = unit.replace("@.", "@local.")
    text = (UNITS / unit).read_text()
    command = tmp_path / "lxdimagefs"  # where pip put it depends on the environment: a stand-in
    command.write_text(f"#!/bin/sh\nexec {sys.executable} -m lxdimagefs \"$@\"\n")
    command.chmod(0o755)
    (tmp_path / name).write_text(text.replace("ExecStart=lxdimagefs ", f"ExecStart={command} "))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lxdimagefs" in text
