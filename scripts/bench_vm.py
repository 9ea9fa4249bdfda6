"""contents/ of VM images (issue 25): the Debian 12 minbase tree the fidelity tests use, as a
distrobuilder-like VM image (GPT, FAT32 ESP at /boot/efi by UUID, ext4 root, compressed qcow2;
tests/contents/vmdisk.py), once with zlib and once with zstd, imported into the private LXD:

    .venv/bin/python scripts/benchmark.py --vm [--baseline DIR] [--rounds N]

`--baseline DIR`: another checkout's lxdimagefs, its daemon timed beside this one's on each `find`
and `diff -r` (run from a folder without lxdimagefs/ in it, so that each side imports its own);
`--rounds N`: each `find` and `diff -r` N times, the sides taking turns, the median shown. The
same tree as a split container image (squashfs) is timed last: the bar issue 25 sets.

Against what a user has without this: the qcow2 converted to raw with `qemu-img convert`, then
`debugfs -R 'cat /etc/os-release'` on the root partition (libguestfs's virt-cat, when installed,
too). Each mount is new with the page cache dropped; its daemon's RSS is sampled throughout. `cat` runs
twice: on the first mount ever of the image (no sealed manifests: both parts are hashed whole before
any byte is served) and on a later one. The daemon runs from compiled bytecode, as an installed
package does (a shell with PYTHONDONTWRITEBYTECODE=1 would have it compile its modules at each start).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmark import RSSWatch, _cpu_seconds, _mib_received, drop_caches, mount, row, sh
from lxd_sandbox import Sandbox, pack_split

ROOT = Path(__file__).resolve().parent.parent


class _Counting(io.RawIOBase):
    """A file that counts the bytes read from it (the disk image, as the daemon's checked part)."""

    def __init__(self, path: Path) -> None:
        self._f, self.read_bytes = open(path, "rb"), 0  # noqa: SIM115

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self.read_bytes += n
        return n


def _bytes_for_os_release(disk: Path) -> tuple[int, str]:
    """What contents/disk/ reads of the qcow2 to open the guest and cat /etc/os-release (the
    daemon's own code, over the file, counted)."""
    from lxdimagefs.contents.disk.root import vm_root

    counted = _Counting(disk)
    _, tree = vm_root(None, counted, disk.name)
    assert tree is not None
    path = "/etc/os-release"
    info = tree.lookup(path)
    while stat.S_ISLNK(info.mode):  # Debian's is a link to ../usr/lib/os-release: cat follows it
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), info.linkname))
        info = tree.lookup(path)
    tree.read(info, 1 << 16, 0)
    return counted.read_bytes, path


def _timed(command: str) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # diff: 1 for what differs (boot/efi: the ESP's files)
        raise RuntimeError(f"{command}: {done.returncode} {done.stderr[-500:]}")
    return time.perf_counter() - t, done.stdout.strip()[-60:]


