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
    said (another file's bytes under a name). Such an index is built in this mount's spool,
    removed with it; if the check passed during the index pass (a compressed tarball's is one
    whole read), every byte the pass read was the verified one and it is kept after all.
    (SQLite in memory is bound to the thread that made it: not an option.)
    """

    def __init__(self, exports: Exports, fp: str, index: Path, suffix: str, unchecked: list[str]) -> None:
        self.exports, self.unchecked = exports, [k for k in unchecked if k]
        self.kept = with_suffix(index, CHECKED + suffix)
        self.path = self.kept
        if self.unchecked:
            private_folder(exports.spool.directory)
            self.path = str(exports.spool.named(fp, "index" + suffix))

    def done(self) -> None:
        if self.path == self.kept or not all(k in self.exports.verification.verified for k in self.unchecked):
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
