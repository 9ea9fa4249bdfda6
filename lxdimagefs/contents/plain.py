"""A compressed unified tarball read inside as a plain one, decoded once (data/exports.py).

Whole-tree commands (diff -r, grep -r, tar -c) read every file: through a
`.tar.gz`'s seek points each read decodes up to a seek point's spacing
again, through a one-block `.tar.xz` from the start. Decoded once into a
plain tarball with its manifest, every later read is an offset read of
checked 1 MiB blocks. zstd and legacy lzma are decoded before the first
look (ratarmountcore reads neither through a checked file object); gzip, xz
and bzip2 in the background after it, while their seek points serve the
first looks; from then on (and on every later mount, from the disk cache)
the plain tarball serves.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from typing import Any

from lxdimagefs.contents.indexes import Place
from lxdimagefs.data.diskparts import CheckedPart
from lxdimagefs.data.exports import Exports
from lxdimagefs.errors import IntegrityError

log = logging.getLogger(__name__)

# A unified export's compression by its name's end (data/exports.py `decoder_of` decodes each).
COMPRESSIONS = {".tar.zst": "zst", ".tar.zstd": "zst", ".tar.lzma": "lzma", ".tar.gz": "gz",
                ".tar.xz": "xz", ".tar.bz2": "bz2"}
AT_ONCE = ("zst", "lzma")  # no seek points ratarmountcore can read through a checked file object
# One background decode at a time in the daemon: `find contents/` opens every image, and each
# decode holds a core and a few MiB of buffers.
_ONE_AT_A_TIME = threading.Lock()


def compression_of(name: str) -> str | None:
    return next((kind for suffix, kind in COMPRESSIONS.items() if name.endswith(suffix)), None)


def plain_tar(fp: str, decoded: CheckedPart, index: Place) -> Any:
    """The decoded tarball as a ratarmountcore source, its index at `index` (its bytes are checked)."""
    from ratarmountcore.mountsource.formats.tar import SQLiteIndexedTar

    from lxdimagefs.contents.archives import ExportFile

    tar = io.BufferedReader(ExportFile(decoded, decoded.total), 1 << 16)
    built = SQLiteIndexedTar(fileObject=tar, tarFileName=fp, indexFilePath=index.ready(), writeIndex=True)
    index.done()
    built.pread = decoded.read  # a file's bytes read by offset, not through the file object (archives.py)
    return built


def spans(pread: Callable[[int, int], bytes | memoryview], offset: int, size: int,
          unit: int = 1 << 20) -> list[bytes | memoryview]:
    """Bytes [offset, offset + size) read by `pread` in pieces that never cross a `unit` boundary:
    a reader of checked 1 MiB blocks hands each as a view of its block, without a copy."""
    out: list[bytes | memoryview] = []
    end = offset + size
    while offset < end:
        got = pread(offset, min(end, (offset // unit + 1) * unit) - offset)
        if not len(got):
            break
        out.append(got)
        offset += len(got)
    return out


def decode_later(exports: Exports, fp: str, size: int, compression: str, index: Place,
                 use: Callable[[Any], bool]) -> threading.Thread:
    """Decode in the background, then hand the plain tarball's source to `use` (False: it was
    not wanted any more, and is closed). A failure leaves the seek points serving, and is logged."""

    def run() -> None:
        try:
            with _ONE_AT_A_TIME:
                decoded = exports.decoded(fp, size, compression)
                assert decoded is not None
                source = plain_tar(fp, decoded, index)
        except (IntegrityError, OSError, ValueError) as e:
            log.warning("contents/ of %s: not decoded (%s); read through its seek points", fp[:12], e)
            return
        except Exception:
            log.exception("contents/ of %s: decoding failed; read through its seek points", fp[:12])
            return
        if use(source):
            log.debug("contents/ of %s: read from its decoded tarball from now on", fp[:12])
        else:
            source.__exit__(None, None, None)

    thread = threading.Thread(target=run, name=f"decode_{fp[:8]}", daemon=True)
    thread.start()
    return thread
