"""Fixtures: one private LXD per test session, real images in it, real mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from lxd_sandbox import Sandbox, make_split, make_unified  # noqa: E402


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
    if shutil.which("qemu-img"):
        meta = make_unified(work / "vm-meta.tar", rootfs_bytes=0, description="vm image")
        disk = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
        add("vm", meta, disk, alias="vm")
    return made


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"lxdimagefs exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    raise TimeoutError(f"{path} was not mounted within {timeout}s")


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount", "-u", str(path)], check=False)
        if os.path.ismount(path):
            subprocess.run(["fusermount", "-uz", str(path)], check=False)


@contextlib.contextmanager
def mounted(sandbox: Sandbox, where: Path, *args: str) -> Iterator[Mount]:
    """lxdimagefs in the foreground, as a child we own and stop by its pid."""
    where.mkdir(parents=True, exist_ok=True)
    log = where.parent / f"{where.name}.log"
    if "--cache-dir" not in args:  # spools and the layout journal go with the test's own files
        args = ("--cache-dir", str(where.parent), *args)
    proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--debug", "--socket", sandbox.socket,
                             "--log-file", str(log), *args, str(where)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_mounted(where, proc)
        yield Mount(where, proc, log)
    finally:
        unmount(where)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mnt(sandbox: Sandbox, images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(sandbox, tmp_path_factory.mktemp("m") / "mnt") as m:
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
