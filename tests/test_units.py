"""Pure logic, without LXD or FUSE."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lxdimagefs.data.blocks import BLOCK, BlockCache
from lxdimagefs.data.verify import Verification
from lxdimagefs.errors import IntegrityError
from lxdimagefs.mount.options import MountOptions, UsageError, parse_options
from lxdimagefs.names import alias_to_filename, filename_to_alias, fits
from lxdimagefs.servers.catalog import LayoutJournal
from lxdimagefs.servers.events import EventSubject, EventWatcher
from lxdimagefs.servers.records import ExportLayout, ExportPart, parse_time
from lxdimagefs.wire.multipart import PartStream, first_part_and_next_name

ODD = st.sampled_from(["/", "／", "‛", ".", "．", "a", " ", "é", "\n"])


@given(st.text(ODD, min_size=1) | st.text(min_size=1).filter(lambda s: "\0" not in s))
def test_alias_names_map_losslessly(alias):
    name = alias_to_filename(alias)
    assert "/" not in name
    assert name not in (".", "..")
    assert filename_to_alias(name) == alias


@pytest.mark.parametrize("alias, name", [
    ("debian/12", "debian／12"), (".", "．"), ("..", "．．"), ("a.b", "a.b"),
    ("x／y", "x‛／y"), ("q‛", "q‛‛"), ("．", "‛．"),
])
def test_alias_names_documented_examples(alias, name):
    assert alias_to_filename(alias) == name
    assert filename_to_alias(name) == alias


def test_fits():
    assert fits("a" * 255)
    assert not fits("a" * 256)
    assert not fits("é" * 128)  # 256 bytes
    assert not fits("")


def test_parse_time():
    assert parse_time("2026-11-27T10:08:12.212657103Z") == pytest.approx(1795774092.212657, abs=1e-6)
    assert parse_time("0001-01-01T00:00:00Z") == 0
    assert parse_time("1970-01-01T00:00:00Z") == 0
    assert parse_time("2023-11-14T22:13:20+01:00") == 1700000000 - 3600
    assert parse_time("") == 0
    assert parse_time("garbage") == 0


def test_parse_options_refuses_numbers_that_are_not_finite_and_positive():
    for bad in ("timeout=nan", "timeout=inf", "metadata_ttl=-1", "cache_size=0"):
        with pytest.raises(UsageError):
            parse_options([bad])


def test_parse_options_splits_own_from_fuse():
    own, fuse = parse_options(["ro,metadata_ttl=2.5", "allow_other,cache_size=32,max_read=131072"])
    assert own == MountOptions(metadata_ttl=2.5, cache_size=32) and own.cache_bytes == 32 << 20
    assert fuse == {"ro": True, "allow_other": True, "max_read": "131072"}
    assert parse_options(["no_events"]) == (MountOptions(no_events=True), {})
    # Unset options keep their defaults; a flag given a value is FUSE's, as it always was.
    own, fuse = parse_options(["cache_max=1G,no_events=1"])
    assert own == MountOptions(cache_max=1 << 30) and own.timeout == 30.0 and fuse == {"no_events": "1"}
    assert parse_options(["cache_max=0"])[0].cache_max == 0
    with pytest.raises(UsageError):
        parse_options(["cache_size=x"])
    with pytest.raises(UsageError):
        parse_options(["timeout=-1"])


def _body(parts, boundary="b0undary"):
    out = b""
    for name, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


def test_part_stream_splits_parts_across_chunk_boundaries():
    meta, rootfs = b"M" * 5000 + b"\r\n--b0und", bytes(range(256)) * 300
    ctype, body = _body([("meta-x.tar.xz", meta), ("x.squashfs", rootfs)])
    got: list[list] = []
    stream = PartStream(ctype, lambda n: got.append([n, b""]),
                        lambda d: got[-1].__setitem__(1, got[-1][1] + bytes(d)), lambda: None)
    stream.feed(body[i:i + 7] for i in range(0, len(body), 7))
    assert got == [["meta-x.tar.xz", meta], ["x.squashfs", rootfs]]
    assert stream.parts_ended == 2
    assert first_part_and_next_name(ctype, [body]) == ("meta-x.tar.xz", len(meta), "x.squashfs")


def _verification(data: bytes, stored: bytes | None = None):
    """A Verification over `data`'s fingerprint, whose refetches return `stored` (LXD's bytes)."""
    stored = data if stored is None else stored
    cache = BlockCache(capacity=2 * BLOCK)
    fetched: list[int] = []

    def fetch(fp, total, index):
        fetched.append(index)
        block = bytearray(stored[index * BLOCK:(index + 1) * BLOCK])
        cache.publish(fp, index, block)
        v.published(fp, total, index, block)
        return block

    v = Verification(cache, fetch)
    return v, hashlib.sha256(data).hexdigest(), fetched


def _serve(v, fp, stored, index):
    """What a fetch followed by a reader's read of one whole block does."""
    block = bytearray(stored[index * BLOCK:(index + 1) * BLOCK])
    v.cache.publish(fp, index, block)
    v.published(fp, len(stored), index, block)
    v.served(fp, len(stored), index * BLOCK, index * BLOCK + len(block))


