"""Writeback to a backing store (zramd.device.backed): the device against a bytearray model with
writeback, read-back, promotion, trim and overwrite of written-back pages interleaved with
writes, idle marking, recompression and groups; the inline doors; moves racing writes; pressure
writeback and the bounded wait; faults of the store (EIO, short writes, ENOSPC, budget, a
truncated file)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import tempfile
import threading
from array import array
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_tiers import (
    NPAGES,
    PAGE,
    PREFILL,
    SIZE,
    Clock,
    InlineExecutor,
    _apply_model,
    _payload,
    _range,
    check_tiers,
)
from zramd.backing import CACHED_READ_MAX_OBJECTS, BackingStore
from zramd.backing import format as fmt
from zramd.backing import store as store_mod
from zramd.device import blockdev as blockdev_mod
from zramd.device.backed import BATCH_PAGES, BURST_BYTES, BURST_PAGES, Backed, _next_batch
from zramd.device.blockdev import ZramDevice
from zramd.device.interface import DeviceIOError, NoSpace, Unsupported
from zramd.device.table import BACKED, GROUPED, HUGE, RAW, STORED, WB_PENDING


def _device(clock: Clock, backing: BackingStore | None, **kw: Any) -> ZramDevice:
    kw.setdefault("recompression", [("zstd", 3)])
    return ZramDevice(
        SIZE, algorithm="lz4", executor=InlineExecutor(), clock=clock, backing=backing, **kw
    )


def _backed(d: ZramDevice) -> Backed:
    b = d._backed
    assert b is not None
    return b


async def settle(d: ZramDevice) -> None:
    """Let the deferred frees and the pressure task finish."""
    b = _backed(d)
    for _ in range(1000):
        if not b._garbage and not b._freeing and b._pressure is None:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("backing work did not settle")


async def check_backed(d: ZramDevice) -> None:
    """The tier and page counters hold; bd_count is the BACKED entries and the store's live
    objects (once the frees are done); RAW only on BACKED pages."""
    await settle(d)
    check_tiers(d)
    t = d.table
    backed = t.state == BACKED
    assert d.stats.bd_count == int(backed.sum())
    assert _backed(d).backing.stat()["bd_count"] == d.stats.bd_count
    assert not (t.flags[~backed] & RAW).any()
    assert not (t.flags & WB_PENDING).any()


_op = st.one_of(
    st.tuples(st.just("write"), _range(), st.integers(0, 3), st.integers(0, 2**32)),
    st.tuples(st.just("read"), _range()),
    st.tuples(st.just("trim"), _range()),
    st.tuples(st.just("zeroes"), _range(), st.booleans()),
    st.tuples(st.just("time"), st.integers(0, 2000)),
    st.tuples(st.just("idle"), st.one_of(st.none(), st.integers(0, 1200))),
    st.tuples(st.just("recompress"), st.sampled_from(["all", "idle"])),
    st.tuples(st.just("group"), st.integers(0, NPAGES - 1), st.integers(0, NPAGES - 1)),
    st.tuples(st.just("compact")),
    st.tuples(
        st.just("writeback"),
        st.sampled_from(["idle", "huge", "huge-idle", "incompressible"]),
        st.one_of(st.none(), st.integers(0, 10)),
    ),
    st.tuples(st.just("writeback"), st.just("idle"), st.none()),
    st.tuples(st.just("promote"), st.booleans()),
    st.tuples(st.just("evict")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, min_size=1, max_size=30))
def test_ops_with_writeback_match_model(ops: list[tuple[Any, ...]]) -> None:
    async def run(tmp: str) -> None:
        clock = Clock()
        bs = BackingStore.create(os.path.join(tmp, "backing"))
        d = _device(clock, bs, writeback_wait=0.05)  # a write without room fails sooner
        model = bytearray(PREFILL)
        d.write_sync(0, PREFILL)
        d.mark_idle()
        await d.writeback(kind="idle", max_pages=NPAGES // 2)  # material from the start
        try:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (off, n), pk, seed = op[1], op[2], op[3]
                    try:
                        await d.write(off, _payload(pk, n, seed))
                    except NoSpace:  # under a "promote" limit: the write changed nothing
                        continue
                elif kind == "read":
                    off, n = op[1]
                    got = await d.read_with_zeros(off, n)
                    assert got[0] == model[off : off + n]
                elif kind == "trim":
                    await d.trim(*op[1])
                elif kind == "zeroes":
                    try:
                        await d.write_zeroes(*op[1], punch_hole=op[2])
                    except NoSpace:
                        continue
                elif kind == "time":
                    clock.t += op[1]
                elif kind == "group":
                    lo, hi = sorted(op[1:])
                    await d.group(lo, hi, group_pages=4)
                elif kind == "idle":
                    d.mark_idle(op[1])
                elif kind == "recompress":
                    await d.recompress(kind=op[1])
                elif kind == "writeback":
                    res = await d.writeback(kind=op[1], max_pages=op[2])
                    assert not res.error and res.written <= res.tried
                elif kind == "promote":
                    # a limit whose low watermark the pool is above: reads back stay backed
                    d.set_mem_limit(0 if op[1] else max(PAGE, d.pool.total_bytes))
                elif kind == "evict":  # the next reads of backed pages wait for the device
                    _evict(d)
                else:
                    d.compact()
                _apply_model(model, op)
                await check_backed(d)
            got = await d.read_with_zeros(0, SIZE)
            assert got[0] == model
            await check_backed(d)
        finally:
            d.close()
            await bs.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(tmp))


# --- the fixtures of the directed tests --------------------------------------------------------


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[ZramDevice]:
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = _device(Clock(), bs)
    yield d
    d.close()
    await bs.aclose()


def _evict(d: ZramDevice) -> bool:
    """Drop the backing file from the page cache (written out first), as the kernel drops a
    file not read for a while; whether it is out (a file system that keeps files in memory,
    tmpfs, keeps it)."""
    fd = os.open(_backed(d).backing.path, os.O_RDWR)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


def _uncached(d: ZramDevice) -> None:
    """From now on no record of the backing file is in the page cache, as far as the device
    can tell: every read of a backed page takes the awaited path, in the store's threads."""
    _backed(d).backing.read_cached = lambda locs: None  # type: ignore[method-assign]


