"""Cold pages on the device: access tracking, idle marking, the page listing and recompression
with secondary algorithms, against a bytearray model (multi-page groups interleaved); NoSpace
and writes during a recompression batch; the background policy's slices, back-off and stop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.allocator import PoolFull
from zramd.device.blockdev import ZramDevice
from zramd.device.table import (
    ATIME_QUANTUM,
    ATIME_REBASE_AT,
    ATIME_REBASE_BY,
    BACKED,
    EMPTY,
    GROUPED,
    HUGE,
    IDLE,
    INCOMPRESSIBLE,
    PENDING,
    RECOMPRESSED,
    SAME,
    STORED,
)
from zramd.device.tiers import TierPolicy, class_sizes

PAGE = 4096
NPAGES = 40
SIZE = NPAGES * PAGE


class InlineExecutor(Executor):
    """Runs the submitted function at once (deterministic tests of the async paths)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
            f.set_exception(e)
        return f


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _text_page(rnd: random.Random) -> bytes:
    """A page lz4 compresses a little and zstd much better (many short repeated words)."""
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"epsilon "]
    out = b"".join(rnd.choice(words) + rnd.randbytes(rnd.randint(0, 3)) for _ in range(900))
    return out[:PAGE]


def _payload(kind: int, n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == 0:
        return bytes(n)
    if kind == 1:
        return (rnd.getrandbits(64).to_bytes(8, "little") * (n // 8 + 1))[:n]
    if kind == 2:
        return b"".join(_text_page(rnd) for _ in range(n // PAGE + 1))[:n]
    return rnd.randbytes(n)


def _device(clock: Clock, **kw: Any) -> ZramDevice:
    kw.setdefault("recompression", [("zstd", 3), ("deflate", None)])
    return ZramDevice(SIZE, algorithm="lz4", executor=InlineExecutor(), clock=clock, **kw)


def check_tiers(d: ZramDevice) -> None:
    """The tier counters equal the table's marks; holes carry no marks; nothing is left
    PENDING; RECOMPRESSED pages hold a recompression codec; the mm counters hold too."""
    t = d.table
    s = d.stats
    fl = t.flags
    st_ = t.state
    assert s.idle_pages == int(np.count_nonzero(fl & IDLE))
    assert s.recompressed_pages == int(np.count_nonzero(fl & RECOMPRESSED))
    assert s.incompressible_pages == int(np.count_nonzero(fl & INCOMPRESSIBLE))
    assert not np.count_nonzero(fl & PENDING)
    empty = st_ == EMPTY
    assert not fl[empty].any() and not t.atime[empty].any()
    recompressed = (fl & RECOMPRESSED) != 0
    held = st_[recompressed]  # written back as they are, they stay recompressed
    assert ((held == STORED) | (held == GROUPED) | (held == BACKED)).all()
    assert not (t.codec[recompressed] == 0).any()  # never the primary codec
    assert s.pages_stored == int((st_ != EMPTY).sum())
    assert s.same_pages == int((st_ == SAME).sum())
    assert s.huge_pages == int((st_ == HUGE).sum())
    pooled = (st_ == STORED) | (st_ == HUGE)
    assert s.compr_data_size == int(t.size[pooled].sum()) + d._store.groups.compr_bytes


@st.composite
def _range(draw: st.DrawFn) -> tuple[int, int]:
    unit = draw(st.sampled_from([PAGE, 512, 1]))
    off = draw(st.integers(0, SIZE // unit - 1)) * unit
    n = draw(st.integers(1, (SIZE - off) // unit)) * unit
    return off, n


_op = st.one_of(
    st.tuples(st.just("write"), _range(), st.integers(0, 3), st.integers(0, 2**32)),
    st.tuples(st.just("read"), _range()),
    st.tuples(st.just("trim"), _range()),
    st.tuples(st.just("zeroes"), _range(), st.booleans()),
    st.tuples(st.just("time"), st.integers(0, 2000)),
    st.tuples(st.just("idle"), st.one_of(st.none(), st.integers(0, 1200))),
    st.tuples(
        st.just("recompress"),
        st.sampled_from(["all", "idle", "huge", "huge-idle"]),
        st.sampled_from([0, 64, 1024, 4096]),
        st.one_of(st.none(), st.integers(0, 10)),
        st.sampled_from(["", "zstd"]),
    ),
    st.tuples(st.just("group"), st.integers(0, NPAGES - 1), st.integers(0, NPAGES - 1)),
    st.tuples(st.just("compact")),
)


def _apply_model(model: bytearray, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "write":
        (off, n), pk, seed = op[1], op[2], op[3]
        model[off : off + n] = _payload(pk, n, seed)
    elif kind == "trim":
        off, n = op[1]
        p0, p1 = (off + PAGE - 1) // PAGE, (off + n) // PAGE
        if p1 > p0:
            model[p0 * PAGE : p1 * PAGE] = bytes((p1 - p0) * PAGE)
    elif kind == "zeroes":
        off, n = op[1]
        model[off : off + n] = bytes(n)


#: text pages (STORED), with incompressible (HUGE), same-filled and zero pages among them
PREFILL = b"".join(
    _payload(3 if i % 7 == 3 else 1 if i % 11 == 5 else 0 if i % 13 == 6 else 2, PAGE, i)
    for i in range(NPAGES)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, min_size=1, max_size=30))
def test_ops_with_idle_and_recompression_match_model(ops: list[tuple[Any, ...]]) -> None:
    async def run() -> None:
        clock = Clock()
        d = _device(clock)
        model = bytearray(PREFILL)
        d.write_sync(0, PREFILL)  # material for idle marking, recompression and groups
        try:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (off, n), pk, seed = op[1], op[2], op[3]
                    await d.write(off, _payload(pk, n, seed))
                    first, last = off // PAGE, (off + n - 1) // PAGE
                    live = d.table.state[first : last + 1] != EMPTY
                    assert not (d.table.flags[first : last + 1][live] & IDLE).any()
                elif kind == "read":
                    off, n = op[1]
                    assert await d.read(off, n) == model[off : off + n]
                    first, last = off // PAGE, (off + n - 1) // PAGE
                    assert not (d.table.flags[first : last + 1] & IDLE).any()
                elif kind == "trim":
                    await d.trim(*op[1])
                elif kind == "zeroes":
                    await d.write_zeroes(*op[1], punch_hole=op[2])
                elif kind == "time":
                    clock.t += op[1]
                elif kind == "group":
                    lo, hi = sorted(op[1:])
                    await d.group(lo, hi, group_pages=4)
                elif kind == "idle":
                    d.mark_idle(op[1])
                elif kind == "recompress":
                    _, rk, threshold, max_pages, alg = op
                    res = await d.recompress(
                        kind=rk, threshold=threshold, max_pages=max_pages, algorithm=alg
                    )
                    assert not res.nospace and not res.aborted
                    assert res.recompressed + res.incompressible <= res.tried
                    if max_pages is not None:
                        assert res.tried <= max_pages
                else:
                    d.compact()
                _apply_model(model, op)
                check_tiers(d)
            assert d.read_sync(0, SIZE) == model
            check_tiers(d)
        finally:
            d.close()

    asyncio.run(run())


def _fill(d: ZramDevice, n: int = NPAGES, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(_text_page(rnd) for _ in range(n))
    d.write_sync(0, data)
    return data


def test_access_refreshes_age_and_clears_idle() -> None:
    clock = Clock()
    d = _device(clock)
    data = _fill(d)
    clock.t += 100 * ATIME_QUANTUM
    assert d.mark_idle(None) == NPAGES
    assert d.stats.idle_pages == NPAGES
    d.read_sync(0, PAGE)  # one page
    d.read_sync(5 * PAGE, 3 * PAGE)  # a few pages: the Python loop
    d.read_sync(16 * PAGE, 20 * PAGE)  # many pages: vectorised
    rows, nxt = d.page_states(0, NPAGES, NPAGES)
    assert nxt == NPAGES and len(rows) == NPAGES
    read = {0, 5, 6, 7, *range(16, 36)}
    for r in rows:
        assert r.state == "stored" and r.algorithm == "lz4" and 0 < r.size < PAGE
        if r.index in read:
            assert r.age == 0 and "idle" not in r.flags
        else:
            assert r.age == 100 * ATIME_QUANTUM and "idle" in r.flags
    assert d.stats.idle_pages == NPAGES - len(read)
    d.write_sync(1 * PAGE, data[PAGE : 2 * PAGE])  # a write replaces the entry: no marks
    assert d.table.flags[1] == 0
    check_tiers(d)


def test_idle_by_age_and_holes_and_same_pages_never_marked() -> None:
    clock = Clock()
    d = _device(clock)
    _fill(d, 10)
    d.write_sync(10 * PAGE, bytes(PAGE))  # a same-filled page
    clock.t += 600
    d.write_sync(0, _text_page(random.Random(1)))  # page 0 is young
    assert d.mark_idle(599) == 9  # pages 1..9: not page 0, not the same page, not holes
    assert d.mark_idle(599) == 0  # already idle
    assert d.mark_idle(None) == 1  # page 0
    assert d.stats.idle_pages == 10
    check_tiers(d)


def test_ages_survive_the_clock_rebase() -> None:
    clock = Clock(0.0)
    d = _device(clock)
    _fill(d, 4)
    clock.t = (ATIME_REBASE_AT - 10) * ATIME_QUANTUM
    d.write_sync(0, _text_page(random.Random(3)))
    clock.t = (ATIME_REBASE_AT + 5) * ATIME_QUANTUM  # the next tick rebases
    rows, _ = d.page_states(0, 4, 4)
    assert rows[0].age == 15 * ATIME_QUANTUM
    # older pages read as accessed at the new epoch: still days old
    assert rows[1].age == (ATIME_REBASE_AT + 5 - ATIME_REBASE_BY) * ATIME_QUANTUM
    assert d.mark_idle(16 * ATIME_QUANTUM) == 3
    assert d.mark_idle(15 * ATIME_QUANTUM) == 1


async def test_recompression_keeps_smaller_classes_and_marks_incompressible() -> None:
    clock = Clock()
    d = _device(clock, recompression=[("zstd", 3)])
    data = _fill(d, 20)
    rnd = random.Random(5)
    noise = rnd.randbytes(PAGE)
    d.write_sync(20 * PAGE, noise)  # HUGE: no algorithm shrinks random bytes
    sizes = class_sizes(d.pool.chain_size)
    before = {i: sizes[int(d.table.size[i])] for i in range(21)}
    total_before = d.stats.compr_data_size
    res = await d.recompress()
    assert res.tried == 21 and res.recompressed == 20 and res.incompressible == 1
    assert res.saved == d.stats.recompress_saved_bytes > 0
    for i in range(20):
        assert d.table.flags[i] == RECOMPRESSED
        assert sizes[int(d.table.size[i])] < before[i]
        assert d.table.codec[i] == d._recomp_ids[0]
    assert d.table.state[20] == HUGE and d.table.flags[20] == INCOMPRESSIBLE
    assert d.stats.compr_data_size < total_before
    assert d.read_sync(0, 21 * PAGE) == data + noise
    again = await d.recompress()  # recompressed and incompressible pages are skipped
    assert again.tried == 0
    d.write_sync(20 * PAGE, noise)  # a rewrite clears the marks: tried again
    assert (await d.recompress()).tried == 1
    check_tiers(d)


async def test_types_threshold_and_max_pages() -> None:
    clock = Clock()
    d = _device(clock)
    _fill(d, 10)
    d.write_sync(10 * PAGE, random.Random(1).randbytes(PAGE))  # huge
    d.mark_idle(None)
    d.read_sync(0, 2 * PAGE)  # pages 0, 1 hot again
    assert (await d.recompress(kind="huge")).tried == 1
    assert (await d.recompress(kind="idle", max_pages=3)).tried == 3
    res = await d.recompress(kind="idle", threshold=PAGE)
    assert res.tried == 0  # only huge objects reach the threshold, and that one is done
    assert (await d.recompress(kind="idle")).tried == 5
    assert (await d.recompress()).tried == 2
    check_tiers(d)


async def test_nospace_leaves_the_page_where_it_was() -> None:
    clock = Clock()
    d = _device(clock)
    data = _fill(d, 12)
    entries = [
        (int(d.table.state[i]), int(d.table.handle[i]), int(d.table.size[i]))
        for i in range(12)
    ]
    stats_before = d.stats.copy()
    pool = d.pool
    real_store = pool.store
    calls = [0]

    def store(payload: Any) -> int:
        calls[0] += 1
        if calls[0] == 4:
            raise PoolFull("full", cause="limit")
        return real_store(payload)

    pool.store = store  # type: ignore[method-assign]
    res = await d.recompress(batch_pages=8)
    pool.store = real_store  # type: ignore[method-assign]
    assert res.nospace and res.recompressed == 3
    for i in range(3, 12):  # the page that found no room and the rest: unchanged
        assert (
            int(d.table.state[i]), int(d.table.handle[i]), int(d.table.size[i])
        ) == entries[i]
        assert d.table.flags[i] == 0
    assert d.stats.failed_writes == stats_before.failed_writes
    assert d.read_sync(0, 12 * PAGE) == data
    check_tiers(d)
    assert (await d.recompress()).recompressed == 9  # the rest when there is room again


async def test_write_during_a_batch_wins() -> None:
    clock = Clock()
    d = _device(clock)
    data = bytearray(_fill(d, 8))
    new = _text_page(random.Random(99))
    real_run = d._run_in_executor

    def run(fn: Callable[..., Any], *args: Any) -> Any:
        d.write_sync(3 * PAGE, new)  # a client write lands while the batch is in a worker
        d.trim_sync(5 * PAGE, PAGE)
        return real_run(fn, *args)

    d._run_in_executor = run  # type: ignore[method-assign]
    res = await d.recompress()
    assert res.tried == 8 and res.recompressed == 6
    data[3 * PAGE : 4 * PAGE] = new
    data[5 * PAGE : 6 * PAGE] = bytes(PAGE)
    assert d.read_sync(0, 8 * PAGE) == data
    assert d.table.flags[3] == 0 and d.table.state[5] == EMPTY
    check_tiers(d)


async def test_reset_and_close_end_a_run() -> None:
    clock = Clock()
    d = _device(clock)
    _fill(d)
    real_run = d._run_in_executor

    def run(fn: Callable[..., Any], *args: Any) -> Any:
        d.reset()
        return real_run(fn, *args)

    d._run_in_executor = run  # type: ignore[method-assign]
    res = await d.recompress()
    assert res.aborted and res.recompressed == 0
    assert d.stats.pages_stored == 0
    check_tiers(d)


async def test_recompress_needs_an_algorithm() -> None:
    d = ZramDevice(SIZE, executor=InlineExecutor())
    d.write_sync(0, _text_page(random.Random(1)))
    with pytest.raises(ValueError, match="no recompression algorithm"):
        await d.recompress()
    res = await d.recompress(algorithm="zstd", level=5)
    assert res.recompressed == 1
    with pytest.raises(ValueError, match="type"):
        await d.recompress(kind="cold", algorithm="zstd")


async def test_policy_marks_recompresses_in_short_slices_and_stops() -> None:
    clock = Clock()
    d = _device(clock)
    data = _fill(d)
    policy = TierPolicy("t", d, after=60, interval=0.01)
    clock.t += 30
    await policy.run_pass()
    assert policy.marked == 0 and d.stats.recompressed_pages == 0
    clock.t += 60
    await policy.run_pass()
    assert policy.marked == NPAGES and policy.recompressed == NPAGES
    assert d.read_sync(0, SIZE) == data
    assert 0 < policy.max_slice_us
    policy.start()
    for _ in range(500):  # the background task's passes, every 10 ms (a loaded machine: later)
        if policy.passes >= 3:
            break
        await asyncio.sleep(0.01)
    assert policy.passes >= 3
    await policy.stop()
    assert policy.task is None
    check_tiers(d)


async def test_policy_backs_off_while_clients_are_busy() -> None:
    clock = Clock()
    d = _device(clock)
    _fill(d)
    busy = [True]
    policy = TierPolicy("t", d, after=0, interval=1, busy=lambda: busy[0])
    clock.t += 16
    await policy.run_pass()
    assert policy.backoffs > 0 and policy.recompressed == NPAGES
    d.close()


async def test_policy_groups_then_recompresses_what_is_left() -> None:
    clock = Clock()
    d = _device(clock)
    data = bytearray(_fill(d, 33))
    policy = TierPolicy("t", d, after=60, interval=1, group_pages=16)
    clock.t += 120
    await policy.run_pass()
    st = d.table.state
    assert policy.marked == 33 and policy.grouped == 32  # two full windows
    assert (st[:32] == GROUPED).all()
    assert policy.recompressed == 1  # page 32: alone in its window, too few for a group
    assert d.read_sync(0, 33 * PAGE) == data
    check_tiers(d)


async def test_memory_limit_during_recompression_changes_nothing_it_cannot_finish() -> None:
    clock = Clock()
    d = _device(clock)
    data = _fill(d)
    d.set_mem_limit(d.pool.total_bytes)  # no room for one more zspage
    before = d.stats.copy()
    res = await d.recompress()
    assert res.nospace
    assert d.read_sync(0, SIZE) == data
    assert d.stats.failed_writes == before.failed_writes
    check_tiers(d)
    d.set_mem_limit(0)
    res = await d.recompress()
    assert not res.nospace and res.recompressed + res.incompressible == res.tried
    assert d.read_sync(0, SIZE) == data
    check_tiers(d)


def test_class_sizes_are_the_pools() -> None:
    from zramd.allocator import Pool

    for chain in (4, 8):
        pool = Pool(chain_size=chain)
        sizes = class_sizes(chain)
        assert all(pool._class_of[n].spec.size == sizes[n] for n in range(1, PAGE + 1))
        pool.close()


async def test_loop_clock_stamps_its_last_reading() -> None:
    clock = Clock()
    d = _device(clock, clock_refresh=0.01)
    d.start_clock()
    assert d._store.coarse
    d.write_sync(0, _text_page(random.Random(1)))
    clock.t += 100 * ATIME_QUANTUM
    d.write_sync(PAGE, _text_page(random.Random(2)))  # before the timer read the clock again
    assert d.table.atime[1] == d.table.atime[0]
    await asyncio.sleep(0.05)
    d.read_sync(0, PAGE)
    assert int(d.table.atime[0]) - int(d.table.atime[1]) == 100
    d.reset()  # the new store keeps the loop's clock
    assert d._store.coarse and d._store.now == 0  # its epoch is the reset
    d.close()
    assert d._clock_timer is None