DATA = os.urandom(4 * BLOCK + 1234)


def test_a_whole_read_in_order_is_verified():
    v, fp, fetched = _verification(DATA)
    for i in range(5):
        _serve(v, fp, DATA, i)
    assert fp in v.verified and not fetched


@pytest.mark.parametrize("order", [[4, 0, 1, 2, 3], [3, 1, 4, 0, 2], [2, 3, 4, 1, 0]])
def test_a_corrupt_image_read_in_any_order_fails_on_the_read_that_completes_it(order):
    corrupt = DATA[:2 * BLOCK + 7] + b"X" + DATA[2 * BLOCK + 8:]
    v, fp, _ = _verification(DATA, corrupt)
    for i in order[:-1]:
        _serve(v, fp, corrupt, i)
    with pytest.raises(IntegrityError):
        _serve(v, fp, corrupt, order[-1])
    assert v.failed(fp)
    with pytest.raises(IntegrityError):  # sticky: the kernel retries failed reads
        v.served(fp, len(DATA), 0, 10)


def test_blocks_dropped_from_the_cache_are_fetched_again_for_the_check():
    v, fp, fetched = _verification(DATA)
    for i in (4, 3, 2, 1, 0):  # the cache holds two blocks: 4 and 3 are gone when 0 comes
        _serve(v, fp, DATA, i)
    assert fp in v.verified
    assert set(fetched) <= {2, 3, 4} and fetched


def test_partial_reads_are_not_checked_and_hold_no_data():
    v, fp, fetched = _verification(DATA)
    v.served(fp, len(DATA), 5, 4096)
    v.served(fp, len(DATA), 3 * BLOCK, 3 * BLOCK + 10)
    assert fp not in v.verified and not v.failed(fp) and not fetched


def test_layout_journal_round_trip_and_distrust(tmp_path):
    path = tmp_path / "layouts.jsonl"
    journal = LayoutJournal(path, "unix:/x project=default")
    unified = ExportLayout(False, (ExportPart("a" * 64 + ".tar.xz", 123),))
    split = ExportLayout(True, (ExportPart("meta-b.tar.xz", 10), ExportPart("b.squashfs", 4096)))
    journal.add("a" * 64, unified)
    journal.add("b" * 64, split)
    with open(path, "a") as f:
        f.write("not json\n{\"fp\": 1}\n")
    assert journal.load() == {"a" * 64: unified, "b" * 64: split}
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.chmod(path, 0o666)  # anyone could have written it: not trusted, not written to
    assert journal.load() == {}
    journal.add("c" * 64, unified)
    os.chmod(path, 0o600)
    assert "c" * 64 not in journal.load()
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    assert LayoutJournal(link, "unix:/x project=default").load() == {}


@pytest.mark.parametrize("message", [b"[1, 2]", b"null", b"\"text\"", b"{\"metadata\": 3}", b"not json"])
def test_a_bad_event_message_is_skipped_and_the_stream_goes_on(message):
    seen = []
    watcher = EventWatcher(None, seen.append, lambda: None)  # type: ignore[arg-type]
    watcher._dispatch(message)
    good = b'{"metadata": {"action": "image-created", "source": "/1.0/images/%s"}}' % (b"ab" * 32)
    watcher._dispatch(good)
    assert len(seen) == 1


