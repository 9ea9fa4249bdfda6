"""A remote LXD over HTTPS with a TLS client certificate, on the loopback address."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest
from mounts import unmount

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keypair(folder, name: str) -> tuple[str, str]:
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return str(crt), str(key)


@pytest.fixture(scope="module")
def remote(sandbox, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    port = _free_port()
    sandbox.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
    crt, key = _keypair(folder, "lxdimagefs-test")
    sandbox.lxc("config", "trust", "add", crt)
    untrusted = _keypair(folder, "stranger")
    try:
        yield {"url": f"https://127.0.0.1:{port}", "cert": crt, "key": key, "untrusted": untrusted,
               "server_cert": str(sandbox.lxd_dir / "server.crt")}
    finally:
        sandbox.lxc("config", "unset", "core.https_address", check=False)


def _mount(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    where = tmp_path / "mnt"
    where.mkdir(exist_ok=True)
    log = tmp_path / "log"
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--debug", "--log-file", str(log), *args,
                           str(where)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return done, str(where)


def test_https_with_a_client_certificate_and_a_pinned_server(remote, images, tmp_path):
    done, where = _mount(tmp_path, "--url", remote["url"], "--cert", remote["cert"], "--key", remote["key"],
                         "--server-cert", remote["server_cert"])
    try:
        assert done.returncode == 0, done.stderr
        assert set(images.fps.values()) <= set(os.listdir(f"{where}/by-fingerprint"))
        fp = images.fps["plain"]
        data = open(f"{where}/by-fingerprint/{fp}/{fp}.tar", "rb").read()  # noqa: SIM115
        assert hashlib.sha256(data).hexdigest() == fp
    finally:
        unmount(tmp_path / "mnt")
    log = (tmp_path / "log").read_text()
    key_body = "".join(open(remote["key"]).read().splitlines()[1:-1])  # noqa: SIM115
    assert key_body[:40] not in log
    assert "BEGIN" not in log


def test_an_import_over_https_is_sent_in_chunks_and_created(remote, sandbox, tmp_path):
    """The upload's body over TLS (no sendmsg there: each chunk and its framing sent in turn)."""
    from lxd_sandbox import make_unified

    tarball = make_unified(tmp_path / "over-https.tar", rootfs_bytes=(3 << 20) + 4321)
    fp = hashlib.sha256(tarball.read_bytes()).hexdigest()
    done, where = _mount(tmp_path, "--url", remote["url"], "--cert", remote["cert"], "--key", remote["key"],
                         "--server-cert", remote["server_cert"])
    try:
        assert done.returncode == 0, done.stderr
        subprocess.run(["cp", str(tarball), f"{where}/import/"], check=True)
        assert fp in os.listdir(f"{where}/by-fingerprint")
        assert sandbox.rest(f"/1.0/images/{fp}")["filename"] == "over-https.tar"
    finally:
        unmount(tmp_path / "mnt")
        sandbox.lxc("image", "delete", fp, check=False)


def test_relative_certificate_paths_work_after_the_daemon_leaves_its_folder(remote, images, tmp_path):
    folder = os.path.dirname(remote["cert"])
    where = tmp_path / "mnt"
    where.mkdir()
    relative = ["--cert", os.path.basename(remote["cert"]), "--key", os.path.basename(remote["key"])]
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--url", remote["url"], *relative,
                           "--server-cert", os.path.relpath(remote["server_cert"], folder), str(where)],
                          capture_output=True, text=True, timeout=60, cwd=folder, stdin=subprocess.DEVNULL)
    try:
        assert done.returncode == 0, done.stderr
        fp = images.fps["plain"]
        with open(where / "by-fingerprint" / fp / f"{fp}.tar", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == fp
    finally:
        unmount(where)


def test_https_is_verified_by_default(remote, tmp_path):
    done, where = _mount(tmp_path, "--url", remote["url"], "--cert", remote["cert"], "--key", remote["key"])
    assert done.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr or "certificate verify failed" in done.stderr
    assert not os.path.ismount(where)


def test_an_untrusted_client_sees_only_public_images(remote, sandbox, images, tmp_path):
    fp = images.fps["gz"]
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": True})
    crt, key = remote["untrusted"]
    try:
        done, where = _mount(tmp_path, "--url", remote["url"], "--cert", crt, "--key", key,
                             "--server-cert", remote["server_cert"])
        assert done.returncode == 0, done.stderr
        try:
            assert os.listdir(f"{where}/by-fingerprint") == [fp]
        finally:
            unmount(tmp_path / "mnt")
        assert "does not trust this client" in (tmp_path / "log").read_text()
    finally:
        sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": False})


def test_a_different_pinned_certificate_is_refused(remote, tmp_path):
    done, where = _mount(tmp_path, "--url", remote["url"], "--cert", remote["cert"], "--key", remote["key"],
                         "--server-cert", remote["untrusted"][0])
    assert done.returncode == 1
    assert "ingerprint" in done.stderr
    assert not os.path.ismount(where)
