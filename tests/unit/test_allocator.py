"""Tests of the zsmalloc-style pool (zramd/allocator): class table, slot layout, round trips
against a dict model (hypothesis), density, memory given back to the OS, limits, compaction
(within a class and spilling into larger classes)."""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.allocator import FULLNESS_LABELS, MemoryBudget, Pool, PoolFull, build_classes
from zramd.allocator import pool as pool_module
from zramd.allocator.classes import NUM_SIZE_CLASSES, chain_size_for, huge_watermark

PAGE = 4096


def _payload(rnd: random.Random, n: int) -> bytes:
    return rnd.randbytes(n)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- class table


def test_raw_class_count() -> None:
    assert NUM_SIZE_CLASSES == 255


@pytest.mark.parametrize(
    ("chain", "rule", "count", "watermark"),
    [
        (4, "min_waste", 69, 3264),
        (8, "min_waste", 119, 3632),
        (16, "min_waste", 192, 3840),
        # the figures zram.md (and much folklore) quotes: the pre-6.3 used-percentage rule
        (4, "used_pct", 69, 3264),
        (8, "used_pct", 123, 3632),
        (16, "used_pct", 191, 3840),
    ],
)
def test_merged_class_table(chain: int, rule: str, count: int, watermark: int) -> None:
    classes, index = build_classes(chain, rule)
    assert len(classes) == count
    assert huge_watermark(classes) == watermark
    assert len(index) == NUM_SIZE_CLASSES
    sizes = [c.size for c in classes]
    assert sizes == sorted(set(sizes))
    assert sizes[0] == 32 and sizes[-1] == 4096
    # every raw class maps to a class at least as large, and merged ones share (pages, objs)
    for raw, ci in enumerate(index):
        assert classes[ci].size >= 32 + 16 * raw or classes[ci].size == 4096
    for c in classes:
        assert c.objs_per_zspage == c.pages_per_zspage * PAGE // c.size
        assert 1 <= c.pages_per_zspage <= chain
    # above the watermark, everything is the huge class: one object per one page
    assert classes[-1].huge and classes[-2].size == watermark


def test_chain_rule_examples_from_zsmalloc_doc() -> None:
    # zsmalloc.rst: a 1568 B class wastes 960, 352, 1312, 704, 96 B at 1..5 pages -> 5 pages
    assert chain_size_for(1568, 8) == 5
    assert chain_size_for(1568, 4) == 2  # chain 4: 352 B at 2 pages is the best there
    assert chain_size_for(2048, 8) == 1
    # at chain 4, 1568 B objects pay for 1632 B (classes 95-99 merged into 100)
    p = Pool(chain_size=4)
    try:
        h = p.store(b"x" * 1568)
        st_ = [c for c in p.class_stats() if c["obj_used"]]
        assert st_[0]["size"] == 1632 and st_[0]["pages_per_zspage"] == 2
        p.free(h)
    finally:
        p.close()


def test_huge_class_size() -> None:
    with Pool() as p:
        assert p.huge_watermark == 3632
        assert p.huge_class_size == 3633
        h1 = p.store(b"a" * 3632)
        h2 = p.store(b"b" * 3633)
        stats = {c["size"]: c for c in p.class_stats()}
        assert stats[3632]["obj_used"] == 1 and stats[3632]["pages_per_zspage"] == 8
        assert stats[4096]["obj_used"] == 1 and stats[4096]["pages_used"] == 1
        assert p.load(h1, 3632) == b"a" * 3632 and p.load(h2, 3633) == b"b" * 3633
    with Pool(chain_size=4) as p4:
        assert p4.huge_class_size == 3265


def test_huge_objects_one_page_each() -> None:
    rnd = random.Random(5)
    with Pool() as p:
        datas = [_payload(rnd, PAGE) for _ in range(10)]
        hs = [p.store(d) for d in datas]
        assert p.total_bytes == 10 * PAGE
        for h, d in zip(hs, datas, strict=True):
            assert p.load(h, PAGE) == d
        for h in hs:
            p.free(h)
        assert p.total_bytes == 0


# --------------------------------------------------------------------------- model tests

