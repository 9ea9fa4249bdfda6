"""`lxdimagefs [OPTIONS] MOUNTPOINT`: check everything, then mount.

Like sshfs, the command returns once the mount is live and the daemon runs
on in the background; every failure before that is one line on stderr and
a non-zero exit, with nothing left mounted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxdimagefs import __version__, stats
from lxdimagefs.errors import LXDError
from lxdimagefs.mount.admin import logs
from lxdimagefs.mount.admin.cachetool import disk_cache_root, made_cache_dir
from lxdimagefs.mount.options import OPTIONS_HELP, MountOptions, UsageError, parse_options
from lxdimagefs.mount.sources import check_joining, servers, source_name
from lxdimagefs.mount.tuning import limit_malloc_arenas

log = logging.getLogger("lxdimagefs")


HELP_EPILOG = f"""\
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

{OPTIONS_HELP}examples:
  lxdimagefs ~/images                          the local LXD
  lxdimagefs --all-projects ~/images           ~/images/PROJECT/...
  lxdimagefs --all-remotes --all-projects ~/l  ~/l/REMOTE/PROJECT/...
  lxdimagefs --trust-token TOKEN lxd1 ~/images join lxd1, then mount it

tools:
  lxdimagefs cache [--cache-dir DIR] du|ls|verify|prune  what is kept on disk
  lxdimagefs stats MOUNTPOINT [--prometheus]             what a mount did

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
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where split images are spooled, export layouts remembered and contents "
                        "indexed (default: $TMPDIR); the disk cache too, when given")
    logs.add_arguments(p)
    p.add_argument("--version", action="version", version=f"lxdimagefs {__version__}")
    return p


def subcommand(argv: list[str]) -> Callable[[list[str]], int] | None:
    """`lxdimagefs cache …` and `lxdimagefs stats MOUNTPOINT`: tools, not a mount (a remote named
    `cache` or `stats` is mounted with --remote NAME)."""
    if argv[:1] == ["cache"]:
        from lxdimagefs.mount.admin import cachetool
        return cachetool.main
    if argv[:1] == ["stats"] and len(argv) >= 2:
        from lxdimagefs.mount.admin import metrics
        return metrics.main
    return None


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


def serving(built: list, disk: Any) -> Callable[[], str]:
    """What STATUS= says the mount serves: its images (as listed last), remotes, disk cache use,
    LXD operations under way; the disk cache's use and bound go to the stats too."""
    if disk is not None:
        stats.gauge("disk_cache_bytes", lambda: [({}, float(disk.in_use() or 0))])
        stats.gauge("disk_cache_max_bytes", lambda: [({}, float(disk.max_bytes or 0))])

    def status() -> str:
        images = sum(len(snap.images) for b in built
                     if (snap := getattr(getattr(b.tree, "catalog", None), "cached", lambda: None)()))
        said = [f"{images} images listed" if images else "",
                "from " + ", ".join(b.remote.name for b in built)]
        if disk is not None:
            bound = "no bound" if disk.max_bytes is None else f"{disk.max_bytes >> 20} MiB"
            said.append(f"disk cache {(disk.in_use() or 0) >> 20} MiB of {bound}")
        said += [f"{what} {f'{done:.0%}' if done >= 0 else 'under way'}"
                 for _, what, done in stats.progress()]
        return "; ".join(filter(None, said))
    return status


def serve(ops: Any, mountpoint: str, foreground: bool, fuse_opts: dict, status: Callable[[], str],
          metrics_at: str | None) -> None:
    """libfuse's loop; under -f, systemd is told when the mount answers and when it is over. The
    stats socket opens once the daemon has forked (in FUSE's init)."""
    from lxdimagefs.mount.admin.metrics import MetricsSocket, socket_for
    from lxdimagefs.mount.admin.notify import Readiness
    from lxdimagefs.mount.fusebind import FUSE
    readiness = Readiness(mountpoint, status)
    stats_socket = MetricsSocket(Path(metrics_at) if metrics_at else socket_for(mountpoint))
    ops.on_init.append(stats_socket.start)
    if foreground:  # no fork: a thread started now serves on
        readiness.start()
    try:
        FUSE(ops, mountpoint, foreground=foreground, raw_fi=True, **fuse_opts)
    finally:
        stats_socket.close()
        readiness.stopping()


