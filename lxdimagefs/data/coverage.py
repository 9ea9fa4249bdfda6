"""Which bytes of a file readers were given, in O(log n) a read.

A read of a file lxdimagefs has not checked yet records its byte range
here; the read that completes the file waits for the hash. Readers choose
the ranges (with `allow_other`, any user), so one read must cost the same
however scattered the earlier ones were: the ranges are kept as sorted,
disjoint, non-touching intervals, found with `bisect`, and a count of the
bytes covered says when the file is complete. Neighbours merge as they
meet, so memory is proportional to the gaps, not to the reads.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from lxdimagefs.data.blocks import BLOCK


class Coverage:
    """The byte ranges of a file of `total` bytes given to readers so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.blocks = max(1, (total + BLOCK - 1) // BLOCK)
        self._starts: list[int] = []
        self._ends: list[int] = []  # interval k is [_starts[k], _ends[k]); both lists ascending
        self._covered = 0
        self._touched = False

    @property
    def complete(self) -> bool:
        return self._touched and self._covered >= self.total

    @property
    def intervals(self) -> int:
        """How many separate ranges are held (the gaps between them are what is left)."""
        return len(self._starts)

    def add(self, offset: int, end: int) -> None:
        """Record bytes [offset, end) as given: two bisections and one slice replacement."""
        self._touched = True
        lo, hi = max(offset, 0), min(end, self.total)
        if lo >= hi:
            return
        first = bisect_left(self._ends, lo)  # the first interval ending at or after lo
        after = bisect_right(self._starts, hi)  # the intervals [first, after) meet [lo, hi)
        if first < after:
            lo = min(lo, self._starts[first])
            hi = max(hi, self._ends[after - 1])
            self._covered -= sum(b - a for a, b in zip(self._starts[first:after],
                                                       self._ends[first:after], strict=True))
        self._starts[first:after] = [lo]
        self._ends[first:after] = [hi]
        self._covered += hi - lo
