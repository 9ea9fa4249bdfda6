"""Which servers the arguments name (SOURCE, --socket/--url, --remote NAME..., --all-remotes),
each with the connection to it: its socket, or its address, client certificate and pinned server
certificate, all checked before anything is mounted.
"""

from __future__ import annotations

import argparse
import os
import sys

from lxdimagefs.mount.options import MountOptions, UsageError
from lxdimagefs.mount.remotes import Remote, RemoteError, all_remotes, resolve
from lxdimagefs.wire.rest import certificate_fingerprint
from lxdimagefs.wire.transport import Connection


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


def connection(remote: Remote, args: argparse.Namespace, own: MountOptions) -> Connection:
    timeout = own.timeout
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


def servers(args: argparse.Namespace, own: MountOptions) -> list[tuple[Remote, Connection]]:
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
