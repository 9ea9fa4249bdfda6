"""Listings that hold while images keep arriving (issue 28), against the real LXD.

A full listing is counted in the daemon's log as the request for `/1.0/images?recursion=1` (one
image is `GET /images/<fp>`): events must be applied one image at a time, never by listing again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import time

import pytest
from lxd_sandbox import make_unified
from mounts import mounted

from lxdimagefs.names import alias_to_filename

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

LISTENING = "listening to LXD's lifecycle events"


def _listings(m) -> int:
    """Full listings: `GET /1.0/images?…recursion=1` (the cheap list at mount has no recursion)."""
    return sum(1 for line in m.log_text().splitlines()
               if '"GET /1.0/images?' in line and "recursion=1" in line)


def _wait_for_log(m, text: str, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while m.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"the log never said {text!r} {count} times"
        time.sleep(0.05)


def _lxds(sandbox) -> tuple[set[str], dict[str, str]]:
    """What LXD lists: its fingerprints, and its aliases' targets."""
    records = sandbox.rest("/1.0/images?recursion=1")
    aliases = {alias_to_filename(a["name"]): r["fingerprint"]
               for r in records for a in r.get("aliases") or ()}
    return {r["fingerprint"] for r in records}, aliases


def _shown(m) -> tuple[set[str], dict[str, str]]:
    """What the mount lists (and `ls -l` stats): its fingerprints, and where its alias links lead."""
    fps = set(os.listdir(m.path / "by-fingerprint"))
    for fp in fps:
        os.lstat(m.path / "by-fingerprint" / fp)
    links = {name: os.readlink(m.path / "by-alias" / name).rsplit("/", 1)[-1]
             for name in os.listdir(m.path / "by-alias")}
    return fps, links


