"""Which server a mount talks to: the SOURCE argument, the lxc and incus clients' remotes, socket discovery.

A user who has `lxc remote add`ed a server should not have to say again
where it is or which certificates it takes: a remote's name is enough, and
its address, protocol and certificates are read from the client's own
configuration (`config.yml`, `client.crt`/`client.key`, `servercerts/NAME.crt`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

# Where each client keeps its configuration folder: its variable first, then its usual places.
CLIENT_DIRS = {
    "lxc": ("LXD_CONF", (".config/lxc", "snap/lxd/common/config")),
    "incus": ("INCUS_CONF", (".config/incus",)),
}

# The sockets a local server listens on, in the order the clients look: LXD's, then Incus's.
SOCKETS = {
    "lxd": ("LXD_SOCKET", "LXD_DIR", ("/var/snap/lxd/common/lxd/unix.socket", "/var/lib/lxd/unix.socket")),
    "incus": ("INCUS_SOCKET", "INCUS_DIR", ("/run/incus/unix.socket", "/var/lib/incus/unix.socket")),
}

# lxc's built-in remotes that its config.yml does not list; named with --remote only, never
# by --all-remotes (which keeps a mount to the servers the user configured).
STATIC = {
    "ubuntu": ("https://cloud-images.ubuntu.com/releases", "simplestreams"),
    "ubuntu-daily": ("https://cloud-images.ubuntu.com/daily", "simplestreams"),
}


class RemoteError(Exception):
    """A SOURCE or remote that names nothing usable; the message is for the user."""


@dataclass(frozen=True)
class Remote:
    name: str
    addr: str  # "unix://" (the local socket), "unix:///path", or "https://host:port"
    protocol: str = "lxd"  # "lxd", "incus" or "simplestreams"
    public: bool = False
    conf_dir: Path | None = None  # the client folder holding its certificates

    @property
    def socket(self) -> str | None:
        """The unix socket this remote is reached on, or None for an HTTPS remote."""
        if not self.addr.startswith("unix:"):
            return None
        path = self.addr[len("unix:"):].lstrip("/")
        return "/" + path if path else find_socket()

    @property
    def url(self) -> str | None:
        return self.addr.rstrip("/") if self.addr.startswith("https://") else None

    @property
    def simplestreams(self) -> bool:
        return self.protocol == "simplestreams"

    def client_pair(self) -> tuple[str, str] | None:
        """The TLS client certificate this remote's client uses, where it keeps one."""
        dirs = [self.conf_dir] if self.conf_dir else []
        return _pair(dirs + client_dirs())

    def server_cert(self) -> str | None:
        """The server certificate the client pinned when the remote was added, if any."""
        if self.conf_dir is None:
            return None
        crt = self.conf_dir / "servercerts" / f"{self.name}.crt"
        return str(crt) if crt.exists() else None


def find_socket() -> str | None:
    """The first local socket that exists: LXD's places, then Incus's."""
    candidates: list[str] = []
    for sock_var, dir_var, usual in SOCKETS.values():
        for var, suffix in ((sock_var, ""), (dir_var, "unix.socket")):
            if os.environ.get(var):
                candidates.append(os.path.join(os.environ[var], suffix) if suffix else os.environ[var])
        candidates.extend(usual)
    return next((c for c in candidates if os.path.exists(c)), None)


def client_dirs(client: str | None = None) -> list[Path]:
    """The configuration folders of the lxc and incus clients (or one of them), in lookup order."""
    home = Path.home()
    dirs = []
    for name, (var, usual) in CLIENT_DIRS.items():
        if client in (None, name):
            dirs += [Path(os.environ[var])] if os.environ.get(var) else [home / u for u in usual]
    return dirs


def _pair(dirs: list[Path]) -> tuple[str, str] | None:
    for conf in dirs:
        crt, key = conf / "client.crt", conf / "client.key"
        if crt.exists() and key.exists():
            return str(crt), str(key)
    return None


def client_pair() -> tuple[str, str] | None:
    """The certificate pair the lxc (else the incus) client keeps."""
    return _pair(client_dirs())


def load_remotes() -> dict[str, Remote]:
    """Every remote in the lxc and incus clients' config.yml files; lxc's wins a shared name."""
    remotes: dict[str, Remote] = {}
    for client in reversed(CLIENT_DIRS):
        for conf in client_dirs(client):
            remotes.update(_read_config(conf, client))
    return remotes


def _read_config(conf: Path, client: str) -> dict[str, Remote]:
    path = conf / "config.yml"
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as e:
        raise RemoteError(f"cannot read {path}: {e}") from None
    found = {}
    for name, entry in (data.get("remotes") or {}).items():
        if not isinstance(entry, dict) or not entry.get("addr"):
            continue
        protocol = entry.get("protocol") or ("incus" if client == "incus" else "lxd")
        found[str(name)] = Remote(str(name), str(entry["addr"]), protocol, bool(entry.get("public")), conf)
    return found


def resolve(source: str | None) -> Remote:
    """A SOURCE argument as the spec reads it: `local`, a remote's name, `unix:///…` or `https://…`."""
    if source in (None, "", "local"):
        configured = load_remotes().get("local")
        if configured is not None and configured.addr.startswith("unix:"):
            return configured
        return Remote("local", "unix://")
    if source.startswith(("unix:", "https://")):
        # An address a client knows comes with the certificates kept for it.
        same = [r for r in load_remotes().values() if r.addr.rstrip("/") == source.rstrip("/")]
        return same[0] if same else Remote(source, source)
    if source.startswith("http://"):
        raise RemoteError(f"{source}: LXD is reached over https:// or a unix:// socket, never plain HTTP")
    remotes = load_remotes()
    if source in remotes:
        return remotes[source]
    if source in STATIC:
        addr, protocol = STATIC[source]
        return Remote(source, addr, protocol, True)
    known = ", ".join(sorted(remotes)) or "none"
    raise RemoteError(f"no remote named {source!r} in the lxc or incus configuration (known: {known})")


def all_remotes() -> list[Remote]:
    """What --all-remotes mounts: every configured remote, `local` first."""
    remotes = load_remotes()
    remotes.setdefault("local", Remote("local", "unix://"))
    return sorted(remotes.values(), key=lambda r: (r.name != "local", r.name))