def joined(args: argparse.Namespace, own: MountOptions) -> int | None:
    """Join the server with the token (one line and exit 1 if that fails); None once joined."""
    from lxdimagefs.mount.trust import TrustError, join
    try:
        join(args.source, args.trust_token, timeout=min(10.0, own.timeout))
    except TrustError as e:
        print(f"lxdimagefs: {e}", file=sys.stderr)
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool = subcommand(argv)
    if tool is not None:
        return tool(argv[1:])
    args = build_parser().parse_intermixed_args(argv)  # SOURCE may stand apart from MOUNTPOINT
    try:
        own, fuse_opts = parse_options(args.options)
        mountpoint = check_mountpoint(args.mountpoint)
        if args.cache_dir:
            made_cache_dir(args.cache_dir)
        chosen = [] if args.trust_token else servers(args, own)
        if args.all_projects and args.project != "default":
            raise UsageError("give --project NAME or --all-projects, not both")
        check_joining(args)
    except UsageError as e:
        print(f"lxdimagefs: {e}", file=sys.stderr)
        return 2
    logs.setup(args, chosen[0][0].name if len(chosen) == 1 else None)
    if args.trust_token:
        failed = joined(args, own)
        if failed is not None:
            return failed
        chosen = servers(args, own)
    limit_malloc_arenas()  # before any thread: each would take an arena of its own

    # Imported late: loading libfuse is not needed for --help or a usage error.
    from lxdimagefs.mount.fusebind import BINDING, LIBFUSE

    inside = None
    if not own.nocontents and BINDING == "mfusepy" and LIBFUSE == 3:
        from lxdimagefs.mount.inside import mounted
        inside = mounted(fuse_opts)  # before the fork, which its session survives (unmounted at exit)
    from lxdimagefs.data.diskcache import CacheRefused, DiskCache
    from lxdimagefs.mount.assemble import Settings, assemble, followed, kernel_timeouts
    from lxdimagefs.mount.fuse_ops import LXDImageOps
    from lxdimagefs.mount.fusebind import worker_options

    disk = None
    if own.cache_max != 0:
        try:
            disk = DiskCache(disk_cache_root(args.cache_dir), own.cache_max)
        except CacheRefused as e:
            print(f"lxdimagefs: {e} (-o cache_max=0 mounts without it)", file=sys.stderr)
            return 2
    settings = Settings(mountpoint=mountpoint, cache_root=Path(args.cache_dir or tempfile.gettempdir()),
                        disk=disk,
                        readonly=bool(fuse_opts.get("ro")),
                        metadata_ttl=own.metadata_ttl, cache_bytes=own.cache_bytes,
                        events=not own.no_events, contents=not own.nocontents,
                        all_projects=args.all_projects,
                        allow_delete=own.allow_delete, local_files=not own.nolocal, own=own.own,
                        inside=str(inside.folder) if inside is not None else "")
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
    for key, value in {**worker_options(), **kernel_timeouts(built, settings)}.items():
        fuse_opts.setdefault(key, value)
    log.debug("mounting %s on %s", ", ".join(c.describe() for _, c in chosen), mountpoint)
    ops = LXDImageOps(root, [b.events for b in built if b.events is not None], mountpoint)
    if inside is not None:
        from lxdimagefs.mount.inside import attach
        # A simplestreams server has no projects: its contents/ is one name less deep.
        projects = args.all_projects and (forest or not built[0].remote.simplestreams)
        depth, timeout = int(forest) + int(projects), float(str(fuse_opts["entry_timeout"]))
        shallow = frozenset(b.remote.name for b in built if forest and projects and b.remote.simplestreams)
        attach(inside, ops, root, depth, timeout, followed(built, settings), shallow)
    try:
        serve(ops, mountpoint, args.foreground, fuse_opts, serving(built, disk), own.metrics)
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
