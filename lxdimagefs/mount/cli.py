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
from collections.abc import Callable
from pathlib import Path

from lxdimagefs import __version__
from lxdimagefs.errors import LXDError
from lxdimagefs.mount.remotes import Remote, RemoteError, all_remotes, resolve
from lxdimagefs.wire.rest import certificate_fingerprint
from lxdimagefs.wire.transport import Connection

log = logging.getLogger("lxdimagefs")


def parse_size(value: str) -> int:
    """`10G`, `512M`, `4096K` or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = value.strip().upper().removesuffix("IB").removesuffix("B")
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


# MiB of export blocks in memory by default: read-ahead and the hash's window. Re-reads of
# verified files come from the page cache and the disk cache (16 MiB kept the soak's RSS at
# 84-88 MiB against 106-112 with 32, first reads no slower: docs/PERFORMANCE.md).
CACHE_SIZE = 16

# lxdimagefs's own -o options and how to read them; every other -o goes to FUSE.
OWN_OPTIONS: dict[str, Callable[[str], float]] = {
    "metadata_ttl": float,  # seconds a listing of LXD's images is trusted
    "cache_size": int,  # MiB of export blocks held in memory, for the whole daemon
    "timeout": float,  # seconds to wait for LXD before a call fails with EIO
    "cache_max": parse_size,  # bytes of verified exports kept on disk; 0: none
}


def disk_cache_root(cache_dir: str | None) -> Path:
    """Where verified exports are kept: beside --cache-dir's other files, else the user's cache."""
    if cache_dir:
        return Path(cache_dir) / f"lxdimagefs-cache-{os.getuid()}"
    if os.geteuid() == 0:
        return Path("/var/cache/lxdimagefs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lxdimagefs"


# lxdimagefs's own -o flags.
OWN_FLAGS = {
    "no_events",  # do not listen to LXD's events: rely on metadata_ttl alone
    "nocontents",  # leave out contents/ (what is inside images), e.g. for backups of the whole mount
    "allow_delete",  # rm -r / rmdir of by-fingerprint/<fp> deletes the image (else EPERM)
    "nolocal",  # never read a local server's own image files: always its socket
}


# Options fstab and systemd give mount(8), which mount.fuse3 hands on and libfuse would refuse.
MOUNT_ONLY = {"_netdev", "nofail", "user", "users", "nouser", "auto", "noauto", "defaults"}


class UsageError(Exception):
    pass


def parse_options(values: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """Split `-o a,b=c` lists into (lxdimagefs options, FUSE options)."""
    own: dict[str, object] = {}
    fuse: dict[str, object] = {}
    for value in values:
        for item in filter(None, value.split(",")):
            key, sep, val = item.partition("=")
            if key in MOUNT_ONLY or key.startswith("x-"):
                continue
            if key in OWN_FLAGS and not sep:
                own[key] = True
            elif key in OWN_OPTIONS:
                try:
                    own[key] = OWN_OPTIONS[key](val)
                except ValueError:
                    raise UsageError(f"option {key} needs a number, not {val!r}") from None
                if own[key] < 0 or (own[key] == 0 and key != "cache_max"):  # type: ignore[operator]
                    raise UsageError(f"option {key} must be positive")
            else:
                fuse[key] = val if sep else True
    return own, fuse


HELP_EPILOG = """\
SOURCE is `local` (the default: LXD's socket, else Incus's), the name of a
remote in the lxc or incus client's configuration (its address and
certificates are read from config.yml), unix:///path/to/unix.socket, or
https://HOST:PORT. --socket and --url say the same in long form. A
simplestreams remote (images:, ubuntu:) is read from its index, read-only.
--remote NAME (repeated) or --all-remotes mount one folder per remote; one
that does not answer is an empty folder until it does. --all-projects mounts
one folder per LXD project (REMOTE/PROJECT/ with several remotes); a project
with features.images=false shows the default project's images.
--trust-token TOKEN NAME joins a server with a token from `lxc config trust
add` as `lxc remote add NAME TOKEN` does, records it as remote NAME (lxc's
config.yml) and mounts it; later, `lxdimagefs NAME MOUNTPOINT` needs no token.
A cluster is mounted through any one member; see docs/SEMANTICS.md.

