"""contents/ as a place to work: what the kernel and the daemon keep of an image's insides, and
that keeping it never serves a wrong byte nor an image that is gone (issue 24)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from lxd_sandbox import make_unified, pack_split
from mounts import mounted, unmount, wait_mounted
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

MIB = 1 << 20
LONG = ("-o", "entry_timeout=86400,attr_timeout=86400")  # the kernel keeps entries for the test's length


def _until(what, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the mount's pages too: ask the daemon


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz", ".tar.bz2"])
def test_a_compressed_tarball_is_decoded_after_the_first_look_and_rot_is_eio_never_wrong(
        sandbox, tmp_path, suffix):
    """A .tar.gz (.xz, .bz2) is read through its seek points at first, decoded in the background
    into a checked plain tarball, then read from that. Its bytes rotting afterwards: the pages the
    kernel kept are the right bytes, and what it asks again is EIO, never the rotted bytes."""
    image = make_unified(tmp_path / f"z{suffix}", rootfs_bytes=24 * MIB)  # more than the block cache
    with tarfile.open(image) as t:
        want = t.extractfile("rootfs/blob").read()
    fp = sandbox.import_image(image)
    try:
        with mounted(sandbox, tmp_path / "mnt", *LONG) as m:
            blob = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "blob"
            assert blob.read_bytes() == want  # the first look
            assert _until(lambda: "read from its decoded tarball" in m.log_text()), m.log_text()[-3000:]
            assert blob.read_bytes() == want  # from the decoded tarball, kept by the kernel
            # The plain tarball the daemon reads, in its spool and (a link) in the disk cache.
            decoded = [*tmp_path.glob("lxdimagefs-spool-*/*.tar"), *tmp_path.rglob(f"part-{fp}.2")]
            assert decoded, sorted(tmp_path.rglob("*"))
            for path in decoded:  # every 1 MiB block of rootfs/blob's: more than the block cache holds
                with open(path, "r+b") as f:
                    for at in range(MIB + 4096, len(want), MIB):
                        f.seek(at)
                        f.write(os.urandom(4096))
            again = subprocess.run(["cat", str(blob)], capture_output=True)  # the kernel's pages
            assert again.stdout == want or again.returncode != 0, "wrong bytes, exit status 0"
            _drop_caches()
            run = subprocess.run(["cat", str(blob)], capture_output=True)
            assert run.stdout != want or run.returncode != 0, ("cannot tell: the edit was not read",
                                                                  decoded, m.log_text()[-3000:])
            assert run.returncode != 0 and b"Input/output error" in run.stderr, "wrong bytes, exit status 0"
            run = subprocess.run(["cat", str(blob)], capture_output=True)  # and on every later pass
            assert run.returncode != 0 or run.stdout == want, "wrong bytes, exit status 0"
            assert (m.path / "contents" / "by-fingerprint" / fp / "metadata.yaml").exists()  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("layout", [(), ("--all-projects",)])
def test_an_image_deleted_while_the_kernel_keeps_its_insides_leaves_contents(sandbox, tmp_path, layout):
    """Entries, pages and listings inside an image are kept by the kernel (here for a day): the
    image deleted in LXD, its folder leaves contents/ all the same, and what was open inside it
    cannot be opened again: a folder held open there (a shell's cwd) lists no more (before: its
    listing kept by the kernel was served, found by review). Under --all-projects too (a
    project's folder above the image, on both connections)."""
    fp = sandbox.import_image(make_unified(tmp_path / "d.tar.gz", rootfs_bytes=MIB))
    deleted = False
    try:
        with mounted(sandbox, tmp_path / "mnt", *LONG, *layout) as m:
            top = m.path / "default" if layout else m.path
            folder = top / "contents" / "by-fingerprint" / fp
            hostname = folder / "rootfs" / "etc" / "hostname"
            for _ in range(2):  # the second pass is the kernel's
                assert hostname.read_bytes().startswith(b"d.tar.gz")
                assert sorted(os.listdir(folder / "rootfs")) == ["blob", "etc"]
            served = Path(os.readlink(top / "contents")) / "by-fingerprint" / fp  # on its connection
            held = os.open(folder / "rootfs" / "etc", os.O_RDONLY | os.O_DIRECTORY)  # a shell's cwd
            try:
                sandbox.lxc("image", "delete", fp)
                deleted = True
                assert _until(lambda: not folder.exists(), within=10), "still in contents/ after its delete"
                assert fp not in os.listdir(top / "contents" / "by-fingerprint")
                assert _until(lambda: not served.exists(), within=10), "still served after its delete"
                assert _errno(lambda: os.listdir(served / "rootfs")) == errno.ENOENT
                with pytest.raises(OSError) as e:
                    hostname.read_bytes()
                assert e.value.errno == errno.ENOENT
                with pytest.raises(OSError) as e:  # `ls` there: an OPENDIR, whatever the kernel keeps
                    os.listdir(f"/proc/self/fd/{held}")
                assert e.value.errno == errno.ENOENT
            finally:
                os.close(held)
    finally:
        if not deleted:
            sandbox.lxc("image", "delete", fp, check=False)


def _errno(call) -> int:
    try:
        call()
    except OSError as e:
        return e.errno or 0
    return 0


def _calls(sock: Path, op: str = "getattr") -> int:
    """How many calls of a FUSE operation (getattr: the kernel's LOOKUP and GETATTR) the daemon answered."""
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "stats", "--prometheus", str(sock)],
                          capture_output=True, text=True, timeout=30, check=True)
    return sum(int(float(s.value)) for f in text_string_to_metric_families(done.stdout) for s in f.samples
               if s.name == "lxdimagefs_operation_seconds_count" and s.labels.get("operation") == op)


