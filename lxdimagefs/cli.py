"""`lxdimagefs [OPTIONS] MOUNTPOINT`: check everything, then mount.

Like sshfs, the command returns once the mount is live and the daemon runs
on in the background; every failure before that is one line on stderr and
a non-zero exit, with nothing left mounted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import logging.handlers
import os
import sys
import tempfile
from pathlib import Path

from . import __version__
from .catalog import Catalog, LayoutJournal
from .client import Connection, LXDClient, certificate_fingerprint
from .errors import LXDError

log = logging.getLogger("lxdimagefs")

SOCKET_CANDIDATES = (
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/lxd/unix.socket",
)

# lxdimagefs's own -o options and how to read them; every other -o goes to FUSE.
OWN_OPTIONS = {
    "metadata_ttl": float,  # seconds a listing of LXD's images is trusted
    "cache_size": int,  # MiB of export blocks held in memory, for the whole daemon
    "timeout": float,  # seconds to wait for LXD before a call fails with EIO
}


# lxdimagefs's own -o flags.
OWN_FLAGS = {
    "no_events",  # do not listen to LXD's events: rely on metadata_ttl alone
    "nocontents",  # leave out contents/ (what is inside images), e.g. for backups of the whole mount
}


class UsageError(Exception):
    pass


def find_socket() -> str | None:
    """The first LXD socket that exists, in the order the lxc client looks."""
    candidates = []
    if os.environ.get("LXD_SOCKET"):
        candidates.append(os.environ["LXD_SOCKET"])
    if os.environ.get("LXD_DIR"):
        candidates.append(os.path.join(os.environ["LXD_DIR"], "unix.socket"))
    candidates.extend(SOCKET_CANDIDATES)
    return next((c for c in candidates if os.path.exists(c)), None)


def lxc_client_pair() -> tuple[str, str] | None:
    """The certificate pair the lxc client keeps, where it keeps one."""
    home = Path.home()
    for conf in (Path(os.environ.get("LXD_CONF", home / ".config/lxc")), home / "snap/lxd/common/config"):
        crt, key = conf / "client.crt", conf / "client.key"
        if crt.exists() and key.exists():
            return str(crt), str(key)
    return None


def parse_options(values: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """Split `-o a,b=c` lists into (lxdimagefs options, FUSE options)."""
    own: dict[str, object] = {}
    fuse: dict[str, object] = {}
    for value in values:
        for item in filter(None, value.split(",")):
            key, sep, val = item.partition("=")
            if key in OWN_FLAGS and not sep:
                own[key] = True
            elif key in OWN_OPTIONS:
                try:
                    own[key] = OWN_OPTIONS[key](val)
                except ValueError:
                    raise UsageError(f"option {key} needs a number, not {val!r}") from None
                if own[key] <= 0:  # type: ignore[operator]
                    raise UsageError(f"option {key} must be positive")
            else:
                fuse[key] = val if sep else True
    return own, fuse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lxdimagefs", description="Mount the images of an LXD server as files.")
    p.add_argument("mountpoint")
    server = p.add_argument_group("server")
    server.add_argument("--socket", help="LXD's unix socket (default: found as lxc finds it)")
    server.add_argument("--url", help="a remote LXD, https://HOST:PORT")
    server.add_argument("--cert", help="TLS client certificate (default: the lxc client's)")
    server.add_argument("--key", help="TLS client key (default: the lxc client's)")
    server.add_argument("--server-cert", help="pin the server's certificate (default: the system's CAs)")
    server.add_argument("--project", default="default")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached; SIGINT/SIGTERM unmount")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="FUSE options (ro, allow_other, ...) and lxdimagefs's own: "
                        + ", ".join([*(f"{k}=N" for k in OWN_OPTIONS), *OWN_FLAGS]))
    p.add_argument("--log-file",
                   help="log here (default: stderr in the foreground, syslog in the background)")
    p.add_argument("--cache-dir",
                   help="where split images are spooled and export layouts remembered (default: $TMPDIR)")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--version", action="version", version=f"lxdimagefs {__version__}")
    return p


def connection(args: argparse.Namespace, own: dict[str, object]) -> Connection:
    timeout = float(own.get("timeout", 30.0))  # type: ignore[arg-type]
    common = {"project": args.project, "timeout": (min(5.0, timeout), timeout)}
    if args.url:
        if args.socket:
            raise UsageError("give either --socket or --url, not both")
        if not args.url.startswith("https://"):
            raise UsageError("--url must start with https://")
        if bool(args.cert) != bool(args.key):
            raise UsageError("--cert and --key go together")
        pair = (args.cert, args.key) if args.cert else lxc_client_pair()
        if pair is None:
            raise UsageError("no client certificate: give --cert and --key")
        # The daemon leaves this folder, and TLS opens the files again for each connection.
        pair = (os.path.abspath(pair[0]), os.path.abspath(pair[1]))
        for f in pair + ((args.server_cert,) if args.server_cert else ()):
            if not os.access(f, os.R_OK):
                raise UsageError(f"cannot read {f}")
        pinned = None
        if args.server_cert:
            try:
                pinned = certificate_fingerprint(args.server_cert)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read the server certificate {args.server_cert}: {e}") from None
        return Connection(url=args.url, cert=pair, pinned=pinned, **common)
    sock = args.socket or find_socket()
    if not sock:
        raise UsageError("no LXD socket found: give --socket or --url, or set LXD_DIR")
    if not os.path.exists(sock):
        raise UsageError(f"no LXD socket at {sock}")
    return Connection(socket=sock, **common)


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"mount point {path} is not a directory" if os.path.exists(path)
                         else f"mount point {path} does not exist")
    if os.path.ismount(path):
        raise UsageError(f"mount point {path} is busy: something is mounted there")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(f"mount point {path} is not writable by this user")
    return path


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
    elif args.foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("lxdimagefs[%(process)d]: %(levelname)s %(message)s"))
    if not isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    if not args.debug:  # urllib3's debug lines would carry request details
        logging.getLogger("urllib3").setLevel(logging.WARNING)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc from giving each of the daemon's threads its own malloc arena.

    1 MiB blocks are allocated on fetch threads and freed on others; with an
    arena per thread, freed blocks linger in each. Measured with the soak:
    RSS 135-139 MiB with glibc's default, 97-107 MiB with two arenas.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator has its own policy
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        own, fuse_opts = parse_options(args.options)
        mountpoint = check_mountpoint(args.mountpoint)
        if args.cache_dir and not os.path.isdir(args.cache_dir):
            raise UsageError(f"cache folder {args.cache_dir} does not exist")
        conn = connection(args, own)
    except UsageError as e:
        print(f"lxdimagefs: {e}", file=sys.stderr)
        return 2
    setup_logging(args)
    limit_malloc_arenas()

    # Imported late: loading libfuse is not needed for --help or a usage error.
    from .archives import IndexFolder
    from .events import EventWatcher
    from .fuse_ops import LXDImageOps
    from .fusebind import FUSE
    from .reader import Exports
    from .spool import SplitSpool
    from .tree import Tree

    client = LXDClient(conn)
    cache_root = Path(args.cache_dir or tempfile.gettempdir())
    journal = LayoutJournal(cache_root / f"lxdimagefs-layouts-{os.getuid()}.jsonl")
    catalog = Catalog(client, ttl=float(own.get("metadata_ttl", 3.0)), journal=journal)  # type: ignore[arg-type]
    client.patience = 0.0
    try:
        catalog.snapshot()  # reachable, and the project exists
        if client.server_info().get("auth") != "trusted":
            log.warning("LXD at %s does not trust this client: only its public images are visible",
                        conn.describe())
    except LXDError as e:
        print(f"lxdimagefs: cannot list images at {conn.describe()}: {e.message}", file=sys.stderr)
        return 1
    client.patience = conn.timeout[1]
    for stale in SplitSpool.sweep(cache_root):
        log.info("removed %s, left by a daemon that did not unmount", stale)
    spool_dir = Path(tempfile.mkdtemp(prefix=SplitSpool.PREFIX, dir=cache_root))
    exports = Exports(client, spool_dir, capacity=int(own.get("cache_size", 32)) << 20)  # type: ignore[call-overload]
    index = None if own.get("nocontents") else IndexFolder(cache_root / f"lxdimagefs-index-{os.getuid()}")
    tree = Tree(catalog, exports, readonly=bool(fuse_opts.get("ro")), mountpoint=mountpoint, index=index)
    if fuse_opts.get("allow_other"):  # other users get the image's own modes, not the mounter's reach
        fuse_opts.setdefault("default_permissions", True)
    fuse_opts.setdefault("fsname", "lxdimagefs")
    # Unlink an open file for real (libfuse would rename it to .fuse_hidden*, which import/ refuses):
    # removing an import being written is how a user breaks it off.
    fuse_opts.setdefault("hard_remove", True)
    fuse_opts.setdefault("subtype", "lxdimagefs")
    log.debug("mounting %s (project %s) on %s", conn.describe(), conn.project, mountpoint)
    events = None
    if not own.get("no_events"):
        events = EventWatcher(client, tree.changed_elsewhere, catalog.refresh, timeout=conn.timeout[1],
                              ping=min(10.0, conn.timeout[1]))
        catalog.events_live = events.live.is_set
    ops = LXDImageOps(tree, events)
    try:
        FUSE(ops, mountpoint, foreground=args.foreground, raw_fi=True, **fuse_opts)
    except RuntimeError as e:
        # libfuse 3 reports an exit by SIGINT/SIGTERM as an error; after a live mount it is not one.
        if not ops.served:
            print(f"lxdimagefs: mounting {mountpoint} failed (libfuse said {e}; see above)", file=sys.stderr)
            return 1
    finally:
        exports.spool.remove()
    log.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