the tree:
  by-fingerprint/<fp>/          metadata.json and the export file(s), named
                                as `lxc image export` names them
  by-alias/<name>               symlinks to ../by-fingerprint/<fp>
                                (ln -s creates, rm deletes, mv renames)
  import/                       cp an image here to create it; a folder of
                                two parts makes a split image; ln -s an
                                https:// URL, or another remote's image
                                folder, and the server fetches it itself
  contents/by-fingerprint/<fp>/ what is inside each image, read-only

  Extended attributes user.lxd.* on image folders and files show (and for
  public, auto_update and properties.KEY, save) the image's record.
  `touch by-fingerprint/<fp>` refreshes an image whose auto_update is on.

options for -o (besides FUSE's own: ro, allow_other, default_permissions, ...):
  metadata_ttl=SECONDS  how long a listing of images is trusted (default 3)
  cache_size=MiB        export blocks held in memory, whole daemon (default 16)
  cache_max=SIZE        verified exports kept on disk (K, M, G; default: no
                        limit but 5% of that filesystem kept free; 0: none).
                        They live in --cache-dir/lxdimagefs-cache-UID, else
                        $XDG_CACHE_HOME/lxdimagefs (~/.cache/lxdimagefs), or
                        /var/cache/lxdimagefs for root: a new mount, another
                        server or contents/ never fetch them again. Every
                        block is checked against the image's manifest when
                        it is read back; the folder is private (0700)
  timeout=SECONDS       how long to ride out an unreachable server before
                        a call fails with EIO (default 30)
  no_events             do not follow the server's event stream
  nocontents            leave out contents/ (backups of the whole mount)
  allow_delete          let rm -r (or rmdir) of by-fingerprint/<fp> delete the
                        image; without it deleting an image is refused (EPERM)
  nolocal               read exports only through the socket; by default, as root
                        beside a local server, its own image files are read in
                        place (checked like its exports)
  _netdev, nofail, user, users, auto, noauto, defaults, x-*
                        fstab's and systemd's: accepted and ignored

examples:
  lxdimagefs ~/images                          the local LXD
  lxdimagefs --all-projects ~/images           ~/images/PROJECT/...
  lxdimagefs --all-remotes --all-projects ~/l  ~/l/REMOTE/PROJECT/...
  lxdimagefs --trust-token TOKEN lxd1 ~/images join lxd1, then mount it

fstab:
  local  /srv/images  fuse.lxdimagefs  _netdev,nofail,allow_other  0 0

exit status: 0 once the mount is live (or, with -f, after a clean unmount);
1 when the server cannot be reached, FUSE refuses the mount or a trust token
is refused; 2 for a usage error. Unmount with `fusermount -u MOUNTPOINT` or
`umount`.

docs/SEMANTICS.md says what every system call does and which errno each
refusal gives.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lxdimagefs", description="Mount the images of an LXD or Incus server "
                                "as files.", epilog=HELP_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="local (default), a remote's name, unix:///path or https://HOST:PORT")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty folder this user can write")
    server = p.add_argument_group("server")
    server.add_argument("--socket", metavar="PATH",
                        help="the server's unix socket (default: $LXD_SOCKET, $LXD_DIR/unix.socket, "
                             "the snap's and Debian's, then Incus's)")
    server.add_argument("--url", metavar="https://HOST:PORT", help="a remote server (or cluster)")
    server.add_argument("--cert", metavar="FILE",
                        help="TLS client certificate (default: the lxc, else the incus client's)")
    server.add_argument("--key", metavar="FILE", help="TLS client key (default: the client's)")
    server.add_argument("--server-cert", metavar="FILE",
                        help="trust exactly this server certificate (default: the remote's, as "
                             "`lxc remote add` kept it, else the system's CAs)")
    server.add_argument("--project", default="default", metavar="NAME", help="default: default")
    server.add_argument("--all-projects", action="store_true",
                        help="one folder per project (REMOTE/PROJECT/ with several remotes); projects "
                             "made or deleted while mounted come and go")
    server.add_argument("--remote", action="append", default=[], metavar="NAME",
                        help="a remote of the lxc or incus client; repeat it to mount several, "
                             "one folder each")
    server.add_argument("--all-remotes", action="store_true",
                        help="every remote in the clients' config.yml, one folder each")
    server.add_argument("--trust-token", metavar="TOKEN",
                        help="join the server with a token from `lxc config trust add`, as "
                             "`lxc remote add SOURCE TOKEN` does: SOURCE is the new remote's name")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached; SIGINT/SIGTERM unmount")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="FUSE's options and lxdimagefs's own (below)")
    p.add_argument("--log-file", metavar="FILE",
                   help="log here (default: stderr in the foreground, syslog in the background)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where split images are spooled, export layouts remembered and contents "
                        "indexed (default: $TMPDIR); the disk cache too, when given")
    p.add_argument("--debug", action="store_true", help="log every request (never a credential)")
    p.add_argument("--version", action="version", version=f"lxdimagefs {__version__}")
    return p