def _new_mounts(box: Sandbox, fp: str, label: str, command: str, sides: list[tuple[str, dict]],
                rounds: int = 1) -> float:
    """`command` on a new mount of each side, the page cache dropped first, `rounds` times (the
    sides taking turns): a row for each side (the median, and each run), and this side's median."""
    runs: dict[str, list[tuple[float, str, int, int, float, float, float]]] = {side: [] for side, _ in sides}
    for _ in range(rounds):
        for side, env in sides:
            with mount(box, env_extra=env) as (where, proc, log):
                time.sleep(0.5)  # at rest
                rest = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text()
                            .splitlines() if line.startswith("VmRSS:"))
                drop_caches()
                with RSSWatch(proc.pid) as rss:
                    took, out = _timed(command.replace("{where}", str(where)))
                runs[side].append((took, out, rest, rss.peak, _cpu_seconds(proc.pid), _mib_received(log, fp),
                                   os.getloadavg()[0]))
    for side, _ in sides:
        got = sorted(runs[side])
        took, out = got[len(got) // 2][:2]
        each = ", ".join(f"{r[0]:.2f}" for r in runs[side])
        row(f"{label}, new mount{side}", f"{took * 1000:.0f} ms" if took < 10 else f"{took:.1f} s",
            f"out {out!r}; {f'median of {rounds}: {each} s; ' if rounds > 1 else ''}daemon RSS at rest "
            f"{max(r[2] for r in got) / 1024:.0f}, peak {max(r[3] for r in got) / 1024:.0f} MiB; daemon CPU "
            f"{got[len(got) // 2][4]:.2f} s (start-up too); {max(r[5] for r in got):.0f} MiB from LXD; "
            f"load {min(r[6] for r in got):.1f}-{max(r[6] for r in got):.1f}")
    return sorted(runs[sides[0][0]])[rounds // 2][0]


def _container_alike(box: Sandbox, work: Path, root: Path, rounds: int) -> None:
    """The bar: `find` and `diff -r` of the same tree as a split container image (squashfs), its
    index built by a first look on an earlier mount, as a VM image's manifests are sealed by then."""
    fp = box.import_image(*pack_split(root, work / "split"))
    with mount(box) as (where, _, _):
        _timed(f"cat {where}/contents/by-fingerprint/{fp}/rootfs/etc/os-release")
    inside = "{where}/contents/by-fingerprint/" + fp + "/rootfs"
    for label, command in [("find rootfs | wc -l", f"find {inside} | wc -l"),
                           ("diff -r --no-dereference source rootfs",
                            f"diff -r --no-dereference {root} {inside} | grep -c .")]:
        _new_mounts(box, fp, f"split container image (squashfs), same tree: {label}", command, [("", {})],
                    rounds)
    box.lxc("image", "delete", fp)


def bench_vm(box: Sandbox, work: Path, baseline: Path | None = None, rounds: int = 1) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "contents")]
    import vmdisk
    from test_fidelity import debian_minbase

    sides = [("", {})] + ([(" (baseline)", {"PYTHONPATH": str(baseline)})] if baseline else [])
    for checkout in (ROOT, *([baseline] if baseline else [])):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "lxdimagefs")], check=True)
    tree = debian_minbase()
    print(f"\ncontents/ of VM images: Debian 12 minbase ({tree}) in a GPT qcow2", flush=True)
    esp, root = vmdisk.esp_tree(work / "esp"), vmdisk.root_tree(tree, work / "root")
    offset = (1 + vmdisk.ESP_MIB) << 20
    for kind in vmdisk.OPTIONS:
        meta, disk = vmdisk.vm_image(work / kind, root, esp, kind)
        fp, size = box.import_image(meta, disk), disk.stat().st_size
        read, target = _bytes_for_os_release(disk)
        row(f"{kind}: qcow2 of {size / (1 << 20):.0f} MiB (guest disk {(offset >> 20) + 1}+ MiB)",
            f"{read / 1024:.0f} KiB read", f"to open the guest and cat /etc/os-release: {read / size:.2%}")
        inside = "{where}/contents/by-fingerprint/" + fp + "/rootfs"
        results = {}
        cat = f"cat {inside}/etc/os-release"
        for label, command in [("cat rootfs/etc/os-release, the first ever (parts hashed)", cat),
                               ("cat rootfs/etc/os-release, a later", cat),
                               ("find rootfs | wc -l", f"find {inside} | wc -l"),
                               ("diff -r --no-dereference source rootfs",
                                f"diff -r --no-dereference {root} {inside} | grep -c ."),]:
            whole = label.startswith(("find", "diff"))  # the baseline's daemon too, `rounds` times
            results[label] = _new_mounts(box, fp, f"{kind}: {label}", command, sides if whole else sides[:1],
                                         rounds if whole else 1)
        raw = work / kind / "disk.raw"
        drop_caches()
        t = time.perf_counter()
        sh("qemu-img", "convert", "-O", "raw", str(disk), str(raw))
        # debugfs does not follow links: it is given the file /etc/os-release links to, and must read it
        done = subprocess.run(["debugfs", "-R", f"cat {target}", f"{raw}?offset={offset}"],
                              capture_output=True)
        if b"VERSION_ID" not in done.stdout:
            raise RuntimeError(f"debugfs: {done.stderr[-300:]!r}")
        other = time.perf_counter() - t
        first, later = (results[f"cat rootfs/etc/os-release, {which}"]
                        for which in ("the first ever (parts hashed)", "a later"))
        row(f"{kind}: qemu-img convert to raw + debugfs cat {target}", f"{other:.2f} s",
            f"contents/ {other / first:.1f}x faster on the first mount ever, {other / later:.1f}x on a later "
            "one (the qcow2 already local for the alternative: no lxc image export counted)")
        raw.unlink()
        if shutil.which("virt-cat"):
            drop_caches()
            took, _ = _timed(f"virt-cat -a {disk} /etc/os-release")
            row(f"{kind}: virt-cat -a disk /etc/os-release", f"{took:.2f} s")
        box.lxc("image", "delete", fp)
    _container_alike(box, work, root, rounds)
