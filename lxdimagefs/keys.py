"""Typed keys: what names an image, a file's bytes, and everything stored or cached about them.

Data from a server enters as strings; a fingerprint or a digest becomes a key here, validated
once, and only a key may name a cache, spool, index or journal entry. A server that sends
`aaaa/../..` as a fingerprint is refused at the door instead of naming a path outside a folder.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Self

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadKey(ValueError):
    """A server's fingerprint or digest that is not 64 lowercase hex digits."""


class Sha256(str):
    """A sha256 as LXD and simplestreams write it: 64 lowercase hex digits, checked on creation."""

    __slots__ = ()

    def __new__(cls, value: str) -> Sha256:
        if type(value) is cls:
            return value
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise BadKey(f"not a sha256: {value!r:.80}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: object) -> Self | None:
        """The key, or None where `value` is not one (for names a user typed, which may be anything)."""
        try:
            return cls(value) if isinstance(value, str) else None
        except BadKey:
            return None


class Fingerprint(Sha256):
    """An image's identity: the sha256 of its export (of both parts, for a split image)."""

    __slots__ = ()


class FileDigest(Sha256):
    """The sha256 of one file's bytes (a simplestreams item's claim until the bytes prove it)."""

    __slots__ = ()


Kind = Literal["export", "part", "index", "layout", "spool", "manifest"]


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """One stored object: which digest, which kind of object, and which server it is about.

    `server` is empty for content-addressed objects (the bytes are the same wherever they came
    from); otherwise it is any string naming the server, hashed into the file name. `part`: which
    part of a split image the object is about (its manifest is one per part), else None.
    """

    digest: Sha256
    kind: Kind
    server: str = ""
    part: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.digest, Sha256):
            object.__setattr__(self, "digest", Sha256(self.digest))

    @property
    def filename(self) -> str:
        """A file name made only of the kind, hex digits and dashes: never a path."""
        tail = "" if self.part is None else f".{int(self.part)}"
        if not self.server:
            return f"{self.kind}-{self.digest}{tail}"
        where = hashlib.sha256(self.server.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{self.kind}-{where}-{self.digest}{tail}"