def test_an_event_handler_that_fails_does_not_end_the_stream(caplog):
    calls = []

    def boom(subject):
        calls.append(subject)
        raise RuntimeError("a bug")

    watcher = EventWatcher(None, boom, lambda: None)  # type: ignore[arg-type]
    for _ in range(2):  # raises nothing, and the next event is still handled
        event = b'{"metadata": {"action": "image-deleted", "source": "/1.0/images/%s"}}' % (b"ab" * 32)
        watcher._dispatch(event)
    assert [c.fingerprint for c in calls] == ["ab" * 32] * 2
    assert "handling event image-deleted failed" in caplog.text


def test_layout_journal_refuses_a_hard_linked_file(tmp_path):
    path = tmp_path / "layouts.jsonl"
    journal = LayoutJournal(path, "unix:/x project=default")
    journal.add("a" * 64, ExportLayout(False, (ExportPart("a.tar", 1),)))
    os.link(path, tmp_path / "elsewhere")  # root writing through a planted hard link
    assert journal.load() == {}
    journal.add("b" * 64, ExportLayout(False, (ExportPart("b.tar", 1),)))
    assert "b" * 64 not in (tmp_path / "elsewhere").read_text()


def test_mount_and_systemd_options_are_dropped():
    own, fuse = parse_options(["_netdev,nofail,ro,x-systemd.automount,users,noauto,defaults,metadata_ttl=2"])
    assert own == MountOptions(metadata_ttl=2.0) and fuse == {"ro": True}


