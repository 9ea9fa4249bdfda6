"""The cluster section of scripts/benchmark.py: reading an image through a member that does not hold it.

A three-member cluster on loopback (scripts/lxd_cluster.py), the image
imported on m1 only (`cluster.images_minimal_replica=1`); over HTTPS with
one client certificate, `cat` through a mount on m2 (which forwards every
request to m1) against the same through a mount on m1, and against curl
with the same certificate on each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lxd_cluster import Cluster, Member
from lxd_sandbox import make_unified


def bench_cluster(work: Path, size_mib: int, row: Callable[..., None], sh: Callable[..., None],
                  first_reads: Callable[..., tuple[float, float]]) -> None:
    """The benchmark's own helpers are handed in (row, sh, mount, ...): one table, one run."""
    print(f"\nCluster of 3 on loopback: a {size_mib} MiB image held by m1 only, over HTTPS, server-warm",
          flush=True)
    started = time.perf_counter()
    cluster = Cluster.start()
    row("cluster of 3 formed (start, enable, 2 token joins)", f"{time.perf_counter() - started:.1f} s", "")
    try:
        holder, other = cluster.member("m1"), cluster.member("m2")
        holder.box.lxc("config", "set", "cluster.images_minimal_replica", "1")
        tarball = make_unified(work / "cluster.tar", rootfs_bytes=(size_mib << 20) - (16 << 10))
        fp = holder.box.import_image(tarball)
        tarball.unlink()
        stored = holder.box.lxd_dir / "images" / fp
        gib = stored.stat().st_size / (1 << 30)
        crt, key = work / "cluster-client.crt", work / "cluster-client.key"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=bench")
        holder.box.lxc("config", "trust", "add", str(crt))
        pinned = str(holder.box.lxd_dir / "cluster.crt")
        results = {}
        for member, label in ((holder, "m1, which holds it"), (other, "m2, which forwards to m1")):
            results[member.name] = _through(member, fp, gib, label, crt, key, pinned, stored, row, sh,
                                            first_reads)
        assert not (other.box.lxd_dir / "images" / fp).exists(), "m2 took a copy: not a forwarded read"
        (c1, l1), (c2, l2) = results["m1"], results["m2"]
        row("through the non-holder vs the holder: lxdimagefs", f"{l1 / l2:.2f}x", f"curl: {c1 / c2:.2f}x")
    finally:
        cluster.stop()


def _through(member: Member, fp: str, gib: float, label: str, crt: Path, key: Path, pinned: str,
             stored: Path, row: Callable[..., None], sh: Callable[..., None],
             first_reads: Callable[..., tuple[float, float]]) -> tuple[float, float]:
    """(curl's seconds, lxdimagefs's seconds), best of three each, through one member."""
    def curl() -> None:
        sh("curl", "-sfk", "--cert", str(crt), "--key", str(key), f"{member.url}/1.0/images/{fp}/export",
           "-o", "/dev/null")

    times = []
    for _ in range(3):
        sh("cat", str(stored))  # the holder's copy in the page cache, as for every tool
        t = time.perf_counter()
        curl()
        times.append(time.perf_counter() - t)
    t_curl = min(times)
    row(f"curl through {label}", f"{gib / t_curl:.2f} GiB/s", f"{t_curl:.2f} s")
    server = ("--url", member.url, "--cert", str(crt), "--key", str(key), "--server-cert", pinned)
    t, spent = first_reads(member.box, fp, server, before=lambda: sh("cat", str(stored)))
    row(f"lxdimagefs through {label}, cat", f"{gib / t:.2f} GiB/s",
        f"{t:.2f} s, {t_curl / t:.2f}x curl, daemon CPU {spent / gib:.2f} s/GiB")
    return t_curl, t
