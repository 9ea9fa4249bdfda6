"""What a server sends is a key before it names anything (issue 17 item 6, issue 18 item 2), and
the daemon's own mode check (issue 17 item 5): over the stand-in, where a server must lie."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from fakelxd import FakeLXD

from lxdimagefs.compose.root import Tree
from lxdimagefs.contents.archives import IndexFolder
from lxdimagefs.data.exports import Exports
from lxdimagefs.fs import access
from lxdimagefs.keys import ObjectKey
from lxdimagefs.servers.catalog import Catalog, LayoutJournal
from lxdimagefs.servers.events import EventSubject
from lxdimagefs.servers.records import ExportLayout, ExportPart
from lxdimagefs.servers.simplestreams import parse_products

HOSTILE = ("aaaaaaaaaaaa/../..", "A" * 64, "a" * 63, "../" + "a" * 61, 12345, None)


def _tree(lxd: FakeLXD, tmp_path: Path) -> Tree:
    index = IndexFolder(tmp_path / "cache" / "index")
    return Tree(Catalog(lxd, ttl=0), Exports(lxd, tmp_path / "cache" / "spool"),  # type: ignore[arg-type]
                readonly=False, mountpoint="/mnt", index=index)


def _errno(call, *args) -> int | None:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def test_a_hostile_fingerprint_is_skipped_names_nothing_and_the_rest_is_listed(tmp_path, caplog):
    lxd = FakeLXD()
    good = lxd.add(b"good image")
    for i, bad in enumerate(HOSTILE):
        lxd.records[f"bad{i}"] = {**lxd.records[good], "fingerprint": bad, "aliases": [{"name": f"evil{i}"}]}
    tree = _tree(lxd, tmp_path)
    caplog.set_level(logging.WARNING)
    assert tree.readdir("/by-fingerprint") == [good]
    assert tree.readdir("/by-alias") == []
    for path in ("/contents/by-fingerprint/aaaaaaaaaaaa", "/contents/by-fingerprint/aaaaaaaaaaaa/rootfs",
                 "/by-fingerprint/aaaaaaaaaaaa", "/by-fingerprint/aaaaaaaaaaaa/metadata.json"):
        assert _errno(tree.getattr, path) == errno.ENOENT, path
    assert "skipped an image record" in caplog.text and "aaaaaaaaaaaa/../.." in caplog.text
    caplog.clear()
    tree.catalog.invalidate()
    assert tree.readdir("/by-fingerprint") == [good] and "skipped" not in caplog.text  # said once
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and tmp_path / "cache" not in p.parents]
    assert outside == []
    assert tree.getattr(f"/by-fingerprint/{good}/metadata.json").size > 0  # the mount goes on


def test_a_simplestreams_item_with_a_bad_hash_is_skipped_alone(caplog):
    def version(fp: str, sha: str) -> dict:
        return {"items": {"m": {"ftype": "lxd.tar.xz", "sha256": sha, "size": 10, "path": "m.tar.xz",
                                "combined_squashfs_sha256": fp},
                          "r": {"ftype": "squashfs", "sha256": "c" * 64, "size": 20, "path": "r.squashfs"}}}
    products = {"p": {"arch": "amd64", "os": "Debian", "release": "x", "aliases": "debian/x",
                      "versions": {"20260101_00:00": version("a" * 64, "b" * 64),
                                   "20260102_00:00": version("../../etc/passwd", "b" * 64),
                                   "20260103_00:00": version("d" * 64, "../" + "e" * 61)}}}
    caplog.set_level(logging.WARNING)
    listing = parse_products(products, "https://example")
    assert [i.fingerprint for i in listing.images] == ["a" * 64]
    assert set(listing.paths) == {"b" * 64, "c" * 64}
    assert caplog.text.count("skipped an item of https://example") == 2


def test_an_event_naming_a_hostile_fingerprint_names_no_image():
    for bad in ("aaaaaaaaaaaa/../..", "%2e%2e", "A" * 64):
        subject = EventSubject.of({"metadata": {"action": "image-deleted", "source": f"/1.0/images/{bad}"}})
        assert subject is not None and subject.fingerprint is None


def test_one_servers_journal_lines_never_answer_for_anothers(tmp_path):
    path = tmp_path / "layouts.jsonl"
    fp = "f" * 64
    evil = LayoutJournal(path, "https://evil:8443 project=default")
    evil.add(fp, ExportLayout(False, (ExportPart("x", 1),)))
    assert LayoutJournal(path, "unix:/var/lib/lxd/unix.socket project=default").load() == {}
    assert LayoutJournal(path, "https://evil:8443 project=default").load()[fp].parts[0].size == 1
    with open(path, "a") as f:  # a line from before keys, or a forged one: ignored
        f.write('{"fp": "%s", "split": false, "parts": [["y", 2]]}\n' % ("e" * 64))
        f.write('{"key": "layout-x-../..", "fp": "../..", "split": false, "parts": [["y", 2]]}\n')
    assert set(LayoutJournal(path, "https://evil:8443 project=default").load()) == {fp}


def test_keys_of_two_servers_differ_and_are_plain_names():
    fp = "a" * 64
    names = {ObjectKey(fp, kind, server).filename for kind in ("index", "spool", "layout")  # type: ignore[arg-type]
             for server in ("unix:/a project=default", "https://b project=default", "")}
    assert len(names) == 9 and all("/" not in n and n.isascii() for n in names)


def test_a_verdict_is_kept_by_server_and_digest():
    from lxdimagefs.data.blocks import BlockCache
    from lxdimagefs.data.verify import Verification
    one, two = (Verification(BlockCache(1 << 20), lambda *a: bytearray(), server) for server in ("a", "b"))
    assert one.key("c" * 64) != two.key("c" * 64)
    with pytest.raises(ValueError):
        one.served("../" + "c" * 61, 10, 0, 10)


def test_the_spool_names_files_by_key(tmp_path):
    lxd = FakeLXD()
    exports = Exports(lxd, tmp_path / "spool")  # type: ignore[arg-type]
    name = exports.spool.named("b" * 64, "0").name
    assert name.startswith("spool-") and name.endswith("b" * 64 + ".0")
    with pytest.raises(ValueError):
        exports.spool.named("../../x", "0")


def test_the_daemon_refuses_a_private_image_to_other_users(tmp_path):
    """The check fuse_ops makes for callers other than the mounter, should the kernel not."""
    lxd = FakeLXD()
    private, public = lxd.add(b"private"), lxd.add(b"public")
    lxd.records[public]["public"] = True
    tree = _tree(lxd, tmp_path)
    owner = (0, 0)

    def may(path: str, want: int, uid: int = 65534) -> bool:
        try:
            access.check(tree.getattr, path, uid, {uid}, owner, want)
        except OSError as e:
            assert e.errno == errno.EACCES
            return False
        return True

    for name in ("metadata.json", f"{public}.tar"):
        assert may(f"/by-fingerprint/{public}/{name}", os.R_OK)
        assert not may(f"/by-fingerprint/{public}/{name}", os.W_OK)
        assert not may(f"/by-fingerprint/{private}/{name.replace(public, private)}", os.R_OK)
    assert not may(f"/by-fingerprint/{private}", os.R_OK)
    assert may("/by-fingerprint", os.R_OK) and not may("/by-fingerprint", os.W_OK | os.X_OK)
    assert not may(f"/contents/by-fingerprint/{private}", os.X_OK)
    # The mounter (here uid 0) has the owner's bits.
    assert may(f"/by-fingerprint/{private}/metadata.json", os.R_OK | os.W_OK, uid=0)
