"""`--trust-token TOKEN`: join a server as `lxc remote add NAME TOKEN` does.

The token (`lxc config trust add`) is base64 JSON naming the server's
certificate fingerprint, its addresses and a one-time secret. The server's
certificate is pinned by that fingerprint before anything is sent; the
client certificate (made, as lxc makes it, where the lxc client keeps its
own, if the user has none) is then trusted by the server in exchange for
the secret, and the remote is recorded in lxc's config.yml, so that later
mounts and `lxc` need no token. The token and its secret are never logged.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lxdimagefs.errors import LXDError
from lxdimagefs.mount.remotes import Remote, client_dirs
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.wire.transport import Connection

log = logging.getLogger(__name__)


class TrustError(Exception):
    """The token could not be used; the message is one line for the user, without the token."""


@dataclass(frozen=True, repr=False)  # repr=False: the secret never shows in a traceback or a log
class Token:
    fingerprint: str
    addresses: tuple[str, ...]
    secret: str
    client_name: str = ""

    @classmethod
    def parse(cls, text: str) -> Token:
        try:
            raw = json.loads(base64.b64decode(text.strip() + "=" * (-len(text.strip()) % 4), validate=False))
            token = cls(str(raw["fingerprint"]).lower(), tuple(str(a) for a in raw["addresses"]),
                        str(raw["secret"]), str(raw.get("client_name") or ""))
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise TrustError("this is not a trust token from `lxc config trust add`") from None
        if not token.addresses or not token.secret or len(token.fingerprint) != 64:
            raise TrustError("this trust token names no server address, certificate or secret")
        return token


def join(name: str, text: str, timeout: float = 10.0) -> Remote:
    """Have the server the token names trust this user's client certificate; record it as `name`."""
    text = text.strip()
    token = Token.parse(text)
    conf = lxc_dir()
    if name in _remotes(conf):
        raise TrustError(f"a remote named {name} exists already in {conf / 'config.yml'}")
    address, server_pem = _server(token, timeout)
    crt, key = client_pair(conf)
    url = f"https://{address}"
    client = LXDClient(Connection(url=url, cert=(crt, key), pinned=token.fingerprint,
                                  timeout=(timeout, timeout)))
    client.patience = timeout  # for the GETs; the token itself is sent once
    try:
        if client.server_info().get("auth") != "trusted":
            client.trust_with_token(text)
        if client.server_info().get("auth") != "trusted":
            raise TrustError(f"{url} took the token but does not trust this client")
    except LXDError as e:
        raise TrustError(f"{url} refused the trust token (used, expired or wrong): {e.message}") from None
    (conf / "servercerts").mkdir(mode=0o700, parents=True, exist_ok=True)
    (conf / "servercerts" / f"{name}.crt").write_text(server_pem)
    _record(conf, name, url)
    log.info("joined %s as remote %s; the client certificate is %s", url, name, crt)
    return Remote(name, url, "lxd", False, conf)


def lxc_dir() -> Path:
    """The lxc client's folder: the first that exists (with its config or certificate), else the first."""
    dirs = client_dirs("lxc")
    return next((d for d in dirs if (d / "config.yml").exists() or (d / "client.crt").exists()), dirs[0])


def _server(token: Token, timeout: float) -> tuple[str, str]:
    """The first address that answers with the certificate the token names, and that certificate."""
    seen = []
    for address in token.addresses:
        parts = urllib.parse.urlsplit(f"https://{address}")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # checked by fingerprint below
        try:
            with socket.create_connection((parts.hostname, parts.port or 8443), timeout) as sock, \
                    ctx.wrap_socket(sock, server_hostname=parts.hostname) as tls:
                der = tls.getpeercert(binary_form=True) or b""
        except OSError as e:
            seen.append(f"{address}: {e}")
            continue
        if hashlib.sha256(der).hexdigest() == token.fingerprint:
            return address, ssl.DER_cert_to_PEM_cert(der)
        seen.append(f"{address}: its certificate is not the one the token names")
    raise TrustError("no address in the trust token answers as its server (" + "; ".join(seen) + ")")


def client_pair(conf: Path) -> tuple[str, str]:
    """The user's client certificate and key in `conf`, made as lxc makes them if there are none."""
    crt, key = conf / "client.crt", conf / "client.key"
    if crt.exists() and key.exists():
        return str(crt), str(key)
    conf.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP384R1())
    who = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "linuxcontainers.org"),
                     x509.NameAttribute(NameOID.COMMON_NAME, f"{_user()}@{socket.gethostname()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(who).issuer_name(who).public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private, hashes.SHA384()))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.debug("made a client certificate, %s", crt)  # (not info: a refusal stays one line on stderr)
    return str(crt), str(key)


def _user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _remotes(conf: Path) -> dict:
    try:
        with open(conf / "config.yml") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as e:
        raise TrustError(f"cannot read {conf / 'config.yml'}: {e}") from None
    return data.get("remotes") or {}


# What lxc writes when it makes its config.yml: its own default remotes (lxc keeps them only if listed).
LXC_DEFAULTS = {
    "default-remote": "local",
    "remotes": {
        "images": {"addr": "https://images.linuxcontainers.org", "protocol": "simplestreams", "public": True},
        "local": {"addr": "unix://", "public": False},
    },
}


def _record(conf: Path, name: str, url: str) -> None:
    """Add the remote to config.yml, keeping everything else it holds; written whole, then renamed."""
    path = conf / "config.yml"
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        data = json.loads(json.dumps(LXC_DEFAULTS))
    data["remotes"] = data.get("remotes") or {}
    data["remotes"][name] = {"addr": url, "auth_type": "tls", "project": "default",
                                           "protocol": "lxd", "public": False}
    tmp = path.with_name(f".config.yml.{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, default_flow_style=False)
    os.replace(tmp, path)
