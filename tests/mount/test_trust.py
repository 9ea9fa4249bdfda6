"""--trust-token: a new machine joins a server as `lxc remote add NAME TOKEN` does.

A private LXD of the module's own listens on HTTPS (one more daemon: about
2 s); each test has a fresh lxc configuration folder (LXD_CONF) of its own,
as a new user or a new machine has.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lxd_sandbox import Sandbox, make_unified
from mounts import unmount, wait_mounted

pytestmark = pytest.mark.lxd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, str]]:
    box = Sandbox.start()
    try:
        box.lxc("config", "set", "core.https_address", f"127.0.0.1:{_free_port()}")
        fp = box.import_image(make_unified(tmp_path_factory.mktemp("trust") / "t.tar"), alias="over-https")
        yield box, fp
    finally:
        box.stop()


def token(box: Sandbox) -> str:
    out = box.lxc("config", "trust", "add", "--name", "newcomer", "--quiet").stdout.decode()
    return out.strip().splitlines()[-1]


@pytest.fixture
def user(tmp_path: Path) -> dict[str, str]:
    """A user with no lxc configuration yet (and no Incus one)."""
    env = {**os.environ, "LXD_CONF": str(tmp_path / "lxc"), "INCUS_CONF": str(tmp_path / "no-incus")}
    env.pop("LXD_DIR", None)
    env.pop("LXD_SOCKET", None)
    return env


def lxdimagefs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxdimagefs", *args], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_token_joins_pins_records_and_is_never_logged(server, user, tmp_path):
    box, fp = server
    conf, where, log = Path(user["LXD_CONF"]), tmp_path / "mnt", tmp_path / "debug.log"
    where.mkdir()
    text = token(box)
    secret = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))["secret"]
    done = lxdimagefs(user, "--trust-token", text, "--debug", "--log-file", str(log), "joined", str(where))
    assert done.returncode == 0, done.stderr
    try:
        wait_mounted(where, timeout=1)
        data = (where / "by-alias" / "over-https" / f"{fp}.tar").read_bytes()  # over HTTPS, trusted
        assert hashlib.sha256(data).hexdigest() == fp
    finally:
        unmount(where)
    # A client certificate where lxc keeps one, its key private; the server's pinned; the remote recorded.
    assert (conf / "client.crt").exists() and (conf / "client.key").stat().st_mode & 0o077 == 0
    server_pem = box.lxd_dir.joinpath("server.crt").read_text()
    assert (conf / "servercerts" / "joined.crt").read_text().strip() == server_pem.strip()
    remote = yaml.safe_load((conf / "config.yml").read_text())["remotes"]["joined"]
    address = box.lxc("config", "get", "core.https_address").stdout.decode().strip()
    assert remote["addr"] == f"https://{address}"
    trusted = box.rest("/1.0/certificates?recursion=1")
    ours = hashlib.sha256(_der(conf / "client.crt")).hexdigest()
    assert ours in [c["fingerprint"] for c in trusted]
    # lxc and a later mount need no token.
    listed = subprocess.run(["lxc", "image", "list", "joined:", "--format", "csv", "-c", "F"], env=user,
                            capture_output=True, text=True, check=True).stdout.split()
    assert fp in listed
    again = lxdimagefs(user, "--debug", "--log-file", str(log), "joined", str(where))
    assert again.returncode == 0, again.stderr
    try:
        wait_mounted(where, timeout=1)
        assert fp in os.listdir(where / "by-fingerprint")
    finally:
        unmount(where)
    # The token and its secret are in no log line, not even with --debug.
    written = log.read_text()
    assert "POST /certificates" in written  # the debug log did record the request
    assert text not in written and secret not in written and text[:40] not in written
    assert secret not in done.stderr + done.stdout


def test_a_used_token_is_one_line_and_exit_1(server, user, tmp_path):
    box, _ = server
    text = token(box)
    first, second = dict(user), {**user, "LXD_CONF": str(tmp_path / "other-machine")}
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    done = lxdimagefs(first, "--trust-token", text, "once", str(tmp_path / "m1"))
    assert done.returncode == 0, done.stderr
    unmount(tmp_path / "m1")
    used = lxdimagefs(second, "--trust-token", text, "twice", str(tmp_path / "m2"))
    assert used.returncode == 1
    assert used.stderr.count("\n") == 1 and "refused the trust token" in used.stderr
    assert text not in used.stderr
    assert not os.path.ismount(tmp_path / "m2")
    assert not (tmp_path / "other-machine" / "config.yml").exists()  # nothing recorded


@pytest.mark.parametrize("mangle, message", [
    (lambda t: "not-a-token", "not a trust token"),
    (lambda t: _with(t, secret="0" * 64), "refused the trust token"),
    (lambda t: _with(t, fingerprint="ab" * 32), "not the one the token names"),
])
def test_a_wrong_token_is_one_line_and_exit_1(server, user, tmp_path, mangle, message):
    box, _ = server
    where = tmp_path / "mnt"
    where.mkdir()
    done = lxdimagefs(user, "--trust-token", mangle(token(box)), "wrong", str(where))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not os.path.ismount(where)
    assert not (Path(user["LXD_CONF"]) / "config.yml").exists()


def test_an_existing_client_certificate_is_kept(server, user, tmp_path):
    box, _ = server
    conf = Path(user["LXD_CONF"])
    conf.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1",
                    "-nodes", "-keyout", str(conf / "client.key"), "-out", str(conf / "client.crt"),
                    "-subj", "/CN=someone", "-days", "2"], capture_output=True, check=True)
    (conf / "config.yml").write_text("default-remote: mine\nremotes:\n  mine:\n    addr: unix:///nowhere\n")
    before = (conf / "client.crt").read_bytes()
    (tmp_path / "mnt").mkdir()
    text = token(box)
    taken = lxdimagefs(user, "--trust-token", text, "mine", str(tmp_path / "mnt"))  # a name lxc has
    assert taken.returncode == 1 and taken.stderr.count("\n") == 1 and "exists already" in taken.stderr
    done = lxdimagefs(user, "--trust-token", text, "kept", str(tmp_path / "mnt"))  # the token is unspent
    assert done.returncode == 0, done.stderr
    unmount(tmp_path / "mnt")
    assert (conf / "client.crt").read_bytes() == before
    config = yaml.safe_load((conf / "config.yml").read_text())
    assert config["default-remote"] == "mine" and sorted(config["remotes"]) == ["kept", "mine"]


def _with(text: str, **fields: str) -> str:
    raw = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))
    raw.update(fields)
    return base64.b64encode(json.dumps(raw).encode()).decode()


def _der(pem: Path) -> bytes:
    import ssl
    return ssl.PEM_cert_to_DER_cert(pem.read_text())