def kept_by_kernel(sock: Path, folder: Path, tries: int = 5) -> bool:
    """Whether a listing of `folder` after the first is the kernel's (no READDIR reaches the
    daemon); a few tries, since another test's drop_caches on this machine empties the kernel."""
    for _ in range(tries):
        first = sorted(os.listdir(folder))
        lists = _calls(sock, "readdir")
        assert sorted(os.listdir(folder)) == first, folder
        if _calls(sock, "readdir") == lists:
            return True
    return False


def test_a_listing_inside_an_image_carries_each_names_exact_attributes(sandbox, tmp_path):
    """READDIRPLUS: a folder listed inside an image, its names' stat comes from the listing (no
    getattr reaches the daemon) and is the image's own, field by field; outside contents/ names
    are looked up as before. A file opened to read is closed without a FLUSH."""
    tarball = make_unified(tmp_path / "p.tar.gz", rootfs_bytes=MIB)
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    fp = sandbox.import_image(tarball)
    sock = tmp_path / "metrics.sock"
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}", *LONG) as m:
            folder = m.path / "contents" / "by-fingerprint" / fp
            (folder / "rootfs" / "etc" / "hostname").read_bytes()  # the archive opened and checked
            for name in ("", "rootfs"):
                at = folder / name
                before = _calls(sock)
                names = sorted(os.listdir(at))
                seen = {n: os.lstat(at / n) for n in names}
                assert _calls(sock) == before, f"the listing of {name or '.'} gave no attributes"
                for n, st in seen.items():
                    want = members[f"{name}/{n}".lstrip("/")]
                    assert (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime)) == (
                        want.mode | (stat.S_IFDIR if want.isdir() else stat.S_IFREG),
                        want.uid, want.gid, int(want.mtime)), n
                    assert st.st_size == (0 if want.isdir() else want.size), n
                    assert st.st_nlink == (2 if want.isdir() else 1), n
            flushes, opens = _calls(sock, "flush"), _calls(sock, "open")
            (folder / "rootfs" / "blob").read_bytes()  # its connection is sent neither (mount/inside.py)
            assert (_calls(sock, "flush"), _calls(sock, "open")) == (flushes, opens)
            exports = m.path / "by-fingerprint" / fp
            before = _calls(sock)
            names = os.listdir(exports)
            for n in names:
                os.lstat(exports / n)
            assert _calls(sock) >= before + len(names)  # an image's exports can change: looked up
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_the_kernel_keeps_listings_inside_images_and_asks_again_elsewhere(sandbox, tmp_path):
    """A folder inside an image never changes: listed once, the kernel answers later listings
    from its own pages (no READDIR reaches the daemon), through a short fingerprint too (a link
    to the full one's folder, which it may name another later). Outside contents/, every
    listing is asked for."""
    fp = sandbox.import_image(make_unified(tmp_path / "l.tar.gz", rootfs_bytes=MIB))
    sock = tmp_path / "metrics.sock"
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}", *LONG) as m:
            assert os.listdir(m.path / "contents" / "by-fingerprint" / fp / "rootfs")  # checked once decoded
            assert _until(lambda: "read from its decoded tarball" in m.log_text()), m.log_text()[-3000:]
            for path, kept in ((f"contents/by-fingerprint/{fp}/rootfs/etc", True),
                               (f"contents/by-fingerprint/{fp}", True),
                               (f"contents/by-fingerprint/{fp[:12]}/rootfs/etc", True),
                               ("by-fingerprint", False), (f"by-fingerprint/{fp}", False)):
                assert kept_by_kernel(sock, m.path / path, tries=5 if kept else 1) == kept, path
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_a_folder_of_many_names_lists_whole_every_time(sandbox, tmp_path):
    """A folder of 9,000 names inside an image (more than one reply of the kernel's) is listed
    whole, twice, with each name's attributes (a cap on kept rows once made it EINVAL, found by
    review), and one of a short fingerprint's folder too. Its names are listed from the image once
    per pass, not once per reply (before: some 360 times, found by review: 30,000 names took 50 s)."""
    tar = make_unified(tmp_path / "many.tar", rootfs_bytes=1024)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with tarfile.open(tar, "a") as t:
        for i in range(9000):
            t.add(empty, f"rootfs/many/f{i:05}")
    fp = sandbox.import_image(tar)
    sock = tmp_path / "metrics.sock"
    with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}") as m:
        for image in (fp, fp[:12]):
            folder = m.path / "contents" / "by-fingerprint" / image / "rootfs" / "many"
            for _ in range(2):
                lists = _calls(sock, "readdir")
                names = os.listdir(folder)
                assert len(names) == 9000 and "f08999" in names
                assert _calls(sock, "readdir") - lists <= 1, "listed again for each reply"
            assert os.lstat(folder / "f08999").st_size == 0


