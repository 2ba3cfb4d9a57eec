"""Writeback of multi-page groups (zramd.device.backed): a group goes to the backing store whole,
one object per live member (the group's codec, zstd at most at MEMBER_ZSTD_LEVEL), and is freed.
The device against a bytearray model (hypothesis state machine) with writes, trims, idle marking,
grouping, on-demand writeback over ranges and page budgets, pressure writeback and read-back
interleaved; directed tests of the moves racing writes and re-packs, ranges and budgets that
would split a group, an undecodable group, and pressure writeback of a device whose cold pages
are all grouped."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.unit.test_groups import _corrupt_group
from tests.unit.test_tiers import PAGE, InlineExecutor, _payload
from tests.unit.test_writeback import HeldExecutor, check_backed
from zramd.backing import BackingStore
from zramd.device.backed import MEMBER_ZSTD_LEVEL
from zramd.device.blockdev import ZramDevice
from zramd.device.groups import GROUP_CACHE
from zramd.device.interface import DeviceIOError, NoSpace
from zramd.device.table import BACKED, GROUPED, RAW, STORED

NPAGES = 64
SIZE = NPAGES * PAGE
T = TypeVar("T")


def _text(n: int, seed: int = 3) -> bytes:
    return _payload(2, n * PAGE, seed)


def _groups(d: ZramDevice) -> int:
    return d._store.groups.count


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[ZramDevice]:
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = ZramDevice(SIZE, backing=bs, executor=InlineExecutor())
    yield d
    d.close()
    await bs.aclose()


def _held_device(bs: BackingStore, ex: HeldExecutor) -> ZramDevice:
    """A device whose requests never go to the executor: only writeback's encoding does."""
    big = NPAGES + 1
    return ZramDevice(
        SIZE, backing=bs, executor=ex, offload_min_pages=big, native_offload_min_pages=big
    )


async def _held(ex: HeldExecutor, task: asyncio.Task[Any]) -> None:
    """Until ``task`` has a job held in ``ex`` (or is done)."""
    for _ in range(2000):
        if ex.jobs or task.done():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no job came")


