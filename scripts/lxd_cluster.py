#!/usr/bin/env python3
"""A private LXD cluster on loopback for tests and benchmarks: three real members, one machine.

Each member is a `Sandbox` (its own LXD_DIR, started and stopped by pid)
listening on 127.0.0.N. The first is turned into a cluster (`lxc cluster
enable`); the others join with a token from `lxc cluster add`, through
`lxd init --preseed`. Three members, because all three are database voters:
with two, the second is a standby, and with the leader stopped it fails every
request after 30 s ("Failed to begin transaction").

    scripts/lxd_cluster.py start      prints each member's folder and pid
    scripts/lxd_cluster.py stop ROOT...
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lxd_sandbox import Sandbox

ONLINE_WAIT = 120.0  # seconds for a member to show as online in the cluster


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str
    address: str  # host:port, for HTTPS and the cluster alike
    box: Sandbox

    @property
    def url(self) -> str:
        return f"https://{self.address}"


@dataclass
class Cluster:
    members: list[Member]

    @classmethod
    def start(cls, size: int = 3, base: str | None = None) -> Cluster:
        cluster = cls([])
        try:
            for n in range(1, size + 1):
                host = f"127.0.0.{n}"
                member = Member(f"m{n}", f"{host}:{free_port(host)}", Sandbox.start(base))
                cluster.members.append(member)
                if n == 1:
                    member.box.lxc("config", "set", "core.https_address", member.address)
                    member.box.lxc("cluster", "enable", member.name)
                else:
                    cluster._join(member)
            cluster.wait_online()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _join(self, member: Member) -> None:
        first = self.members[0].box
        token = first.lxc("cluster", "add", member.name, "--quiet").stdout.decode().strip().splitlines()[-1]
        preseed = {"cluster": {"enabled": True, "server_name": member.name, "server_address": member.address,
                               "cluster_token": token}}
        done = subprocess.run(["lxd", "init", "--preseed"], input=json.dumps(preseed).encode(),
                              env=member.box.env(), capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"{member.name} did not join: {done.stderr.decode().strip()}")

    def any_up(self) -> Member:
        return next(m for m in self.members if m.box.pid)

    def states(self) -> dict[str, dict]:
        """Each member's record, as a running member reports it (status, roles, url)."""
        records = self.any_up().box.rest("/1.0/cluster/members?recursion=1")
        return {r["server_name"]: r for r in records}

    def wait_online(self, timeout: float = ONLINE_WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.states()
                if len(states) == len(self.members) and all(s["status"] == "Online" for s in states.values()):
                    return
            except (subprocess.CalledProcessError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster's members were not all online within {timeout:.0f} s")
            time.sleep(0.5)

    def leader(self) -> Member:
        names = [n for n, s in self.states().items() if "database-leader" in (s.get("roles") or [])]
        return next(m for m in self.members if m.name in names)

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def stop(self) -> None:
        for member in reversed(self.members):
            member.box.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("start")
    stop = sub.add_parser("stop")
    stop.add_argument("roots", nargs="+", help="the member folders `start` printed")
    args = p.parse_args()
    if args.cmd == "start":
        cluster = Cluster.start()
        for m in cluster.members:
            print(f"{m.name} {m.url} SANDBOX={m.box.root} LXD_DIR={m.box.lxd_dir} PID={m.box.pid}")
        return 0
    for root in map(Path, args.roots):
        Sandbox(root, int((root / "pid").read_text())).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
