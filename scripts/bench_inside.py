"""contents/ as a place to work (issue 24): whole-tree commands on a real Debian 12 minbase rootfs.

The tree tests/contents/test_fidelity.py builds (debootstrap) is imported twice, as a unified
`.tar.gz` and as a split squashfs image, and each command is timed through contents/ and on the
trees `lxc image export` + `tar -x` / `unsquashfs` make, in one run:

    .venv/bin/python scripts/benchmark.py --contents [--rounds 1] [--only 'tar -cf'] [--baseline DIR]

"Fresh mount": a new daemon, the page cache dropped (echo 3 > drop_caches) before the command;
what the disk cache and the index folder kept from earlier mounts stays, as it does for a user.
"Repeat": the same command again on that mount. Both are run with libfuse's default kernel
timeouts and with `-o entry_timeout=86400,attr_timeout=86400`. Each fresh pass also gives the
daemon's CPU seconds (/proc/PID/stat: the whole daemon, every thread) and its busiest FUSE
operations, calls and handler seconds (the mount's stats socket, `lxdimagefs stats --prometheus`).

`--only TEXT`: only the commands whose label holds TEXT (and the first look). `--baseline DIR`:
another checkout's lxdimagefs (a worktree of main, say) as a second side, each command's mount of
it just before or after ours (each side first in turn), with its own index folder (run from a
folder without lxdimagefs/ in it, so that each side imports its own).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark import RSSWatch, _cpu_seconds, drop_caches, drops_by_others, mount, row, sh
from lxd_sandbox import Sandbox, pack_split, pack_unified

ROOT = Path(__file__).resolve().parent.parent
LONG = ("-o", "entry_timeout=86400,attr_timeout=86400")


def _commands(u: str, s: str) -> list[tuple[str, str]]:
    """(label, shell command) with {u} and {s} the two images' folders (rootfs/ inside)."""
    return [
        ("diff -r --no-dereference of the two rootfs",
         f"diff -r --no-dereference {u}/rootfs {s}/rootfs | grep -vc 'character special file'"),
        ("grep -r -l 'GNU General Public' rootfs/usr/share (unified)",
         f"grep -r -l 'GNU General Public' {u}/rootfs/usr/share | wc -l"),
        ("grep -r -l 'GNU General Public' rootfs/usr/share (split)",
         f"grep -r -l 'GNU General Public' {s}/rootfs/usr/share | wc -l"),
        ("tar -cf - rootfs | wc -c (unified)", f"tar -C {u} -cf - rootfs | wc -c"),
        ("tar -cf - rootfs | wc -c (split)", f"tar -C {s} -cf - rootfs | wc -c"),
        ("find rootfs -perm -4000 (unified)", f"find {u}/rootfs -perm -4000 | wc -l"),
        ("find rootfs -perm -4000 (split)", f"find {s}/rootfs -perm -4000 | wc -l"),
        ("find rootfs (unified)", f"find {u}/rootfs | wc -l"),
        ("find rootfs (split)", f"find {s}/rootfs | wc -l"),
        ("du -s rootfs (unified)", f"du -s {u}/rootfs"),
        ("du -s rootfs (split)", f"du -s {s}/rootfs"),
        ("cat of 2,000 files in path order (unified)", f"cat $(cat {{files}} | sed 's,^,{u}/,') | wc -c"),
        ("cat of 2,000 files in path order (split)", f"cat $(cat {{files}} | sed 's,^,{s}/,') | wc -c"),
    ]


def _ops(where: Path) -> dict[str, list[float]]:
    """Each FUSE operation's [calls, handler seconds] so far, from the mount's stats socket."""
    from lxdimagefs.mount.admin.metrics import fetch, socket_for

    out: dict[str, list[float]] = {}
    try:
        text = fetch(socket_for(str(where)))
    except OSError:  # not answering (yet): the operations are then counted from the mount's start
        return out
    for line in text.splitlines():
        if found := re.match(r'lxdimagefs_operation_seconds_(count|sum)\{operation="(\w+)"\} (\S+)', line):
            out.setdefault(found[2], [0.0, 0.0])[found[1] == "sum"] = float(found[3])
    return out


def _busiest(before: dict[str, list[float]], after: dict[str, list[float]], n: int = 6) -> str:
    done = {op: (calls - before.get(op, [0, 0])[0], took - before.get(op, [0, 0])[1])
            for op, (calls, took) in after.items()}
    return ", ".join(f"{op} {calls:.0f} / {took:.2f} s"
                     for op, (calls, took) in sorted(done.items(), key=lambda kv: -kv[1][1])[:n] if calls)


def _inside(mnt: str, fps: dict[str, str]) -> tuple[str, str]:
    return f"{mnt}/contents/by-fingerprint/{fps['unified']}", f"{mnt}/contents/by-fingerprint/{fps['split']}"


def _timed(command: str, files: Path) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(command.replace("{files}", str(files)), shell=True, capture_output=True, text=True)
    took = time.perf_counter() - t
    if done.returncode not in (0, 1):  # diff: 1 for the devices it does not compare, 2 for trouble
        raise RuntimeError(f"{command}: {done.returncode} {done.stderr[-500:]} {done.stdout[-500:]}")
    return took, done.stdout.strip()[-40:]