def server(args: argparse.Namespace) -> Remote:
    """The server the arguments name: SOURCE, or --socket/--url, else the local socket."""
    if args.source and (args.socket or args.url):
        raise UsageError("give SOURCE or --socket/--url, not both")
    if args.socket and args.url:
        raise UsageError("give either --socket or --url, not both")
    if args.url and not args.url.startswith("https://"):
        raise UsageError("--url must start with https://")
    try:
        if args.socket or args.url:
            return resolve("unix://" + os.path.abspath(args.socket) if args.socket else args.url)
        return resolve(args.source)
    except RemoteError as e:
        raise UsageError(str(e)) from None


def source_name(args: argparse.Namespace) -> str:
    if args.all_remotes or args.remote:
        return "remotes:" + ("all" if args.all_remotes else "+".join(args.remote))
    return args.source or args.url or (args.socket and "unix://" + os.path.abspath(args.socket)) or "local"


def connection(remote: Remote, args: argparse.Namespace, own: dict[str, object]) -> Connection:
    timeout = float(own.get("timeout", 30.0))  # type: ignore[arg-type]
    common = {"project": args.project, "timeout": (min(5.0, timeout), timeout)}
    if remote.simplestreams:
        if not remote.url:
            raise UsageError(f"simplestreams remote {remote.name} needs an https:// address")
        return Connection(url=remote.url, **common)  # public: no client certificate
    if remote.url:
        if bool(args.cert) != bool(args.key):
            raise UsageError("--cert and --key go together")
        pair = (args.cert, args.key) if args.cert else remote.client_pair()
        if pair is None:
            raise UsageError("no client certificate: give --cert and --key")
        # The daemon leaves this folder, and TLS opens the files again for each connection.
        pair = (os.path.abspath(pair[0]), os.path.abspath(pair[1]))
        server_cert = args.server_cert or remote.server_cert()
        for f in pair + ((server_cert,) if server_cert else ()):
            if not os.access(f, os.R_OK):
                raise UsageError(f"cannot read {f}")
        pinned = None
        if server_cert:
            try:
                pinned = certificate_fingerprint(server_cert)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read the server certificate {server_cert}: {e}") from None
        return Connection(url=remote.url, cert=pair, pinned=pinned, **common)
    sock = remote.socket
    if not sock:
        raise UsageError("no LXD or Incus socket found: give SOURCE, --socket or --url, or set LXD_DIR")
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


def servers(args: argparse.Namespace, own: dict[str, object]) -> list[tuple[Remote, Connection]]:
    """The servers to mount, each with its connection: SOURCE, --remote NAME…, or --all-remotes."""
    if (args.remote or args.all_remotes) and (args.source or args.socket or args.url):
        raise UsageError("give SOURCE (or --socket/--url), or --remote/--all-remotes, not both")
    try:
        remotes = all_remotes() if args.all_remotes else [resolve(n) for n in args.remote] or [server(args)]
    except RemoteError as e:
        raise UsageError(str(e)) from None
    if len({r.name for r in remotes}) != len(remotes):
        raise UsageError("a remote is named twice")
    if not args.all_remotes:
        return [(r, connection(r, args, own)) for r in remotes]
    chosen = []
    for remote in remotes:  # every remote the clients know: one that cannot be used is left out, said once
        try:
            chosen.append((remote, connection(remote, args, own)))
        except UsageError as e:
            print(f"lxdimagefs: leaving out remote {remote.name}: {e}", file=sys.stderr)
    if not chosen:
        raise UsageError("no remote can be mounted")
    return chosen


def check_joining(args: argparse.Namespace) -> None:
    """--trust-token names the remote it records with SOURCE, and mounts nothing else."""
    if not args.trust_token:
        return
    if args.remote or args.all_remotes or args.socket or args.url:
        raise UsageError("--trust-token joins one server: give it with SOURCE only, the new remote's name")
    if not args.source or args.source == "local" or ":" in args.source or "/" in args.source:
        raise UsageError("--trust-token needs SOURCE: the name to record the server under, as in "
                         "`lxc remote add NAME TOKEN`")