def _text(n: int, seed: int = 3) -> bytes:
    return _payload(2, n * PAGE, seed)


async def _written_back(d: ZramDevice, data: bytes) -> None:
    await d.write(0, data)
    d.mark_idle()
    res = await d.writeback(kind="idle")
    assert res.written == len(data) // PAGE and not res.error


async def test_writeback_moves_objects_as_they_are(dev: ZramDevice) -> None:
    data = _text(8) + _payload(3, 2 * PAGE, 9)  # 8 stored, 2 huge
    await dev.write(0, data)
    t = dev.table
    sizes = t.size[:10].copy()
    codecs = t.codec[:10].copy()
    dev.mark_idle()
    res = await dev.writeback(kind="huge")
    assert res.written == 2 and (t.state[8:10] == BACKED).all() and (t.flags[8:10] & RAW).all()
    res = await dev.writeback(kind="idle")
    assert res.written == 8 and (t.state[:10] == BACKED).all()
    assert (t.size[:10] == sizes).all() and (t.codec[:10] == codecs).all()
    assert res.bytes == int(sizes[:8].sum())
    s = dev.stats
    assert s.bd_count == 10 and s.bd_writes == 10 and s.compr_data_size == 0
    assert s.huge_pages == 0 and s.pages_stored == 10
    await check_backed(dev)
    # read back without room to promote: the pages stay where they are
    dev.set_mem_limit(PAGE)
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    assert (t.state[:10] == BACKED).all() and dev.stats.bd_reads == 10
    # with room they come back to RAM, HUGE as HUGE
    dev.set_mem_limit(0)
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    assert (t.state[:8] == STORED).all() and (t.state[8:10] == HUGE).all()
    assert dev.stats.bd_promoted == 10
    await check_backed(dev)


async def test_inline_reads_take_backed_pages_from_the_page_cache(dev: ZramDevice) -> None:
    """A read of a few pages whose records the page cache holds is done inline: decoded,
    counted and promoted as the awaited path does; a read of more backed pages than a cached
    read takes gives way, and so does one whose record is not in the page cache (``_evict``);
    a record that does not check is EIO for that read, inline too."""
    data = _text(CACHED_READ_MAX_OBJECTS + 4)
    await _written_back(dev, data)
    s = dev.stats
    t = dev.table
    dev.set_mem_limit(max(PAGE, dev.pool.total_bytes))  # above the low watermark: no promotion
    assert dev.read_with_zeros_now(0, PAGE) == (data[:PAGE], [])
    assert (s.bd_reads, s.bd_promoted, t.state[0]) == (1, 0, BACKED)
    assert dev.read_with_zeros_now(PAGE + 100, 3 * PAGE) == (data[PAGE + 100 : 4 * PAGE + 100], [])
    assert (s.bd_reads, t.state[1]) == (5, BACKED)
    assert dev.read_with_zeros_now(0, (CACHED_READ_MAX_OBJECTS + 1) * PAGE) is None
    assert s.bd_reads == 5
    dev.set_mem_limit(0)  # no limit: pages read back return to RAM
    assert dev.read_sync(2 * PAGE, 2 * PAGE) == data[2 * PAGE : 4 * PAGE]
    assert (s.bd_reads, s.bd_promoted) == (7, 2)
    assert t.state[2] == t.state[3] == STORED
    assert dev.read_with_zeros_now(8 * PAGE, PAGE) == (data[8 * PAGE : 9 * PAGE], [])
    assert (s.bd_reads, s.bd_promoted, t.state[8]) == (8, 3, STORED)
    await check_backed(dev)
    loc = int(t.handle[5])
    off = fmt.locator_offset(loc) + fmt.RECORD_HEADER_BYTES
    with open(_backed(dev).backing.path, "r+b") as f:  # one payload byte flipped
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    failed = s.failed_reads
    with pytest.raises(DeviceIOError):
        dev.read_with_zeros_now(5 * PAGE, PAGE)
    assert s.failed_reads == failed + 1
    assert dev.read_with_zeros_now(6 * PAGE, PAGE) == (data[6 * PAGE : 7 * PAGE], [])
    if not _evict(dev):
        pytest.skip("the backing file's file system keeps it in memory")
    assert dev.read_with_zeros_now(7 * PAGE, PAGE) is None
    assert (await dev.read_with_zeros(7 * PAGE, PAGE))[0] == data[7 * PAGE : 8 * PAGE]


