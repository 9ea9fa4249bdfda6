"""Incus, LXD's community fork, mounted and used as LXD is: a real Incus 6.0 daemon (Debian's incusd).

Only what differs, or could, between the two is run here: the socket's
discovery, the upload headers (X-Incus-*), reads, aliases, record edits,
extended attributes, df and events. The rest of the suite runs on LXD.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxd_sandbox import Sandbox, make_split, make_unified
from mounts import Mount, alias_made_elsewhere_shows, mounted, unmount, wait_mounted

pytestmark = pytest.mark.lxd


@pytest.fixture(scope="module")
def incus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    if not os.path.exists("/usr/libexec/incus/incusd"):
        pytest.fail("Incus is not installed: scripts/install.sh installs incus-base")
    box = Sandbox.start(product="incus")
    try:
        work = tmp_path_factory.mktemp("incus-images")
        box.import_image(make_unified(work / "u.tar.gz", rootfs_bytes=2 << 20), alias="inc/unified")
        box.import_image(*make_split(work / "split"), alias="inc/split")
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def imnt(incus: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(incus, tmp_path_factory.mktemp("im") / "mnt", "-o", "metadata_ttl=600") as m:
        yield m


def _fps(box: Sandbox) -> set[str]:
    return {r["fingerprint"] for r in box.rest("/1.0/images?recursion=1")}


def test_the_incus_socket_is_found_by_itself(incus, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LXD_", "INCUS_"))}
    env.update(INCUS_DIR=str(incus.lxd_dir), TMPDIR=str(tmp_path))
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", str(where)], env=env, capture_output=True,
                          text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        wait_mounted(where, timeout=1)
        assert set(os.listdir(where / "by-fingerprint")) == _fps(incus), "a system LXD's socket came first?"
    finally:
        unmount(where)


def test_exports_read_as_incus_exports_them(incus, imnt, tmp_path):
    for alias in ("inc/unified", "inc/split"):
        fp = incus.rest(f"/1.0/images/aliases/{alias}")["target"]
        ref = tmp_path / alias.replace("/", "-")
        ref.mkdir()
        incus.lxc("image", "export", fp, str(ref) + "/")
        folder = imnt.path / "by-alias" / alias.replace("/", "／")
        names = sorted(os.listdir(folder))
        assert names == sorted(["metadata.json", *os.listdir(ref)])
        digest = hashlib.sha256()
        for name in sorted(os.listdir(ref), key=lambda n: not n.startswith("meta-")):  # metadata first
            data = (folder / name).read_bytes()
            assert data == (ref / name).read_bytes()
            digest.update(data)
        assert digest.hexdigest() == fp
        assert json.loads((folder / "metadata.json").read_text()) == incus.rest(f"/1.0/images/{fp}")


def test_an_import_carries_name_properties_and_public_to_incus(mnt, imnt, incus, images):
    """cp -r from an LXD mount into an Incus mount: Incus reads X-Incus-* headers, not X-LXD-*."""
    fp = images.fps["gz"]
    src = mnt.path / "by-fingerprint" / fp
    record = json.loads((src / "metadata.json").read_text())
    record["public"] = True
    record["properties"]["copied"] = "to incus"
    (src / "metadata.json").write_text(json.dumps(record))
    try:
        subprocess.run(["cp", "-r", str(src), str(imnt.path / "import") + "/"], check=True)
        got = incus.rest(f"/1.0/images/{fp}")
        assert got["public"] is True and got["properties"]["copied"] == "to incus"
        assert fp in os.listdir(imnt.path / "by-fingerprint")  # at once, through the mount
    finally:
        incus.lxc("image", "delete", fp, check=False)
        record["public"] = False
        del record["properties"]["copied"]
        (src / "metadata.json").write_text(json.dumps(record))


def test_an_upload_names_its_file_to_incus(incus, imnt, tmp_path):
    tarball = make_unified(tmp_path / "café.tar.xz")
    shutil.copyfile(tarball, imnt.path / "import" / tarball.name)
    fp = hashlib.sha256(tarball.read_bytes()).hexdigest()
    try:
        assert incus.rest(f"/1.0/images/{fp}")["filename"] == "café.tar.xz"
    finally:
        incus.lxc("image", "delete", fp, check=False)


def test_aliases_edits_and_xattrs_on_incus(incus, imnt, tmp_path):
    fp = incus.import_image(make_unified(tmp_path / "edit.tar"))
    try:
        aliases = imnt.path / "by-alias"
        os.symlink(f"../by-fingerprint/{fp}", aliases / "made")
        os.rename(aliases / "made", aliases / "renamed")
        assert [a["name"] for a in incus.rest(f"/1.0/images/{fp}")["aliases"]] == ["renamed"]
        (aliases / "renamed").unlink()
        assert incus.rest(f"/1.0/images/{fp}")["aliases"] == []
        meta = imnt.path / "by-fingerprint" / fp / "metadata.json"
        record = json.loads(meta.read_text())
        record["properties"]["edited"] = "yes"
        meta.write_text(json.dumps(record))
        assert incus.rest(f"/1.0/images/{fp}")["properties"]["edited"] == "yes"
        os.setxattr(meta.parent, "user.lxd.auto_update", b"true")
        assert incus.rest(f"/1.0/images/{fp}")["auto_update"] is True
    finally:
        incus.lxc("image", "delete", fp, check=False)


def test_incus_events_show_within_a_second(incus, imnt):
    fp = next(iter(_fps(incus)))
    os.listdir(imnt.path / "by-alias")  # the listing is cached now (metadata_ttl=600)
    alias_made_elsewhere_shows(incus, imnt, fp, "from-incus")


def test_df_on_incus_is_its_image_folder(incus, imnt):
    st, ref = os.statvfs(imnt.path), os.statvfs(Path(incus.lxd_dir) / "images")
    assert abs(st.f_blocks * st.f_frsize - ref.f_blocks * ref.f_frsize) <= 1 << 20


def test_a_remote_of_the_incus_client_is_a_source(incus, tmp_path):
    """`incus remote add` writes ~/.config/incus/config.yml: its remotes name sources as lxc's do."""
    env = {**os.environ, "INCUS_CONF": str(tmp_path / "incus-conf"), "LXD_CONF": str(tmp_path / "no-lxc"),
           "TMPDIR": str(tmp_path)}
    subprocess.run(["incus", "remote", "add", "private-incus", f"unix://{incus.socket}"], env=env, check=True,
                   capture_output=True)
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "private-incus", str(where)], env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        wait_mounted(where, timeout=1)
        assert set(os.listdir(where / "by-fingerprint")) == _fps(incus)
    finally:
        unmount(where)
