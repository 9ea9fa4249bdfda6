"""Fixtures: one private LXD per test session, real images in it, real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from faultproxy import FaultProxy  # noqa: E402
from lxd_sandbox import Sandbox, make_split, make_unified  # noqa: E402
from mounts import Mount, mounted  # noqa: E402


def _have_lxd() -> str | None:
    if not shutil.which("lxd"):
        return "Debian's lxd is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "a private LXD needs root"
    return None


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mounts a test starts keep their spools and layout journal among the test's own files."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@dataclass
class Images:
    """The images the tests made, by role, with the files they came from."""

    fps: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[Path, ...]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    reason = _have_lxd()
    if reason:
        pytest.fail(f"the integration tests need a real LXD and FUSE: {reason}")
    box = Sandbox.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="session")
def images(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("images")
    made = Images()

    def add(role: str, *files: Path, alias: str | None = None) -> None:
        made.fps[role] = sandbox.import_image(*files, alias=alias)
        made.files[role] = files

    add("gz", make_unified(work / "a.tar.gz"), alias="test/gz")
    add("xz", make_unified(work / "b.tar.xz"), alias="xz")
    # Several blocks long, uncompressed, for random reads and prefetch.
    add("plain", make_unified(work / "c.tar", rootfs_bytes=5 << 20 | 12345), alias="plain")
    add("split", *make_split(work / "split", rootfs_bytes=3 << 20), alias="split")
    # A VM image: qemu-img comes with scripts/install.sh (qemu-utils); without it this fails.
    meta = make_unified(work / "vm-meta.tar", rootfs_bytes=0, description="vm image")
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    add("vm", meta, disk, alias="vm")
    return made


@pytest.fixture(scope="session")
def mnt(sandbox: Sandbox, images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(sandbox, tmp_path_factory.mktemp("m") / "mnt") as m:
        yield m


@pytest.fixture(scope="session")
def deleting_mnt(sandbox: Sandbox, images: Images,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A mount where deleting images is allowed (-o allow_delete)."""
    with mounted(sandbox, tmp_path_factory.mktemp("del") / "mnt", "-o", "allow_delete") as m:
        yield m


@pytest.fixture(scope="session")
def ro_mnt(sandbox: Sandbox, images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(sandbox, tmp_path_factory.mktemp("ro") / "mnt", "-o", "ro") as m:
        yield m


@pytest.fixture(scope="session")
def exported(sandbox: Sandbox, images: Images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`lxc image export` of every test image, the reference for names and bytes."""
    out = {}
    for role, fp in images.fps.items():
        d = tmp_path_factory.mktemp(f"export-{role}")
        sandbox.lxc("image", "export", fp, str(d) + "/")
        out[role] = d
    return out


@pytest.fixture()
def proxy(sandbox: Sandbox, tmp_path: Path) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the private LXD's socket (tests/faultproxy.py)."""
    p = FaultProxy(sandbox.socket, str(tmp_path / "proxy.socket"))
    yield p
    p.close()