def _config(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(text)


def test_remotes_come_from_the_lxc_and_incus_configs(tmp_path, monkeypatch):
    from lxdimagefs.mount.remotes import RemoteError, all_remotes, resolve
    lxc, incus = tmp_path / "lxc", tmp_path / "incus"
    monkeypatch.setenv("LXD_CONF", str(lxc))
    monkeypatch.setenv("INCUS_CONF", str(incus))
    _config(lxc, "remotes:\n  a:\n    addr: https://a:8443\n  shared:\n    addr: https://lxc-one:8443\n"
                 "  img:\n    addr: https://img.example\n    protocol: simplestreams\n    public: true\n")
    _config(incus, "remotes:\n  b:\n    addr: unix:///run/b.socket\n  shared:\n    addr: https://incus-one:8443\n")
    (lxc / "servercerts").mkdir()
    (lxc / "servercerts" / "a.crt").write_text("pem")
    a = resolve("a")
    assert a.url == "https://a:8443" and a.server_cert() == str(lxc / "servercerts/a.crt")
    assert resolve("https://a:8443") == a  # an address a client knows comes with its certificates
    assert resolve("b").socket == "/run/b.socket" and resolve("b").protocol == "incus"
    assert resolve("shared").addr == "https://lxc-one:8443"  # lxc's wins
    assert resolve("img").simplestreams and resolve("img").public
    assert resolve("ubuntu").simplestreams  # lxc's built-in, not in config.yml
    assert [r.name for r in all_remotes()] == ["local", "a", "b", "img", "shared"]
    with pytest.raises(RemoteError, match="no remote named 'nope'"):
        resolve("nope")
    with pytest.raises(RemoteError, match="never plain HTTP"):
        resolve("http://a:8443")


def test_xattr_changes_and_refusals():
    import errno

    from lxdimagefs.servers.records import Image
    from lxdimagefs.tree.xattrs import XATTR_CREATE, XATTR_REPLACE, attributes, change
    rec = {"fingerprint": "f" * 64, "public": False, "auto_update": True, "properties": {"os": "x"},
           "aliases": [{"name": "a/b"}, {"name": "c"}], "type": "container", "architecture": "x86_64"}
    image = Image.from_record(rec)
    attrs = attributes(image)
    assert attrs["user.lxd.aliases"] == b"a/b\nc" and attrs["user.lxd.auto_update"] == b"true"
    fields = {"public": False, "properties": {"os": "x"}}
    change(image, "user.lxd.public", b"1", 0, "p")(fields)
    change(image, "user.lxd.properties.new", "é".encode(), 0, "p")(fields)
    change(image, "user.lxd.properties.os", None, 0, "p")(fields)
    assert fields == {"public": True, "properties": {"new": "é"}}
    assert rec["properties"] == {"os": "x"}  # the record itself is untouched

    def code(name, value, flags=0):
        with pytest.raises(OSError) as e:
            change(image, name, value, flags, "p")
        return e.value.errno

    assert code("user.lxd.fingerprint", b"x") == errno.EPERM
    assert code("user.lxd.public", b"yes") == errno.EINVAL
    assert code("user.lxd.properties.k", b"\xff") == errno.EINVAL
    assert code("security.selinux", b"x") == errno.ENOTSUP
    assert code("user.lxd.properties.os", b"y", XATTR_CREATE) == errno.EEXIST
    assert code("user.lxd.properties.none", b"y", XATTR_REPLACE) == errno.ENODATA
    assert code("user.lxd.properties.none", None) == errno.ENODATA


def test_simplestreams_products_become_lxds_records():
    from lxdimagefs.servers.simplestreams import native_arch, parse_products
    native = {"x86_64": "amd64", "aarch64": "arm64"}[native_arch()]
    foreign = "arm64" if native == "amd64" else "amd64"

    def h(label: str) -> str:
        return hashlib.sha256(label.encode()).hexdigest()

    def item(ftype, sha, size, **extra):
        return {"ftype": ftype, "path": f"images/x/{sha[:4]}.{ftype}", "sha256": sha, "size": size, **extra}

    def product(arch, serials):
        return {"aliases": "deb/12,deb", "arch": arch, "os": "Debian", "release": "12", "release_title": "12",
                "variant": "default", "versions": {s: {"items": {
                    "lxd.tar.xz": item("lxd.tar.xz", h(f"m{s}{arch}"), 10,
                                       combined_squashfs_sha256=h(f"c{s}{arch}")),
                    "squashfs": item("squashfs", h(f"r{s}{arch}"), 90)}} for s in serials}}

    old, new = "20260101_00:00", "20260202_00:00"
    listing = parse_products({
        "native": product(native, [old, new]),
        "foreign": product(foreign, [new]),
        "combined": {"aliases": "one", "arch": native, "os": "X", "release": "1", "versions": {
            "20260303": {"items": {"c": item("lxd_combined.tar.gz", h("combined"), 5)}}}},
        "broken": {"aliases": "b", "arch": native, "versions": {"nodate": {"items": {}}}},
    })
    by_fp = {i.fingerprint: i for i in listing.images}
    newest = h(f"c{new}{native}")
    assert set(by_fp) == {newest, h(f"c{old}{native}"), h(f"c{new}{foreign}"), h("combined")}
    assert by_fp[newest].aliases == ("deb/12", f"deb/12/{native}", "deb", f"deb/{native}")
    assert by_fp[h(f"c{old}{native}")].aliases == ()  # the newer version holds the names
    assert by_fp[h(f"c{new}{foreign}")].aliases == (f"deb/12/{foreign}", f"deb/{foreign}")
    rec = by_fp[newest].record
    assert rec["size"] == 100 and rec["type"] == "container" and rec["public"] is True
    assert rec["properties"]["serial"] == new and rec["created_at"] == "2026-02-02T00:00:00Z"
    layout = listing.layouts[newest]
    assert layout.split and [p.name for p in layout.parts] == [f"meta-{newest}.tar.xz", f"{newest}.squashfs"]
    assert [p.key for p in layout.parts] == [h(f"m{new}{native}"), h(f"r{new}{native}")]
    assert listing.layouts[h("combined")].parts[0].name == f"{h('combined')}.tar.gz"
    assert listing.paths[h(f"r{new}{native}")].endswith(".squashfs")


def test_events_of_all_projects_name_their_project_and_project_changes():
    """LXD's all-projects stream: an image event names its project; project lifecycle events are kept."""
    image = EventSubject.of({"project": "team", "metadata": {"action": "image-alias-created",
                                                             "source": "/1.0/images/aliases/a%2Fb"}})
    assert image == EventSubject("image-alias-created", alias="a/b", project="team")
    made = EventSubject.of({"project": "new", "metadata": {"action": "project-created",
                                                           "source": "/1.0/projects/new"}})
    assert made is not None and made.projects_changed
    assert EventSubject.of({"metadata": {"action": "image-created", "source": "/1.0/images/ab"}}).project == \
        "default"  # a stream of one project: LXD 5.0 may leave the field out
    assert EventSubject.of({"metadata": {"action": "instance-created", "source": "/1.0/instances/x"}}) is None


def test_no_patience_still_gives_the_first_try_its_whole_timeout():
    """Mounting asks once, without retries: that one try must not be cut to 0.1 s (a busy LXD misses it)."""
    from lxdimagefs.errors import LXDUnreachable
    from lxdimagefs.wire.transport import Backoff

    assert Backoff(0).clamp((5.0, 30.0)) == (5.0, 30.0)
    later = Backoff(0.5)
    later.pause(LXDUnreachable("away"), "a test")  # a retry: bounded by what is left of the budget
    assert max(later.clamp((5.0, 30.0))) <= 0.5


def test_a_threads_process_is_its_thread_group():
    import threading

    from lxdimagefs.fs.commit import killed_by, process_of

    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(process_of(threading.get_native_id())))
    t.start()
    t.join()
    assert seen == [os.getpid()] and threading.get_native_id() != 0
    assert process_of(2**22 + 12345) == 2**22 + 12345  # no such thread: the id itself
    assert killed_by(os.getpid()) == 0  # alive, not exiting


