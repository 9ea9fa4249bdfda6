"""Who can see what (issue 17, items 5 and 6): private images are the mounter's alone, public
ones everyone's; what a server sends is a key before it names anything.

Real LXD and real mounts read as `nobody`; the stand-in only where a server must lie.
Cost: about 25 s (two images imported, three mounts).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxd_sandbox import make_unified
from mounts import mounted, stop, wait_mounted

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

NOBODY = 65534


def as_nobody(*args: str, groups: str = "") -> subprocess.CompletedProcess:
    who = [f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={groups}" if groups else "--clear-groups"]
    return subprocess.run(["setpriv", *who, *args], capture_output=True, text=True)


@pytest.fixture()
def shared() -> Iterator[Path]:
    """A folder another user can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lxdimagefs-shared-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def two(sandbox, tmp_path) -> Iterator[tuple[str, str]]:
    """A public image and a private one, made for the test and deleted after it."""
    public = sandbox.lxc("image", "import", str(make_unified(tmp_path / "pub.tar.gz")), "--public",
                         "--alias", "pub").stdout.decode().split()[-1]
    private = sandbox.import_image(make_unified(tmp_path / "priv.tar.gz"), alias="priv")
    yield public, private
    for fp in (public, private):
        sandbox.lxc("image", "delete", fp, check=False)


def test_private_images_are_the_mounters_alone_public_ones_everyones(sandbox, two, shared):
    public, private = two
    with mounted(sandbox, shared / "mnt", "-o", "allow_other") as m:
        fps = m.path / "by-fingerprint"
        for fp, dir_mode, file_mode in ((public, 0o755, 0o644), (private, 0o700, 0o600)):
            st = os.stat(fps / fp)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (dir_mode, 0)
            assert stat.S_IMODE(os.stat(fps / fp / "metadata.json").st_mode) == file_mode
            assert stat.S_IMODE(os.stat(fps / fp / f"{fp}.tar.gz").st_mode) == file_mode
        # Everyone reads a public image: its export, its record, its attributes, inside it.
        assert as_nobody("sha256sum", str(fps / public / f"{public}.tar.gz")).stdout.split()[0] == public
        assert '"public": true' in as_nobody("cat", str(fps / public / "metadata.json")).stdout
        got = as_nobody("getfattr", "--only-values", "-n", "user.lxd.public", str(fps / public))
        assert got.stdout == "true"
        inside = m.path / "contents/by-fingerprint" / public / "metadata.yaml"
        assert as_nobody("cat", str(inside)).returncode == 0
        # Nobody else reads a private one, by any of those ways; the names stay listed.
        assert private in as_nobody("ls", str(fps)).stdout.split()
        for args in (["cat", str(fps / private / f"{private}.tar.gz")],
                     ["cat", str(fps / private / "metadata.json")],
                     ["ls", str(fps / private)],
                     ["getfattr", "-d", str(fps / private)],
                     ["getfattr", "-n", "user.lxd.public", str(fps / private / f"{private}.tar.gz")],
                     ["cat", str(m.path / "contents/by-fingerprint" / private / "metadata.yaml")],
                     ["cat", str(m.path / "by-alias/priv/metadata.json")]):
            done = as_nobody(*args)
            assert done.returncode != 0 and "Permission denied" in done.stderr, (args, done.stderr)
        # The mounter (root here) reads it all.
        assert (fps / private / "metadata.json").read_bytes().startswith(b"{")
        assert os.getxattr(fps / private, "user.lxd.public") == b"false"
        # Why LXD refused an import is the mounter's too.
        with pytest.raises(OSError), open(m.path / "import" / "junk.tar.gz", "wb") as f:
            f.write(b"not an image")
        error = m.path / "import" / "junk.tar.gz.error"
        assert error.read_text() and stat.S_IMODE(error.stat().st_mode) == 0o400
        done = as_nobody("cat", str(error))
        assert done.returncode != 0 and "Permission denied" in done.stderr


def test_making_an_image_public_opens_it_to_everyone(sandbox, two, shared):
    _, private = two
    with mounted(sandbox, shared / "mnt", "-o", "allow_other") as m:
        export = m.path / "by-fingerprint" / private / f"{private}.tar.gz"
        assert as_nobody("cat", str(export)).returncode != 0
        sandbox.rest(f"/1.0/images/{private}", "PATCH", {"public": True})
        deadline = 10  # LXD's event drops the listing; the kernel's cached modes last a second
        while deadline and as_nobody("sha256sum", str(export)).returncode != 0:  # the kernel's attr cache
            deadline -= 1
            subprocess.run(["sleep", "1"], check=True)
        assert as_nobody("sha256sum", str(export)).stdout.split()[0] == private


@pytest.fixture()
def user_allow_other() -> Iterator[None]:
    """What a distribution gives users (/dev/fuse 0666) and user_allow_other in /etc/fuse.conf,
    for the test alone: both as they were after it."""
    conf, dev = Path("/etc/fuse.conf"), Path("/dev/fuse")
    before = conf.read_bytes() if conf.exists() else None
    times = (conf.stat().st_atime_ns, conf.stat().st_mtime_ns) if before is not None else None
    mode = stat.S_IMODE(dev.stat().st_mode)
    conf.write_bytes((before or b"") + b"\nuser_allow_other\n")
    dev.chmod(0o666)
    try:
        yield
    finally:
        dev.chmod(mode)
        if before is None:
            conf.unlink()
        else:
            conf.write_bytes(before)
            os.utime(conf, ns=times)