def test_a_split_images_squashfs_read_by_offset_is_its_bytes_and_rot_is_eio_never_wrong(sandbox, tmp_path):
    """A squashfs rootfs's files are read by offset from the part's checked blocks, each block of a
    file decoded once and kept (contents/squashfs.py): every byte, at any offset and length, is the
    file's, in compressed blocks, stored ones and fragments. Its part rotting afterwards: what the
    kernel asks again is EIO or the right bytes, never the rotted ones."""
    tree = tmp_path / "tree" / "rootfs"
    (tree / "etc").mkdir(parents=True)
    want = {"blob": os.urandom(20 * MIB + 12345),  # stored blocks (random bytes do not compress)
            "text": b"".join(b"%09d a line of text\n" % i for i in range(120_000)),  # compressed blocks
            "etc/small": b"a fragment's tail\n" * 3, "etc/empty": b""}
    for name, data in want.items():
        (tree / name).write_bytes(data)
    meta, rootfs = pack_split(tree, tmp_path / "split")
    fp = sandbox.import_image(meta, rootfs)
    try:
        with mounted(sandbox, tmp_path / "mnt", *LONG) as m:
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
            for name, data in want.items():
                assert (inside / name).read_bytes() == data, name
                with open(inside / name, "rb", buffering=0) as f:  # across block and 1 MiB bounds
                    for at, size in ((131_000, 5000), (MIB - 7, 300_000), (max(0, len(data) - 10), 100)):
                        assert os.pread(f.fileno(), size, at) == data[at:at + size], (name, at)
            size = rootfs.stat().st_size  # the squashfs part: LXD's own file (read in place), any copies
            parts = [p for p in [*(sandbox.lxd_dir / "images").glob(f"{fp}*"), *tmp_path.glob(f"*/*{fp}*")]
                     if p.is_file() and p.stat().st_size == size]
            assert parts, sorted(tmp_path.rglob("*"))
            for path in parts:  # the blob's stored blocks, more than the block cache holds
                with open(path, "r+b") as f:
                    for at in range(MIB + 4096, 20 * MIB, MIB):
                        f.seek(at)
                        f.write(os.urandom(4096))
            _drop_caches()
            run = subprocess.run(["cat", str(inside / "blob")], capture_output=True)
            assert run.stdout != want["blob"] or run.returncode != 0, ("cannot tell: the edit was not read",
                                                                        parts, m.log_text()[-3000:])
            assert run.returncode != 0 and b"Input/output error" in run.stderr, "wrong bytes, exit status 0"
            assert (inside / "etc" / "small").read_bytes() == want["etc/small"]  # still serving
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def test_an_image_that_fails_its_check_is_eio_inside_where_its_entries_were_kept(sandbox, tmp_path):
    """A .tar read lazily is indexed before its check ends; once the check fails, the entries and
    listings the daemon kept from it are gone too: a listing inside is EIO (before: still served
    from what was kept, found by review), also where the folder was open before the verdict (the
    kernel keeps no listing made from bytes not checked yet: before, it did, found by review)."""
    from helpers import export_of

    fp = sandbox.import_image(make_unified(tmp_path / "late.tar", rootfs_bytes=48 * MIB))
    try:
        with mounted(sandbox, tmp_path / "mnt", *LONG) as m:
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs"
            assert os.listdir(inside) == os.listdir(inside)  # kept by the daemon, from bytes not checked yet
            held = os.open(inside, os.O_RDONLY | os.O_DIRECTORY)
            hostname = os.open(inside / "etc" / "hostname", os.O_RDONLY)  # its pages kept by the kernel
            assert os.pread(hostname, 64, 0).startswith(b"late.tar")
            stored = sandbox.lxd_dir / "images" / fp
            with open(stored, "r+b") as f:
                f.seek(stored.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            assert subprocess.run(["cat", str(export_of(m, fp))], capture_output=True).returncode != 0
            assert _until(lambda: _errno(lambda: os.listdir(inside)) == errno.EIO, within=5)  # dropped
            try:  # open before the verdict: a rewinddir asks again, a read too (the pages dropped)
                assert _errno(lambda: os.listdir(held)) == errno.EIO
                assert _errno(lambda: os.pread(hostname, 64, 0)) == errno.EIO
            finally:
                os.close(held)
                os.close(hostname)
            assert os.listdir(m.path / "by-alias") is not None  # the mount serves on
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.parametrize("layout", [(), ("--all-projects",)])
def test_a_repeat_pass_inside_an_image_is_the_kernels_alone(sandbox, tmp_path, layout):
    """contents/ is a link to a connection of its own (under --all-projects, a project's to the
    project's folder there), which the kernel sends no OPEN or OPENDIR:
    once a tree was walked and read, walking and reading it again (`find`, `cat` of every file,
    `ls -l`) reaches the daemon with nothing at all. Made from bytes whose check was still under
    way (a .tar read lazily), the kernel keeps it all the same: a failed check drops it (above)."""
    fp = sandbox.import_image(make_unified(tmp_path / "unchecked.tar", rootfs_bytes=16 * MIB))
    sock = tmp_path / "metrics.sock"
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}", *layout) as m:
            root = m.path / "default" if layout else m.path
            target = Path(os.readlink(root / "contents"))
            assert target.is_absolute() and target.name == "contents", target
            assert target.parent.name == ("default" if layout else target.parent.name)
            link = root / "contents" / "by-fingerprint" / fp
            assert stat.S_ISDIR(os.lstat(link).st_mode)
            walk = f"find {link}/ -type f -exec cat {{}} + | sha256sum; ls -lR {link}/ | sha256sum"

            def calls() -> int:
                return sum(_calls(sock, op) for op in ("getattr", "readdir", "read", "open", "opendir",
                                                       "readlink", "release", "releasedir"))
            first = subprocess.run(walk, shell=True, capture_output=True, check=True).stdout
            for _ in range(5):  # another test's drop_caches on this machine empties the kernel's
                before = calls()
                again = subprocess.run(walk, shell=True, capture_output=True, check=True).stdout
                assert again == first
                if calls() == before:
                    break
            else:
                pytest.fail(f"a repeat pass reached the daemon: {calls() - before} calls")
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *args], capture_output=True, text=True)