def test_the_last_read_racing_a_failed_verdict_is_eio() -> None:
    """`served` looks for a verdict, then for the check in progress: a verdict that lands between
    the two must not start a fresh check that lets the read through."""
    good, bad = [b"g" * BLOCK, b"h" * BLOCK], [b"g" * BLOCK, b"X" * BLOCK]
    fp, total = hashlib.sha256(b"".join(good)).hexdigest(), 2 * BLOCK
    cache = BlockCache(8 * BLOCK)
    verification = Verification(cache, lambda f, t, i: bytearray(bad[i]))
    reader, concluded = threading.current_thread(), threading.Event()

    class Corrupt(set[str]):  # the reader's `fp in corrupt`, then the hash concludes right there
        def __contains__(self, item: object) -> bool:
            found = super().__contains__(item)
            if threading.current_thread() is reader and not found and not concluded.is_set():
                concluded.set()
                verification.published(fp, total, 1, bytearray(bad[1]))
                for _ in range(200):
                    if super().__contains__(item):
                        break
                    threading.Event().wait(0.01)
                assert super().__contains__(item)
            return found

    cache.publish(fp, 0, bytearray(bad[0]))
    verification.published(fp, total, 0, bytearray(bad[0]))
    verification.served(fp, total, 0, BLOCK)
    verification.corrupt = Corrupt(verification.corrupt)
    with pytest.raises(IntegrityError):  # this read completes the file
        verification.served(fp, total, BLOCK, total)


# -- the listing, one change at a time (servers/listing.py, the catalog's event thread) ----------


def _listing_with(fake):
    from lxdimagefs.servers.catalog import Catalog

    catalog = Catalog(fake, ttl=600)
    catalog.events_live = lambda: True
    told: list = []
    catalog.listeners.append(told.append)
    return catalog, told


def test_an_event_asks_for_its_image_alone_and_says_what_changed():
    from fakelxd import FakeLXD

    fake = FakeLXD()
    a, b = fake.add(b"a", ("os/1",)), fake.add(b"b")
    catalog, told = _listing_with(fake)
    assert catalog.snapshot().aliases == {alias_to_filename("os/1"): a}
    calls = []
    fake.images = lambda: calls.append("all") or []  # a full listing now would be seen
    fake.retarget_alias("os/1", b)
    catalog.heard(aliases=frozenset({"os/1"}))
    catalog.settled()
    assert catalog.snapshot().aliases == {alias_to_filename("os/1"): b}
    assert any(alias_to_filename("os/1") in c.aliases for c in told)
    fake.delete_image(b)
    catalog.heard(images=frozenset({b}))
    catalog.settled()
    assert b not in catalog.snapshot().images and catalog.snapshot().aliases == {}
    assert calls == []
    catalog.close()


def test_a_burst_of_events_is_one_full_listing():
    from fakelxd import FakeLXD

    fake = FakeLXD()
    catalog, _ = _listing_with(fake)
    catalog.snapshot()
    made = [fake.add(str(i).encode()) for i in range(100)]
    listed = []
    real = fake.images
    fake.images = lambda: listed.append(1) or real()
    with catalog._fill:  # the event thread waits while the burst piles up
        for fp in made:
            catalog.heard(images=frozenset({fp}))
    catalog.settled()
    assert len(listed) == 1 and set(made) <= set(catalog.snapshot().images)
    catalog.close()


