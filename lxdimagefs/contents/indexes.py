"""Where contents/'s indexes are built, and which of them later mounts may take up."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxdimagefs.data.exports import Exports

from lxdimagefs.keys import Fingerprint, ObjectKey
from lxdimagefs.private import private_folder

log = logging.getLogger(__name__)

# In every kept index's name: indexes kept before only those built from checked bytes were kept
# (any lazy read could have built one) are never taken up; the folder's cap removes them in time.
CHECKED = ".checked"


class Place:
    """Where one source's index is built, and whether later mounts may take it up.

    Kept in the index folder only when every byte it is built from is checked. A lazy read of an
    image not verified yet is not (its check ends only when every byte has been read): an index
    built from it would answer, in a later mount where the image verifies, with what those bytes
    said (another file's bytes under a name). If the check passed during the index pass (a
    compressed tarball's is one whole read), every byte the pass read was the verified one and
    it is kept after all. (SQLite in memory is bound to the thread that made it: not an option.)

    A mount never opens the index folder's file itself: ratarmountcore holds each index it opens
    locked (SQLite's EXCLUSIVE locking mode) for as long as it is open, so a second mount sharing
    the folder met "database is locked". Each mount reads its own copy, in its spool, and an
    index it built enters the folder whole, by rename.
    """

    def __init__(self, exports: Exports, fp: str, index: Path, suffix: str, unchecked: list[str]) -> None:
        self.exports, self.unchecked = exports, [k for k in unchecked if k]
        self.kept = with_suffix(index, CHECKED + suffix)
        # A copy of a checked index, or one built from checked bytes, is never the same file as
        # one built here from unchecked bytes: that one must not be kept as checked later.
        checked = "" if self.unchecked else CHECKED
        self.path = str(exports.spool.named(fp, "index" + checked + suffix))
        self.taken: tuple[int, int] | None = None  # copied from the folder: its size and mtime then

    def ready(self) -> str:
        """The mount's own index file: a copy of the kept one, if its bytes may be trusted."""
        private_folder(self.exports.spool.directory)
        if not self.unchecked and not os.path.exists(self.path):
            tmp = f"{self.path}.{threading.get_ident()}"
            try:
                shutil.copyfile(self.kept, tmp)
                os.replace(tmp, self.path)
                self.taken = _stamp(self.path)
            except OSError:  # none kept (or trimmed since): built here
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return self.path

    def done(self) -> None:
        """Keep the index built (a copy taken up and rebuilt, one of an older ratarmountcore: too)."""
        if (self.taken is not None and self.taken == _stamp(self.path)) or not all(
                k in self.exports.verification.verified for k in self.unchecked):
            return
        tmp = f"{self.kept}.{os.getpid()}.{threading.get_ident()}"
        try:
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, self.kept)
        except OSError as e:  # the index folder full: the next mount builds it again
            log.warning("index %s not kept: %s", self.kept, e)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def with_suffix(index: Path, suffix: str) -> str:
    return str(index.with_name(index.name + suffix))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class IndexFolder:
    """Where archive indexes are kept between mounts: a folder only its owner can use, size-capped."""

    def __init__(self, path: Path, cap: int = 256 << 20) -> None:
        self.path = path
        self.cap = cap

    def ready(self) -> Path:
        private_folder(self.path)
        self._trim()
        return self.path

    def base(self, fp: Fingerprint, server: str) -> Path:
        """The folder, made ready, joined with the name of one image's index files (never a path)."""
        return self.ready() / ObjectKey(fp, "index", server).filename

    def _trim(self) -> None:
        files = sorted((p for p in self.path.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.cap:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)

