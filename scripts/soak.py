#!/usr/bin/env python3
"""A bounded soak of one mount: parallel readers, uploads and alias churn.

Starts a private LXD, makes 8 images, mounts them, then for --seconds runs
16 readers (each reads whole images and random ranges, every whole read
checked by sha256), 2 uploaders (import a fresh tarball, check it landed,
delete it) and one alias churner (create, rename, retarget, delete). It
stops by itself and prints what it did and the daemon's RSS, open file
descriptors and threads before and after, and its peak RSS (VmHWM). Needs root.

    .venv/bin/python scripts/soak.py [--seconds 120]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lxd_sandbox import Sandbox, make_unified


def daemon_stats(pid: int) -> dict[str, int]:
    field = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.split():
            field[key] = value.split()[0]
    return {"rss_kib": int(field["VmRSS"]), "peak_kib": int(field["VmHWM"]), "threads": int(field["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--readers", type=int, default=16)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("-o", dest="options", default="", help="mount options, as lxdimagefs takes them")
    p.add_argument("--log", help="keep the daemon's debug log here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still stop the private LXD
    box = Sandbox.start()
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/var/tmp"))
    where = work / "mnt"
    where.mkdir()
    counts = {"whole reads": 0, "range reads": 0, "bytes verified": 0, "uploads": 0, "alias changes": 0}
    errors: list[str] = []
    lock = threading.Lock()
    proc = None
    try:
        fps = []
        for i in range(args.images):
            tarball = make_unified(work / f"img{i}.tar", rootfs_bytes=(4 + 3 * i) << 20)
            fps.append(box.import_image(tarball, alias=f"soak/{i}"))
            tarball.unlink()
        opts = ["-o", ",".join(filter(None, ["allow_delete", args.options]))]  # it deletes what it imports
        proc = subprocess.Popen([sys.executable, "-m", "lxdimagefs", "-f", "--debug", *opts,
                                 "--socket", box.socket,
                                 "--cache-dir", str(work), "--log-file", args.log or str(work / "daemon.log"),
                                 str(where)],
                                stdin=subprocess.DEVNULL)
        while not os.path.ismount(where):
            time.sleep(0.05)
        os.listdir(where / "by-fingerprint")
        before = daemon_stats(proc.pid)
        stop = time.monotonic() + args.seconds

        def count(key: str, n: int = 1) -> None:
            with lock:
                counts[key] += n

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                fp = rng.choice(fps)
                path = where / "by-fingerprint" / fp / f"{fp}.tar"
                try:
                    if rng.random() < 0.3:
                        data = path.read_bytes()
                        if hashlib.sha256(data).hexdigest() != fp:
                            errors.append(f"wrong bytes in {fp}")
                        count("whole reads")
                        count("bytes verified", len(data))
                    else:
                        size = path.stat().st_size
                        with open(path, "rb") as f:
                            for _ in range(20):
                                f.seek(rng.randrange(size))
                                f.read(rng.choice([4096, 65536, 1 << 20]))
                        count("range reads", 20)
                except OSError as e:
                    errors.append(f"read {fp}: {e}")

        def uploader(n: int) -> None:
            i = 0
            while time.monotonic() < stop:
                tarball = make_unified(work / f"up{n}-{i}.tar.gz", rootfs_bytes=2 << 20)
                fp = hashlib.sha256(tarball.read_bytes()).hexdigest()
                try:
                    subprocess.run(["cp", str(tarball), str(where / "import")], check=True)
                    if fp not in os.listdir(where / "by-fingerprint"):
                        errors.append(f"upload {fp} not visible")
                    subprocess.run(["rm", "-r", str(where / "by-fingerprint" / fp)], check=True)
                    count("uploads")
                except (OSError, subprocess.CalledProcessError) as e:
                    errors.append(f"upload: {e}")
                tarball.unlink()
                i += 1

        def churner() -> None:
            rng = random.Random(7)
            aliases = where / "by-alias"
            while time.monotonic() < stop:
                try:
                    os.symlink(f"../by-fingerprint/{rng.choice(fps)}", aliases / "churn")
                    os.rename(aliases / "churn", aliases / "churned")
                    subprocess.run(["ln", "-sfn", f"../by-fingerprint/{rng.choice(fps)}",
                                    str(aliases / "churned")], check=True)
                    os.unlink(aliases / "churned")
                    count("alias changes", 4)
                except (OSError, subprocess.CalledProcessError) as e:
                    errors.append(f"alias: {e}")

        warm: dict[str, int] = {}

        def sampler() -> None:  # once warmed up, to tell a steady pool from a leak
            time.sleep(args.seconds / 3)
            warm.update(daemon_stats(proc.pid))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.readers)]
        threads.append(threading.Thread(target=sampler))
        threads += [threading.Thread(target=uploader, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=churner))
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        time.sleep(1)
        after = daemon_stats(proc.pid)
        print(f"soak: {took:.0f} s, {args.readers} readers over {args.images} images, "
              "2 uploaders, 1 alias churner")
        for key, value in counts.items():
            shown = f"{value / (1 << 30):.2f} GiB" if key == "bytes verified" else str(value)
            print(f"  {key}: {shown}")
        print(f"  daemon before: RSS {before['rss_kib'] / 1024:.0f} MiB, {before['fds']} fds, "
              f"{before['threads']} threads")
        print(f"  daemon at 1/3: RSS {warm['rss_kib'] / 1024:.0f} MiB, {warm['fds']} fds, "
              f"{warm['threads']} threads")
        print(f"  daemon after:  RSS {after['rss_kib'] / 1024:.0f} MiB, {after['fds']} fds, "
              f"{after['threads']} threads; peak RSS {after['peak_kib'] / 1024:.0f} MiB (the kernel's VmHWM)")
        log = Path(args.log or work / "daemon.log").read_text()
        print(f"  export requests: {log.count('/export bytes=')}, blocks received: {log.count(' in (')}")
        print(f"  errors: {len(errors)}")
        for e in errors[:10]:
            print(f"    {e}")
        for line in [x for x in log.splitlines() if " ERROR " in x or " WARNING " in x][:10]:
            print(f"    log: {line}")
        return 1 if errors else 0
    finally:
        if proc is not None:
            subprocess.run(["fusermount", "-u", str(where)], check=False)
            proc.wait(timeout=30)
        box.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
