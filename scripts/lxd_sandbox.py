#!/usr/bin/env python3
"""A private LXD (or Incus) for tests, benchmarks and the demo, and images to put in it.

The daemon is Debian's real `lxd`, with its own LXD_DIR in a temporary
folder, started as `lxd --group root`, awaited with `lxd waitready`, and
stopped by its process id; Incus the same way (`incusd`, INCUS_DIR,
`incus admin waitready`). Nothing here touches a system LXD or Incus.

    scripts/lxd_sandbox.py start [--seed] [--incus]   prints the folder and the pid
    scripts/lxd_sandbox.py stop SANDBOX
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

METADATA_YAML = """architecture: x86_64
creation_date: 1700000000
properties:
  os: {os}
  release: "{release}"
  description: {description}
"""


@dataclass(frozen=True)
class Product:
    daemon: str
    client: str
    dir_var: str
    waitready: tuple[str, ...]


PRODUCTS = {
    "lxd": Product("lxd", "lxc", "LXD_DIR", ("lxd", "waitready")),
    "incus": Product("/usr/libexec/incus/incusd", "incus", "INCUS_DIR", ("incus", "admin", "waitready")),
}


@dataclass
class Sandbox:
    root: Path  # holds lxd/ (the LXD_DIR, or INCUS_DIR), pid and product
    pid: int
    product: str = "lxd"
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. SSL_CERT_FILE, to trust a test CA

    @property
    def lxd_dir(self) -> Path:
        return self.root / "lxd"

    @property
    def socket(self) -> str:
        return str(self.lxd_dir / "unix.socket")

    @property
    def kind(self) -> Product:
        return PRODUCTS[self.product]

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, self.kind.dir_var: str(self.lxd_dir)}

    def lxc(self, *args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """The server's own client: lxc, or incus (never waited on for ever: a hung client fails
        the test that ran it instead of the whole run)."""
        return subprocess.run([self.kind.client, *args], env=self.env(), check=check, capture_output=True,
                              input=input, timeout=timeout)

    def rest(self, path: str, method: str = "GET", data: dict | None = None) -> dict:
        """LXD's own answer, through `lxc query`, to check the mount against."""
        args = ["query", "-X", method, path]
        if data is not None:
            args[3:3] = ["-d", json.dumps(data)]
        out = self.lxc(*args).stdout
        return json.loads(out) if out.strip() else {}

    def import_image(self, *files: Path, alias: str | None = None) -> str:
        args = ["image", "import", *map(str, files)]
        if alias:
            args += ["--alias", alias]
        try:
            out = self.lxc(*args, timeout=120).stdout.decode()
        except subprocess.TimeoutExpired:
            # LXD 5.0's lxc was seen (once, in a churn of concurrent imports and deletes) to wait on
            # after its operation had ended. A unified image's fingerprint is its file's sha256:
            # if LXD holds it, the import happened; its alias is added as lxc would have.
            if len(files) != 1:
                raise
            fp = hashlib.sha256(files[0].read_bytes()).hexdigest()
            if self.lxc("image", "info", fp, check=False).returncode != 0:
                raise
            if alias:
                self.lxc("image", "alias", "create", alias, fp, check=False)
            return fp
        return out.strip().rsplit(" ", 1)[-1]

    @classmethod
    def start(cls, base: str | None = None, timeout: float = 90, product: str = "lxd",
              extra_env: dict[str, str] | None = None) -> Sandbox:
        root = Path(tempfile.mkdtemp(prefix=f"lxdimagefs-{product}-", dir=base))
        os.chmod(root, 0o755)
        (root / "lxd").mkdir()
        (root / "product").write_text(product)
        sandbox = cls(root, 0, product, dict(extra_env or {}))
        try:
            sandbox.resume(timeout)
        except BaseException:
            sandbox.stop()
            raise
        return sandbox

    def resume(self, timeout: float = 90) -> None:
        """Start the daemon on this sandbox's LXD_DIR and wait until it is ready."""
        with open(self.root / "daemon.log", "ab") as log:
            proc = subprocess.Popen([self.kind.daemon, "--group", "root", "--logfile",
                                     str(self.root / "lxd.log")], env=self.env(), stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        (self.root / "pid").write_text(str(proc.pid))
        ready = subprocess.run([*self.kind.waitready, "--timeout", str(int(timeout))], env=self.env(),
                               capture_output=True)
        if ready.returncode != 0:
            raise RuntimeError(f"private {self.product} did not start: {ready.stderr.decode().strip()}")

    def halt(self, timeout: float = 60) -> None:
        """Stop the daemon by its pid, keeping its LXD_DIR for `resume`."""
        if not self.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pid = 0

    def stop(self, timeout: float = 60) -> None:
        """Stop the daemon by its pid, then remove its folder and what it mounted there."""
        self.halt(timeout)
        for mount in reversed(_mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def seed(self, workdir: Path) -> dict[str, str]:
        """A few sample images: unified in three compressions, and a split one."""
        made = {}
        for name, comp in (("demo/gz", "gz"), ("demo/xz", "xz"), ("demo/plain", "")):
            tarball = make_unified(workdir / f"{name.replace('/', '-')}.tar{'.' + comp if comp else ''}",
                                   rootfs_bytes=256 << 10, description=f"sample {name}")
            made[name] = self.import_image(tarball, alias=name)
        meta, rootfs = make_split(workdir / "demo-split", description="sample split image")
        made["demo/split"] = self.import_image(meta, rootfs, alias="demo/split")
        return made


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def _metadata(description: str, seed: str) -> bytes:
    return METADATA_YAML.format(os="lxdimagefs-test", release=seed, description=description).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int = 0, fill=None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1700000000
    if data is None and fill is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    info.mode = 0o644
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else fill)


class _Noise(io.RawIOBase):
    """Incompressible bytes, reproducible from a seed, without holding them in memory."""

    def __init__(self, seed: str, size: int) -> None:
        self._state = hashlib.sha256(seed.encode()).digest()
        self._left = size
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        while len(self._buf) < n:
            self._state = hashlib.sha512(self._state).digest()
            self._buf += hashlib.shake_256(self._state).digest(1 << 16)
        out, self._buf = self._buf[:n], self._buf[n:]
        self._left -= n
        return out


def make_unified(path: Path, rootfs_bytes: int = 64 << 10, description: str = "test image",
                 seed: str | None = None) -> Path:
    """A unified image tarball; compression follows the name (.tar, .tar.gz, .tar.xz)."""
    seed = seed or path.name + str(time.time_ns())
    mode = {".gz": "w:gz", ".xz": "w:xz", ".bz2": "w:bz2"}.get(path.suffix, "w")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        _add(tar, "metadata.yaml", _metadata(description, seed))
        _add(tar, "rootfs")
        _add(tar, "rootfs/etc")
        _add(tar, "rootfs/etc/hostname", seed.encode() + b"\n")
        _add(tar, "rootfs/blob", size=rootfs_bytes, fill=_Noise(seed, rootfs_bytes))
    return path


def make_split(folder: Path, description: str = "split test image", seed: str | None = None,
               rootfs_bytes: int = 64 << 10) -> tuple[Path, Path]:
    """A split image: metadata tarball and squashfs rootfs (made by mksquashfs)."""
    seed = seed or folder.name + str(time.time_ns())
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.tar.xz"
    with tarfile.open(meta, "w:xz") as tar:
        _add(tar, "metadata.yaml", _metadata(description, seed))
    tree = folder / "rootfs"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text(seed + "\n")
    with open(tree / "blob", "wb") as f:
        shutil.copyfileobj(_Noise(seed, rootfs_bytes), f)
    squash = folder / "rootfs.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(squash), "-noappend", "-quiet", "-all-root"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return meta, squash


def pack_unified(rootfs: Path, path: Path, description: str = "distribution image") -> Path:
    """A unified image of a real root tree, as LXD and distrobuilder pack one: metadata.yaml and
    rootfs/ in one tarball (GNU tar, numeric owners, hard links as links; gzip for a .gz name).
    Names are sorted, so a reader walking the tree in name order reads the tarball forwards."""
    work = path.parent / f"{path.name}.meta"
    work.mkdir(parents=True, exist_ok=True)
    (work / "metadata.yaml").write_bytes(_metadata(description, path.name))
    # gzip's and mksquashfs's fastest level: what is inside is the same, packing takes a third.
    compress = ["-I", "gzip -1"] if path.suffix == ".gz" else ["-J"] if path.suffix == ".xz" else []
    rename = [] if rootfs.name == "rootfs" else ["--transform", f"s,^{rootfs.name},rootfs,S"]
    subprocess.run(["tar", "-c", *compress, "--numeric-owner", "--sort=name", "-f", str(path),
                    "-C", str(work), "metadata.yaml", "-C", str(rootfs.parent), *rename, rootfs.name],
                   check=True, capture_output=True)
    shutil.rmtree(work)
    return path


def pack_split(rootfs: Path, folder: Path, description: str = "distribution image") -> tuple[Path, Path]:
    """A split image of a real root tree: a metadata tarball and the tree as a squashfs, owners,
    devices and hard links kept (mksquashfs as distrobuilder runs it, without -all-root)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.tar.xz"
    with tarfile.open(meta, "w:xz") as tar:
        _add(tar, "metadata.yaml", _metadata(description, folder.name))
    squash = folder / "rootfs.squashfs"
    subprocess.run(["mksquashfs", str(rootfs), str(squash), "-noappend", "-quiet",
                    "-Xcompression-level", "1"], check=True, capture_output=True)
    return meta, squash


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start")
    start.add_argument("--seed", action="store_true", help="import sample images")
    start.add_argument("--incus", action="store_true", help="Incus instead of LXD")
    stop = sub.add_parser("stop")
    stop.add_argument("root", help="the folder `start` printed as SANDBOX")
    args = p.parse_args()
    if args.cmd == "start":
        sandbox = Sandbox.start(product="incus" if args.incus else "lxd")
        if args.seed:
            with tempfile.TemporaryDirectory() as tmp:
                for alias, fp in sandbox.seed(Path(tmp)).items():
                    print(f"image {alias} {fp}", file=sys.stderr)
        print(f"SANDBOX={sandbox.root} {sandbox.kind.dir_var}={sandbox.lxd_dir} PID={sandbox.pid}")
        return 0
    root = Path(args.root)
    if not (root / "pid").exists():
        print(f"no private LXD at {root}", file=sys.stderr)
        return 1
    product = (root / "product").read_text() if (root / "product").exists() else "lxd"
    Sandbox(root, int((root / "pid").read_text()), product).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