def _unpacked(box: Sandbox, fps: dict[str, str], work: Path) -> tuple[Path, dict[str, float]]:
    """Both images exported and unpacked as a user would; the seconds each took."""
    out, took = work / "unpacked", {}
    for kind, fp in fps.items():
        where = out / kind
        where.mkdir(parents=True)
        drop_caches()
        t = time.perf_counter()
        sh("lxc", "image", "export", fp, f"{where}/", env=box.env())
        exported = sorted((p for p in where.iterdir()), key=lambda p: p.stat().st_size)[-1]
        if kind == "split":
            sh("unsquashfs", "-q", "-d", str(where / "rootfs"), str(exported))
        else:
            sh("tar", "--numeric-owner", "-xf", str(exported), "-C", str(where))
        took[kind] = time.perf_counter() - t
        for p in where.iterdir():
            if p.is_file():
                p.unlink()
    return out, took


def bench_inside(box: Sandbox, work: Path, rounds: int = 1, baseline: Path | None = None,
                 only: str | None = None) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "contents")]
    from test_fidelity import debian_minbase

    tree = debian_minbase()
    print(f"\ncontents/ as a place to work: Debian 12 minbase ({tree})", flush=True)
    fps = {"unified": box.import_image(pack_unified(tree, work / "debian.tar.gz")),
           "split": box.import_image(*pack_split(tree, work / "debian-split"))}
    files = work / "files"
    listed = subprocess.run(f"cd {tree.parent} && find rootfs -type f -size +0 | sort | head -2000",
                            shell=True, capture_output=True, text=True, check=True).stdout
    files.write_text(listed)
    unpacked, extract = _unpacked(box, fps, work)
    both = sum(extract.values())
    commands = [(label, run) for label, run in _commands(str(unpacked / "unified"), str(unpacked / "split"))
                if not only or only in label]
    plain = {}
    for label, command in commands:
        drop_caches()
        cold, _ = _timed(command, files)
        warm = min(_timed(command, files)[0] for _ in range(2))
        plain[label] = (cold, warm)
    row("lxc image export + extract (unified .tar.gz / split squashfs)",
        f"{extract['unified']:.2f} / {extract['split']:.2f} s", "caches dropped first")
    sides = [("", {}, work / "index")]
    if baseline is not None:
        sides.append((", baseline", {"PYTHONPATH": str(baseline)}, work / "index-baseline"))
    for _, _, index in sides:
        index.mkdir()
    for opts, name in (((), "default timeouts"), (LONG, "entry/attr_timeout=86400")):
        for side, env, index in sides:
            _first_look(box, fps, index, opts, name + side, files, env)
        for turn, (label, command) in enumerate(_commands(*_inside("{mnt}", fps))):
            if label not in plain:
                continue
            cold_plain, warm_plain = plain[label]
            alt = extract["split" if "(split)" in label else "unified"] if "(" in label else both
            for side, env, index in sides[::-1] if turn % 2 else sides:  # each side first in turn
                with mount(box, "mfusepy", "--cache-dir", str(index), *opts, env_extra=env) as mounted:
                    where, proc, _ = mounted
                    run = command.replace("{mnt}", shlex.quote(str(where)))
                    drop_caches()
                    load = os.getloadavg()[0]
                    with RSSWatch(proc.pid) as rss:
                        cpu, ops = _cpu_seconds(proc.pid), _ops(where)
                        cold, out = _timed(run, files)
                        cpu, ops = _cpu_seconds(proc.pid) - cpu, _busiest(ops, _ops(where))
                        drops, again = drops_by_others(), _ops(where)
                        repeat = min(_timed(run, files)[0] for _ in range(rounds))
                        drops, again = drops_by_others() - drops, _busiest(again, _ops(where))
                other = alt + cold_plain
                row(f"{label}, {name}{side}: fresh mount", f"{cold:.2f} s",
                    f"{cold / other:.2f}x export+extract+command ({other:.2f} s); daemon CPU {cpu:.2f} s; "
                    f"load {load:.1f}; out {out!r}")
                row(f"{label}, {name}{side}: fresh mount, busiest operations", "", ops)
                row(f"{label}, {name}{side}: repeat", f"{repeat:.3f} s",
                    f"{repeat / warm_plain:.1f}x the unpacked tree's repeat ({warm_plain:.3f} s), "
                    f"{repeat / cold_plain:.1f}x its cold ({cold_plain:.3f} s); "
                    f"daemon RSS peak {rss.peak / 1024:.0f} MiB"
                    + (f"; NOT VALID: {drops} page-cache drops by others during the repeat" if drops else ""))
                row(f"{label}, {name}{side}: repeats ({rounds}), busiest operations", "", again)
    for fp in fps.values():
        box.lxc("image", "delete", fp)


def _first_look(box: Sandbox, fps: dict[str, str], index: Path, opts: tuple[str, ...], name: str,
                files: Path, env: dict[str, str]) -> None:
    """cat rootfs/etc/os-release of each image on a new mount, then diff -r at once on it: on the
    first mount ever, while the .tar.gz is decoded in the background."""
    with mount(box, "mfusepy", "--cache-dir", str(index), *opts, env_extra=env) as (where, proc, _log):
        drop_caches()
        for kind, fp in fps.items():
            t = time.perf_counter()
            sh("cat", f"{where}/contents/by-fingerprint/{fp}/rootfs/etc/os-release")
            row(f"cat rootfs/etc/os-release ({kind}), {name}: new mount",
                f"{(time.perf_counter() - t) * 1000:.0f} ms")
        label, command = _commands(*_inside(str(where), fps))[0]
        with RSSWatch(proc.pid) as rss:
            took, _ = _timed(command, files)
        row(f"{label}, {name}: on that mount, at once", f"{took:.2f} s",
            f"daemon RSS peak {rss.peak / 1024:.0f} MiB")


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-inside-", dir="/var/tmp"))