_op = st.one_of(
    st.tuples(st.just("store"), st.integers(1, 4096), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("store_small"), st.integers(1, 300), st.integers(0, 2**32 - 1)),
    # a few classes with several zspages each, so compaction within a class has work too
    st.tuples(st.just("store_few"), st.sampled_from([500, 1000, 2000]), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("free"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("free"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("compact"), st.integers(0, 3), st.just(0)),  # a = max_pages (0: all)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, max_size=300),
    chain=st.sampled_from([1, 4, 8, 16]),
    cache=st.sampled_from([0, 0, 12]),
)
def test_random_ops_match_dict_model(
    ops: list[tuple[str, int, int]], chain: int, cache: int
) -> None:
    pool = Pool(chain_size=chain, arena_size=64 * PAGE, cache_pages=cache)
    model: dict[int, bytes] = {}
    try:
        for kind, a, seed in ops:
            if kind.startswith("store"):
                data = random.Random(seed).randbytes(a)
                h = pool.store(data)
                assert h > 0 and h not in model
                model[h] = data
            elif kind == "free" and model:
                keys = sorted(model)
                h = keys[a % len(keys)]
                pool.free(h)
                del model[h]
            elif kind == "compact":
                before, cached = pool.total_bytes, pool.cached_bytes
                freed = pool.compact(max_pages=a)
                assert pool.total_bytes == before - cached - freed * PAGE
                if a:
                    assert freed < a + 16  # stops after the zspage that reached the bound
                assert pool.cached_bytes == 0
            for h, d in model.items():
                assert pool.load(h, len(d)) == d
        pool.check({h: len(d) for h, d in model.items()})
        pool.compact()
        pool.check({h: len(d) for h, d in model.items()})
        for h, d in model.items():
            assert pool.load(h, len(d)) == d
            assert pool.load(h, 1) == d[:1]
        for h in list(model):
            pool.free(h)
        assert pool.total_bytes == pool.cached_bytes <= cache * PAGE
        pool.check()
        pool.drop_cache()
        assert pool.total_bytes == 0
        pool.check()
    finally:
        pool.close()


def test_long_random_churn_with_compaction() -> None:
    rnd = random.Random(1234)
    pool = Pool(arena_size=256 * PAGE)
    model: dict[int, bytes] = {}
    live: list[int] = []
    try:
        for step in range(30_000):
            if live and rnd.random() < 0.48:
                i = rnd.randrange(len(live))
                h = live[i]
                live[i] = live[-1]
                live.pop()
                pool.free(h)
                del model[h]
            else:
                n = rnd.choice([rnd.randint(1, 4096), rnd.randint(500, 2500)])
                d = _payload(rnd, n)
                h = pool.store(d)
                model[h] = d
                live.append(h)
            if step % 5000 == 4999:
                pool.compact()
                pool.check({h: len(d) for h, d in model.items()})
                for h, d in model.items():
                    assert pool.load(h, len(d)) == d
    finally:
        pool.close()


# --------------------------------------------------------------------------- handles


def test_handles_survive_compaction_and_are_recycled() -> None:
    rnd = random.Random(7)
    with Pool(auto_compact=False) as p:
        datas = {p.store(d): d for d in (_payload(rnd, 1500) for _ in range(2000))}
        hs = list(datas)
        rnd.shuffle(hs)
        for h in hs[:1800]:
            p.free(h)
            del datas[h]
        before = p.total_bytes
        freed = p.compact()
        assert freed > 0 and p.pages_compacted == freed
        assert p.total_bytes == before - freed * PAGE
        for h, d in datas.items():
            assert p.load(h, 1500) == d
        # freed handles come back (LIFO), table does not grow
        tbl_len = len(p._tbl)
        new = [p.store(b"z" * 100) for _ in range(1800)]
        assert len(p._tbl) == tbl_len
        assert set(new) == set(hs[:1800])
        p.check()


def test_bad_handles_and_sizes() -> None:
    with Pool() as p:
        h = p.store(b"abc")
        for bad in (0, -1, h + 1, 10**9):
            with pytest.raises((KeyError, IndexError)):
                p.free(bad)
            with pytest.raises((KeyError, IndexError)):
                p.load(bad, 1)
        p.free(h)
        with pytest.raises(KeyError):
            p.free(h)  # double free
        with pytest.raises(KeyError):
            p.load(h, 3)
        for n in (0, 4097):
            with pytest.raises(ValueError):
                p.store(b"x" * n)
        assert p.total_bytes == 0


def test_accepts_bytearray_and_memoryview() -> None:
    with Pool() as p:
        buf = bytearray(os.urandom(5000))
        h1 = p.store(memoryview(buf)[100:2100])
        h2 = p.store(buf[:700])
        assert p.load(h1, 2000) == bytes(buf[100:2100])
        assert p.load(h2, 700) == bytes(buf[:700])


def test_objects_straddle_pages() -> None:
    # class 1568 B at chain 8: 13 objects in 5 pages; most straddle a page boundary
    rnd = random.Random(3)
    with Pool() as p:
        datas = [_payload(rnd, 1568) for _ in range(13)]
        hs = [p.store(d) for d in datas]
        assert p.total_bytes == 5 * PAGE
        for h, d in zip(hs, datas, strict=True):
            assert p.load(h, 1568) == d


@pytest.mark.parametrize("size", [32, 48, 1024, 1568, 3632])
def test_slots_hold_objects_back_to_back_without_headers(size: int) -> None:
    # a zspage filled with objects of exactly its class size is those objects, end to end:
    # no header, no gap, objects straddling page boundaries; one byte more is the next class
    rnd = random.Random(size)
    with Pool() as p:
        spec = next(c for c in p.class_stats() if c["size"] == size)
        objs, pages = spec["objs_per_zspage"], spec["pages_per_zspage"]
        assert isinstance(objs, int) and isinstance(pages, int)
        datas = [_payload(rnd, size) for _ in range(objs)]
        hs = [p.store(d) for d in datas]
        assert p.total_bytes == pages * PAGE
        zs = p._zspages[p._tbl[hs[0]] >> 12]
        assert zs is not None and all(p._tbl[h] >> 12 == p._tbl[hs[0]] >> 12 for h in hs)
        slots = [p._tbl[h] & 0xFFF for h in hs]
        run = zs.mm[zs.base : zs.base + objs * size]
        assert run == b"".join(d for _, d in sorted(zip(slots, datas, strict=True)))
        h = p.store(b"+" * (size + 1))
        assert p._tbl[h] >> 12 != p._tbl[hs[0]] >> 12
        assert p.total_bytes > pages * PAGE
        p.check({**{h_: size for h_ in hs}, h: size + 1})


# --------------------------------------------------------------------------- fullness


def test_allocation_fills_fullest_zspage_first() -> None:
    with Pool(auto_compact=False) as p:
        # class 1024: 4 objects per 1-page zspage
        hs = [p.store(b"q" * 1024) for _ in range(12)]  # 3 full zspages
        assert p.total_bytes == 3 * PAGE
        # groups are labelled by their upper bound, as in the kernel's debugfs columns
        p.free(hs[0])  # zspage A: 3/4 = 75% -> group "80%"
        p.free(hs[4])
        p.free(hs[5])  # zspage B: 2/4 = 50% -> group "60%"
        stats = next(c for c in p.class_stats() if c["obj_used"])
        fl = stats["fullness"]
        assert isinstance(fl, dict) and list(fl) == list(FULLNESS_LABELS)
        assert fl["80%"] == 1 and fl["60%"] == 1 and fl["100%"] == 1
        h = p.store(b"r" * 1024)
        assert h == hs[5]  # handle recycled; the object must land in zspage A (fullest)
        assert p._tbl[h] >> 12 == p._tbl[hs[1]] >> 12
        p.check()


# --------------------------------------------------------------------------- density, RSS


def test_density_and_memory_returned_to_os() -> None:
    rnd = random.Random(99)
    pool = Pool(auto_compact=False, arena_size=8 << 20)
    try:
        classes, index = build_classes(8)
        from zramd.allocator.classes import raw_class_index

        hs: list[int] = []
        class_bytes = 0
        sizes = [rnd.randint(500, 2000) for _ in range(20_000)]
        blob = os.urandom(8192)
        for n in sizes:
            off = rnd.randrange(4096)
            hs.append(pool.store(blob[off : off + n]))
            class_bytes += classes[index[raw_class_index(n)]].size
        # zspages are filled in order, so only the tail waste of each zspage and one
        # partial zspage per class come on top of the class-rounded sizes
        assert pool.total_bytes <= 1.05 * class_bytes
        assert pool.total_bytes >= class_bytes
        payload = sum(sizes)
        assert pool.total_bytes <= 1.07 * payload  # rounding to 16 B classes costs ~1-2%
        assert pool.fragmentation() < 0.05
        assert pool.metadata_bytes < 64 * len(hs)

        rss_full = _rss_kib()
        full_bytes = pool.total_bytes
        rnd.shuffle(hs)
        keep = hs[:2000]
        for h in hs[2000:]:
            pool.free(h)
        mid_bytes = pool.total_bytes
        assert pool.fragmentation() > 0.3  # 90% freed at random: mostly partial zspages
        freed = pool.compact()
        assert freed > 0 and pool.pages_compacted == freed
        assert pool.total_bytes == mid_bytes - freed * PAGE
        # after compaction the pool is about 10% of its former size (+ partial zspages)
        assert pool.total_bytes < 0.13 * full_bytes
        assert pool.compact() == 0  # nothing left to win
        rss_after = _rss_kib()
        returned_kib = (full_bytes - pool.total_bytes) // 1024
        # RSS really fell by (most of) what the pool gave back
        assert rss_full - rss_after > 0.8 * returned_kib, (rss_full, rss_after, returned_kib)
        for h in keep:
            assert len(pool.load(h, 500)) == 500
        pool.check()
    finally:
        pool.close()


def test_empty_arena_is_unmapped() -> None:
    with Pool(arena_size=16 * PAGE) as p:
        hs = [p.store(b"x" * 4096) for _ in range(40)]  # huge class: 1-page runs, 3 arenas
        assert len(p._arenas[1]) == 3
        for h in hs[:16]:
            p.free(h)
        assert len(p._arenas[1]) == 2
        for h in hs[16:]:
            p.free(h)
        assert p._arenas[1] == [] and p.total_bytes == 0


# --------------------------------------------------------------------------- limits


def test_limit_raises_and_changes_nothing() -> None:
    rnd = random.Random(11)
    with Pool(limit=10 * PAGE) as p:
        model: dict[int, bytes] = {}
        with pytest.raises(PoolFull):
            while True:
                d = _payload(rnd, 3000)
                model[p.store(d)] = d
        total, objs, frag = p.total_bytes, p.obj_count, p.fragmentation()
        tbl = bytes(p._tbl)
        assert total <= 10 * PAGE
        p.limit = total  # now even a one-page zspage is too much
        for n in (4096, 3000, 100):
            with pytest.raises(PoolFull):
                p.store(b"h" * n)
        assert (p.total_bytes, p.obj_count, p.fragmentation()) == (total, objs, frag)
        assert bytes(p._tbl) == tbl
        for h, d in model.items():
            assert p.load(h, len(d)) == d
        p.check()
        # raising the limit at runtime lets stores through again
        p.limit = 0
        model[p.store(b"h" * 4096)] = b"h" * 4096
        p.limit = p.total_bytes
        h_small = next(iter(model))
        p.free(h_small)
        del model[h_small]
        # the freed slot can be reused without a new zspage, even at the limit
        model[p.store(b"s" * 3000)] = b"s" * 3000


def test_shared_budget() -> None:
    budget = MemoryBudget(limit=6 * PAGE)
    a = Pool(budget=budget)
    b = Pool(budget=budget)
    try:
        ha = [a.store(b"a" * 4096) for _ in range(4)]
        hb = [b.store(b"b" * 4096) for _ in range(2)]
        assert budget.used == 6 * PAGE
        with pytest.raises(PoolFull):
            a.store(b"a" * 4096)
        with pytest.raises(PoolFull):
            b.store(b"b" * 4096)
        b.free(hb[0])
        assert budget.used == 5 * PAGE
        ha.append(a.store(b"a" * 4096))
        assert budget.used == 6 * PAGE
        a.close()
        assert budget.used == 1 * PAGE
    finally:
        a.close()
        b.close()
    assert budget.used == 0


# --------------------------------------------------------------------------- compaction


def test_auto_compaction_triggers_from_free_path() -> None:
    results = []
    for auto in (True, False):
        rnd = random.Random(21)
        with Pool(auto_compact=auto) as p:
            hs = [p.store(_payload(rnd, 1200)) for _ in range(20_000)]
            rnd.shuffle(hs)
            for h in hs[:15_000]:
                p.free(h)
            p.check()
            results.append((p.pages_compacted, p.total_bytes, p.fragmentation()))
    (auto_pc, auto_total, auto_frag), (man_pc, man_total, man_frag) = results
    assert man_pc == 0 and auto_pc > 0
    assert auto_total < 0.75 * man_total and auto_frag < man_frag - 0.2


def test_auto_compaction_runs_are_short_and_continue_sooner() -> None:
    """An automatic run frees at most about AUTO_COMPACT_MAX_PAGES (a pause of one or two
    milliseconds); after a run that stopped there the next check comes
    AUTO_COMPACT_CONTINUE_EVERY frees later, else AUTO_COMPACT_CHECK_EVERY frees later."""
    from zramd.allocator.pool import (
        AUTO_COMPACT_CHECK_EVERY,
        AUTO_COMPACT_CONTINUE_EVERY,
        AUTO_COMPACT_MAX_PAGES,
    )

    rnd = random.Random(22)
    with Pool() as p:
        hs = [p.store(_payload(rnd, 1200)) for _ in range(60_000)]
        rnd.shuffle(hs)
        runs: list[tuple[int, int]] = []  # per check: (frees so far, pages freed)
        frees = 0
        real = p.maybe_compact

        def recorded() -> int:
            n = real()
            runs.append((frees, n))
            return n

        p.maybe_compact = recorded  # type: ignore[method-assign]
        for h in hs[:45_000]:
            frees += 1
            p.free(h)
        p.check()
    assert runs and max(n for _, n in runs) <= AUTO_COMPACT_MAX_PAGES + 16
    assert any(n >= AUTO_COMPACT_MAX_PAGES for _, n in runs)
    for (at, n), (nxt, _) in zip(runs, runs[1:], strict=False):
        if n >= AUTO_COMPACT_MAX_PAGES:
            assert nxt - at == AUTO_COMPACT_CONTINUE_EVERY
        else:
            assert nxt - at == AUTO_COMPACT_CHECK_EVERY


def test_class_stats_fields() -> None:
    with Pool() as p:
        hs = [p.store(b"k" * 1568) for _ in range(20)]
        st_ = {c["size"]: c for c in p.class_stats()}
        c = st_[1568]
        assert c["pages_per_zspage"] == 5 and c["objs_per_zspage"] == 13
        assert c["zspages"] == 2 and c["obj_allocated"] == 26 and c["obj_used"] == 20
        assert c["pages_used"] == 10 and p.total_bytes == 10 * PAGE
        fl = c["fullness"]
        assert isinstance(fl, dict) and fl["100%"] == 1 and fl["60%"] == 1
        assert len(p.class_stats()) == 119
        for h in hs:
            p.free(h)


# --------------------------------------------------------------------------- warm cache


def test_warm_cache_accounting_and_limits() -> None:
    budget = MemoryBudget()
    with Pool(cache_pages=4, budget=budget) as p:
        hs = [p.store(b"w" * 4096) for _ in range(6)]
        assert p.total_bytes == 6 * PAGE == budget.used
        for h in hs:
            p.free(h)
        # 4 pages stay warm (held, so counted), 2 went back to the OS
        assert p.total_bytes == p.cached_bytes == 4 * PAGE == budget.used
        p.check()
        # reuse: no new pages
        h = p.store(b"v" * 4096)
        assert p.total_bytes == 4 * PAGE and p.cached_bytes == 3 * PAGE
        assert p.load(h, 4096) == b"v" * 4096
        # a zspage of another class cannot use the huge class's warm pages: at a limit of
        # 4 pages a 5-page zspage (class 1568) only fits once the cache is dropped
        p.limit = 6 * PAGE
        h2 = p.store(b"k" * 1568)
        assert p.cached_bytes == 0 and p.total_bytes == 6 * PAGE == budget.used
        p.check()
        p.free(h2)
        p.free(h)
        assert p.total_bytes == p.cached_bytes == 1 * PAGE  # 5-page zspage too big to keep
        assert p.compact() == 0 and p.total_bytes == 0 == budget.used
        p.check()


def test_compaction_moves_least_used_into_most_used() -> None:
    with Pool(auto_compact=False) as p:
        # class 1024: 4 objects per 1-page zspage; 3 zspages A, B, C
        hs = [p.store(bytes([i]) * 1024) for i in range(12)]
        zid = {h: p._tbl[h] >> 12 for h in hs}
        a, b, c = zid[hs[0]], zid[hs[4]], zid[hs[8]]
        assert len({a, b, c}) == 3
        for h in (hs[0],):  # A: 3/4
            p.free(h)
        for h in hs[4:7]:  # B: 1/4 (hs[7] left)
            p.free(h)
        for h in hs[8:10]:  # C: 2/4
            p.free(h)
        assert p.compactable_pages() == 1
        assert p.compact() == 1
        # B (least used) was emptied into A (most used); C untouched
        assert p._tbl[hs[7]] >> 12 == a
        assert p._zspages[b] is None
        assert [p._tbl[h] >> 12 for h in hs[10:12]] == [c, c]
        assert p.load(hs[7], 1024) == bytes([7]) * 1024
        assert p.total_bytes == 2 * PAGE and p.pages_compacted == 1
        p.check()


def test_compaction_spills_a_partial_zspage_into_a_larger_class() -> None:
    with Pool(auto_compact=False) as p:
        big = [p.store(bytes([i]) * 2048) for i in range(3)]  # class 2048: 2 per page, 1 free
        small = p.store(b"s" * 1000)  # class 1024 (1008 merged into it): 4 per page, 3 free
        assert p.total_bytes == 3 * PAGE and p.compactable_pages() == 0
        zbig = p._tbl[big[2]] >> 12
        assert p.compact() == 1  # no class can win a page alone; the 1000 B object moves up
        assert p._tbl[small] >> 12 == zbig and p.total_bytes == 2 * PAGE
        assert p.load(small, 1000) == b"s" * 1000
        assert [p.load(h, 2048) for h in big] == [bytes([i]) * 2048 for i in range(3)]
        stats = {c["size"]: c for c in p.class_stats()}
        assert stats[2048]["obj_used"] == 4 and stats[1024]["zspages"] == 0
        p.check({**dict.fromkeys(big, 2048), small: 1000})
        # freed like any object of that zspage, which then empties and goes at once
        p.free(small)
        assert p.total_bytes == 2 * PAGE
        p.free(big[2])
        assert p.total_bytes == PAGE and p.compact() == 0
        p.check(dict.fromkeys(big[:2], 2048))


def test_spill_moves_nothing_unless_a_zspage_empties() -> None:
    with Pool(auto_compact=False) as p:
        big = [p.store(b"b" * 2048) for _ in range(3)]  # one free 2048 slot
        small = [p.store(b"s" * 1000) for _ in range(2)]  # two objects need two slots
        where = {h: p._tbl[h] for h in big + small}
        assert p.compact() == 0 and p.total_bytes == 3 * PAGE
        assert {h: p._tbl[h] for h in big + small} == where
        p.check({**dict.fromkeys(big, 2048), **dict.fromkeys(small, 1000)})


def test_trim_half_then_compact_leaves_almost_no_partial_zspage() -> None:
    # objects of many classes, every other one freed (half of a device trimmed), compacted:
    # per class compaction alone leaves up to one zspage's worth of free slots in each of
    # ~100 classes; spilling them into larger classes leaves about one chain in all
    rnd = random.Random(5)
    blob = rnd.randbytes(8192)
    with Pool(auto_compact=False) as p:
        sizes = [min(3632, max(1, int(rnd.lognormvariate(7, 0.5)))) for _ in range(20_000)]
        hs = [p.store(blob[:n]) for n in sizes]
        for h in hs[1::2]:
            p.free(h)
        p.compact()
        live = dict(zip(hs[::2], sizes[::2], strict=True))
        cost = 0.0  # each object's share of its own class's zspage
        for n in live.values():
            c = p._class_of[n]
            assert c is not None
            cost += c.pages * PAGE / c.objs
        assert cost <= p.total_bytes <= cost + 16 * PAGE
        assert p.compact() == 0
        p.check(live)
        for h, n in live.items():
            assert p.load(h, n) == blob[:n]


def test_empty_fullness_groups_cost_nothing() -> None:
    with Pool(auto_compact=False) as p:
        empty = p.metadata_bytes
        # class tables only: no set per (class, fullness group) until a zspage is in it
        assert empty < 128 * 1024
        hs = [p.store(b"m" * n) for n in range(32, 3633, 7) for _ in range(3)]
        assert p.metadata_bytes > empty
        for h in hs:
            p.free(h)
        p.compact()
        # every group is the one shared empty set again; the handle table and the zspage
        # table keep their length
        assert len({id(s) for c in p._classes for s in c.groups}) == 1
        assert p.metadata_bytes <= empty + 16 * len(hs)
        p.check({})


def test_bounded_compaction_continues_where_it_stopped() -> None:
    rnd = random.Random(8)
    with Pool(auto_compact=False) as p:
        datas = (_payload(rnd, rnd.randint(600, 3000)) for _ in range(6000))
        model = {p.store(d): d for d in datas}
        for h in rnd.sample(sorted(model), 5000):
            p.free(h)
            del model[h]
        can = p.compactable_pages()
        assert can > 300
        total = 0
        while True:
            freed = p.compact(max_pages=100)
            assert freed < 100 + 8
            total += freed
            for h, d in model.items():
                assert p.load(h, len(d)) == d
            if not freed:
                break
        assert p.compactable_pages() == 0 and total >= can
        p.check()


def test_huge_objects_need_no_zspage_object() -> None:
    rnd = random.Random(17)
    with Pool() as p:
        base = p.metadata_bytes
        huge = (_payload(rnd, rnd.randint(3633, 4096)) for _ in range(3000))
        datas = {p.store(d): d for d in huge}
        small = {p.store(d): d for d in (_payload(rnd, 2048) for _ in range(100))}  # 1-page too
        assert p.total_bytes == (3000 + 50) * PAGE
        assert all(z is None or z.cls.size == 2048 for z in p._zspages)
        # ~8 B of handle table per huge object (plus 50 small zspages)
        assert p.metadata_bytes - base < 12 * 3100 + 50 * 300
        for h in list(datas)[::2]:
            p.free(h)
            del datas[h]
        for h, d in {**datas, **small}.items():
            assert p.load(h, len(d)) == d
        assert p.class_stats()[-1]["obj_used"] == 1500
        p.check()


SIZES = [1, 31, 32, 200, 208, 1000, 3000, 3632, 3700, 4096]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(st.sampled_from(SIZES), max_size=400), max_size=6),
    frees=st.lists(st.integers(0, 10**6), max_size=50),
    chain=st.sampled_from([1, 8]),
    limit_pages=st.sampled_from([0, 0, 40]),
)
def test_store_many_is_store_of_each(
    batches: list[list[int]], frees: list[int], chain: int, limit_pages: int
) -> None:
    """Batches (some between frees, so recycled handles and partial zspages meet fresh ones,
    and batches into new zspages only, which are placed all at once) against the same objects
    stored one by one: same memory, same zspages per class, every object loads, the
    invariants hold; a batch past the limit raises PoolFull and changes nothing."""
    one = Pool(chain_size=chain, arena_size=64 * PAGE, limit=limit_pages * PAGE)
    many = Pool(chain_size=chain, arena_size=64 * PAGE, limit=limit_pages * PAGE)
    model: dict[int, tuple[int, bytes]] = {}  # handle in many -> handle in one, data
    rnd = random.Random(len(batches))
    try:
        for b, sizes in enumerate(batches):
            objs = [rnd.randbytes(n) for n in sizes]
            try:
                singles = [one.store(o) for o in objs]
            except PoolFull:
                before = (many.total_bytes, many.obj_count)
                with pytest.raises(PoolFull):
                    many.store_many(objs)
                assert (many.total_bytes, many.obj_count) == before
                break
            hs = many.store_many(objs)
            assert len(hs) == len(objs) and len(set(hs)) == len(hs)
            for h, h1, o in zip(hs, singles, objs, strict=True):
                assert h not in model
                model[h] = (h1, o)
            assert many.total_bytes == one.total_bytes and many.obj_count == one.obj_count
            assert many.class_stats() == one.class_stats()  # the same zspages, class by class
            for f in frees[b::3]:
                if model:
                    h = sorted(model)[f % len(model)]
                    many.free(h)
                    one.free(model.pop(h)[0])
            many.check({h: len(d) for h, (_h1, d) in model.items()})
            for h, (_h1, d) in model.items():
                assert many.load(h, len(d)) == d
    finally:
        one.close()
        many.close()


