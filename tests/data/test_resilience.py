"""Faults injected between the mount and the real LXD, and LXD's events."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
from faultproxy import Rule
from helpers import export_of as _export
from lxd_sandbox import make_split, make_unified
from mounts import alias_made_elsewhere_shows, mounted, unmount, wait_mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


def test_a_read_whose_connection_drops_resumes_with_the_right_bytes(sandbox, images, proxy, tmp_path):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path) as m:
        path = _export(m, fp)
        proxy.add(Rule("/export", cut_after=300_000, times=2))  # inside the first block
        assert hashlib.sha256(path.read_bytes()).hexdigest() == fp
        assert len(proxy.applied) == 2
        log = m.log_text()
        drops = [int(x) for x in re.findall(r"dropped at offset (\d+)", log)]
        ranges = [int(x) for x in re.findall(rf"GET /images/{fp}/export bytes=(\d+)-", log)]
        assert len(drops) == 2 and all(d % (1 << 20) for d in drops)  # cut mid-block
        assert ranges == [0, *drops]  # each resumed at the very byte it had reached


def test_an_lxd_error_gives_eio_and_the_next_call_works(sandbox, images, proxy, tmp_path):
    fp = images.fps["plain"]
    # no_events: with a live stream the listing would not be fetched again at all
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", "metadata_ttl=0.1,no_events") as m:
        path = _export(m, fp)
        proxy.add(Rule("/export", status=500, times=-1))  # the kernel retries a failed readahead
        with open(path, "rb") as f, pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
        proxy.clear()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == fp
        time.sleep(0.2)
        proxy.add(Rule("GET /1.0/images?", status=500))
        with pytest.raises(OSError) as e:
            os.listdir(m.path / "by-fingerprint")
        assert e.value.errno == errno.EIO
        assert fp in os.listdir(m.path / "by-fingerprint")


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_passing_503_is_retried_and_invisible(sandbox, images, proxy, tmp_path, status):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", "metadata_ttl=0.1,no_events") as m:
        path = _export(m, fp)
        proxy.add(Rule("/export", status=status, times=3))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == fp
        time.sleep(0.2)
        proxy.add(Rule("GET /1.0/images?", status=status, times=2))
        assert fp in os.listdir(m.path / "by-fingerprint")
        assert len(proxy.applied) == 5


@pytest.mark.parametrize("fault, timeout, least, most", [
    (Rule("/export", status=503, times=-1), "1.5", 1.0, 4),  # a lasting 503: retried, then EIO
    (Rule("/export", delay=3, times=-1), "1", 0, 2.5),  # a slow LXD: EIO within the timeout
])
def test_a_lasting_fault_gives_eio_after_the_timeout(sandbox, images, proxy, tmp_path, fault, timeout,
                                                     least, most):
    fp = images.fps["plain"]
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", f"timeout={timeout}") as m:
        path = _export(m, fp)
        proxy.add(fault)
        started = time.monotonic()
        with open(path, "rb") as f, pytest.raises(OSError) as e:
            f.read(4096)
        assert e.value.errno == errno.EIO
        assert least < time.monotonic() - started < most
        proxy.clear()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == fp


def test_an_interrupted_upload_fails_on_close_and_leaves_nothing(sandbox, proxy, tmp_path):
    tarball = make_unified(tmp_path / "cut.tar", rootfs_bytes=4 << 20)
    before = {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path) as m:
        proxy.add(Rule("POST /1.0/images", cut_request_after=1 << 20))
        done = subprocess.run(["cp", str(tarball), str(m.path / "import")], capture_output=True, text=True)
        assert done.returncode != 0
        assert os.listdir(m.path / "import") == ["cut.tar.error"]
        os.unlink(m.path / "import" / "cut.tar.error")
        _lxd_idle(sandbox)  # LXD has finished with the broken body
        assert {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")} == before
        leftovers = [n for n in os.listdir(sandbox.lxd_dir / "images") if len(n.split(".")[0]) != 64]
        assert leftovers == []
        # and the mount still imports
        subprocess.run(["cp", str(tarball), str(m.path / "import")], check=True)
    sandbox.lxc("image", "delete", hashlib.sha256(tarball.read_bytes()).hexdigest())


def test_changes_made_with_lxc_show_within_a_second(sandbox, images, tmp_path):
    fp = images.fps["xz"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        os.listdir(m.path / "by-alias")  # the listing is cached for 10 minutes…
        _wait_for_log(m, "listening to LXD's lifecycle events")
        sandbox.lxc("image", "alias", "create", "from-lxc", fp)
        try:
            started = time.monotonic()
            while "from-lxc" not in os.listdir(m.path / "by-alias"):  # …but the event drops it
                assert time.monotonic() - started < 1, "not visible within 1 s"
                time.sleep(0.01)
        finally:
            sandbox.lxc("image", "alias", "delete", "from-lxc")
        started = time.monotonic()
        while "from-lxc" in os.listdir(m.path / "by-alias"):
            assert time.monotonic() - started < 1, "deletion not visible within 1 s"
            time.sleep(0.01)


def test_events_come_back_after_lxd_restarts(sandbox, images, tmp_path):
    fp = images.fps["xz"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        _wait_for_log(m, "listening to LXD's lifecycle events")
        sandbox.halt()
        sandbox.resume()
        _wait_for_log(m, "listening to LXD's lifecycle events", count=2, timeout=40)
        alias_made_elsewhere_shows(sandbox, m, fp, "after-restart")


def test_lxds_412_on_a_save_is_estale(sandbox, proxy, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "etag.tar"))
    try:
        with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path) as m:
            path = m.path / "by-fingerprint" / fp / "metadata.json"
            record = json.loads(path.read_text())
            record["public"] = True
            # Someone else's change lands between lxdimagefs's check and its PUT: only LXD's
            # If-Match can catch it.
            proxy.add(Rule("PUT /1.0/images/", before=lambda: sandbox.rest(
                f"/1.0/images/{fp}", "PATCH", {"properties": {"by": "in between"}})))
            with pytest.raises(OSError) as e:
                path.write_text(json.dumps(record))
            assert e.value.errno == errno.ESTALE
            assert len(proxy.applied) == 1
        got = sandbox.rest(f"/1.0/images/{fp}")
        assert got["properties"]["by"] == "in between" and got["public"] is False
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_lxds_412_on_an_xattr_save_is_estale(sandbox, proxy, tmp_path):
    fp = sandbox.import_image(make_unified(tmp_path / "etag-x.tar"))
    try:
        with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path) as m:
            folder = m.path / "by-fingerprint" / fp
            proxy.add(Rule("PUT /1.0/images/", before=lambda: sandbox.rest(
                f"/1.0/images/{fp}", "PATCH", {"properties": {"by": "in between"}})))
            # LXD refuses the first PUT (412): ESTALE, which the kernel retries once by itself for
            # setxattr(2). The retry sets the one attribute on the record as it is now.
            os.setxattr(folder, "user.lxd.public", b"true")
            assert len(proxy.applied) == 1
            assert "refused setxattr user.lxd.public" in m.log_text()
        got = sandbox.rest(f"/1.0/images/{fp}")
        assert got["properties"]["by"] == "in between" and got["public"] is True  # both changes kept
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def _lxd_idle(sandbox, timeout: float = 10) -> None:
    """Wait until LXD runs no operation (what it does with a broken upload is done by then)."""
    deadline = time.monotonic() + timeout
    while sandbox.rest("/1.0/operations?recursion=1").get("running"):
        assert time.monotonic() < deadline, "LXD still has operations running"
        time.sleep(0.05)


def _wait_for_log(m, text: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while m.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"the log never said {text!r} {count} times"
        time.sleep(0.05)


def test_a_silent_event_stream_is_taken_as_dropped_and_reopened(sandbox, images, proxy, tmp_path):
    """A half-open link (a host gone, a NAT that forgot it) says nothing: pings find it out."""
    fp = images.fps["xz"]
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", "timeout=2,metadata_ttl=0.5") as m:
        _wait_for_log(m, "listening to LXD's lifecycle events")
        proxy.frozen.set()
        try:
            _wait_for_log(m, "no answer from LXD's event stream", timeout=10)
        finally:
            proxy.frozen.clear()
        _wait_for_log(m, "listening to LXD's lifecycle events", count=2, timeout=40)
        alias_made_elsewhere_shows(sandbox, m, fp, "after-silence")


def test_a_daemon_killed_mid_upload_leaves_nothing_after_the_next_mount(sandbox, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tarball = make_unified(tmp_path / "big.tar", rootfs_bytes=4 << 20).read_bytes()
    meta, rootfs = make_split(tmp_path / "s", rootfs_bytes=2 << 20)
    before = {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}
    where = tmp_path / "mnt"
    where.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--socket", sandbox.socket,
                             "--cache-dir", str(cache), str(where)], stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fds = []
    try:
        wait_mounted(where, proc)
        fds.append(os.open(where / "import" / "big.tar", os.O_WRONLY | os.O_CREAT, 0o644))
        os.write(fds[-1], tarball[:2 << 20])
        os.mkdir(where / "import" / "half")
        (where / "import" / "half" / "meta.tar.xz").write_bytes(meta.read_bytes())
        fds.append(os.open(where / "import" / "half" / "rootfs.squashfs", os.O_WRONLY | os.O_CREAT, 0o644))
        os.write(fds[-1], rootfs.read_bytes()[:1 << 20])
        assert [p.name for p in cache.iterdir() if p.name.startswith("lxdimagefs-spool-")]
        proc.kill()
        proc.wait()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        unmount(where)
    _lxd_idle(sandbox)
    assert {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")} == before
    assert [n for n in os.listdir(sandbox.lxd_dir / "images") if len(n.split(".")[0]) != 64] == []
    stale = [p for p in cache.iterdir() if p.name.startswith("lxdimagefs-spool-")]
    assert len(stale) == 1  # the killed daemon's
    with mounted(sandbox, tmp_path / "again", "--cache-dir", str(cache)) as m:
        assert os.listdir(m.path / "import") == []
        assert not stale[0].exists()
        assert "left by a daemon that did not unmount" in m.log_text()
    assert [p for p in cache.iterdir() if p.name.startswith("lxdimagefs-spool-")] == []


def test_reading_exports_does_not_drop_the_listing(sandbox, images, tmp_path):
    """LXD sends an image-retrieved event for every export: it changes nothing."""
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        deadline = time.monotonic() + 10
        while "listening to LXD's lifecycle events" not in m.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.listdir(m.path / "by-fingerprint")

        def listings() -> int:
            return sum(1 for line in m.log_text().splitlines() if line.endswith("client: GET /images"))

        before = listings()
        for role in ("gz", "xz", "plain"):
            _export(m, images.fps[role]).read_bytes()
        os.listdir(m.path / "by-fingerprint")
        # A marker event: LXD's events arrive in order, so any the reads caused came before it.
        sandbox.lxc("image", "alias", "create", "marker", images.fps["gz"])
        try:
            _wait_for_log(m, "alias='marker'")
        finally:
            sandbox.lxc("image", "alias", "delete", "marker")
        upto = m.log_text().index("alias='marker'")
        assert "image-retrieved" not in m.log_text()[:upto]
        assert m.log_text()[:upto].count("client: GET /images\n") == before


def test_without_events_the_metadata_lifetime_bounds_staleness(sandbox, images, tmp_path):
    fp = images.fps["xz"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "no_events,metadata_ttl=1") as m:
        os.listdir(m.path / "by-alias")
        sandbox.lxc("image", "alias", "create", "from-lxc-ttl", fp)
        try:
            started = time.monotonic()
            while "from-lxc-ttl" not in os.listdir(m.path / "by-alias"):
                assert time.monotonic() - started < 1.5, "not visible within the metadata lifetime"
                time.sleep(0.02)
        finally:
            sandbox.lxc("image", "alias", "delete", "from-lxc-ttl")
        assert "listening to LXD's lifecycle events" not in m.log_text()


def test_a_deletion_made_with_lxc_drops_the_kernels_cached_entry(sandbox, images, tmp_path):
    fp = images.fps["xz"]
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        deadline = time.monotonic() + 10
        while "listening to LXD's lifecycle events" not in m.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        sandbox.lxc("image", "alias", "create", "short-lived", fp)
        link = m.path / "by-alias" / "short-lived"
        started = time.monotonic()
        while not os.path.lexists(link):
            assert time.monotonic() - started < 1
            time.sleep(0.01)
        os.lstat(link)  # now in the kernel's entry and attribute caches for 1 s
        sandbox.lxc("image", "alias", "delete", "short-lived")
        started = time.monotonic()
        while os.path.lexists(link):
            assert time.monotonic() - started < 0.5, "the kernel kept the deleted alias"
            time.sleep(0.01)
