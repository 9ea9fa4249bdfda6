"""A real three-member LXD cluster on loopback (127.0.0.1-3), one mount per member.

The cost, measured: the cluster is started once for the module
(scripts/lxd_cluster.py: 5-7 s for the three daemons and the two token
joins, 8 s to stop them); the module alone takes 40-51 s on the shared
2-core machine, and about 35 s of the full suite's 9.5 minutes (2026-12-01),
of which the leader's test is 12-20 s (the EIO waits out the 8 s timeout;
the leader's restart and rejoin about 10 s). `cluster.images_minimal_replica=1`
keeps each image on the member that took it, so that reads through another
member really go through that member's forwarding.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml
from helpers import sha, within
from lxd_cluster import Cluster, Member
from lxd_sandbox import make_unified
from mounts import Mount, mounted, unmount

pytestmark = pytest.mark.lxd

TIMEOUT = 8  # -o timeout: how long a mount rides out a member that does not answer


def held_by(member: Member, fp: str) -> bool:
    return (member.box.lxd_dir / "images" / fp).exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = time.monotonic()
    c = Cluster.start()
    print(f"cluster of 3 formed in {time.monotonic() - started:.1f} s")
    try:
        c.members[0].box.lxc("config", "set", "cluster.images_minimal_replica", "1")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mounts(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Mount]]:
    """One mount per member: m1's and m2's on their own sockets, m3's over HTTPS (a client
    certificate the cluster trusts, the cluster's certificate pinned), its events over wss."""
    work = tmp_path_factory.mktemp("https")
    crt, key = work / "client.crt", work / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-subj", "/CN=mount", "-days", "2"],
                   capture_output=True, check=True)
    cluster.members[0].box.lxc("config", "trust", "add", str(crt))
    pinned = str(cluster.members[0].box.lxd_dir / "cluster.crt")
    with contextlib.ExitStack() as stack:
        made = {}
        for m in cluster.members:
            https = ("--url", m.url, "--cert", str(crt), "--key", str(key), "--server-cert", pinned)
            where = tmp_path_factory.mktemp(m.name) / "mnt"
            made[m.name] = stack.enter_context(mounted(m.box, where, "-o", f"timeout={TIMEOUT}",
                                                       server=https if m.name == "m3" else ()))
        yield made


def test_three_members_joined_with_tokens(cluster):
    states = cluster.states()
    assert sorted(states) == ["m1", "m2", "m3"]
    assert all(s["status"] == "Online" for s in states.values())
    assert all("database" in s["roles"] for s in states.values())  # three voters: one may go
    assert [m.address.split(":")[0] for m in cluster.members] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_import_through_one_member_read_verified_through_another(cluster, mounts, tmp_path):
    image = make_unified(tmp_path / "via-m2.tar.xz", rootfs_bytes=3 << 20)
    fp = hashlib.sha256(image.read_bytes()).hexdigest()
    shutil.copyfile(image, mounts["m2"].path / "import" / "via-m2.tar.xz")
    try:
        assert held_by(cluster.member("m2"), fp) and not held_by(cluster.member("m3"), fp)
        within(lambda: fp in os.listdir(mounts["m3"].path / "by-fingerprint"))
        assert sha(mounts["m3"].path / "by-fingerprint" / fp / f"{fp}.tar.xz") == fp
        assert not held_by(cluster.member("m3"), fp)  # m3 forwarded the reads to m2
    finally:
        cluster.member("m2").box.lxc("image", "delete", fp)


def test_an_alias_made_through_one_member_shows_on_another_within_a_second(cluster, mounts, tmp_path):
    fp = cluster.member("m3").box.import_image(make_unified(tmp_path / "a.tar"))
    try:
        os.listdir(mounts["m1"].path / "by-alias")  # cached now: only the event can tell
        os.symlink(f"../by-fingerprint/{fp}", mounts["m3"].path / "by-alias" / "made-on-m3")
        took = within(lambda: "made-on-m3" in os.listdir(mounts["m1"].path / "by-alias"))
        print(f"alias made through m3 listed on m1 after {took:.3f} s")
        # (Not mv: LXD 5.0.2 takes 10 s to rename an alias in a cluster, a transaction timing out.)
        os.unlink(mounts["m3"].path / "by-alias" / "made-on-m3")
        within(lambda: "made-on-m3" not in os.listdir(mounts["m1"].path / "by-alias"))
    finally:
        cluster.member("m3").box.lxc("image", "delete", fp)


