"""Split exports, downloaded once to a private local spool and verified before use."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

from .client import LXDClient
from .errors import IntegrityError, LXDError
from .multipart import PartStream


class SplitSpool:
    """Split exports, downloaded once to local files and shared by all readers.

    LXD serves a split export only as one multipart stream, without ranges
    or part sizes, so random access needs a local copy. The download is
    verified against the fingerprint before anyone reads it. The spool is
    private to this mount and removed when it ends.
    """

    def __init__(self, client: LXDClient, directory: Path) -> None:
        self.client = client
        self.directory = directory
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.downloads = 0

    def paths(self, fp: str) -> list[Path]:
        """The local files of both parts, downloading them first if needed."""
        final = [self.directory / f"{fp}.{i}" for i in range(2)]
        if all(p.exists() for p in final):
            return final
        with self._lock:
            lock = self._locks.setdefault(fp, threading.Lock())
        with lock:
            if not all(p.exists() for p in final):
                self._download(fp, final)
        return final

    def _download(self, fp: str, final: list[Path]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = [p.with_suffix(p.suffix + ".part") for p in final]
        digest = hashlib.sha256()
        files: list = []

        def begin(_name: str) -> None:
            if len(files) >= 2:
                raise LXDError(f"LXD's split export of {fp} holds more than two parts")
            files.append(open(tmp[len(files)], "wb"))  # noqa: SIM115 - closed in finally

        def data(chunk: memoryview) -> None:
            digest.update(chunk)
            files[-1].write(chunk)

        self.downloads += 1
        try:
            resp = self.client.export_stream(fp)
            with resp:
                PartStream(resp.headers.get("Content-Type", ""), begin, data,
                           lambda: files[-1].flush()).feed(LXDClient.iter_chunks(resp))
            for f in files:
                f.close()
            if len(files) != 2:
                raise LXDError(f"LXD's split export of {fp} did not hold two parts")
            if digest.hexdigest() != fp:
                raise IntegrityError(fp)
            for t, f in zip(tmp, final, strict=True):
                os.replace(t, f)
        finally:
            for f in files:
                f.close()
            for t in tmp:
                t.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    PREFIX = "lxdimagefs-spool-"

    def claim(self) -> None:
        """Mark the spool as this (daemonized) process's, for `sweep` to know it is alive."""
        (self.directory / "pid").write_text(str(os.getpid()))

    @classmethod
    def sweep(cls, root: Path, grace: float = 60.0) -> list[Path]:
        """Remove the spools of daemons that died without unmounting (killed, crashed)."""
        removed = []
        for path in root.glob(cls.PREFIX + "*"):
            try:
                if path.stat().st_uid != os.getuid():
                    continue
                pid = int((path / "pid").read_text())
            except FileNotFoundError:  # never claimed: a start-up that failed, unless brand new
                pid = 0
                if time.time() - path.stat().st_mtime < grace:
                    continue
            except (OSError, ValueError):
                continue
            if pid and _alive(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