@pytest.mark.parametrize("native", [True, False])
def test_store_packed_with_and_without_the_c_copy(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``store_packed`` gives the same pool with the C copy and with its Python loop (what runs
    where the accelerator is not built); a size out of range or data too short is refused
    before anything is stored."""
    if not native:
        monkeypatch.setattr(pool_module, "_native_copy", None)
    elif pool_module._native_copy is None:
        pytest.skip("the C accelerator is not built")
    rnd = random.Random(5)
    objs = [rnd.randbytes(rnd.choice(SIZES)) for _ in range(2000)]
    pool = Pool(arena_size=64 * PAGE)
    try:
        lengths = np.array([len(o) for o in objs], dtype=np.int64)
        hs = pool.store_packed(b"".join(objs), lengths)
        for h, o in zip(hs, objs, strict=True):
            assert pool.load(h, len(o)) == o
        pool.check(dict(zip(hs, map(len, objs), strict=True)))
        before = (pool.total_bytes, pool.obj_count)
        with pytest.raises(ValueError, match="past the end"):
            pool.store_packed(b"x" * 10, np.array([8, 8], dtype=np.int64))
        with pytest.raises(ValueError, match="object size"):
            pool.store_packed(b"x" * 5000, np.array([4097], dtype=np.int64))
        assert (pool.total_bytes, pool.obj_count) == before
    finally:
        pool.close()


@pytest.mark.parametrize("native", [True, False])
def test_store_packed_copies_taken_by_the_caller(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``copies``, ``store_packed`` books the objects and leaves their bytes to
    ``run_copies``, which another thread may run while the next batch is booked; a batch that
    fails on the limit frees only its own objects, without compacting (which would move
    objects whose copies are still to come), and the pending copies then land where they
    should."""
    if not native:
        monkeypatch.setattr(pool_module, "_native_copy", None)
    elif pool_module._native_copy is None:
        pytest.skip("the C accelerator is not built")
    rnd = random.Random(9)
    pool = Pool(arena_size=64 * PAGE, limit=400 * PAGE)
    try:
        batches = [[rnd.randbytes(rnd.choice(SIZES)) for _ in range(300)] for _ in range(2)]
        copies: list[pool_module.Copy] = []
        handles: list[int] = []
        for objs in batches:
            lengths = np.array([len(o) for o in objs], dtype=np.int64)
            handles += pool.store_packed(b"".join(objs), lengths, copies)
        objs = batches[0] + batches[1]
        assert copies and all(pool.load(h, len(o)) != o for h, o in zip(handles, objs, strict=True))
        # a batch past the limit: PoolFull, its own objects freed, nothing compacted
        before = (pool.total_bytes, pool.obj_count, pool.pages_compacted)
        too_many = [rnd.randbytes(3000) for _ in range(400)]
        compactions: list[int] = []
        monkeypatch.setattr(pool, "maybe_compact", lambda: compactions.append(1) or 0)
        pool._frees_to_check = 1  # the first free would look for compaction to do
        with pytest.raises(PoolFull):
            pool.store_packed(b"".join(too_many), np.array([3000] * 400, dtype=np.int64), copies)
        assert (pool.total_bytes, pool.obj_count, pool.pages_compacted) == before
        assert compactions == [] and pool.auto_compact
        t = threading.Thread(target=pool_module.run_copies, args=(copies,))
        t.start()
        t.join()
        for h, o in zip(handles, objs, strict=True):
            assert pool.load(h, len(o)) == o
        pool.check(dict(zip(handles, map(len, objs), strict=True)))
    finally:
        pool.close()


@pytest.mark.parametrize("cache_pages", [0, 64], ids=["cold", "warm"])
@pytest.mark.parametrize("accelerated", [True, False], ids=["native", "python"])
def test_load_packed_is_load_of_each(
    accelerated: bool, cache_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch load (C, or the Python join without it) gives what load gives, end to end,
    for objects of every class and huge ones, stored one by one and in batches that fill new
    zspages at once, over small arenas, after frees emptied zspages (their ids and runs reused,
    or kept warm) and a compaction moved some; a handle that is not live is KeyError."""
    if not accelerated:
        monkeypatch.setattr(pool_module, "_native_load", None)
    elif pool_module._native_load is None:
        pytest.skip("zramd._native is not built")
    rnd = random.Random(11)
    p = Pool(arena_size=64 * Pool.PAGE_SIZE, cache_pages=cache_pages)
    live: dict[int, bytes] = {}

    def some(n: int) -> list[bytes]:
        return [
            rnd.randbytes(rnd.choice([4096, rnd.randint(1, 4096), rnd.randint(20, 400)]))
            for _ in range(n)
        ]

    for _ in range(3):
        for i, data in enumerate(some(1000)):
            live[p.store(data)] = data
            if i % 3 == 0:
                h = rnd.choice(list(live))
                p.free(h)
                del live[h]
        batch = some(500)
        live.update(zip(p.store_many(batch), batch, strict=True))
        for h in rnd.sample(list(live), len(live) * 2 // 3):  # empties many zspages
            p.free(h)
            del live[h]
    p.compact()
    handles = list(live)
    rnd.shuffle(handles)

    def packed(hs: list[int]) -> bytes:
        sizes = np.array([len(live[h]) for h in hs], dtype=np.uint16)
        return bytes(p.load_packed(np.array(hs, dtype=np.uint64), sizes))

    want = b"".join(live[h] for h in handles)
    assert packed(handles) == want == b"".join(p.load(h, len(live[h])) for h in handles)
    assert packed([]) == b""
    gone = handles[0]
    p.free(gone)
    live[gone] = b"x"
    with pytest.raises(KeyError):
        packed([handles[1], gone])
