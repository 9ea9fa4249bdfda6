"""Read coverage (`Coverage` in lxdimagefs/data/verify.py): right, and O(log n) a read, however scattered."""

from __future__ import annotations

import time
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from lxdimagefs.data.blocks import BLOCK
from lxdimagefs.data.verify import Coverage

TOTAL = 3 * BLOCK // 1024 + 17  # small enough for a byte-set model


@given(st.lists(st.tuples(st.integers(-5, TOTAL + 5), st.integers(0, 300)), max_size=60))
def test_coverage_agrees_with_a_set_of_bytes(reads):
    c, seen = Coverage(TOTAL), set()
    for offset, length in reads:
        c.add(offset, offset + length)
        seen |= set(range(max(offset, 0), min(offset + length, TOTAL)))
        assert c.complete == (len(seen) == TOTAL)
    ranges = list(zip(c._starts, c._ends, strict=True))
    assert all(a < b for a, b in ranges)
    assert all(b1 < a2 for (_, b1), (a2, _) in pairwise(ranges))  # disjoint, apart
    assert sum(b - a for a, b in ranges) == len(seen)


def test_an_empty_file_is_complete_once_read():
    c = Coverage(0)
    assert not c.complete
    c.add(0, 0)
    assert c.complete


def test_scattered_one_byte_reads_cost_little_and_merge_when_filled():
    """Issue 17.9: 20k one-byte reads at stride 2 took 59 s of daemon CPU (a sort of every range
    held, on every read); here they and the 20k that fill the gaps take milliseconds."""
    c = Coverage(5 * BLOCK)
    started = time.process_time()
    for offset in range(0, 40_000, 2):
        c.add(offset, offset + 1)
    assert c.intervals == 20_000
    for offset in range(1, 40_000, 2):
        c.add(offset, offset + 1)
    spent = time.process_time() - started
    assert c.intervals == 1 and not c.complete
    c.add(40_000, 5 * BLOCK)
    assert c.complete
    assert spent < 2.0, f"40k reads cost {spent:.1f} s of CPU"