@pytest.mark.parametrize("runtime", ["private", "none"])
def test_allow_other_lets_others_through_the_link_whatever_else_is_mounted(
        sandbox, tmp_path, monkeypatch, runtime):
    """With allow_other, another user reads a public image's files through contents/, whose image
    folders are links into the folder of the connection that serves them (mount/inside.py): that
    folder lets them pass even where $XDG_RUNTIME_DIR is its user's alone (0700, as root's is in an
    ssh session), and a later mount without allow_other does not shut them out (before: both
    EACCES, found by review)."""
    if runtime == "private":
        own = tmp_path / "runtime"
        own.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(own))
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    fp = sandbox.import_image(make_unified(tmp_path / "o.tar", rootfs_bytes=4096))
    sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": True})  # a private one is no one else's
    shared = Path(tempfile.mkdtemp(prefix="lxdimagefs-shared-"))  # pytest's own folders are root's alone
    shared.chmod(0o755)
    try:
        with mounted(sandbox, shared / "mnt", "-o", "allow_other") as m:
            hostname = m.path / "contents" / "by-fingerprint" / fp / "rootfs" / "etc" / "hostname"
            assert hostname.read_bytes().startswith(b"o.tar")
            read = _as_nobody("cat", str(hostname))
            assert read.returncode == 0 and read.stdout.startswith("o.tar"), read.stderr
            with mounted(sandbox, tmp_path / "other"):  # the mounter's alone
                read = _as_nobody("cat", str(hostname))
                assert read.returncode == 0 and read.stdout.startswith("o.tar"), read.stderr
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
        shutil.rmtree(shared)