def joined(args: argparse.Namespace, own: dict[str, object]) -> int | None:
    """Join the server with the token (one line and exit 1 if that fails); None once joined."""
    from lxdimagefs.mount.trust import TrustError, join
    try:
        join(args.source, args.trust_token, timeout=min(10.0, float(own.get("timeout", 30.0))))  # type: ignore[arg-type]
    except TrustError as e:
        print(f"lxdimagefs: {e}", file=sys.stderr)
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # SOURCE may stand apart from MOUNTPOINT
    try:
        own, fuse_opts = parse_options(args.options)
        mountpoint = check_mountpoint(args.mountpoint)
        if args.cache_dir and not os.path.isdir(args.cache_dir):
            raise UsageError(f"cache folder {args.cache_dir} does not exist")
        chosen = [] if args.trust_token else servers(args, own)
        if args.all_projects and args.project != "default":
            raise UsageError("give --project NAME or --all-projects, not both")
        check_joining(args)
    except UsageError as e:
        print(f"lxdimagefs: {e}", file=sys.stderr)
        return 2
    setup_logging(args)
    if args.trust_token:
        failed = joined(args, own)
        if failed is not None:
            return failed
        chosen = servers(args, own)
    limit_malloc_arenas()

    # Imported late: loading libfuse is not needed for --help or a usage error.
    from lxdimagefs.data.diskcache import CacheRefused, DiskCache
    from lxdimagefs.mount.assemble import Settings, assemble
    from lxdimagefs.mount.fuse_ops import LXDImageOps
    from lxdimagefs.mount.fusebind import FUSE, worker_options

    disk = None
    if own.get("cache_max", None) != 0:
        try:
            disk = DiskCache(disk_cache_root(args.cache_dir), own.get("cache_max"))  # type: ignore[arg-type]
        except CacheRefused as e:
            print(f"lxdimagefs: {e} (-o cache_max=0 mounts without it)", file=sys.stderr)
            return 2
    settings = Settings(mountpoint=mountpoint, cache_root=Path(args.cache_dir or tempfile.gettempdir()),
                        disk=disk,
                        readonly=bool(fuse_opts.get("ro")),
                        metadata_ttl=float(own.get("metadata_ttl", 3.0)),  # type: ignore[arg-type]
                        cache_bytes=int(own.get("cache_size", CACHE_SIZE)) << 20,  # type: ignore[call-overload]
                        events=not own.get("no_events"), contents=not own.get("nocontents"),
                        all_projects=args.all_projects,
                        allow_delete=bool(own.get("allow_delete")), local_files=not own.get("nolocal"))
    forest = args.all_remotes or len(args.remote) > 1
    try:
        root, built = assemble(chosen, settings, forest)
    except LXDError as e:
        print(f"lxdimagefs: cannot list images at {chosen[0][1].describe()}: {e.message}", file=sys.stderr)
        return 1
    if fuse_opts.get("allow_other") or fuse_opts.get("allow_root"):
        # Other users get the modes the tree gives (a private image is the mounter's alone), checked
        # by the kernel; the daemon checks them again (fuse_ops), in case the kernel does not.
        fuse_opts["default_permissions"] = True
    # The SOURCE as fstab names it, so `mount -a` sees the line is mounted already.
    fuse_opts.setdefault("fsname", source_name(args).replace(",", "\\,"))
    # Unlink an open file for real (libfuse would rename it to .fuse_hidden*, which import/ refuses):
    # removing an import being written is how a user breaks it off.
    fuse_opts.setdefault("hard_remove", True)
    # The tree numbers its own files (fs/node.py inode_number): a hard link inside an image shares
    # its file's number, as tar, du and rsync -H need to see it as one file.
    fuse_opts.setdefault("use_ino", True)
    fuse_opts.setdefault("subtype", "lxdimagefs")
    for key, value in worker_options().items():
        fuse_opts.setdefault(key, value)
    log.debug("mounting %s on %s", ", ".join(c.describe() for _, c in chosen), mountpoint)
    ops = LXDImageOps(root, [b.events for b in built if b.events is not None], mountpoint)
    try:
        FUSE(ops, mountpoint, foreground=args.foreground, raw_fi=True, **fuse_opts)
    except RuntimeError as e:
        # libfuse 3 reports an exit by SIGINT/SIGTERM as an error; after a live mount it is not one.
        if not ops.served:
            print(f"lxdimagefs: mounting {mountpoint} failed (libfuse said {e}; see above)", file=sys.stderr)
            return 1
    finally:
        for b in built:
            b.tree.close()  # again, if libfuse did not: its spools go
    log.info("unmounted %s", mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