async def _grouped(d: ZramDevice, data: bytes, group_pages: int = 16) -> None:
    await d.write(0, data)
    d.mark_idle()
    res = await d.group(0, len(data) // PAGE - 1, group_pages=group_pages)
    assert res.pages == len(data) // PAGE


async def test_a_group_goes_whole_one_object_per_member(dev: ZramDevice) -> None:
    data = _text(16) + _payload(3, 2 * PAGE, 9)  # 16 grouped text pages, 2 huge pages
    await dev.write(0, data)
    dev.mark_idle()
    assert (await dev.group(0, 15, group_pages=16)).pages == 16
    g = dev._store.groups
    gid = int(dev.table.handle[0])
    codec = int(g.codec[gid])
    blob = int(g.csize[gid])
    pool_before = dev.pool.total_bytes
    res = await dev.writeback(kind="idle")
    assert res.written == res.tried == 18 and not res.error
    t = dev.table
    assert (t.state[:18] == BACKED).all() and _groups(dev) == 0
    group_codec = dev._store.codecs[codec]
    assert (group_codec.name, group_codec.level) == ("zstd", 9)  # the default group codec
    member = dev._store.codecs[int(t.codec[0])]
    assert (member.name, member.level) == ("zstd", MEMBER_ZSTD_LEVEL)  # each member on its own
    assert (t.codec[:16] == t.codec[0]).all()
    assert (t.flags[16:18] & RAW).all() and not (t.flags[:16] & RAW).any()
    per_page = int(t.size[:16].sum())
    assert blob < per_page < 16 * PAGE  # a little more than the blob, far less than raw
    assert dev.pool.total_bytes < pool_before
    s = dev.stats
    assert s.bd_count == 18 and s.grouped_pages == 0 and s.compr_data_size == 0
    await check_backed(dev)
    dev._store.groups.check()
    dev.set_mem_limit(PAGE)  # no promotion: read from the store
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    dev.set_mem_limit(0)  # promoted: STORED with the group's codec, readable from RAM
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    assert (t.state[:16] == STORED).all() and dev.read_sync(0, 16 * PAGE) == data[: 16 * PAGE]
    await check_backed(dev)


async def test_members_on_the_primary_codec_lose_their_recompressed_mark(tmp_path: Path) -> None:
    """A device whose primary codec is zstd level 3, the members' codec on the way out: pages
    recompressed (zstd 19) then grouped are no longer RECOMPRESSED once written back."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = ZramDevice(
        SIZE,
        algorithm="zstd",
        level=3,
        recompression=[("zstd", 19)],
        backing=bs,
        executor=InlineExecutor(),
    )
    try:
        data = _text(16)
        await d.write(0, data)
        d.mark_idle()
        assert (await d.recompress(kind="idle")).recompressed > 0
        assert d.stats.recompressed_pages > 0
        assert (await d.group(0, 15, group_pages=16)).pages == 16
        res = await d.writeback(kind="idle")
        assert res.written == 16
        t = d.table
        assert (t.state[:16] == BACKED).all() and (t.codec[:16] == 0).all()
        assert d.stats.recompressed_pages == 0
        await check_backed(d)  # the tier counters equal the marks
        assert (await d.read_with_zeros(0, len(data)))[0] == data
    finally:
        d.close()
        await bs.aclose()


async def test_a_range_or_a_budget_never_splits_a_group(dev: ZramDevice) -> None:
    data = _text(32)
    await _grouped(dev, data, group_pages=8)  # groups of pages 0-7, 8-15, 16-23, 24-31
    assert _groups(dev) == 4
    res = await dev.writeback(kind="idle", first=4, stop=20)  # only 8-15 lies inside
    assert res.written == res.tried == 8
    st_ = dev.table.state
    assert (st_[8:16] == BACKED).all() and (st_[:8] == GROUPED).all()
    assert (st_[16:32] == GROUPED).all()
    res = await dev.writeback(kind="idle", max_pages=5)  # a group does not fit in 5 pages
    assert res.written == res.tried == 0
    res = await dev.writeback(kind="idle", max_pages=12)  # one group fits, not two
    assert res.written == res.tried == 8 and _groups(dev) == 2
    res = await dev.writeback(kind="huge")  # groups hold no huge page
    assert res.written == 0
    await check_backed(dev)
    dev._store.groups.check()
    assert (await dev.read_with_zeros(0, len(data)))[0] == data


async def test_writeback_leaves_the_read_cache_alone(dev: ZramDevice) -> None:
    """The read cache of decoded groups (GROUP_CACHE of them) keeps what reads put there: a group
    written back is decoded outside it."""
    data = _text(NPAGES)
    await _grouped(dev, data, group_pages=4)
    g = dev._store.groups
    dev.set_mem_limit(PAGE)  # reads do not promote
    for p in range(0, GROUP_CACHE * 4, 4):
        assert dev.read_sync(p * PAGE, PAGE) == data[p * PAGE : (p + 1) * PAGE]
    cached = list(g._cache)
    assert len(cached) == GROUP_CACHE
    res = await dev.writeback(kind="idle", first=GROUP_CACHE * 4, stop=NPAGES)
    assert res.written == NPAGES - GROUP_CACHE * 4
    assert list(g._cache) == cached
    await check_backed(dev)


async def test_members_rewritten_or_trimmed_during_the_move_win(tmp_path: Path) -> None:
    bs = BackingStore.create(str(tmp_path / "backing"))
    ex = HeldExecutor()
    d = _held_device(bs, ex)
    try:
        data = _text(16)
        d.write_sync(0, data)  # the sync API: the held executor is for the writeback only
        d.mark_idle()
        assert d.group_sync(0, 15, group_pages=16).pages == 16
        task = asyncio.create_task(d.writeback(kind="idle"))
        await _held(ex, task)  # the members are being encoded in the worker
        assert ex.jobs
        new = _text(1, seed=77)
        assert d.write_now(3 * PAGE, new)
        await d.trim(5 * PAGE, PAGE)
        ex.release()
        res = await task
        assert res.written == 14 and res.tried == 16
        t = d.table
        assert t.state[3] == STORED and t.state[5] == 0 and _groups(d) == 0
        assert (np.delete(t.state[:16], [3, 5]) == BACKED).all()
        want = bytearray(data)
        want[3 * PAGE : 4 * PAGE] = new
        want[5 * PAGE : 6 * PAGE] = bytes(PAGE)
        assert (await d.read_with_zeros(0, len(data)))[0] == want
        await check_backed(d)  # the store's copies of pages 3 and 5 were freed
        d._store.groups.check()
    finally:
        d.close()
        await bs.aclose()


async def test_a_group_repacked_during_the_move_still_goes(tmp_path: Path) -> None:
    """Members killed past the dead bound while the batch is encoded: the group is re-packed
    (its live pages move to a new group, marks kept); they are still the batch's data, so they
    switch from the new group, which is freed."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    ex = HeldExecutor()
    d = _held_device(bs, ex)
    try:
        data = _text(16)
        d.write_sync(0, data)
        d.mark_idle()
        assert d.group_sync(0, 15, group_pages=16).pages == 16
        old = int(d.table.handle[0])
        task = asyncio.create_task(d.writeback(kind="idle"))
        await _held(ex, task)
        assert ex.jobs
        for p in range(9):  # 9 of 16 dead: re-packed into a group of pages 9-15
            assert d.write_now(p * PAGE, b"w" * PAGE)
        assert (d.table.state[9:16] == GROUPED).all() and int(d.table.handle[9]) != old
        ex.release()
        res = await task
        assert res.written == 7
        assert (d.table.state[9:16] == BACKED).all() and _groups(d) == 0
        want = b"w" * (9 * PAGE) + data[9 * PAGE :]
        assert (await d.read_with_zeros(0, len(data)))[0] == want
        await check_backed(d)
        d._store.groups.check()
    finally:
        d.close()
        await bs.aclose()


async def test_an_undecodable_group_stays_and_the_rest_goes(dev: ZramDevice) -> None:
    data = _text(32)
    await _grouped(dev, data)
    bad = int(dev.table.handle[0])
    dev._store.groups._cache.clear()
    _corrupt_group(dev, bad)
    res = await dev.writeback(kind="idle")
    assert res.written == 16 and res.tried == 32 and not res.error
    st_ = dev.table.state
    assert (st_[:16] == GROUPED).all() and (st_[16:32] == BACKED).all()
    with pytest.raises(DeviceIOError):
        await dev.read_with_zeros(0, PAGE)
    dev.set_mem_limit(PAGE)  # no promotion
    assert (await dev.read_with_zeros(16 * PAGE, 16 * PAGE))[0] == data[16 * PAGE :]
    await check_backed(dev)
    # under pressure the undecodable group is all that is left: writes fail, no spinning
    dev.set_mem_limit(dev.pool.total_bytes)
    d_backed = dev._backed
    assert d_backed is not None
    d_backed.configure(0.9, 0.8, 0.2)
    with pytest.raises(NoSpace):
        await dev.write(40 * PAGE, _payload(3, 8 * PAGE, 1))
    assert d_backed.stuck == "nothing left to write back"


async def test_pressure_writes_back_a_device_whose_cold_pages_are_grouped(
    tmp_path: Path,
) -> None:
    """Everything in RAM grouped, the pool at its limit: new writes make room by writing
    groups back (before, ENOSPC: nothing left to write back)."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = ZramDevice(4 * SIZE, backing=bs, executor=InlineExecutor())
    try:
        data = _text(NPAGES)
        await _grouped(d, data)
        assert _groups(d) == NPAGES // 16 and d.stats.grouped_pages == NPAGES
        d.set_mem_limit(d.pool.total_bytes)
        fresh = _text(16, seed=8)
        await d.write(SIZE, fresh)
        s = d.stats
        assert s.bd_count >= 16 and _groups(d) < NPAGES // 16
        assert s.bd_waits and not s.bd_wait_timeouts
        got = await d.read_with_zeros(0, SIZE + len(fresh))
        assert got[0] == data + fresh
        await check_backed(d)
        d._store.groups.check()
    finally:
        d.close()
        await bs.aclose()


# --- the model ---------------------------------------------------------------------------------


class GroupWritebackModel(RuleBasedStateMachine):
    """The device with groups and a backing store against a bytearray."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="zramd-wb-groups-")
        self.bs = BackingStore.create(os.path.join(self.dir, "backing"))
        self.d = ZramDevice(SIZE, backing=self.bs, executor=InlineExecutor(), writeback_wait=0.05)
        self.model = bytearray(_text(NPAGES, seed=1))  # material for groups from the start
        self.d.write_sync(0, self.model)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.d.close()
        self.run(self.bs.aclose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        first=st.integers(0, NPAGES - 1),
        n=st.integers(1, 24),
        kind=st.sampled_from([1, 2, 2, 3]),
        seed=st.integers(0, 99),
    )
    def write(self, first: int, n: int, kind: int, seed: int) -> None:
        n = min(n, NPAGES - first)
        data = _payload(kind, n * PAGE, seed)
        try:
            self.run(self.d.write(first * PAGE, data))
        except NoSpace:
            event("write refused")
            return
        self.model[first * PAGE : (first + n) * PAGE] = data

    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, 8))
    def trim(self, first: int, n: int) -> None:
        n = min(n, NPAGES - first)
        self.run(self.d.trim(first * PAGE, n * PAGE))
        self.model[first * PAGE : (first + n) * PAGE] = bytes(n * PAGE)

    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, NPAGES))
    def read(self, first: int, n: int) -> None:
        n = min(n, NPAGES - first)
        got = self.run(self.d.read_with_zeros(first * PAGE, n * PAGE))
        assert got[0] == self.model[first * PAGE : (first + n) * PAGE]

    @rule()
    def idle(self) -> None:
        self.d.mark_idle()

    @rule(
        first=st.integers(0, NPAGES - 1), size=st.sampled_from([2, 4, 8, 16]), idle=st.booleans()
    )
    def group(self, first: int, size: int, idle: bool) -> None:
        if idle:
            self.d.mark_idle()
        res = self.run(self.d.group(first, NPAGES - 1, group_pages=size))
        if res.pages:
            event("grouped")

    def _grouped_went(self, before: Any) -> None:
        if ((before == GROUPED) & (self.d.table.state == BACKED)).any():
            event("group written back")

    @rule(
        first=st.integers(0, NPAGES - 1),
        stop=st.integers(1, NPAGES),
        max_pages=st.one_of(st.none(), st.integers(0, 40)),
    )
    def writeback(self, first: int, stop: int, max_pages: int | None) -> None:
        first, stop = min(first, stop), max(first, stop)
        t = self.d.table
        g = self.d._store.groups
        before = {int(gid) for gid in t.handle[t.state == GROUPED]}
        whole = {
            gid
            for gid in before
            if first <= g.live_members(gid)[0] and g.live_members(gid)[-1] < stop
        }
        states = t.state.copy()
        res = self.run(
            self.d.writeback(kind="idle", first=first, stop=stop, max_pages=max_pages)
        )
        self._grouped_went(states)
        assert res.written <= res.tried
        if max_pages is not None:
            assert res.tried <= max_pages
        # a group is never split: its pages are all still in it or none is
        for gid in before - whole:
            if g.members[gid]:
                assert g.live_members(gid)[0] < first or g.live_members(gid)[-1] >= stop
        if res.written:
            event("written back")

    @rule(share=st.sampled_from([0.3, 0.6, 1.0]))
    def pressure(self, share: float) -> None:
        """A limit under (or at) the pool now, then a write: pressure writeback runs."""
        states = self.d.table.state.copy()
        self.d.set_mem_limit(max(PAGE, int(self.d.pool.total_bytes * share)))
        self.write(NPAGES - 2, 2, 3, 7)
        self.run(_settled(self.d))
        self.d.set_mem_limit(0)
        self._grouped_went(states)

    @invariant()
    def consistent(self) -> None:
        self.run(check_backed(self.d))
        self.d._store.groups.check()


async def _settled(d: ZramDevice) -> None:
    b = d._backed
    assert b is not None
    while b._pressure is not None:
        await asyncio.sleep(0.001)


GroupWritebackModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_group_writeback_against_a_model = GroupWritebackModel.TestCase