def test_a_killed_daemons_inside_mount_is_removed_by_the_next_mount(sandbox, tmp_path):
    """A daemon killed (SIGKILL, the OOM killer) leaves its main mount for the user to unmount,
    and its inside connection's mount (mount/inside.py) dead in a private folder the user never
    sees: the next mount of that user unmounts and removes it (before: each kill left one for
    good, found by review), and leaves a live daemon's alone."""
    fp = sandbox.import_image(make_unified(tmp_path / "k.tar", rootfs_bytes=4096))

    def mounts() -> str:
        return Path("/proc/self/mountinfo").read_text()
    try:
        with mounted(sandbox, tmp_path / "live") as live:
            alive = Path(os.readlink(live.path / "contents")).parent
            killed = tmp_path / "killed"
            killed.mkdir()
            proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--socket", sandbox.socket,
                                     "--cache-dir", str(tmp_path), str(killed)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_mounted(killed, proc)
                dead = Path(os.readlink(killed / "contents")).parent
                assert dead != alive and f" {dead} " in mounts()
                proc.kill()  # by its pid: ours
                proc.wait()
            finally:
                unmount(killed)  # the user unmounts the main mount only
            assert f" {dead} " in mounts()
            with mounted(sandbox, tmp_path / "next") as n:
                assert (n.path / "contents" / "by-fingerprint" / fp / "metadata.yaml").exists()
                assert f" {dead} " not in mounts() and not dead.exists()
            assert (live.path / "contents" / "by-fingerprint" / fp / "rootfs" / "etc" / "hostname").exists()
            assert f" {alive} " in mounts()
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


def _kept_across(sock: Path, inside: Path, log, change) -> bool:
    """Whether what the kernel keeps of `inside` (an image's rootfs) stays across `change(i)`: no
    read or listing reaches the daemon after it (three tries: another test's drop_caches on this
    machine empties the kernel's caches)."""
    assert _until(lambda: (inside / "blob").read_bytes() is not None
                  and "read from its decoded tarball" in log()), log()[-3000:]  # its pages kept from now
    for i in range(3):
        (inside / "blob").read_bytes()
        os.listdir(inside / "etc")
        change(i)
        time.sleep(0.5)  # the drops a change makes: at once and 0.1 s later (libfuse/drops.py)
        reads, lists = _calls(sock, "read"), _calls(sock, "readdir")
        (inside / "blob").read_bytes()
        os.listdir(inside / "etc")
        if (_calls(sock, "read"), _calls(sock, "readdir")) == (reads, lists):
            return True
    return False