def test_a_new_machine_joins_with_a_token_and_reads_over_https(cluster, tmp_path):
    """The cluster's own certificate pinned from the token; an image held by one member read via another."""
    holder = cluster.member("m3")
    fp = holder.box.import_image(make_unified(tmp_path / "https.tar.gz", rootfs_bytes=1 << 20))
    out = cluster.member("m2").box.lxc("config", "trust", "add", "--name", "laptop", "-q").stdout.decode()
    env = {**os.environ, "LXD_CONF": str(tmp_path / "lxc"), "INCUS_CONF": str(tmp_path / "no-incus")}
    env.pop("LXD_DIR", None)
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--trust-token", out.strip().splitlines()[-1],
                           "--cache-dir", str(tmp_path), "cluster", str(where)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        addr = yaml.safe_load((tmp_path / "lxc" / "config.yml").read_text())["remotes"]["cluster"]["addr"]
        assert addr != holder.url  # the first address of the token that answered: not the holder's
        assert sha(where / "by-fingerprint" / fp / f"{fp}.tar.gz") == fp
    finally:
        unmount(where)
        holder.box.lxc("image", "delete", fp)


def test_the_leader_stopped_the_survivors_serve_and_all_works_again(cluster, mounts, tmp_path):
    leader = cluster.leader()
    survivors = [m for m in cluster.members if m is not leader]
    only_on_leader = leader.box.import_image(make_unified(tmp_path / "leader.tar.gz"), alias="on-leader")
    on_survivor = survivors[0].box.import_image(make_unified(tmp_path / "surv.tar", rootfs_bytes=2 << 20),
                                                alias="on-survivor")
    reader = mounts[survivors[1].name].path  # holds neither image
    within(lambda: {only_on_leader, on_survivor} <= set(os.listdir(reader / "by-fingerprint")))
    assert not held_by(survivors[0], only_on_leader) and not held_by(survivors[1], only_on_leader)
    started = time.monotonic()
    leader.box.halt()
    try:
        # The survivors keep quorum: they list, read, and take changes.
        for m in survivors:
            assert {only_on_leader, on_survivor} <= set(os.listdir(mounts[m.name].path / "by-fingerprint"))
        assert sha(reader / "by-alias" / "on-survivor" / f"{on_survivor}.tar") == on_survivor
        writer = mounts[survivors[0].name].path
        os.symlink(f"../by-fingerprint/{on_survivor}", writer / "by-alias" / "no-leader")
        within(lambda: "no-leader" in os.listdir(reader / "by-alias"))
        # The one copy of an image is on the stopped member: EIO within the timeout, never a hang.
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            sha(reader / "by-fingerprint" / only_on_leader / f"{only_on_leader}.tar.gz")
        assert e.value.errno == errno.EIO
        print(f"EIO for the image only the stopped leader held after {time.monotonic() - t0:.1f} s")
        assert time.monotonic() - t0 < 2 * TIMEOUT + 5  # a lookup, then an open: each bounded
        assert cluster.leader() in survivors  # a new leader was elected among the two left
    finally:
        leader.box.resume()
    cluster.wait_online()
    print(f"leader stopped and back online in {time.monotonic() - started:.1f} s")
    # Everything works again: the image read through the member that never held it, verified.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert sha(reader / "by-alias" / "on-leader" / f"{only_on_leader}.tar.gz") == only_on_leader
            break
        except OSError:
            assert time.monotonic() < deadline, "the image did not come back with its member"
            time.sleep(0.5)
    assert sorted(os.listdir(mounts[leader.name].path / "by-fingerprint")) == \
        sorted(os.listdir(reader / "by-fingerprint"))
    for fp in (only_on_leader, on_survivor):
        survivors[0].box.lxc("image", "delete", fp)
