"""Issue 17.8, the parts that need no LXD: what a broken or hostile server's answers may cost."""

from __future__ import annotations

import hashlib
import logging

from lxdimagefs.servers.simplestreams import native_arch, parse_products


def _h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _combined(label: str, **fields: object) -> dict:
    item = {"ftype": "lxd_combined.tar.gz", "path": f"images/{label}.tar.gz", "sha256": _h(label), "size": 5}
    item.update(fields)
    return item


def _product(alias: str, *items: dict) -> dict:
    return {"aliases": alias, "arch": native_arch(), "os": "X", "release": "1",
            "versions": {"20260303": {"items": {str(i): item for i, item in enumerate(items)}}}}


def test_a_malformed_simplestreams_item_is_skipped_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    bad_size, no_path = _combined("bad-size", size="big"), _combined("no-path")
    del no_path["path"]
    listing = parse_products({
        "good": _product("good", _combined("good")),
        "mixed": _product("mixed", bad_size, no_path, _combined("fine")),
        "not-an-object": ["a", "list"],
        "bad-versions": {"aliases": "v", "arch": native_arch(), "versions": {"20260303": "text"}},
    })
    assert {i.fingerprint for i in listing.images} == {_h("good"), _h("fine")}
    assert set(listing.paths) == {_h("good"), _h("fine")}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and all("skipped" in w for w in warned), warned