def test_another_image_landing_keeps_what_the_kernel_keeps_of_an_image(sandbox, tmp_path):
    """An image imported (or deleted) changes by-fingerprint/'s listing, never what is inside another
    image: the pages and listings the kernel keeps of that one stay (before: every node below
    by-fingerprint/ was dropped at each change, so any import elsewhere, or an image's record
    edited, made every kept image read again; found by review)."""
    fp = sandbox.import_image(make_unified(tmp_path / "a.tar.gz", rootfs_bytes=MIB))
    sock = tmp_path / "metrics.sock"
    others: list[str] = []
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}") as m:
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs"

            def land(i: int) -> None:
                others.append(sandbox.import_image(make_unified(tmp_path / f"b{i}.tar", rootfs_bytes=4096)))
                assert _until(lambda: others[-1] in os.listdir(m.path / "contents" / "by-fingerprint"), 10)
            assert _kept_across(sock, inside, m.log_text, land), "an import elsewhere dropped what was kept"
    finally:
        for image in (fp, *others):
            sandbox.lxc("image", "delete", image, check=False)


@pytest.mark.parametrize("layout", [(), ("-o", "no_events")])
def test_an_alias_moved_in_lxd_leads_to_its_new_image_in_the_mount_and_in_contents(sandbox, tmp_path, layout):
    """An alias retargeted in LXD: `by-alias/NAME` (whose target the kernel keeps as a page where
    events are followed) and `contents/by-alias/NAME` (a new node on contents' connection) lead
    to the new image, and a file read through the old target's link is the new image's."""
    a = sandbox.import_image(make_unified(tmp_path / "first.tar", rootfs_bytes=4096), alias="moving")
    b = sandbox.import_image(make_unified(tmp_path / "second.tar", rootfs_bytes=4096))
    try:
        with mounted(sandbox, tmp_path / "mnt", *layout) as m:
            link, inside = m.path / "by-alias" / "moving", m.path / "contents" / "by-alias" / "moving"
            hostname = inside / "rootfs" / "etc" / "hostname"
            for _ in range(2):  # the second: the kernel's
                assert os.readlink(link) == f"../by-fingerprint/{a}"
                assert os.readlink(inside) == f"../by-fingerprint/{a}"
                assert hostname.read_bytes().startswith(b"first.tar")
            sandbox.rest("/1.0/images/aliases/moving", "PUT", {"target": b, "description": ""})
            assert _until(lambda: os.readlink(link) == f"../by-fingerprint/{b}", within=10), os.readlink(link)
            assert _until(lambda: os.readlink(inside) == f"../by-fingerprint/{b}", within=10), \
                os.readlink(inside)
            assert hostname.read_bytes().startswith(b"second.tar")
            assert (link / "metadata.json").exists() and b in (link / "metadata.json").read_text()
    finally:
        for image in (a, b):
            sandbox.lxc("image", "delete", image, check=False)


def test_an_image_whose_record_changes_keeps_what_the_kernel_keeps_inside_it(sandbox, tmp_path):
    """An alias given to an image, or its description edited, changes its record, never what is
    inside it (named by its fingerprint): the pages and listings the kernel keeps there stay,
    while the folder shows the record as it is now (before: every change of an image's record
    dropped all the kernel kept of its insides; found by review)."""
    fp = sandbox.import_image(make_unified(tmp_path / "r.tar.gz", rootfs_bytes=MIB))
    sock = tmp_path / "metrics.sock"
    try:
        with mounted(sandbox, tmp_path / "mnt", "-o", f"metrics={sock}") as m:
            inside = m.path / "contents" / "by-fingerprint" / fp / "rootfs"

            def alias(i: int) -> None:
                sandbox.lxc("image", "alias", "create", f"given{i}", fp)
                assert _until(lambda: f"given{i}" in os.listdir(m.path / "contents" / "by-alias"), 10)
                assert _until(lambda: f"given{i}" in (m.path / "by-fingerprint" / fp / "metadata.json")
                              .read_text(), 10)
            assert _kept_across(sock, inside, m.log_text, alias), "an alias given dropped what was kept"
            sandbox.rest(f"/1.0/images/{fp}", "PATCH", {"public": True})
            assert _until(lambda: os.stat(inside.parent).st_mode & 0o777 == 0o555, 10), oct(
                os.stat(inside.parent).st_mode)
    finally:
        sandbox.lxc("image", "delete", fp, check=False)
