"""Page table: lazily committed flat arrays, <=16 B/page, vectorised range helpers."""

from __future__ import annotations

import numpy as np

from zramd.device.table import EMPTY, ENTRY_BYTES, HUGE, SAME, STORED, PageTable


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_empty_table_is_free() -> None:
    assert ENTRY_BYTES <= 16
    npages = (64 << 30) >> 12
    before = _rss_kib()
    t = PageTable(npages)
    grown = _rss_kib() - before
    assert grown < 1024, f"RSS grew {grown} KiB"
    # touching sparse entries commits only their 4 KiB pages (no transparent huge pages)
    for i in range(0, npages, npages // 16):
        t.state_mv[i] = STORED
        t.handle_mv[i] = 2**64 - 1
        t.size_mv[i] = 1
    assert int(t.handle[0]) == 2**64 - 1
    assert _rss_kib() - before < 1024
    t.release()


def test_scalar_views_match_arrays() -> None:
    t = PageTable(10)
    t.state_mv[3] = HUGE
    t.handle_mv[3] = 123456789012345
    t.size_mv[3] = 4096
    t.codec_mv[3] = 2
    assert (int(t.state[3]), int(t.handle[3]), int(t.size[3]), int(t.codec[3])) == (
        HUGE,
        123456789012345,
        4096,
        2,
    )
    t.handle[4] = 99
    assert t.handle_mv[4] == 99


def test_range_helpers() -> None:
    t = PageTable(100)
    t.state[[2, 5, 6, 50]] = [SAME, STORED, HUGE, SAME]
    t.handle[[2, 5, 6, 50]] = [0, 11, 12, 0xAB]
    t.size[[5, 6]] = [100, 4096]
    occ = t.occupied(0, 100)
    assert occ.tolist() == [2, 5, 6, 50]
    assert t.occupied(3, 50).tolist() == [5, 6]
    assert t.counts(occ) == (2, 1, 4196, 2)
    assert t.pooled_handles(occ) == [11, 12]
    cls = t.classify(0, 8)
    assert cls.tolist() == [3, 3, 2, 3, 3, 0, 0, 3]
    assert t.classify(50, 51).tolist() == [0]  # SAME with a non-zero word
    t.clear(np.array([5, 6]))
    assert t.occupied(0, 100).tolist() == [2, 50]
    assert int(t.size[5]) == 0 and int(t.handle[6]) == 0
    assert t.state_counts() == {
        "empty": 98, "same": 2, "stored": 0, "huge": 0, "grouped": 0, "backed": 0
    }
    assert int(t.state[0]) == EMPTY
