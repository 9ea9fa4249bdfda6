"""Block manifests: the XXH3-128 of every block of an image, as the whole-file hash saw it.

The sha256 of an export proves a whole read; the manifest carries that proof
to every later copy of a block, wherever it comes from (LXD again, the disk
cache), at 0.02 CPU-s/GiB instead of re-hashing the file. Before the verdict
the first copy of a block that reaches memory is recorded, and every later
copy must match it: so the bytes a reader was handed ahead of the hash are
the bytes the hash sees, or the image is `EIO`. After a good verdict the
manifest is the image's truth: a copy that differs is refused (`EIO` for
that read) and never kept.
"""

from __future__ import annotations

import threading

import xxhash

from lxdimagefs.data.blocks import BLOCK

DIGEST = 16  # bytes of an XXH3-128


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


class Manifest:
    """One image's block digests, filled as blocks arrive; `verified` once the sha256 agreed."""

    def __init__(self, fp: str, total: int, sums: bytes | None = None) -> None:
        self.fp, self.total = fp, total
        self.blocks = max(1, (total + BLOCK - 1) // BLOCK)
        self.verified = sums is not None
        self._sums = bytearray(sums) if sums is not None else bytearray(DIGEST * self.blocks)
        self._have = bytearray(b"\1" * self.blocks if sums is not None else self.blocks)
        self._lock = threading.Lock()
        if len(self._sums) != DIGEST * self.blocks:
            raise ValueError(f"manifest of {fp[:12]}: {len(self._sums)} bytes for {self.blocks} blocks")

    def admit(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Whether this copy of a block may be served: the first copy is recorded, later ones must match."""
        got = digest(data)
        at = index * DIGEST
        with self._lock:
            if not self._have[index]:
                if self.verified:
                    return False  # cannot happen for a whole manifest; refuse rather than guess
                self._sums[at:at + DIGEST] = got
                self._have[index] = 1
                return True
            return self._sums[at:at + DIGEST] == got

    def has(self, index: int) -> bool:
        """Whether a copy of this block was recorded (a kept copy can then be checked)."""
        return bool(self._have[index])

    def sealed(self) -> bytes:
        """The digests of a verified image, to be kept (the disk cache stores them)."""
        with self._lock:
            return bytes(self._sums)


class BlockSums:
    """The digests of a file's blocks as its bytes go by in pieces of any size (a split part being
    downloaded or hashed): its manifest, made by the same pass as its sha256."""

    def __init__(self) -> None:
        self._sums = bytearray()
        self._hash = xxhash.xxh3_128()
        self._filled = 0  # bytes of the current block seen so far

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(BLOCK - self._filled, len(view))
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK:
                self._sums += self._hash.digest()
                self._hash.reset()
                self._filled = 0

    def manifest(self, fp: str, total: int) -> Manifest:
        """The verified manifest of the `total` bytes seen (call once the whole-file hash agreed)."""
        sums = bytes(self._sums)
        if self._filled or not sums:  # the last, shorter block (an empty file: one empty block)
            sums += self._hash.digest()
        return Manifest(fp, total, sums)