async def test_inline_doors_give_way_to_backed_pages(dev: ZramDevice) -> None:
    data = _text(4)
    await _written_back(dev, data)
    if not _evict(dev):
        pytest.skip("the backing file's file system keeps it in memory")
    assert dev.read_with_zeros_now(0, PAGE) is None
    _evict(dev)  # a read that missed may have started the kernel's read-ahead
    assert dev.read_with_zeros_now(PAGE, 3 * PAGE) is None
    _evict(dev)
    with pytest.raises(DeviceIOError):
        dev.read_sync(0, PAGE)
    assert dev.write_now(10, b"x") is False  # partial: the old page is in the backing store
    assert dev.write_now(PAGE, b"y" * PAGE) is True  # a whole page replaces it inline
    await dev.write(10, b"x")
    want = bytearray(data)
    want[10:11] = b"x"
    want[PAGE : 2 * PAGE] = b"y" * PAGE
    assert (await dev.read_with_zeros(0, 4 * PAGE))[0] == want
    await dev.write_zeroes(2 * PAGE + 100, 200)
    want[2 * PAGE + 100 : 2 * PAGE + 300] = bytes(200)
    await dev.trim(3 * PAGE, PAGE)
    want[3 * PAGE :] = bytes(PAGE)
    assert (await dev.read_with_zeros(0, 4 * PAGE))[0] == want
    await check_backed(dev)


async def test_a_write_during_writeback_wins(dev: ZramDevice) -> None:
    data = _text(4)
    await dev.write(0, data)
    dev.mark_idle()
    task = asyncio.create_task(dev.writeback(kind="idle"))
    await asyncio.sleep(0)  # the batch is copied out and being written
    assert dev.write_now(PAGE, b"n" * PAGE)
    await dev.trim(2 * PAGE, PAGE)
    res = await task
    assert res.written == 2
    t = dev.table
    assert t.state[0] == BACKED and t.state[1] != BACKED and t.state[3] == BACKED
    want = data[:PAGE] + b"n" * PAGE + bytes(PAGE) + data[3 * PAGE :]
    assert (await dev.read_with_zeros(0, 4 * PAGE))[0] == want
    await check_backed(dev)


async def test_a_read_in_flight_keeps_its_locator_until_done(dev: ZramDevice) -> None:
    data = _text(2)
    await _written_back(dev, data)
    dev.set_mem_limit(PAGE)  # no promotion
    _uncached(dev)
    read = asyncio.create_task(dev.read_with_zeros(0, PAGE))
    await asyncio.sleep(0)
    await dev.trim(0, PAGE)  # frees the locator the read is reading
    b = _backed(dev)
    assert b._garbage  # held back while the read is in flight
    assert (await read)[0] == data[:PAGE]
    await settle(dev)
    assert b.backing.stat()["bd_count"] == 1


async def test_writeback_limit_and_types(dev: ZramDevice) -> None:
    await dev.write(0, _text(8))
    dev.mark_idle()
    assert dev.writeback_limit is None
    dev.set_writeback_limit(3000)
    res = await dev.writeback(kind="idle")
    assert res.error == "budget" and res.written == 0
    assert (dev.table.state[:8] == STORED).all()
    dev.set_writeback_limit(1 << 20)
    res = await dev.writeback(kind="idle", max_pages=3)
    assert res.written == 3 and res.tried == 3
    assert dev.writeback_limit is not None and dev.writeback_limit < 1 << 20
    res = await dev.writeback(kind="incompressible")
    assert res.tried == 0
    with pytest.raises(ValueError, match="type"):
        await dev.writeback(kind="cold")
    plain = ZramDevice(SIZE)
    with pytest.raises(Unsupported):
        await plain.writeback()
    assert plain.backing_stat() == {}
    plain.close()


async def test_reset_frees_every_backed_object(dev: ZramDevice) -> None:
    await _written_back(dev, _text(6))
    dev.reset()
    await settle(dev)
    assert _backed(dev).backing.stat()["bd_count"] == 0
    assert (await dev.read_with_zeros(0, PAGE))[0] == bytes(PAGE)
    await _written_back(dev, _text(3))
    await check_backed(dev)


# --- memory pressure --------------------------------------------------------------------------


async def _fill_over_limit(d: ZramDevice, nbytes: int) -> bytes:
    rnd = random.Random(5)
    out = bytearray()
    for off in range(0, nbytes, PAGE):
        page = (rnd.randbytes(1000) * 5)[:PAGE] if off % (8 * PAGE) else rnd.randbytes(PAGE)
        if not d.write_now(off, page):
            await d.write(off, page)
        out += page
    return bytes(out)


async def test_pressure_writes_back_the_coldest_and_writes_wait(tmp_path: Path) -> None:
    bs = BackingStore.create(str(tmp_path / "backing"))
    size = 16 << 20
    d = ZramDevice(size, backing=bs, mem_limit=1 << 20)
    try:
        data = await _fill_over_limit(d, 8 << 20)  # 8x the limit
        await settle(d)
        s = d.stats
        assert s.bd_count > 0 and s.bd_waits > 0 and not s.bd_wait_timeouts
        assert s.mem_used_max <= 1 << 20
        assert (await d.read_with_zeros(0, len(data)))[0] == data
        # a 1 MiB write (the awaited path) waits too
        big = _payload(2, 1 << 20, 4)
        await d.write(12 << 20, big)
        assert (await d.read_with_zeros(12 << 20, 1 << 20))[0] == big
    finally:
        d.close()
        await bs.aclose()