def test_a_non_root_mounter_with_allow_other(sandbox, two, shared, user_allow_other):
    """nobody mounts (the sandbox's socket is group root's): the mounter deletes, sets attributes
    and reads its private images, under the kernel's checks; another user (uid 65533) reads none."""
    public, private = two
    os.chown(shared, NOBODY, NOBODY)
    where = shared / "mnt"
    where.mkdir()
    os.chown(where, NOBODY, NOBODY)
    log = shared / "daemon.log"
    package = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(shared), "HOME": str(shared), "PYTHONPATH": str(package)}
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--groups=0",
                             sys.executable, "-m", "lxdimagefs", "-f", "--socket", sandbox.socket,
                             "--cache-dir", str(shared), "--log-file", str(log),
                             "-o", "allow_other,allow_delete",
                             str(where)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        try:
            wait_mounted(where, proc)
        except RuntimeError:
            raise AssertionError(proc.communicate()[0]) from None
        fps = where / "by-fingerprint"
        assert os.stat(fps / private).st_uid == NOBODY
        mounter = ["--groups=0"]
        got = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *mounter, "sha256sum",
                              str(fps / private / f"{private}.tar.gz")], capture_output=True, text=True)
        assert got.stdout.split()[0] == private
        other = subprocess.run(["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "cat",
                                str(fps / private / "metadata.json")], capture_output=True, text=True)
        assert other.returncode != 0 and "Permission denied" in other.stderr
        done = as_nobody("setfattr", "-n", "user.lxd.properties.note", "-v", "hi",
                         str(fps / public / f"{public}.tar.gz"), groups="0")
        assert done.returncode == 0, done.stderr
        assert sandbox.rest(f"/1.0/images/{public}")["properties"]["note"] == "hi"
        done = as_nobody("rmdir", str(fps / private), groups="0")
        assert done.returncode == 0, done.stderr
        assert private not in sandbox.lxc("image", "list", "-c", "F", "-f", "csv").stdout.decode()
    finally:
        stop(where, proc)


def test_an_alias_with_a_question_mark_and_a_hash_works_end_to_end(sandbox, mnt, images):
    fp, name = images.fps["gz"], "odd?name#frag"
    link = mnt.path / "by-alias" / name
    os.symlink(f"../by-fingerprint/{fp}", link)
    try:
        assert os.readlink(link) == f"../by-fingerprint/{fp}"
        assert sandbox.rest(f"/1.0/images/aliases/{name.replace('?', '%3F').replace('#', '%23')}"
                            )["target"] == fp
        assert (link / "metadata.json").read_bytes().startswith(b"{")
    finally:
        os.unlink(link)
    assert not os.path.lexists(link)
    names = [a["name"] for a in sandbox.rest("/1.0/images/aliases?recursion=1")]
    assert name not in names and "odd" not in names


def test_a_fingerprint_typed_with_a_query_reaches_no_url(sandbox, mnt, images):
    """64 characters, as a full fingerprint, but not hex: it was placed in `GET /images/...` as is."""
    fp = images.fps["gz"]
    for name in (fp[:50] + "?project=other", fp[:60] + "#a=b"):
        with pytest.raises(OSError) as e:
            os.stat(mnt.path / "by-fingerprint" / name)
        assert e.value.errno == errno.ENOENT
    requests = [line for line in mnt.log_text().splitlines() if " GET /images/" in line]
    assert requests and not [r for r in requests if "?project=other" in r or "#a=b" in r]
    assert os.stat(mnt.path / "by-fingerprint" / fp).st_mode  # the mount goes on serving


def test_uid_gid_and_modes_own_the_mounts_entries_never_an_images(sandbox, two, shared):
    """-o uid=,gid=,file_mode=,dir_mode= (as mountpoint-s3's): seen by another user's stat; the group
    reads private images; everyone else still reads public ones only; contents/ keeps its owners."""
    public, private = two
    opts = f"allow_other,uid=4242,gid={NOBODY},file_mode=0644,dir_mode=0755"
    with mounted(sandbox, shared / "mnt", "-o", opts) as m:
        fps = m.path / "by-fingerprint"
        seen = as_nobody("stat", "-c", "%u %g %a %n", str(fps), str(fps / public), str(fps / private),
                         str(fps / private / "metadata.json"), str(m.path / "by-alias"),
                         str(m.path / "import"), groups=str(NOBODY))
        assert seen.returncode == 0, seen.stderr
        assert [line.split()[:3] for line in seen.stdout.splitlines()] == [
            ["4242", str(NOBODY), "755"], ["4242", str(NOBODY), "755"], ["4242", str(NOBODY), "750"],
            ["4242", str(NOBODY), "640"], ["4242", str(NOBODY), "755"], ["4242", str(NOBODY), "755"]]
        # The group reads a private image; a user outside it does not, but reads a public one.
        got = as_nobody("sha256sum", str(fps / private / f"{private}.tar.gz"), groups=str(NOBODY))
        assert got.stdout.split()[:1] == [private], got.stderr
        other = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"]
        refused = subprocess.run([*other, "cat", str(fps / private / "metadata.json")], capture_output=True)
        assert refused.returncode != 0 and b"Permission denied" in refused.stderr
        assert subprocess.run([*other, "cat", str(fps / public / "metadata.json")]).returncode == 0
        # Inside an image, its own owners (the tarball's root), not the mount's.
        inside = os.stat(m.path / "contents/by-fingerprint" / public / "metadata.yaml")
        assert (inside.st_uid, inside.st_gid) == (0, 0)


@pytest.mark.parametrize("bad", ["uid=no-such-user-here", "gid=no-such-group-here", "file_mode=0999",
                                 "dir_mode=rwx", "umask=022"])
def test_bad_ownership_options_are_usage_errors(bad, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "-o", bad, str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and bad.split("=")[0] in done.stderr, done.stderr
