"""Pure logic, without LXD or FUSE."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lxdimagefs.catalog import LayoutJournal
from lxdimagefs.cli import UsageError, parse_options
from lxdimagefs.client import ExportLayout, ExportPart, parse_time
from lxdimagefs.multipart import PartStream, first_part_and_next_name
from lxdimagefs.names import alias_to_filename, filename_to_alias, fits
from lxdimagefs.reader import IntegrityError, Verifier

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


def test_parse_options_splits_own_from_fuse():
    own, fuse = parse_options(["ro,metadata_ttl=2.5", "allow_other,cache_size=32,max_read=131072"])
    assert own == {"metadata_ttl": 2.5, "cache_size": 32}
    assert fuse == {"ro": True, "allow_other": True, "max_read": "131072"}
    assert parse_options(["no_events"]) == ({"no_events": True}, {})
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


def _verifier(data):
    return Verifier(hashlib.sha256(data).hexdigest(), len(data), window=1000)


def test_verifier_accepts_in_order_and_reordered_reads():
    data = bytes(range(256)) * 10
    v = _verifier(data)
    for off in (0, 512, 256, 1024, 768, 1280, 1536, 1792, 2048, 2304):
        v.feed(off, data[off:off + 256])
    assert v.state == "ok"


def test_verifier_rejects_wrong_bytes_and_stays_rejecting():
    data = b"x" * 1000
    v = _verifier(data)
    v.feed(0, data[:500])
    with pytest.raises(IntegrityError):
        v.feed(500, b"y" * 500)
    with pytest.raises(IntegrityError):
        v.feed(0, data[:10])


def test_verifier_gives_up_quietly_on_partial_or_scattered_reads():
    data = b"z" * 5000
    v = _verifier(data)
    v.feed(3000, data[3000:3800])
    v.feed(4000, data[4000:4400])  # more than the 1000-byte window held
    assert v.state == "unchecked"
    v.feed(0, b"wrong")  # no longer checked: no false alarm


def test_layout_journal_round_trip_and_distrust(tmp_path):
    path = tmp_path / "layouts.jsonl"
    journal = LayoutJournal(path)
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
    assert LayoutJournal(link).load() == {}