async def test_pressure_batches_are_bursts_while_writes_wait(tmp_path: Path) -> None:
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = ZramDevice(32 << 20, backing=bs, mem_limit=4 << 20)
    sizes: list[tuple[int, int]] = []
    write_many = bs.write_many

    async def recording(objs: list[bytes]) -> list[int]:
        sizes.append((len(objs), sum(len(o) for o in objs)))
        return await write_many(objs)

    bs.write_many = recording  # type: ignore[method-assign]
    try:
        rnd = random.Random(7)  # 2:1 compressible pages, 16 MiB: 4x the limit
        data = b"".join(rnd.randbytes(PAGE // 2) + bytes(PAGE // 2) for _ in range(4096))
        for k in range(16):
            await d.write(k << 20, data[k << 20 : (k + 1) << 20])
        await settle(d)
        assert d.stats.bd_waits > 0 and not d.stats.bd_wait_timeouts
        assert max(n for n, _ in sizes) > BATCH_PAGES
        assert all(n <= BURST_PAGES for n, _ in sizes)
        assert all(n == 1 or b <= BURST_BYTES for n, b in sizes)
        assert (await d.read_with_zeros(0, len(data)))[0] == data
        await check_backed(d)
    finally:
        d.close()
        await bs.aclose()


async def test_writes_waiting_for_room_are_compressed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes under pressure, four at a time (1 MiB each, done on the loop as the server
    does): one that finds no room waits and then commits the pages it compressed before
    the wait, and one that comes while others wait does not try first (and fail) inline;
    so the pages compressed are close to the pages written, not a multiple of them."""
    prepared = [0]
    real = blockdev_mod.prepare_part

    def counting(start: int, stop: int, *args: Any) -> Any:
        prepared[0] += stop - start
        return real(start, stop, *args)

    monkeypatch.setattr(blockdev_mod, "prepare_part", counting)
    bs = BackingStore.create(str(tmp_path / "backing"))
    d = ZramDevice(
        32 << 20, backing=bs, mem_limit=4 << 20,
        offload_min_pages=blockdev_mod.SERVER_OFFLOAD_MIN_PAGES,
    )  # fmt: skip
    try:
        rnd = random.Random(8)  # 2:1 compressible pages, 24 MiB: 6x the limit
        data = b"".join(rnd.randbytes(PAGE // 2) + bytes(PAGE // 2) for _ in range(6144))
        gate = asyncio.Semaphore(4)

        async def one(k: int) -> None:
            async with gate:
                await d.write(k << 20, data[k << 20 : (k + 1) << 20])

        await asyncio.gather(*[one(k) for k in range(24)])
        await settle(d)
        s = d.stats
        assert s.bd_waits > 0 and not s.bd_wait_timeouts and s.bd_count > 0
        assert prepared[0] < 1.4 * (len(data) // PAGE), prepared[0]
        assert (await d.read_with_zeros(0, len(data)))[0] == data
        await check_backed(d)
    finally:
        d.close()
        await bs.aclose()


async def test_closing_under_pressure_writeback_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The export closes its device and then its store at once (``zramd destroy`` of a busy
    export): the pressure task, cancelled while its store write is in a thread, ends without
    an exception (the rest of its operation, the undo that gives a whole segment back, meets
    the closed store) and nothing is logged as a fault."""
    bs = BackingStore.create(str(tmp_path / "backing"), segment_size=64 << 10)  # < one batch
    entered, release = threading.Event(), threading.Event()
    real = bs._write_io

    def gated(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return real(*args)

    bs._write_io = gated  # type: ignore[method-assign]
    d = ZramDevice(32 << 20, backing=bs, mem_limit=1 << 20)
    b = _backed(d)
    k = 0
    while b._pressure is None:  # up to the high watermark, one page at a time
        d.write_now(k * PAGE, _payload(2, PAGE, k))
        k += 1
    task = b._pressure
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, entered.wait, 10)
    with caplog.at_level(logging.WARNING, logger="zramd"):
        d.close()
        release.set()
        bs.close()  # the write in its thread ends first
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    assert task.done() and (task.cancelled() or task.exception() is None)
    assert not caplog.records


def test_next_batch_bounds() -> None:
    size_mv = memoryview(array("H", [1000, 3000, 500, 500, 4096, 100]))
    pages = [0, 1, 2, 3, 4, 5]
    assert _next_batch(pages, 0, size_mv, 64, 4000) == ([0, 1], 2)
    assert _next_batch(pages, 2, size_mv, 64, 4000) == ([2, 3], 4)
    assert _next_batch(pages, 4, size_mv, 64, 4000) == ([4], 5)  # at least one page
    assert _next_batch(pages, 0, size_mv, 3, 1 << 20) == ([0, 1, 2], 3)
    assert _next_batch(pages, 5, size_mv, 64, 4000) == ([5], 6)


async def test_pressure_takes_the_oldest_first(tmp_path: Path) -> None:
    bs = BackingStore.create(str(tmp_path / "backing"))
    clock = Clock()
    d = ZramDevice(4 << 20, backing=bs, clock=clock)
    try:
        old = _text(64, 1)
        await d.write(0, old)
        clock.t += 1000
        await d.write(64 * PAGE, _text(64, 2))
        d.set_mem_limit(d.pool.total_bytes)  # over the high watermark at once
        _backed(d).check()
        await settle(d)
        st_ = d.table.state
        assert (st_[:64] == BACKED).sum() > 0
        assert not (st_[64:128] == BACKED).any()
    finally:
        d.close()
        await bs.aclose()


async def test_without_backing_store_nospace_at_once() -> None:
    d = ZramDevice(16 << 20, mem_limit=1 << 20)
    with pytest.raises(NoSpace):
        await _fill_over_limit(d, 8 << 20)
    assert d.stats.failed_writes == 1
    d.close()


# --- faults -----------------------------------------------------------------------------------


async def test_writeback_eio_leaves_pages_in_ram_and_logs_once(
    dev: ZramDevice, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = _text(8)
    await dev.write(0, data)
    dev.mark_idle()

    def fail(fd: int, bufs: list[bytes], off: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "pwritev", fail)
    with caplog.at_level(logging.WARNING, logger="zramd.device"):
        for _ in range(3):
            res = await dev.writeback(kind="idle")
            assert res.error == "io" and res.written == 0
    assert len([r for r in caplog.records if "writeback failed" in r.message]) == 1
    assert dev.stats.bd_errors == 3
    monkeypatch.undo()
    assert (dev.table.state[:8] == STORED).all()
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    dev.mark_idle()  # the read cleared the marks
    res = await dev.writeback(kind="idle")
    assert res.written == 8
    assert (await dev.read_with_zeros(0, len(data)))[0] == data
    await check_backed(dev)


async def test_short_writes_are_completed(dev: ZramDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def short(fd: int, bufs: list[bytes], off: int) -> int:
        return real(fd, [bytes(bufs[0])[: max(1, len(bufs[0]) // 2)]], off)

    monkeypatch.setattr(store_mod.os, "pwritev", short)
    data = _text(6)
    await _written_back(dev, data)
    monkeypatch.undo()
    dev.set_mem_limit(PAGE)
    assert (await dev.read_with_zeros(0, len(data)))[0] == data


async def test_read_eio_fails_that_read_only(
    dev: ZramDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _text(4)
    await _written_back(dev, data)
    await dev.write(4 * PAGE, _text(2, 8))
    real = os.pread

    def fail(fd: int, n: int, off: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    def not_cached(fd: int, bufs: list[bytearray], off: int, flags: int) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(store_mod.os, "pread", fail)  # the device fails the reads that reach it
    monkeypatch.setattr(store_mod.os, "preadv", not_cached)
    with pytest.raises(DeviceIOError):
        await dev.read_with_zeros(0, 2 * PAGE)
    with pytest.raises(DeviceIOError):
        await dev.write(100, b"z")  # its old page cannot be read
    assert dev.stats.failed_reads == 1 and dev.stats.failed_writes == 1
    assert (await dev.read_with_zeros(4 * PAGE, 2 * PAGE))[0] == _text(2, 8)  # RAM: fine
    monkeypatch.undo()
    assert os.pread is real
    assert (await dev.read_with_zeros(0, 4 * PAGE))[0] == data


async def test_truncated_file_is_eio_for_backed_pages_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "backing")
    bs = BackingStore.create(path)
    d = _device(Clock(), bs)
    try:
        data = _text(8)
        await _written_back(d, data)
        await d.write(8 * PAGE, _text(4, 9))
        os.truncate(path, 4096)
        d.set_mem_limit(PAGE)
        with caplog.at_level(logging.WARNING, logger="zramd.device"):
            for i in range(8):
                with pytest.raises(DeviceIOError):
                    await d.read_with_zeros(i * PAGE, PAGE)
        assert len([r for r in caplog.records if "read failed" in r.message]) == 1
        assert (await d.read_with_zeros(8 * PAGE, 4 * PAGE))[0] == _text(4, 9)
        await d.write(0, b"w" * PAGE)  # rewriting a lost page works
        assert (await d.read_with_zeros(0, PAGE))[0] == b"w" * PAGE
    finally:
        d.close()
        await bs.aclose()


async def test_full_store_then_pressure_gives_nospace(tmp_path: Path) -> None:
    room = fmt.DEFAULT_DATA_OFFSET + 6 * fmt.SEGMENT_SIZE
    bs = BackingStore.create(str(tmp_path / "backing"), size=room)
    d = ZramDevice(64 << 20, backing=bs, mem_limit=1 << 20)
    try:
        with pytest.raises(NoSpace):
            await _fill_over_limit(d, 32 << 20)
        assert d.stats.bd_wait_timeouts >= 1 and d.stats.bd_count > 0
        assert bs.stat()["full_refusals"] >= 1
    finally:
        d.close()
        await bs.aclose()



async def test_concurrent_clients_under_pressure_read_their_writes(tmp_path: Path) -> None:
    """Writers and readers at once on their own regions, the pool held at 1 MiB: pressure
    writeback, promotion, partial writes over written-back pages and trims interleave."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    region = 2 << 20
    d = ZramDevice(8 * region, backing=bs, mem_limit=1 << 20, offload_min_pages=8)
    d.start_clock()

    async def client(k: int) -> None:
        rnd = random.Random(k)
        base = k * region
        model = bytearray(region)
        for _ in range(300):
            off = rnd.randrange(0, region - 40000)
            n = rnd.choice([PAGE, 100, 5000, 40000])
            if rnd.random() < 0.1:
                await d.trim(base + off, n)
                p0, p1 = -(-off // PAGE), (off + n) // PAGE
                if p1 > p0:
                    model[p0 * PAGE : p1 * PAGE] = bytes((p1 - p0) * PAGE)
            elif rnd.random() < 0.6:
                data = (rnd.randbytes(500) * (n // 500 + 1))[:n]
                if not d.write_now(base + off, data):
                    await d.write(base + off, data)
                model[off : off + n] = data
            else:
                got = await d.read_with_zeros(base + off, n)
                assert got[0] == model[off : off + n]
            await asyncio.sleep(0)
        got = await d.read_with_zeros(base, region)
        assert got[0] == model

    try:
        await asyncio.gather(*(client(k) for k in range(8)))
        await settle(d)
        s = d.stats
        assert s.bd_writes > 0 and s.bd_reads > 0 and not s.bd_wait_timeouts
        assert s.mem_used_max <= 1 << 20
        check_tiers(d)
    finally:
        d.close()
        await bs.aclose()


async def test_large_reads_mix_ram_and_backed_pages(dev: ZramDevice, tmp_path: Path) -> None:
    """Reads big enough for the native batch in the workers (and the Python loop) with pages
    in RAM, in the backing store, raw and compressed, same-filled and holes."""
    bs = BackingStore.create(str(tmp_path / "big"))
    d = ZramDevice(8 << 20, backing=bs)
    try:
        data = bytearray(_payload(2, 4 << 20, 1))
        data[PAGE * 10 : PAGE * 20] = _payload(3, 10 * PAGE, 2)  # huge pages
        data[PAGE * 30 : PAGE * 40] = bytes(10 * PAGE)
        await d.write(0, bytes(data))
        d.mark_idle(first=0, stop=600)
        await d.writeback(kind="idle")
        d.set_mem_limit(PAGE)  # no promotion: the second read meets the same mix
        for length in (4 << 20, 2 << 20, 64 * PAGE):
            got = await d.read_with_zeros(0, length)
            assert got[0] == data[:length]
        d.set_mem_limit(0)
        got = await d.read_with_zeros(PAGE // 2, (4 << 20) - PAGE)
        assert got[0] == data[PAGE // 2 : (4 << 20) - PAGE // 2]
        assert d.stats.bd_promoted == 600 - 10
    finally:
        d.close()
        await bs.aclose()


async def test_a_full_store_with_dead_space_is_cleaned(tmp_path: Path) -> None:
    room = fmt.DEFAULT_DATA_OFFSET + 16 * fmt.SEGMENT_SIZE  # 4 MiB of segments
    bs = BackingStore.create(str(tmp_path / "backing"), size=room)
    d = ZramDevice(16 << 20, backing=bs)
    try:
        first = _payload(3, 3 << 20, 1)  # raw pages: 3 MiB fill 12 segments
        await d.write(0, first)
        d.mark_idle()
        res = await d.writeback(kind="huge")
        assert not res.error and res.written == 768
        for off in range(0, 3 << 20, 4 * PAGE):
            await d.trim(off, 3 * PAGE)  # a quarter of every segment stays live
        await settle(d)
        second = _payload(3, 2 << 20, 2)  # more than the free segments hold
        await d.write(8 << 20, second)
        d.mark_idle()
        res = await d.writeback(kind="huge")
        assert not res.error and res.written == 512, res
        await settle(d)
        assert bs.stat()["cleaned_segments"] > 0
        d.set_mem_limit(PAGE)  # no promotion: every page is read from the store
        assert (await d.read_with_zeros(8 << 20, 2 << 20))[0] == second
        for off in range(0, 3 << 20, 4 * PAGE):
            got = await d.read_with_zeros(off + 3 * PAGE, PAGE)
            assert got[0] == first[off + 3 * PAGE : off + 4 * PAGE]
        await check_backed(d)
    finally:
        d.close()
        await bs.aclose()


async def test_frees_wait_only_for_older_reads(dev: ZramDevice) -> None:
    data = _text(3)
    await _written_back(dev, data)
    dev.set_mem_limit(PAGE)  # no promotion
    _uncached(dev)
    b = _backed(dev)
    real = b.backing.read_many
    gates: list[asyncio.Event] = []

    async def gated(locs: Any) -> list[bytes]:
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return await real(locs)

    b.backing.read_many = gated  # type: ignore[method-assign]
    older = asyncio.create_task(dev.read_with_zeros(0, PAGE))
    await asyncio.sleep(0)
    await dev.trim(PAGE, PAGE)  # dropped while the older read is in flight: held
    newer = asyncio.create_task(dev.read_with_zeros(2 * PAGE, PAGE))
    await asyncio.sleep(0)
    assert len(gates) == 2 and len(b._garbage) == 1
    gates[0].set()
    assert (await older)[0] == data[:PAGE]
    await asyncio.sleep(0.05)
    assert not b._garbage and not newer.done()  # freed while the newer read still runs
    gates[1].set()
    assert (await newer)[0] == data[2 * PAGE :]
    await settle(dev)
    assert b.backing.stat()["bd_count"] == 2


async def test_the_page_listing_shows_written_back_pages(dev: ZramDevice) -> None:
    await dev.write(0, _text(1) + _payload(3, PAGE, 4))
    dev.mark_idle()
    await dev.writeback(kind="idle")
    rows, _ = dev.page_states(0, 2, 10)
    assert rows[0].state == "backed" and rows[0].flags == ["backed", "idle"]
    assert rows[0].algorithm == "lz4" and 0 < rows[0].size < PAGE
    assert rows[1].flags == ["backed", "huge", "idle"] and rows[1].size == PAGE
    assert rows[1].algorithm == ""


def test_a_reload_keeps_the_backing_store(tmp_path: Path) -> None:
    from zramd.config import ExportConfig
    from zramd.control.reload import apply_exports
    from zramd.server.exports import ExportRegistry

    registry = ExportRegistry()
    try:
        registry.add(ExportConfig(name="a", size=1 << 20, backing=str(tmp_path / "one")))
        moved = ExportConfig(name="a", size=1 << 20, backing=str(tmp_path / "two"))
        _managed, lines = apply_exports(registry, [moved], {"a"})
        assert any("backing changed in the configuration; kept as is" in x for x in lines)
        exp = registry.get("a")
        assert exp is not None and exp.device.backing_stat()["path"] == str(tmp_path / "one")
    finally:
        registry.close()


async def test_pages_grouped_during_writeback_stay_grouped(dev: ZramDevice) -> None:
    data = _text(8)
    await dev.write(0, data)
    dev.mark_idle()
    task = asyncio.create_task(dev.writeback(kind="idle"))
    await asyncio.sleep(0)  # the batch is copied out and being written
    packed = await dev.group(0, 7, group_pages=4)
    assert packed.pages == 8
    res = await task
    assert res.written == 0 and res.tried == 8
    assert (dev.table.state[:8] == GROUPED).all()
    await check_backed(dev)  # nothing PENDING, the store's copies freed
    assert (await dev.read_with_zeros(0, len(data)))[0] == data


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_clients_and_every_mover_at_once(tmp_path: Path, seed: int) -> None:
    """Clients write, read, trim and zero their own regions while idle marking, writeback of
    every type, recompression, groups and compaction run over the whole device at once."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    region = 64 * PAGE
    nclients = 4
    d = ZramDevice(
        nclients * region,
        backing=bs,
        recompression=[("zstd", 3)],
        offload_min_pages=8,
        writeback_wait=0.05,
    )
    done = False

    async def movers() -> None:
        rnd = random.Random(seed)
        while not done:
            op = rnd.randrange(6)
            if op == 0:
                d.mark_idle()
            elif op == 1:
                await d.writeback(kind=rnd.choice(["idle", "huge", "huge-idle"]))
            elif op == 2:
                await d.recompress(kind="idle", batch_pages=4)
            elif op == 3:
                lo = rnd.randrange(d.npages - 16)
                await d.group(lo, lo + 15, group_pages=4)
            elif op == 4:
                d.compact()
            else:
                d.set_mem_limit(rnd.choice([0, 0, d.pool.total_bytes]))  # promotion on/off
            await asyncio.sleep(0)

    async def client(k: int) -> None:
        rnd = random.Random(seed * 100 + k)
        base = k * region
        model = bytearray(region)
        for _ in range(150):
            off = rnd.randrange(0, region - 1)
            n = rnd.randrange(1, min(region - off, 3 * PAGE) + 1)
            op = rnd.random()
            if op < 0.45:
                data = _payload(rnd.randrange(4), n, rnd.randrange(1 << 30))
                try:
                    if not d.write_now(base + off, data):
                        await d.write(base + off, data)
                except NoSpace:  # a limit the movers set may leave no room: nothing changed
                    continue
                model[off : off + n] = data
            elif op < 0.55:
                await d.trim(base + off, n)
                p0, p1 = -(-off // PAGE), (off + n) // PAGE
                if p1 > p0:
                    model[p0 * PAGE : p1 * PAGE] = bytes((p1 - p0) * PAGE)
            elif op < 0.6:
                try:
                    await d.write_zeroes(base + off, n)
                except NoSpace:
                    continue
                model[off : off + n] = bytes(n)
            else:
                got = await d.read_with_zeros(base + off, n)
                assert got[0] == model[off : off + n]
            await asyncio.sleep(0)
        got = await d.read_with_zeros(base, region)
        assert got[0] == model

    mover = asyncio.create_task(movers())
    try:
        await asyncio.gather(*(client(k) for k in range(nclients)))
        done = True
        await mover
        await check_backed(d)
        d._store.groups.check()
    finally:
        done = True
        d.close()
        await bs.aclose()


class HeldExecutor(Executor):
    """Runs the submitted functions only when released (a worker held up on purpose)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        self.jobs.append((f, fn, args))
        return f

    def release(self) -> None:
        jobs, self.jobs = self.jobs, []
        for f, fn, args in jobs:
            f.set_result(fn(*args))


async def test_a_page_written_back_during_a_group_step_joins_the_group(
    tmp_path: Path,
) -> None:
    """A group step holds its range against writes only: a writeback batch may move one of its
    members out meanwhile; the group's install then frees the store's copy instead."""
    bs = BackingStore.create(str(tmp_path / "backing"))
    ex = HeldExecutor()
    d = ZramDevice(SIZE, backing=bs, executor=ex)
    try:
        data = _text(4) + _payload(3, 4 * PAGE, 5)
        await d.write(0, data)
        d.mark_idle()
        group = asyncio.create_task(d.group(0, 7, group_pages=8))
        await asyncio.sleep(0)  # planned: its members copied out, packing held
        assert ex.jobs
        res = await d.writeback(kind="huge")
        assert res.written == 4
        while not group.done():  # the packing, then the heap trim that ends a group call
            ex.release()
            await asyncio.sleep(0)
        packed = await group
        assert packed.pages == 8
        assert (d.table.state[:8] == GROUPED).all()
        await check_backed(d)
        assert (await d.read_with_zeros(0, len(data)))[0] == data
    finally:
        d.close()
        await bs.aclose()


async def _fill_to(d: ZramDevice, fraction: float, limit: int) -> bytes:
    """Pages written from offset 0 until the pool holds ``fraction`` of ``limit``."""
    rnd = random.Random(11)
    out = bytearray()
    off = 0
    while d.pool.total_bytes <= fraction * limit:
        page = (rnd.randbytes(1000) * 5)[:PAGE]
        if not d.write_now(off, page):
            await d.write(off, page)
        out += page
        off += PAGE
    return bytes(out)


async def test_the_watermarks_are_the_exports(tmp_path: Path) -> None:
    """A pool at 60% of the limit: under the default high watermark (90%) nothing is written
    back; with writeback-high 0.5 / writeback-low 0.3 pressure writeback starts and stops under
    30%; lowering the default device's watermarks live starts it there too."""
    limit = 4 << 20
    devs: list[ZramDevice] = []
    stores: list[BackingStore] = []
    try:
        for k, (high, low_) in enumerate([(0.9, 0.8), (0.5, 0.3)]):  # the default, and low
            bs = BackingStore.create(str(tmp_path / f"backing{k}"))
            stores.append(bs)
            d = ZramDevice(
                16 << 20, backing=bs, mem_limit=limit, writeback_high=high, writeback_low=low_
            )
            devs.append(d)
        default, low = devs
        assert default.writeback_settings == {"high": 0.9, "low": 0.8, "wait": 2.0}
        assert low.writeback_settings == {"high": 0.5, "low": 0.3, "wait": 2.0}
        data = await _fill_to(default, 0.6, limit)
        await settle(default)
        assert default.stats.bd_count == 0 and default.pool.total_bytes > 0.5 * limit
        for off in range(0, len(data), PAGE):
            await low.write(off, data[off : off + PAGE])
        await settle(low)
        assert low.stats.bd_count > 0 and not low.stats.bd_waits
        assert low.pool.total_bytes <= 0.3 * limit
        assert (await low.read_with_zeros(0, len(data)))[0] == data
        # live: the default device's watermarks lowered, the pool is written back at once
        default.set_writeback_settings(0.5, 0.4, 1.0)
        await settle(default)
        assert default.stats.bd_count > 0 and default.pool.total_bytes <= 0.4 * limit
        with pytest.raises(ValueError, match="writeback-low 0.6 must be below writeback-high"):
            default.set_writeback_settings(0.5, 0.6, 1.0)
        assert default.writeback_settings == {"high": 0.5, "low": 0.4, "wait": 1.0}
        with pytest.raises(Unsupported):
            ZramDevice(1 << 20).set_writeback_settings(0.9, 0.8, 2.0)
    finally:
        for d in devs:
            d.close()
        for bs in stores:
            await bs.aclose()


async def test_writeback_wait_zero_fails_at_once(tmp_path: Path) -> None:
    """A write that finds no room waits for pressure writeback by default; with writeback-wait
    0 it gets ENOSPC at once (pressure writeback still starts)."""
    for wait in (2.0, 0.0):
        bs = BackingStore.create(str(tmp_path / f"backing{wait}"))
        d = ZramDevice(16 << 20, backing=bs, writeback_wait=wait)
        try:
            data = await _fill_over_limit(d, 1 << 20)
            d.set_mem_limit(d.pool.total_bytes)  # full, and no pressure round yet
            page = random.Random(3).randbytes(PAGE)
            if wait:
                await d.write(2 << 20, page)
                assert d.stats.bd_waits == 1 and not d.stats.bd_wait_timeouts
                assert (await d.read_with_zeros(2 << 20, PAGE))[0] == page
            else:
                with pytest.raises(NoSpace):
                    await d.write(2 << 20, page)
                assert d.stats.bd_wait_timeouts == 1
            await settle(d)
            assert d.stats.bd_count > 0
            assert (await d.read_with_zeros(0, len(data)))[0] == data
        finally:
            d.close()
            await bs.aclose()


async def test_waits_names_the_ranges_in_flight_and_the_pressure_state(dev: ZramDevice) -> None:
    """``waits()``, the line a report of a long request carries: the mutating ranges the device
    has registered, the writes waiting for room, pressure writeback, backing reads."""
    assert dev.waits() == (
        "page ranges in flight: none; writes waiting for room: 0, pressure writeback idle, "
        "reads in flight from the backing store: 0"
    )
    gate = asyncio.Event()
    r = await dev._inflight.acquire(3, 9)  # as a group step or an offloaded write holds it

    async def held() -> None:
        await gate.wait()
        dev._inflight.release(r)

    task = asyncio.create_task(held())
    assert dev.waits().startswith("page ranges in flight: 3-9;")
    gate.set()
    await task
    assert dev.waits().startswith("page ranges in flight: none;")