def test_an_event_queued_with_a_reconnect_is_applied_when_the_listing_is_newer_than_it():
    from fakelxd import FakeLXD

    from lxdimagefs.servers.catalog import Catalog

    fake, now = FakeLXD(), [100.0]
    catalog = Catalog(fake, ttl=600, clock=lambda: now[0])
    catalog.events_live = lambda: True
    catalog.snapshot()  # taken at 100
    made = fake.add(b"made")
    kick, catalog._kick = catalog._kick, lambda: None  # both land in one batch of the event thread
    now[0] = 50.0
    catalog.refresh()  # the stream reopened at 50: the listing of 100 covers it
    catalog.heard(images=frozenset({made}))
    catalog._kick = kick
    now[0] = 200.0
    kick()
    catalog.settled()
    assert made in catalog.snapshot().images
    catalog.close()


def test_an_archive_leaving_contents_open_ones_takes_its_kept_entries_along():
    """contents/ keeps entries looked up inside images; each holds its archive (an image's index
    and decoder state): an archive pushed out of the 16 open ones must not stay alive through them."""
    from types import SimpleNamespace

    from lxdimagefs.contents.node import ContentsNode
    from lxdimagefs.fs.node import Context

    exports = SimpleNamespace(verification=SimpleNamespace(on_corrupt=[]))  # told of no failed check
    node = ContentsNode(Context(), None, exports, None, None)  # type: ignore[arg-type]  # no image is opened
    node._entries[("a" * 64, "rootfs", "etc")] = ("archive a",)  # type: ignore[assignment]
    node._entries[("b" * 64, "rootfs")] = ("archive b",)  # type: ignore[assignment]
    with node._lock:
        for fp in ["a" * 64, *(f"{i:064x}" for i in range(ContentsNode.MAX_OPEN))]:  # "a": pushed out
            node._archives[fp] = object()  # type: ignore[assignment]
    assert [key[0][0] for key in node._entries] == ["b"]


def test_a_lookup_and_a_forget_of_one_name_at_once_never_leave_a_node_without_its_path():
    """The inside connection's node table (mount/libfuse/nodes.py): the kernel forgets a node (its
    inode evicted) while it looks the same name up again. A node the lookup found and the kernel
    then took is put back if the FORGET dropped it in between (before: ESTALE at the next GETATTR,
    found by review). Two threads each look a name up, ask its attributes and forget it."""
    import stat
    import sys
    from pathlib import Path

    from lxdimagefs.fs.node import Attr
    from lxdimagefs.mount.inside import Inside
    from lxdimagefs.mount.libfuse.lowlevel import ROOT

    class Root:
        uid = gid = 0

        def getattr(self, path: str) -> Attr:
            return Attr(stat.S_IFDIR | 0o555, 0, 0.0, 0.0, 0.0)

    inside = Inside(Path("/nonexistent"), [])
    inside.root, inside.depth, inside.timeout = Root(), 0, 1.0  # type: ignore[assignment]
    errors = []

    def kernel() -> None:
        for _ in range(20000):
            entry = inside.lookup(ROOT, b"contents")
            inside.held([entry])  # the reply went out: the kernel holds it
            try:
                inside.getattr(entry.node)
            except OSError as e:
                errors.append(e.errno)
                return
            inside.forget(entry.node, 1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads switch as often as they can
    try:
        threads = [threading.Thread(target=kernel) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert inside.nodes.within(9) == [ROOT]  # every node forgotten is gone


def test_a_forget_that_outruns_the_count_of_the_reply_it_covers_leaves_no_node():
    """The inside connection's node table (mount/libfuse/nodes.py): a reply naming a node the
    kernel holds goes out, the kernel takes it (two lookups now), evicts the inode and sends
    FORGET(2), which a worker handles before the replying one counts its lookup (`held`). The
    node is gone once both are counted (before: put back with a count of 1 the kernel never
    forgets, one node kept for the daemon's life per such race; found by review)."""
    import lxdimagefs.mount.inside  # noqa: F401  (mfusepy on libfuse 3, as the daemon loads it)
    from lxdimagefs.mount.libfuse.lowlevel import ROOT
    from lxdimagefs.mount.libfuse.nodes import Nodes

    nodes = Nodes()
    node = nodes.node("/contents")
    nodes.looked_up([(node, "/contents", None)])  # the kernel holds one lookup
    assert nodes.node("/contents") == node  # a second lookup's reply names it, and goes out
    nodes.forget(node, 2)  # the kernel took it, then forgot both
    nodes.looked_up([(node, "/contents", None)])  # the second reply counted, late
    assert nodes.within(9) == [ROOT]
    assert nodes.known("/contents") is None
