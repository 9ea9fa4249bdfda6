"""Every remote the lxc client knows, in one mount: two private LXDs (one over HTTPS with a client
certificate, one on its unix socket), a simplestreams server over HTTPS on loopback that the tests
generate, and server-side copies between them. The LXDs trust the test CA through SSL_CERT_FILE."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxd_sandbox import Sandbox, make_split, make_unified
from mounts import Mount, alias_made_elsewhere_shows, unmount, wait_mounted
from streams_server import Entry, LoopbackCA, StreamsServer, write_index

pytestmark = pytest.mark.lxd

NATIVE = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
FOREIGN = "arm64" if NATIVE == "amd64" else "amd64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class World:
    ca: LoopbackCA
    streams: StreamsServer
    a: Sandbox  # on its unix socket only
    b: Sandbox  # over HTTPS, trusting the client certificate `lxc remote add` made
    conf: Path  # LXD_CONF
    env: dict[str, str]
    fps: dict[str, str]  # role -> fingerprint on the simplestreams server
    work: Path

    def lxc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["lxc", *args], env=self.env, check=check, capture_output=True, text=True)


def _entries(work: Path, serial: str) -> list[Entry]:
    meta, root = make_split(work / f"split-{serial}", rootfs_bytes=3 << 20)
    meta2, root2 = make_split(work / f"foreign-{serial}", rootfs_bytes=1 << 20)
    unified = make_unified(work / f"uni-{serial}.tar.gz", rootfs_bytes=2 << 20)
    return [Entry(f"testos:1:{NATIVE}:default", NATIVE, serial, "testos/1,testos/one", (meta, root)),
            Entry(f"testos:1:{FOREIGN}:default", FOREIGN, serial, "testos/1,testos/one", (meta2, root2)),
            Entry(f"uni:1:{NATIVE}:default", NATIVE, serial, "uni", (unified,))]


def _publish(world_root: Path, entries: list[Entry]) -> dict[str, str]:
    made = write_index(world_root, entries)
    return {key.split(":")[0] + ("-foreign" if f":{FOREIGN}:" in key else ""): fp for key, fp in made.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("remotes")
    ca = LoopbackCA.make(work / "ca")
    www = work / "www"
    entries = _entries(work, "20261101_00:00")
    fps = _publish(www, entries)
    streams = StreamsServer(www, ca).start()
    trust = {"SSL_CERT_FILE": str(ca.bundle)}
    a = b = None
    try:
        a = Sandbox.start(extra_env=trust)
        b = Sandbox.start(extra_env=trust)
        port = _free_port()
        b.lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
        b.lxc("config", "set", "core.trust_password", "sesame")
        conf = work / "lxc-conf"
        env = {**os.environ, "LXD_CONF": str(conf), "INCUS_CONF": str(work / "no-incus"),
               "SSL_CERT_FILE": str(ca.bundle), "TMPDIR": str(work)}
        env["LXD_DIR"] = str(a.lxd_dir)  # `local`, which lxc keeps, is `a` too
        env.pop("LXD_SOCKET", None)
        w = World(ca, streams, a, b, conf, env, fps, work)
        w.lxc("remote", "add", "b", f"https://127.0.0.1:{port}", "--accept-certificate",
              "--password", "sesame")
        w.lxc("remote", "add", "a", f"unix://{a.socket}")
        w.lxc("remote", "add", "sst", streams.url, "--protocol", "simplestreams", "--public")
        w.lxc("remote", "remove", "images")  # a public server: nothing here may reach it
        yield w
    finally:
        streams.stop()
        for box in (a, b):
            if box is not None:
                box.stop()


@pytest.fixture
def forest(world: World, tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--all-remotes", "--debug", "--log-file",
                           str(tmp_path / "log"), "--cache-dir", str(tmp_path), str(where)],
                          env=world.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        wait_mounted(where, timeout=1)
        yield where
    finally:
        unmount(where)


def _log(forest: Path) -> str:
    return (forest.parent / "log").read_text()


def _records(box: Sandbox) -> dict[str, dict]:
    return {r["fingerprint"]: r for r in box.rest("/1.0/images?recursion=1")}


def test_all_remotes_one_folder_each(world, forest):
    assert sorted(os.listdir(forest)) == ["a", "b", "local", "sst"]
    fp = world.b.import_image(make_unified(world.work / "on-b.tar"), alias="on-b")
    try:
        assert sorted(os.listdir(forest / "b" / "by-fingerprint")) == sorted(_records(world.b))
        data = (forest / "b" / "by-alias" / "on-b" / f"{fp}.tar").read_bytes()  # over HTTPS, lxc's cert
        assert hashlib.sha256(data).hexdigest() == fp
        assert sorted(os.listdir(forest / "sst" / "by-fingerprint")) == sorted(world.fps.values())
    finally:
        world.b.lxc("image", "delete", fp)


def test_changes_made_elsewhere_show_in_each_remotes_folder(world, forest):
    fp = world.b.import_image(make_unified(world.work / "events.tar"))
    try:
        os.listdir(forest / "b" / "by-alias")  # the listing is cached now
        alias_made_elsewhere_shows(world.b, Mount(forest / "b", None, forest.parent / "log"), fp, "b-made")
    finally:
        world.b.lxc("image", "delete", fp)


def test_all_remotes_and_all_projects_is_remote_then_project(world, tmp_path):
    world.b.lxc("project", "create", "team")
    fp = world.b.import_image(make_unified(world.work / "on-b-default.tar"), alias="b-default")
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--all-remotes", "--all-projects",
                               "--cache-dir", str(tmp_path), str(where)],
                              env=world.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(where)) == ["a", "b", "local", "sst"]
        assert sorted(os.listdir(where / "b")) == ["default", "team"]  # over HTTPS
        assert sorted(os.listdir(where / "b" / "default" / "by-fingerprint")) == sorted(_records(world.b))
        assert os.listdir(where / "b" / "team" / "by-fingerprint") == []
        data = (where / "b" / "default" / "by-alias" / "b-default" / f"{fp}.tar").read_bytes()
        assert hashlib.sha256(data).hexdigest() == fp
        # contents/ of each: an LXD's two names deep, a simplestreams server's one (it has no projects:
        # before, the connection serving contents/ took every remote as two deep, found by review)
        sst = where / "sst" / "contents" / "by-fingerprint" / world.fps["testos"]
        assert (sst / "rootfs" / "etc" / "hostname").read_text().startswith("split-20261101_00:00")
        inside_b = where / "b" / "default" / "contents" / "by-fingerprint" / fp
        assert (inside_b / "rootfs" / "etc" / "hostname").read_bytes().startswith(b"on-b-default.tar")
        world.b.lxc("project", "create", "later")  # heard on the HTTPS event stream of all projects
        started = time.monotonic()
        while "later" not in os.listdir(where / "b"):
            assert time.monotonic() - started < 1.0
            time.sleep(0.01)
        assert "by-fingerprint" in os.listdir(where / "sst")  # a simplestreams server has no projects
    finally:
        unmount(where)
        world.b.lxc("image", "delete", fp)
        for project in ("team", "later"):
            world.b.lxc("project", "delete", project, check=False)


def test_a_simplestreams_server_is_read_from_its_index(world, forest):
    sst = forest / "sst"
    fp = world.fps["testos"]
    assert os.readlink(sst / "by-alias" / "testos／1") == f"../by-fingerprint/{fp}"
    assert os.readlink(sst / "by-alias" / f"testos／1／{NATIVE}") == f"../by-fingerprint/{fp}"
    assert os.readlink(sst / "by-alias" / f"testos／1／{FOREIGN}") == \
        f"../by-fingerprint/{world.fps['testos-foreign']}"
    folder = sst / "by-fingerprint" / fp
    meta, root = f"meta-{fp}.tar.xz", f"{fp}.squashfs"
    assert sorted(os.listdir(folder)) == sorted(["metadata.json", meta, root])
    world.streams.requests.clear()
    with open(folder / root, "rb") as f:  # a 4 KiB read at the end: one bounded Range request
        f.seek(-4096, os.SEEK_END)
        assert len(f.read(4096)) == 4096
    ranged = [r for r in world.streams.requests if ".squashfs" in r]
    assert len(ranged) == 1 and "range=bytes=" in ranged[0] and "range=bytes=0-" not in ranged[0]
    digest = hashlib.sha256((folder / meta).read_bytes() + (folder / root).read_bytes()).hexdigest()
    assert digest == fp  # LXD's fingerprint of a split image: metadata then rootfs
    with pytest.raises(OSError) as e:
        os.symlink(f"../by-fingerprint/{fp}", sst / "by-alias" / "mine")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.rmdir(folder)
    assert e.value.errno == errno.EROFS
    assert sorted(os.listdir(sst)) == ["by-alias", "by-fingerprint", "contents"]  # no import/


def test_inside_a_simplestreams_image_without_downloading_it(world, forest):
    """contents/ of a remote image: the squashfs and the metadata tarball read at the offsets needed."""
    fp = world.fps["testos"]
    inside = forest / "sst" / "contents" / "by-fingerprint" / fp
    world.streams.requests.clear()
    hostname = (inside / "rootfs" / "etc" / "hostname").read_text()
    assert hostname.startswith("split-20261101_00:00")  # make_split's seed: the folder's name
    meta = (inside / "metadata.yaml").read_text()
    assert "lxdimagefs-test" in meta
    assert os.readlink(forest / "sst" / "contents" / "by-alias" / "testos／1") == f"../by-fingerprint/{fp}"
    served = next((world.streams.root / "images").rglob("rootfs.squashfs"))
    ranges = [r.split("range=bytes=")[1].split()[0] for r in world.streams.requests if "squashfs" in r]
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.split("-") for r in ranges if r.split("-")[1]))
    assert ranges and fetched < served.stat().st_size  # not the whole 3 MiB rootfs


def test_a_simplestreams_record_is_what_lxd_shows_after_a_copy(world, forest):
    fp = world.fps["testos"]
    world.lxc("image", "copy", "sst:testos/1", "a:")
    try:
        ours = json.loads((forest / "sst" / "by-fingerprint" / fp / "metadata.json").read_text())
        lxds = world.a.rest(f"/1.0/images/{fp}")
        for key in ("fingerprint", "architecture", "type", "size", "properties", "created_at"):
            assert ours[key] == lxds[key], key
        assert ours["public"] is True
        exported = world.work / "exported"
        exported.mkdir(exist_ok=True)
        world.a.lxc("image", "export", fp, str(exported) + "/")
        assert sorted(os.listdir(exported)) == sorted(
            n for n in os.listdir(forest / "sst" / "by-fingerprint" / fp) if n != "metadata.json")
    finally:
        world.a.lxc("image", "delete", fp, check=False)


def test_a_corrupt_file_on_the_server_reads_as_eio(world, forest, tmp_path):
    fp = world.fps["uni"]
    served = next((world.streams.root / "images").rglob("uni-*.tar.gz"))
    original = served.read_bytes()
    served.write_bytes(original[:-10] + bytes(10))
    try:
        with pytest.raises(OSError) as e:
            (forest / "sst" / "by-fingerprint" / fp / f"{fp}.tar.gz").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        served.write_bytes(original)


def test_ln_s_pulls_from_simplestreams_server_side(world, forest):
    fp = world.fps["testos"]
    world.streams.requests.clear()
    os.symlink("../../sst/by-alias/testos／1", forest / "a" / "import" / "testos／1")
    try:
        record = world.a.rest(f"/1.0/images/{fp}")
        assert [a["name"] for a in record["aliases"]] == ["testos/1"]
        assert record["update_source"]["alias"] == "testos/1"  # pulled by alias: refresh follows it
        assert os.readlink(forest / "a" / "by-alias" / "testos／1") == f"../by-fingerprint/{fp}"
        pulls = [r for r in world.streams.requests if ".squashfs" in r]
        assert pulls and all("lxdimagefs" not in r for r in pulls)  # LXD fetched it, not the mount
    finally:
        world.a.lxc("image", "delete", fp, check=False)


def test_ln_s_copies_a_private_image_between_lxds_server_side(world, forest):
    fp = world.b.import_image(make_unified(world.work / "private.tar.gz", rootfs_bytes=1 << 20))
    try:
        os.symlink(f"../../b/by-fingerprint/{fp[:12]}", forest / "a" / "import" / "copied")
        operations = world.b.rest("/1.0/operations?recursion=1")  # LXD keeps ended ones a few seconds
        secrets = [op["metadata"]["secret"] for ops in operations.values() for op in ops
                   if (op.get("metadata") or {}).get("secret")]
        record = world.a.rest(f"/1.0/images/{fp}")
        assert [a["name"] for a in record["aliases"]] == ["copied"] and record["public"] is False
        assert f"/images/{fp}/export" not in _log(forest)  # no byte through the mount
        assert "asking" in _log(forest)
        assert secrets and not any(secret in _log(forest) for secret in secrets)  # never logged
    finally:
        world.a.lxc("image", "delete", fp, check=False)
        world.b.lxc("image", "delete", fp, check=False)


def test_a_source_on_a_unix_socket_is_streamed_through_the_daemon(world, forest):
    meta, root = make_split(world.work / "from-a", rootfs_bytes=1 << 20)
    fp = world.a.import_image(meta, root)
    try:
        os.symlink(f"../../a/by-fingerprint/{fp}", forest / "b" / "import" / fp)
        record = world.b.rest(f"/1.0/images/{fp}")
        assert record["fingerprint"] == fp and record["aliases"] == []  # a fingerprint is no alias
        assert "through the daemon" in _log(forest)
    finally:
        world.a.lxc("image", "delete", fp, check=False)
        world.b.lxc("image", "delete", fp, check=False)


def test_ln_s_of_an_https_url_is_create_from_url(world, forest):
    fp = world.fps["uni"]
    served = next((world.streams.root / "images").rglob("uni-*.tar.gz"))
    world.streams.urls["uni"] = (fp, "", str(served.relative_to(world.streams.root)))
    os.symlink(f"{world.streams.url}/url/uni", forest / "a" / "import" / "from-url")
    try:
        record = world.a.rest(f"/1.0/images/{fp}")
        assert [a["name"] for a in record["aliases"]] == ["from-url"]
    finally:
        world.a.lxc("image", "delete", fp, check=False)


def test_a_refused_pull_says_why_and_creates_nothing(world, forest):
    own = world.a.import_image(make_unified(world.work / "own.tar"), alias="taken")
    try:
        _refused_pulls(world, forest)
    finally:
        world.a.lxc("image", "delete", own)


def _refused_pulls(world: World, forest: Path) -> None:
    before = set(_records(world.a))
    target = forest / "a" / "import" / "nothing"
    with pytest.raises(OSError) as e:
        os.symlink(f"{world.streams.url}/url/none-such", target)
    assert e.value.errno in (errno.EINVAL, errno.ENOENT, errno.EIO)
    message = (forest / "a" / "import" / "nothing.error").read_text()
    assert "LXD-Image-Hash" in message  # LXD's own words: the URL did not name an image
    assert set(_records(world.a)) == before
    os.unlink(forest / "a" / "import" / "nothing.error")
    with pytest.raises(OSError) as e:  # a taken name: refused before anything is pulled
        os.symlink("../../sst/by-alias/uni", forest / "a" / "import" / "taken")
    assert e.value.errno == errno.EEXIST
    assert "Alias already exists: taken" in (forest / "a" / "import" / "taken.error").read_text()
    assert set(_records(world.a)) == before
    with pytest.raises(OSError) as e:  # an image no remote holds
        os.symlink("../../sst/by-alias/no-such", forest / "a" / "import" / "x")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:  # a link into import/ that names no image and no URL
        os.symlink("/etc/passwd", forest / "a" / "import" / "y")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.rename(forest / "a" / "by-alias", forest / "b" / "by-alias")
    assert e.value.errno == errno.EXDEV


def test_touch_refreshes_an_auto_updating_image(world, forest):
    old = world.fps["testos"]
    index = {p: p.read_bytes() for p in (world.streams.root / "streams" / "v1").iterdir()}
    os.symlink("../../sst/by-alias/testos／1", forest / "a" / "import" / "testos／1")
    folder = forest / "a" / "by-fingerprint" / old
    new = None
    try:
        with pytest.raises(OSError) as e:  # auto_update is off: nothing to refresh with
            os.utime(folder)
        assert e.value.errno == errno.EPERM
        os.setxattr(folder, "user.lxd.auto_update", b"true")
        newer = _publish(world.streams.root, _entries(world.work, "20261201_00:00"))
        new = newer["testos"]
        # LXD keeps a simplestreams index for an hour before asking again: stand in for that hour.
        for cached in (world.a.lxd_dir / "cache").glob("*/index.json"):
            shutil.rmtree(cached.parent)
        os.utime(folder)  # touch
        assert new in os.listdir(forest / "a" / "by-fingerprint")  # at once
        assert os.readlink(forest / "a" / "by-alias" / "testos／1") == f"../by-fingerprint/{new}"
        assert new in _records(world.a)
    finally:
        for path, data in index.items():
            path.write_bytes(data)
        for fp in (old, new):
            if fp:
                world.a.lxc("image", "delete", fp, check=False)


def test_an_unreachable_remote_is_an_empty_folder_until_it_answers(world, tmp_path):
    port = _free_port()
    world.lxc("remote", "add", "later", f"https://127.0.0.1:{port}", "--protocol", "simplestreams",
              "--public", check=False)
    conf = Path(world.env["LXD_CONF"]) / "config.yml"
    text = conf.read_text()
    if "later:" not in text:  # lxc checks a simplestreams server as it adds it: write the entry itself
        conf.write_text(text.replace("remotes:\n", f"remotes:\n  later:\n    addr: https://127.0.0.1:{port}\n"
                                     "    protocol: simplestreams\n    public: true\n", 1))
    where = tmp_path / "mnt"
    where.mkdir()
    server = None
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--remote", "later", "--remote", "sst",
                               "--log-file", str(tmp_path / "log"), str(where)],
                              env=world.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 15
        assert sorted(os.listdir(where)) == ["later", "sst"] and os.listdir(where / "later") == []
        assert "remote later does not answer" in (tmp_path / "log").read_text()
        t = time.monotonic()
        assert os.statvfs(where / "later").f_blocks == 0  # unknown, at once: no wait for the server
        assert time.monotonic() - t < 1
        server = StreamsServer(world.streams.root, world.ca, port=port).start()
        deadline = time.monotonic() + 25
        while not os.listdir(where / "later"):
            assert time.monotonic() < deadline, "the remote did not come back"
            time.sleep(0.5)
        assert sorted(os.listdir(where / "later" / "by-fingerprint")) == sorted(world.fps.values())
    finally:
        unmount(where)
        if server is not None:
            server.stop()
        world.lxc("remote", "remove", "later", check=False)


def test_one_remote_by_name_is_the_tree_itself(world, tmp_path):
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "sst", str(where)], env=world.env,
                          capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(where)) == ["by-alias", "by-fingerprint", "contents"]
        vfs = os.statvfs(where)  # read-only: full of its images, as a squashfs is
        assert vfs.f_bavail == 0 and vfs.f_blocks > 0
    finally:
        unmount(where)


def test_one_image_under_two_remotes_is_two_files_inside(world, forest):
    """`local` and `a` are one LXD: its image's files are not hard links of each other across them
    (du and tar count both), and each remote's folder numbers them the same on every look."""
    fp = world.a.import_image(make_unified(world.work / "twice.tar"))
    try:
        inside = [forest / r / "contents/by-fingerprint" / fp / "rootfs/etc/hostname" for r in ("a", "local")]
        first, second = (os.lstat(p) for p in inside)
        assert first.st_ino != second.st_ino and first.st_nlink == second.st_nlink == 1
        assert os.lstat(inside[0]).st_ino == first.st_ino
    finally:
        world.a.lxc("image", "delete", fp)


def test_inside_a_simplestreams_image_mounted_alone_with_all_projects(world, tmp_path):
    """--all-projects given for a simplestreams server alone (which has no projects) leaves its
    tree as it is, and the connection serving its image folders finds them there (before: it
    looked one name deeper, and contents/ was ENOENT, found by review)."""
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--all-projects", "--cache-dir",
                               str(tmp_path), "sst", str(where)],
                              env=world.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        inside = where / "contents" / "by-fingerprint" / world.fps["testos"]
        assert (inside / "rootfs" / "etc" / "hostname").read_text().startswith("split-20261101_00:00")
    finally:
        unmount(where)
