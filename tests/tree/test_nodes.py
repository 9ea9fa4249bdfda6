"""The tree's subtrees and their rules, over an in-memory stand-in for LXD: no root, no FUSE."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
from fakelxd import FakeLXD

from lxdimagefs.compose.root import Tree
from lxdimagefs.data.exports import Exports
from lxdimagefs.servers.catalog import Catalog


@pytest.fixture()
def lxd():
    return FakeLXD()


def make_tree(lxd, tmp_path, readonly=False, allow_delete=False):
    return Tree(Catalog(lxd, ttl=0), Exports(lxd, tmp_path / "spool"), readonly=readonly,
                mountpoint="/mnt", allow_delete=allow_delete)


@pytest.fixture()
def tree(lxd, tmp_path):
    return make_tree(lxd, tmp_path)


def code(call, *args):
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def test_the_root_dispatches_to_its_three_subtrees(tree, lxd):
    fp = lxd.add(b"one", aliases=("debian/12",))
    assert tree.readdir("/") == ["by-fingerprint", "by-alias", "import"]
    assert tree.readdir("/by-fingerprint") == [fp]
    assert tree.readdir("/by-alias") == ["debian／12"]
    assert tree.readlink("/by-alias/debian／12") == f"../by-fingerprint/{fp}"
    assert tree.readdir(f"/by-fingerprint/{fp}") == ["metadata.json", f"{fp}.tar"]
    assert stat.S_ISDIR(tree.getattr("/import").mode)
    assert code(tree.getattr, "/elsewhere") == errno.ENOENT


def test_a_unique_prefix_resolves_but_is_not_listed(tree, lxd):
    fp = lxd.add(b"two")
    assert stat.S_ISDIR(tree.getattr(f"/by-fingerprint/{fp[:12]}").mode)
    assert code(tree.getattr, f"/by-fingerprint/{fp[:11]}") == errno.ENOENT


def test_refusals_across_and_within_subtrees(tree, lxd):
    fp = lxd.add(b"three", aliases=("a",))
    assert code(tree.rename, "/by-alias/a", "/import/a") == errno.EXDEV
    assert code(tree.rename, f"/by-fingerprint/{fp}", "/by-fingerprint/x" * 1) == errno.EPERM
    assert code(tree.mkdir, "/by-alias/x") == errno.EPERM
    assert code(tree.rmdir, "/by-alias") == errno.EBUSY
    # import/ takes links to URLs and to other remotes' images only: this names the same server's
    assert code(tree.symlink, "/import/x", "../by-fingerprint/" + fp) == errno.EINVAL
    assert code(tree.symlink, f"/by-fingerprint/{fp}/x", "a") == errno.EPERM
    assert code(tree.unlink, "/by-fingerprint") == errno.EISDIR
    assert code(tree.readdir, f"/by-fingerprint/{fp}/metadata.json") == errno.ENOTDIR
    assert code(tree.open, f"/by-fingerprint/{fp}/{fp}.tar", os.O_WRONLY) == errno.EACCES
    assert code(tree.truncate, f"/by-fingerprint/{fp}/{fp}.tar", 0) == errno.EACCES
    assert code(tree.set_attributes, f"/by-fingerprint/{fp}/{fp}.tar", "chmod") == errno.EPERM
    tree.set_attributes(f"/by-fingerprint/{fp}/metadata.json", "chmod")  # editors keep modes: accepted


def test_a_read_only_tree_refuses_every_change_with_erofs(lxd, tmp_path):
    fp = lxd.add(b"four", aliases=("a",))
    tree = make_tree(lxd, tmp_path, readonly=True)
    for call, args in ((tree.unlink, ("/by-alias/a",)), (tree.mkdir, ("/import/x",)),
                       (tree.symlink, ("/by-alias/b", fp)), (tree.rmdir, (f"/by-fingerprint/{fp}",)),
                       (tree.set_attributes, (f"/by-fingerprint/{fp}/metadata.json", "chmod"))):
        assert code(call, *args) == errno.EROFS
    assert tree.getattr(f"/by-fingerprint/{fp}/metadata.json").mode & 0o222 == 0


def test_aliases_are_made_renamed_retargeted_and_removed(tree, lxd):
    one, two = lxd.add(b"five"), lxd.add(b"six")
    tree.symlink("/by-alias/os／12", f"../by-fingerprint/{one[:12]}")
    assert lxd.alias_exists("os/12")
    assert code(tree.symlink, "/by-alias/os／12", one) == errno.EEXIST
    assert code(tree.symlink, "/by-alias/x", "../by-fingerprint/" + "0" * 64) == errno.ENOENT
    assert code(tree.symlink, "/by-alias/x", "/elsewhere/by-fingerprint/" + one) == errno.EINVAL
    tree.symlink("/by-alias/tmp", two)
    tree.rename("/by-alias/tmp", "/by-alias/os／12")  # ln -sfn: the old name now points elsewhere
    assert tree.readlink("/by-alias/os／12") == f"../by-fingerprint/{two}"
    assert tree.readdir("/by-alias") == ["os／12"]
    tree.unlink("/by-alias/os／12")
    assert tree.readdir("/by-alias") == []


def test_alias_names_too_long_or_not_text_are_refused(tree, lxd):
    fp = lxd.add(b"seven")
    assert code(tree.symlink, "/by-alias/" + "a" * 256, fp) == errno.ENAMETOOLONG
    assert code(tree.symlink, "/by-alias/bad\x01name", fp) == errno.EINVAL


def _save(tree, fp, record, pid):
    fh = tree.open(f"/by-fingerprint/{fp}/metadata.json", os.O_WRONLY | os.O_TRUNC, pid)
    tree.write(fh, 0, json.dumps(record).encode())
    try:
        tree.flush(fh, pid)
    finally:
        tree.release(fh)


def _read(tree, fp, pid):
    fh = tree.open(f"/by-fingerprint/{fp}/metadata.json", os.O_RDONLY, pid)
    try:
        return json.loads(tree.read(fh, 0, 1 << 20))
    finally:
        tree.release(fh)


def test_a_save_is_compared_with_what_that_process_read(tree, lxd):
    fp = lxd.add(b"eight")
    record = _read(tree, fp, pid=100)
    lxd.edit_elsewhere(fp, properties={"by": "someone else"})
    _read(tree, fp, pid=200)  # another process reads: process 100's base stays
    record["public"] = True
    assert code(_save, tree, fp, record, 100) == errno.ESTALE
    assert code(_save, tree, fp, record, 100) == errno.ESTALE  # and a retry too
    assert lxd.records[fp]["public"] is False
    record = _read(tree, fp, pid=100)
    record["public"] = True
    _save(tree, fp, record, 100)
    assert lxd.records[fp]["public"] is True and lxd.records[fp]["properties"] == {"by": "someone else"}


def test_a_change_between_check_and_put_is_caught_by_the_etag(tree, lxd, monkeypatch):
    fp = lxd.add(b"nine")
    record = _read(tree, fp, pid=1)
    record["public"] = True
    real = lxd.image_with_etag

    def racing(f):
        answer = real(f)
        lxd.edit_elsewhere(f, properties={"in": "between"})  # lands after lxdimagefs's check
        return answer

    monkeypatch.setattr(lxd, "image_with_etag", racing)
    assert code(_save, tree, fp, record, 1) == errno.ESTALE
    assert lxd.records[fp]["public"] is False


@pytest.mark.parametrize("text, errno_", [(b"not json", errno.EINVAL), (b"[1]", errno.EINVAL),
                                          (b'{"size": 1}', errno.EINVAL)])
def test_bad_records_change_nothing(tree, lxd, text, errno_):
    fp = lxd.add(b"ten")
    before = dict(lxd.records[fp])
    fh = tree.open(f"/by-fingerprint/{fp}/metadata.json", os.O_WRONLY | os.O_TRUNC, 1)
    tree.write(fh, 0, text)
    assert code(tree.flush, fh, 1) == errno_
    tree.release(fh)
    assert lxd.records[fp] == before and not lxd.calls


def test_an_editors_scratch_file_renamed_over_metadata_json_saves_it(tree, lxd):
    fp = lxd.add(b"eleven")
    record = _read(tree, fp, pid=5)
    record["properties"] = {"edited": "yes"}
    fh = tree.create(f"/by-fingerprint/{fp}/.metadata.json.swp", os.O_WRONLY, 5)
    tree.write(fh, 0, json.dumps(record).encode())
    tree.release(fh)
    assert ".metadata.json.swp" in tree.readdir(f"/by-fingerprint/{fp}")
    tree.rename(f"/by-fingerprint/{fp}/.metadata.json.swp", f"/by-fingerprint/{fp}/metadata.json", 5)
    assert lxd.records[fp]["properties"] == {"edited": "yes"}
    assert ".metadata.json.swp" not in tree.readdir(f"/by-fingerprint/{fp}")


def test_rm_r_hides_files_then_deletes_the_image(lxd, tmp_path):
    tree = make_tree(lxd, tmp_path, allow_delete=True)
    fp = lxd.add(b"twelve", aliases=("gone",))
    assert code(tree.unlink, f"/by-fingerprint/{fp}/{fp}.tar", 7) == errno.EPERM  # `rm` of one file
    dh = tree.opendir(f"/by-fingerprint/{fp}", 7)  # `rm -r` holds the folder open while emptying it
    tree.unlink(f"/by-fingerprint/{fp}/{fp}.tar", 7)
    tree.unlink(f"/by-fingerprint/{fp}/metadata.json", 7)
    assert tree.readdir(f"/by-fingerprint/{fp}") == []
    assert fp in lxd.records  # unlinking files never changes the image
    tree.release(dh)
    tree.rmdir(f"/by-fingerprint/{fp}")
    assert fp not in lxd.records and tree.readdir("/by-alias") == []


def test_without_allow_delete_no_image_is_deleted(tree, lxd):
    fp = lxd.add(b"thirteen")
    dh = tree.opendir(f"/by-fingerprint/{fp}", 7)
    assert code(tree.unlink, f"/by-fingerprint/{fp}/{fp}.tar", 7) == errno.EPERM
    tree.release(dh)
    assert code(tree.rmdir, f"/by-fingerprint/{fp}") == errno.EPERM
    assert fp in lxd.records and tree.readdir(f"/by-fingerprint/{fp}") == ["metadata.json", f"{fp}.tar"]


def test_import_folders_and_error_files(tree, tmp_path):
    tree.mkdir("/import/split")
    assert code(tree.mkdir, "/import/split") == errno.EEXIST
    fh = tree.create("/import/split/meta.tar.xz", os.O_WRONLY, 1)
    tree.write(fh, 0, b"x" * 10)
    assert tree.readdir("/import/split") == ["meta.tar.xz"]
    assert code(tree.rmdir, "/import/split") == errno.ENOTEMPTY
    tree.flush(fh, 1)  # the writer's close: the part counts
    tree.release(fh)
    assert tree.readdir("/import/split") == ["meta.tar.xz"]
    tree.unlink("/import/split/meta.tar.xz")
    tree.rmdir("/import/split")
    assert tree.readdir("/import") == []
    assert not list((tmp_path / "spool").glob("import/*"))


def test_only_paths_inside_an_image_under_contents_are_inside_an_image(lxd, tmp_path):
    """What may carry attributes with a listing and skips the opener's /proc read: inside an
    image's folder under contents/, in a tree or below a remote's folder of a forest; nothing else."""
    from lxdimagefs.compose.forest import Forest, Slot
    from lxdimagefs.contents.archives import IndexFolder
    from lxdimagefs.fs.handles import HandleTable

    fp = "a" * 64
    with_contents = Tree(Catalog(lxd, ttl=0), Exports(lxd, tmp_path / "spool"), mountpoint="/mnt",
                         index=IndexFolder(tmp_path / "index"))
    inside = [f"/contents/by-fingerprint/{fp}", f"/contents/by-fingerprint/{fp}/rootfs/etc"]
    outside = ["", "/", "/contents", "/contents/by-fingerprint", "/contents/by-fingerprint/",
               f"/contents/by-alias/{fp}", f"/by-fingerprint/{fp}", f"/by-fingerprint/{fp}/rootfs.squashfs",
               f"/import/{fp}", f"/x/contents/by-fingerprint/{fp}"]
    assert [p for p in inside if not with_contents.inside_image(p)] == []
    assert [p for p in outside if with_contents.inside_image(p)] == []
    assert not make_tree(lxd, tmp_path).inside_image(inside[1])  # -o nocontents: no contents/ at all
    forest = Forest([Slot("contents", with_contents, lambda: True)], HandleTable(), True, "/mnt")
    assert forest.inside_image("/contents" + inside[1])
    assert not any(forest.inside_image(p) for p in [*inside, *("/contents" + p for p in outside)])
