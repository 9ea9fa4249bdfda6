"""The tree, catalog and reader as plain objects against the real LXD: no FUSE."""

from __future__ import annotations

import errno
import hashlib
import stat
import threading

import pytest

from lxdimagefs.compose.root import Tree
from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import LXDError
from lxdimagefs.servers.catalog import Catalog
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.wire.transport import Connection

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root


@pytest.fixture()
def tree(sandbox, images, tmp_path):
    client = LXDClient(Connection(socket=sandbox.socket))
    t = Tree(Catalog(client, ttl=30), Exports(client, tmp_path / "s", capacity=8 << 20))
    yield t
    t.exports.close()


def test_client_turns_lxd_refusals_into_errors_with_lxds_message(sandbox):
    client = LXDClient(Connection(socket=sandbox.socket))
    with pytest.raises(LXDError) as e:
        client.image("0" * 64)
    assert e.value.status == 404
    assert e.value.errno == errno.ENOENT
    assert "not found" in e.value.message.lower()


def test_tree_answers_without_fuse(tree, images):
    fp = images.fps["plain"]
    assert tree.readdir("/") == ["by-fingerprint", "by-alias", "import"]
    assert fp in tree.readdir("/by-fingerprint")
    assert tree.readlink("/by-alias/plain") == f"../by-fingerprint/{fp}"
    attr = tree.getattr(f"/by-fingerprint/{fp}/{fp}.tar")
    assert stat.S_ISREG(attr.mode) and attr.size > 5 << 20
    with pytest.raises(OSError) as e:
        tree.getattr(f"/by-fingerprint/{fp}/nope")
    assert e.value.errno == errno.ENOENT


def test_concurrent_readers_share_fetches_and_get_the_right_bytes(tree, images):
    fp = images.fps["plain"]
    path = f"/by-fingerprint/{fp}/{fp}.tar"
    size = tree.getattr(path).size
    results: list[str] = []

    def reader():
        fh = tree.open(path, 0)
        h = hashlib.sha256()
        off = 0
        while off < size:
            data = tree.read(fh, off, 128 << 10)
            h.update(data)
            off += len(data)
        tree.release(fh)
        results.append(h.hexdigest())

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [fp] * 6
    blocks = (size + BLOCK - 1) // BLOCK
    # Shared: six readers of `blocks` blocks cost far fewer than six full downloads of requests.
    assert tree.exports.fetcher.requests <= blocks + 2


def test_a_4k_read_far_in_fetches_one_block(tree, images):
    fp = images.fps["plain"]
    fh = tree.open(f"/by-fingerprint/{fp}/{fp}.tar", 0)
    assert len(tree.read(fh, 4 << 20, 4096)) == 4096
    assert tree.exports.fetcher.requests == 1
    tree.release(fh)


def test_split_image_is_downloaded_once_for_all_readers(tree, images):
    fp = images.fps["split"]
    names = [n for n in tree.readdir(f"/by-fingerprint/{fp}") if n != "metadata.json"]
    fhs = [tree.open(f"/by-fingerprint/{fp}/{n}", 0) for n in names for _ in range(3)]
    whole = hashlib.sha256()
    for n in sorted(names, key=lambda n: not n.startswith("meta-")):
        size = tree.getattr(f"/by-fingerprint/{fp}/{n}").size
        fh = tree.open(f"/by-fingerprint/{fp}/{n}", 0)
        whole.update(tree.read(fh, 0, size))
        tree.release(fh)
    for fh in fhs:
        tree.release(fh)
    assert whole.hexdigest() == fp
    assert tree.exports.spool.downloads == 1
