"""DeviceStats: kernel field order and formatting, JSON dict, derived values."""

from __future__ import annotations

import json

from zramd.stats import IO_STAT_FIELDS, MM_STAT_FIELDS, DeviceStats


def test_field_order_matches_kernel() -> None:
    assert MM_STAT_FIELDS == (
        "orig_data_size",
        "compr_data_size",
        "mem_used_total",
        "mem_limit",
        "mem_used_max",
        "same_pages",
        "pages_compacted",
        "huge_pages",
        "huge_pages_since",
    )
    assert IO_STAT_FIELDS == ("failed_reads", "failed_writes", "invalid_io", "notify_free")


def test_lines_and_dict() -> None:
    s = DeviceStats(
        pages_stored=3,
        compr_data_size=5000,
        mem_used_total=8192,
        mem_limit=1 << 20,
        mem_used_max=12288,
        same_pages=1,
        pages_compacted=2,
        huge_pages=1,
        huge_pages_since=4,
        failed_reads=5,
        failed_writes=6,
        notify_free=7,
    )
    mm = s.mm_stat_line()
    assert mm.endswith("\n")
    assert [int(x) for x in mm.split()] == [3 * 4096, 5000, 8192, 1 << 20, 12288, 1, 2, 1, 4]
    assert [int(x) for x in s.io_stat_line().split()] == [5, 6, 0, 7]
    d = s.as_dict()
    assert d["orig_data_size"] == 3 * 4096 and d["notify_free"] == 7
    assert json.loads(json.dumps(d)) == d
    assert abs(s.compression_ratio() - 3 * 4096 / 8192) < 1e-9
    assert DeviceStats().compression_ratio() == 0.0
    c = s.copy()
    c.same_pages += 1
    assert s.same_pages == 1
