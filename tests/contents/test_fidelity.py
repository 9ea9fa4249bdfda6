"""contents/ against a real distribution tree: every entry as the image holds it.

A Debian 12 minbase tree (debootstrap, from Debian's archive) is packed as LXD
packs images — a unified .tar.gz, and a split image with a squashfs rootfs —
imported into the private LXD and mounted; every entry under contents/ must
equal the tree walked directly: type and mode (setuid too), owner, group,
mtime, device number, link target, size, bytes, and hard links as one inode.

Cost (2 cores shared with other jobs, load 8, 2026-12-01): debootstrap 80 s,
once a day (the tree, 206 MB, 6768 entries, is kept under /var/tmp, keyed by
date); then 58 s for the file: starting LXD, packing (fastest gzip and
mksquashfs levels) and importing both images 18 s, the walk through the
tarball 19 s and through the squashfs 16 s.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import deleting
from helpers import sha as _digest
from lxd_sandbox import pack_split, pack_unified
from mounts import mounted

pytestmark = pytest.mark.lxd

CACHE = Path("/var/tmp")
PREFIX = "lxdimagefs-debootstrap-bookworm-"
MIRROR = "http://deb.debian.org/debian"


def _debootstrap(where: Path) -> None:
    """A minbase bookworm tree at where/rootfs; a failure fails the test (CI must run it for real)."""
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is not installed (scripts/install.sh installs it)")
    work = where.with_name(where.name + ".part")
    _remove(work)
    work.mkdir()
    done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(work / "rootfs"), MIRROR],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _remove(work)
        pytest.fail(f"debootstrap from {MIRROR} failed ({done.returncode}): {done.stderr[-2000:]}"
                    f"{done.stdout[-2000:]}")
    work.rename(where)


def _remove(work: Path) -> None:
    """A half-made tree, with whatever an interrupted debootstrap left mounted in it (/proc) first."""
    with open("/proc/self/mounts") as f:
        inside = [line.split()[1] for line in f if line.split()[1].startswith(f"{work}/")]
    for point in sorted(inside, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def distro() -> Path:
    return debian_minbase()


def debian_minbase() -> Path:
    """Today's Debian 12 minbase tree, made once a day and kept; older days' trees are removed
    (scripts/bench_inside.py measures on the same tree)."""
    where = CACHE / f"{PREFIX}{datetime.date.today():%Y%m%d}"
    with open(CACHE / f"{PREFIX}lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build, however many test runs ask at once
        if not (where / "rootfs").is_dir():
            _debootstrap(where)
        for old in CACHE.glob(f"{PREFIX}2*"):
            if old != where:
                _remove(old)
    return where / "rootfs"


@pytest.fixture(scope="module")
def distro_images(sandbox, distro, tmp_path_factory) -> Iterator[dict[str, str]]:
    work = tmp_path_factory.mktemp("distro")
    with deleting(sandbox, {}) as fps:
        fps["unified"] = sandbox.import_image(pack_unified(distro, work / "unified.tar.gz"))
        fps["split"] = sandbox.import_image(*pack_split(distro, work / "split"))
        shutil.rmtree(work)  # LXD holds its own copies
        yield fps


@pytest.fixture(scope="module")
def distro_mnt(sandbox, distro_images, tmp_path_factory):
    with mounted(sandbox, tmp_path_factory.mktemp("dm") / "mnt") as m:
        yield m


def _walk(root: Path, rel: str = "") -> Iterator[str]:
    """Every path below root, depth first in name order: the order the tarball holds them in."""
    yield rel
    if stat.S_ISDIR(os.lstat(root / rel).st_mode):
        for name in sorted(os.listdir(root / rel)):
            yield from _walk(root, f"{rel}/{name}" if rel else name)


def _seen(path: Path, st: os.stat_result) -> dict[str, object]:
    """What must be equal: every field an image keeps (a folder's size is the filesystem's own)."""
    kind = stat.S_IFMT(st.st_mode)
    seen: dict[str, object] = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                               "mtime": int(st.st_mtime), "rdev": st.st_rdev}
    if kind in (stat.S_IFREG, stat.S_IFLNK):
        seen["size"] = st.st_size
    if kind == stat.S_IFLNK:
        seen["target"] = os.readlink(path)
    if kind == stat.S_IFREG:
        seen["sha256"] = _digest(path)
    return seen


def _differences(source: Path, mounted_root: Path) -> list[str]:
    """Every entry's differences, and hard links: one inode for the names of one source file."""
    wrong: list[str] = []
    inode_of: dict[int, tuple[int, int]] = {}  # the mount's inode number -> the source's file
    groups: dict[tuple[int, int], set[int]] = {}
    names = 0
    for rel in _walk(source):
        names += 1
        src, there = source / rel, mounted_root / rel
        want = os.lstat(src)
        try:
            got = os.lstat(there)
        except OSError as e:
            wrong.append(f"{rel}: {e}")
            continue
        a, b = _seen(src, want), _seen(there, got)
        if a != b:
            diff = [f"{k} {a.get(k)} != {b.get(k)}" for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
            wrong.append(f"{rel}: {', '.join(diff)}")
        key = (want.st_dev, want.st_ino)
        if inode_of.setdefault(got.st_ino, key) != key:
            wrong.append(f"{rel}: inode number {got.st_ino} is another file's too")
        if not stat.S_ISDIR(want.st_mode) and want.st_nlink > 1:
            groups.setdefault(key, set()).add(got.st_ino)
            if got.st_nlink != want.st_nlink:
                wrong.append(f"{rel}: {got.st_nlink} links, not {want.st_nlink}")
    wrong += [f"names of source inode {k[1]} have numbers {v}" for k, v in groups.items() if len(v) != 1]
    assert names > 5000 and groups, "the tree is not a distribution's"
    return wrong


@pytest.mark.parametrize("kind", ["unified", "split"])
def test_contents_equal_a_debian_tree_entry_by_entry(distro, distro_images, distro_mnt, kind):
    root = distro_mnt.path / "contents" / "by-fingerprint" / distro_images[kind] / "rootfs"
    wrong = _differences(distro, root)
    assert not wrong, f"{len(wrong)} entries differ, first: " + "\n".join(wrong[:25])
    # The cases the issue names, spelled out: a device's number, a private file's group, setuid.
    assert os.lstat(root / "dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISCHR(os.lstat(root / "dev/null").st_mode)
    assert os.lstat(root / "etc/shadow").st_gid == 42
    assert os.lstat(root / "usr/bin/passwd").st_mode & stat.S_ISUID


@pytest.mark.parametrize("kind", ["unified", "split"])
def test_names_stat_after_their_listing_equal_the_tree(sandbox, distro, distro_images, kind, tmp_path):
    """Each folder listed first, on a new mount: every name's attributes are then made from its
    listing's rows (and go to the kernel with it), not looked up one by one. They must be the
    same, to the link count, device number and inode shared by a hard link's names; and again
    once the kernel has forgotten them, from the listings the daemon keeps."""
    with mounted(sandbox, tmp_path / "mnt") as m:
        root = m.path / "contents" / "by-fingerprint" / distro_images[kind] / "rootfs"
        listed = sum(len(names) + len(folders) for _, folders, names in os.walk(root))
        wrong = _differences(distro, root)
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel's names and inodes
        assert sum(len(names) + len(folders) for _, folders, names in os.walk(root)) == listed
        wrong += _differences(distro, root)
    assert listed > 6000
    assert not wrong, f"{len(wrong)} entries differ, first: " + "\n".join(wrong[:25])


def test_tar_c_of_contents_keeps_hard_links_and_devices(distro, distro_images, distro_mnt, tmp_path):
    """What tools make of it: tar -c over contents/ archives a hard link as a link, a device as one."""
    root = distro_mnt.path / "contents" / "by-fingerprint" / distro_images["split"] / "rootfs"
    subprocess.run(["tar", "-c", "--numeric-owner", "-f", str(tmp_path / "t.tar"), "-C", str(root),
                    "usr/bin/perl", "usr/bin/perl5.36.0", "dev/null"], capture_output=True, check=True)
    table = subprocess.run(["tar", "-tvf", str(tmp_path / "t.tar")], capture_output=True, text=True,
                           check=True).stdout
    assert "usr/bin/perl5.36.0 link to usr/bin/perl" in table and "1,3" in table.replace(" ", ""), table


@pytest.mark.parametrize("kind", ["unified", "split"])
def test_listings_give_each_entrys_type_as_stat_does(distro_images, distro_mnt, kind, tmp_path):
    """A folder's listing gives the types its index is sure of (d_type), so that find, du and
    diff need not stat each name: every type given is the one stat gives, and the common ones
    (folders, files, symlinks) are given."""
    root = distro_mnt.path / "contents" / "by-fingerprint" / distro_images[kind] / "rootfs"
    given, wrong, folders = 0, [], [root]
    while folders:
        with os.scandir(folders.pop()) as listing:
            for entry in listing:
                # DirEntry answers from d_type when it is known: is_symlink() then costs no stat.
                listed = (entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False),
                          entry.is_symlink())
                mode = os.lstat(entry.path).st_mode
                if listed != (stat.S_ISDIR(mode), stat.S_ISREG(mode), stat.S_ISLNK(mode)):
                    wrong.append(entry.path)
                if stat.S_ISDIR(mode):
                    folders.append(Path(entry.path))
                given += 1
    assert not wrong, wrong[:10]
    assert given > 6000
    # The listing itself says so: `find -type d` stats the folders, not every name (as on a disk).
    if not shutil.which("strace"):
        pytest.fail("strace is not installed (scripts/install.sh installs it)")
    counts = tmp_path / "strace"
    subprocess.run(["strace", "-f", "-c", "-o", str(counts), "find", str(root), "-type", "d"],
                   capture_output=True, check=True)
    stats = sum(int(line.split()[3]) for line in counts.read_text().splitlines()
                if line.split()[-1:] in (["newfstatat"], ["lstat"], ["fstatat64"], ["statx"]))
    assert stats < given * 0.6, f"{stats} stats for {given} names: the listing gave no types"
