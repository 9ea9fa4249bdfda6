"""The records servers send, as typed values: an image, and the file(s) it exports as.

LXD, Incus and simplestreams servers all become these, checked where they enter (a fingerprint is
a `Fingerprint`, a part's name one a directory entry can hold); the tree and the data path see
nothing else.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lxdimagefs.keys import BadKey, FileDigest, Fingerprint
from lxdimagefs.names import METADATA, fits

log = logging.getLogger(__name__)

_ZERO_TIME = 0.0
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


@functools.lru_cache(maxsize=4096)
def parse_time(value: str | None) -> float:
    """RFC 3339 (with LXD's nanoseconds) to a POSIX timestamp; 0 for unset."""
    if not value:
        return _ZERO_TIME
    m = _TIME_RE.match(value)
    if not m:
        return _ZERO_TIME
    base, frac, tz = m.groups()
    tz = "+00:00" if tz == "Z" else tz
    ts = datetime.fromisoformat(base + tz).timestamp()
    if ts <= 0:  # Go's zero time (0001-01-01) and the epoch mean "never"
        return _ZERO_TIME
    return ts + (float("0." + frac) if frac else 0.0)


@dataclass(frozen=True)
class Image:
    """One image record, as `GET /1.0/images/<fp>` returns it."""

    fingerprint: Fingerprint
    size: int
    uploaded_at: float
    last_used_at: float
    aliases: tuple[str, ...]
    record: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Image:
        return cls(
            fingerprint=Fingerprint(rec["fingerprint"]),
            size=int(rec.get("size") or 0),
            uploaded_at=parse_time(rec.get("uploaded_at")),
            last_used_at=parse_time(rec.get("last_used_at")),
            aliases=tuple(str(a["name"]) for a in rec.get("aliases") or ()),
            record=rec,
        )


def images_from(records: Iterable[Any], where: str) -> list[Image]:
    """The records that make images; one that does not (a bad fingerprint) is skipped with a warning."""
    images = []
    for rec in records:
        try:
            images.append(Image.from_record(rec))
        except (BadKey, KeyError, TypeError, ValueError, AttributeError) as e:
            warn_once(f"skipped an image record from {where}: {e}")
    return images


@functools.lru_cache(maxsize=256)
def warn_once(message: str) -> None:
    """A warning about what a server keeps sending (every listing): said once, not every 3 s."""
    log.warning("%s", message)


@dataclass(frozen=True)
class ExportPart:
    """One file of an export, as `lxc image export` would write it."""

    name: str
    size: int
    key: FileDigest | None = None  # the file's own sha256, where it is read on its own (simplestreams)
    path: str = field(default="", compare=False)  # where the server keeps it (simplestreams)


@dataclass(frozen=True)
class ExportLayout:
    """What an image exports as: one unified file, or a split pair."""

    split: bool
    parts: tuple[ExportPart, ...]


def part_name(name: str, fallback: str) -> str:
    """A server's name for an export file, if a directory entry can hold it; else `fallback`."""
    ok = fits(name) and "/" not in name and name not in (".", "..", METADATA)
    return name if ok else fallback