def _settles_to_lxds(sandbox, m, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while True:
        want, shown = _lxds(sandbox), _shown(m)
        if shown == want:
            return
        assert time.monotonic() < deadline, f"the mount shows {shown}, LXD {want}"
        time.sleep(0.05)


def _import(sandbox, tmp_path, name: str, alias: str | None = None) -> str:
    tarball = make_unified(tmp_path / f"{name}.tar", rootfs_bytes=1024, seed=name)
    return sandbox.import_image(tarball, alias=alias)


def test_events_are_applied_one_image_at_a_time_without_listing_again(sandbox, images, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        _wait_for_log(m, LISTENING)
        _shown(m)
        listed = _listings(m)
        a = _import(sandbox, tmp_path, "ev-a", alias="ev/a")
        b = _import(sandbox, tmp_path, "ev-b")
        try:
            sandbox.lxc("image", "alias", "create", "ev-moved", a)
            sandbox.rest("/1.0/images/aliases/ev-moved", "PUT", {"target": b, "description": ""})
            sandbox.lxc("image", "alias", "rename", "ev/a", "ev/renamed")
            sandbox.rest(f"/1.0/images/{b}", "PATCH", {"properties": {"edited": "elsewhere"}})
            sandbox.lxc("image", "delete", a)
            _settles_to_lxds(sandbox, m)
            assert _shown(m)[1]["ev-moved"] == b and a not in _shown(m)[0]
            record = json.loads((m.path / "by-fingerprint" / b / "metadata.json").read_text())
            assert record["properties"]["edited"] == "elsewhere"
            assert _listings(m) == listed, "an event made the mount list every image again"
        finally:
            sandbox.lxc("image", "delete", a, check=False)
            sandbox.lxc("image", "delete", b, check=False)


def test_a_listing_taken_while_images_arrive_and_leave_is_right_when_they_stop(sandbox, images, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        _wait_for_log(m, LISTENING)
        made: list[str] = []

        def churn(i: int) -> None:
            fp = _import(sandbox, tmp_path, f"churn-{i}", alias=f"churn/{i}")
            made.append(fp)
            if i % 3 == 0:
                sandbox.lxc("image", "delete", fp)

        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                done = [pool.submit(churn, i) for i in range(12)]
                while not all(f.done() for f in done):
                    with contextlib.suppress(FileNotFoundError):
                        _shown(m)  # ls -l, racing the changes: an entry may vanish under it
                for f in done:
                    f.result()
            _settles_to_lxds(sandbox, m)
            assert len(_shown(m)[0] & set(made)) == 8
        finally:
            for fp in made:
                sandbox.lxc("image", "delete", fp, check=False)


def test_events_lost_while_the_stream_reconnects_are_made_up_by_one_listing(sandbox, images, proxy, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", "timeout=2,metadata_ttl=600") as m:
        _wait_for_log(m, LISTENING)
        _shown(m)
        proxy.frozen.set()  # the stream says nothing, and hears nothing
        try:
            fp = _import(sandbox, tmp_path, "lost", alias="lost-while-down")
            _wait_for_log(m, "no answer from LXD's event stream", timeout=20)
            listed = _listings(m)
        finally:
            proxy.frozen.clear()
        try:
            _wait_for_log(m, LISTENING, count=2, timeout=40)
            _settles_to_lxds(sandbox, m)
            sandbox.lxc("image", "alias", "create", "after-reconnect", fp)
            deadline = time.monotonic() + 2
            while "after-reconnect" not in os.listdir(m.path / "by-alias"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            for _ in range(3):
                _shown(m)
            assert _listings(m) == listed + 1
        finally:
            sandbox.lxc("image", "delete", fp, check=False)


def test_a_miss_is_asked_once_and_never_lists_again(sandbox, images, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "-o", "metadata_ttl=600") as m:
        _wait_for_log(m, LISTENING)
        _shown(m)
        listed = _listings(m)
        absent = "0123456789abcdef" * 4
        for name in (absent, absent, "0123456789abcdef", "0123456789abcdef"):
            with pytest.raises(OSError) as e:
                os.stat(m.path / "by-fingerprint" / name)
            assert e.value.errno == errno.ENOENT
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                os.lstat(m.path / "by-alias" / "no-such-alias")
        assert m.log_text().count("client: GET /images/aliases/no-such-alias\n") == 1
        assert m.log_text().count(f"client: GET /images/{absent}\n") == 1
        assert m.log_text().count("client: GET /images/0123456789abcdef\n") == 1
        assert _listings(m) == listed


def test_a_fresh_mount_lists_once(sandbox, images, tmp_path):
    with mounted(sandbox, tmp_path / "mnt") as m:
        _wait_for_log(m, LISTENING)
        _shown(m)
        _shown(m)
        assert _listings(m) == 1


def _within(check, what: str, seconds: float = 1.0) -> None:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what} not within {seconds} s"
        time.sleep(0.01)


def test_with_the_kernels_long_caches_changes_made_elsewhere_show_within_a_second(sandbox, images, tmp_path):
    """Every server follows events: the kernel keeps names for an hour, and forgets exactly what changed."""
    with mounted(sandbox, tmp_path / "mnt") as m:
        _wait_for_log(m, LISTENING)
        c = _import(sandbox, tmp_path, "kc-c", alias="kc")
        d = _import(sandbox, tmp_path, "kc-d")
        try:
            fps, alias = m.path / "by-fingerprint", m.path / "by-alias" / "kc"
            meta, inside = fps / c / "metadata.json", m.path / "contents" / "by-fingerprint" / c
            _within(lambda: os.path.lexists(alias), "the new alias")
            assert os.readlink(alias).endswith(c) and os.listdir(inside)  # now in the kernel's caches
            size = os.stat(meta).st_size
            sandbox.rest("/1.0/images/aliases/kc", "PUT", {"target": d, "description": ""})
            _within(lambda: os.readlink(alias).endswith(d), "the retargeted alias")
            sandbox.rest(f"/1.0/images/{c}", "PATCH", {"properties": {"note": "x" * 100}})
            _within(lambda: os.stat(meta).st_size > size, "metadata.json's new size")
            assert os.stat(meta).st_size == len(meta.read_bytes())
            files = [fps / c / name for name in os.listdir(fps / c)] + [inside / "rootfs/etc/hostname"]
            assert all(os.stat(f) for f in files)  # the names and attributes, in the kernel's caches
            sandbox.lxc("image", "delete", c)
            _within(lambda: not os.path.exists(fps / c) and not os.path.exists(inside), "the deletion")
            _within(lambda: not any(os.path.exists(f) for f in files), "the deletion of its files")
            assert "no_events" not in m.log_text()
        finally:
            sandbox.lxc("image", "delete", c, check=False)
            sandbox.lxc("image", "delete", d, check=False)


def test_with_the_event_stream_refused_changes_show_within_the_metadata_lifetime(sandbox, images, proxy,
                                                                                 tmp_path):
    """LXD answers everything but its event stream (a proxy without websockets): the kernel keeps
    names for an hour as the mount asked for events, so while the stream is down a listing every
    metadata_ttl must tell it what changed (SPEC, Freshness)."""
    from faultproxy import Rule

    proxy.add(Rule(match="/1.0/events", status=503, times=-1))
    with mounted(sandbox, tmp_path / "mnt", "--socket", proxy.path, "-o", "metadata_ttl=1") as m:
        _wait_for_log(m, "event stream is down")
        c = _import(sandbox, tmp_path, "down-c", alias="down-a")
        try:
            meta, alias = m.path / "by-fingerprint" / c / "metadata.json", m.path / "by-alias" / "down-a"
            _within(lambda: os.path.lexists(alias), "the new alias", seconds=3)
            size = os.stat(meta).st_size  # now in the kernel's caches
            sandbox.rest(f"/1.0/images/{c}", "PATCH", {"properties": {"note": "x" * 100}})
            _within(lambda: os.stat(meta).st_size > size, "metadata.json's new size", seconds=8)
            sandbox.lxc("image", "alias", "delete", "down-a")
            _within(lambda: not os.path.lexists(alias), "the deleted alias", seconds=8)
        finally:
            sandbox.lxc("image", "delete", c, check=False)
