"""ZramDevice against the real pool: semantics, failure atomicity, corruption, block_status."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from zramd.compress import get_codec
from zramd.device import STATE_HOLE, STATE_ZERO, BlockDevice, DeviceIOError, NoSpace
from zramd.device.blockdev import OFFLOAD_MIN_PAGES, ZramDevice
from zramd.device.interface import MAX_EXTENTS
from zramd.device.table import EMPTY, HUGE, SAME, STORED

PAGE = 4096
HZ = STATE_HOLE | STATE_ZERO


def text_page(seed: int, n: int = PAGE) -> bytes:
    """Compressible (~2-3:1 with lz4), distinct per seed."""
    rnd = random.Random(seed)
    words = [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(3, 9))) for _ in range(40)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


@pytest.fixture
def dev() -> Iterator[ZramDevice]:
    d = ZramDevice(64 * PAGE)
    yield d
    d.close()


def test_is_block_device(dev: ZramDevice) -> None:
    assert isinstance(dev, BlockDevice)
    assert ZramDevice(5).size == PAGE
    assert ZramDevice(0).size == 0


def test_unwritten_reads_zero(dev: ZramDevice) -> None:
    assert dev.read_sync(0, dev.size) == bytes(dev.size)
    assert dev.read_sync(123, 4567) == bytes(4567)


def test_page_states_and_round_trip(dev: ZramDevice) -> None:
    pages = {
        0: bytes(PAGE),
        1: b"\x5a" * PAGE,
        2: text_page(1),
        3: os.urandom(PAGE),
    }
    for i, p in pages.items():
        dev.write_sync(i * PAGE, p)
    t = dev.table
    assert [t.state_mv[i] for i in range(5)] == [SAME, SAME, STORED, HUGE, EMPTY]
    assert t.handle_mv[1] == int.from_bytes(b"\x5a" * 8, "little")
    for i, p in pages.items():
        assert dev.read_sync(i * PAGE, PAGE) == p
    assert dev.read_sync(0, 5 * PAGE) == b"".join(pages.values()) + bytes(PAGE)


def test_unaligned_rmw(dev: ZramDevice) -> None:
    model = bytearray(dev.size)
    rnd = random.Random(5)
    for _ in range(200):
        off = rnd.randrange(dev.size)
        n = rnd.randint(1, min(3 * PAGE, dev.size - off))
        data = text_page(rnd.getrandbits(16), n) if rnd.random() < 0.7 else os.urandom(n)
        kind = rnd.randrange(3)
        buf: bytes | bytearray | memoryview = (
            data if kind == 0 else bytearray(data) if kind == 1 else memoryview(b"xx" + data)[2:]
        )
        dev.write_sync(off, buf)
        model[off : off + n] = data
    assert dev.read_sync(0, dev.size) == model
    for _ in range(100):
        off = rnd.randrange(dev.size)
        n = rnd.randint(0, dev.size - off)
        assert dev.read_sync(off, n) == model[off : off + n]


def test_trim_whole_pages_only(dev: ZramDevice) -> None:
    data = text_page(9, 4 * PAGE)
    dev.write_sync(0, data)
    dev.trim_sync(100, 3 * PAGE)  # whole page 1 and 2 only ... [100, 12388)
    got = dev.read_sync(0, 4 * PAGE)
    assert got[:PAGE] == data[:PAGE]  # partial head left as is
    assert got[PAGE : 3 * PAGE] == bytes(2 * PAGE)
    assert got[3 * PAGE :] == data[3 * PAGE :]  # partial tail left
    assert dev.stats.notify_free == 2
    assert dev.table.state_mv[1] == EMPTY
    dev.trim_sync(10, 20)  # no whole page: nothing
    assert dev.stats.notify_free == 2
    assert dev.read_sync(0, PAGE) == data[:PAGE]


@pytest.mark.parametrize("punch", [True, False])
def test_write_zeroes(dev: ZramDevice, punch: bool) -> None:
    data = text_page(3, 6 * PAGE)
    dev.write_sync(0, data)
    dev.write_zeroes_sync(1000, 4 * PAGE, punch_hole=punch)
    model = bytearray(data)
    model[1000 : 1000 + 4 * PAGE] = bytes(4 * PAGE)
    assert dev.read_sync(0, 6 * PAGE) == model
    whole = [dev.table.state_mv[i] for i in (1, 2, 3)]
    assert whole == ([EMPTY] * 3 if punch else [SAME] * 3)
    st = dev.stats
    assert st.notify_free == (3 if punch else 0)
    assert st.same_pages == (0 if punch else 3)
    assert st.pages_stored == 6 - (3 if punch else 0)
    # small range inside one page
    dev.write_zeroes_sync(5 * PAGE + 10, 20, punch_hole=punch)
    model[5 * PAGE + 10 : 5 * PAGE + 30] = bytes(20)
    assert dev.read_sync(0, 6 * PAGE) == model
    # both ends partial, crossing one page boundary, no whole page (regression)
    model.extend(bytes(4 * PAGE))
    dev.write_sync(8 * PAGE, b"\x09" * 2 * PAGE)
    dev.write_zeroes_sync(8 * PAGE + 1, PAGE, punch_hole=punch)
    model[8 * PAGE : 10 * PAGE] = b"\x09" + bytes(PAGE) + b"\x09" * (PAGE - 1)
    assert dev.read_sync(0, 10 * PAGE) == model
    # zeroing a whole already-empty range and beyond stays cheap and correct
    dev.write_zeroes_sync(0, dev.size, punch_hole=punch)
    assert dev.read_sync(0, dev.size) == bytes(dev.size)


def test_huge_threshold_default_and_configurable() -> None:
    d = ZramDevice(8 * PAGE)
    assert d.huge_threshold == d.pool.huge_class_size
    d.write_sync(0, os.urandom(PAGE))
    assert d.table.state_mv[0] == HUGE
    d.close()
    d = ZramDevice(8 * PAGE, huge_threshold=100)
    d.write_sync(0, text_page(1))  # compresses to > 100 bytes -> stored raw
    assert d.table.state_mv[0] == HUGE
    assert d.read_sync(0, PAGE) == text_page(1)
    d.close()
    with pytest.raises(ValueError):
        ZramDevice(PAGE, huge_threshold=0)


def test_stats_exact_for_known_workload() -> None:
    d = ZramDevice(64 * PAGE)
    codec = get_codec("lz4")
    comp = [text_page(100 + i) for i in range(5)]
    rnd_pages = [os.urandom(PAGE) for _ in range(3)]
    # 4 zero pages, 2 same-fill, 5 compressible, 3 incompressible
    d.write_sync(0, bytes(4 * PAGE))
    d.write_sync(4 * PAGE, b"\x01\x02\x03\x04\x05\x06\x07\x08" * 1024)
    for i, p in enumerate(comp):
        d.write_sync((6 + i) * PAGE, p)
    d.write_sync(11 * PAGE, b"".join(rnd_pages))
    st = d.stats
    expect_compr = sum(len(codec.compress(p)) for p in comp) + 3 * PAGE
    assert st.orig_data_size == 14 * PAGE
    assert st.same_pages == 6
    assert st.huge_pages == 3 and st.huge_pages_since == 3
    assert st.compr_data_size == expect_compr
    assert st.mem_used_total == d.pool.total_bytes >= expect_compr
    assert st.mem_used_max >= st.mem_used_total
    # overwrite a huge page with a zero page, trim a compressible one
    d.write_sync(11 * PAGE, bytes(PAGE))
    d.trim_sync(6 * PAGE, PAGE)
    st = d.stats
    assert st.huge_pages == 2 and st.huge_pages_since == 3
    assert st.same_pages == 7
    assert st.orig_data_size == 13 * PAGE
    assert st.compr_data_size == expect_compr - PAGE - len(codec.compress(comp[0]))
    assert st.notify_free == 1
    line = st.mm_stat_line().split()
    assert len(line) == 9 and int(line[0]) == 13 * PAGE and int(line[5]) == 7
    assert st.io_stat_line().split() == ["0", "0", "0", "1"]
    assert st.as_dict()["orig_data_size"] == 13 * PAGE
    peak = st.mem_used_max
    d.trim_sync(0, d.size)
    st = d.stats
    assert st.orig_data_size == 0 and st.compr_data_size == 0 and st.same_pages == 0
    assert st.mem_used_max == peak
    d.reset_mem_used_max()
    assert d.stats.mem_used_max == d.pool.total_bytes
    d.close()


def _fill_incompressible(d: ZramDevice, npages: int) -> bytes:
    data = os.urandom(npages * PAGE)
    d.write_sync(0, data)
    return data


@pytest.mark.parametrize("cache", [0, 16])
def test_nospace_changes_nothing(cache: int) -> None:
    d = ZramDevice(256 * PAGE, pool_cache_pages=cache)
    before = text_page(7, 8 * PAGE)
    d.write_sync(0, before)
    d.mem_limit = d.pool.total_bytes + 16 * PAGE  # room for a few huge pages, not 64
    st0 = d.stats.copy()
    with pytest.raises(NoSpace):
        d.write_sync(0, os.urandom(64 * PAGE))
    # the partial stores were rolled back (a warm cache may have been dropped at the limit)
    assert d.pool.total_bytes - d.pool.cached_bytes <= st0.mem_used_total
    if not cache:
        assert d.pool.total_bytes == st0.mem_used_total
    assert d.read_sync(0, 64 * PAGE) == before + bytes(56 * PAGE)
    st1 = d.stats
    assert st1.failed_writes == 1
    assert (st1.compr_data_size, st1.pages_stored, st1.huge_pages) == (
        st0.compr_data_size,
        st0.pages_stored,
        st0.huge_pages,
    )
    # unaligned multi-page write over the old data fails the same way
    with pytest.raises(NoSpace):
        d.write_sync(100, os.urandom(40 * PAGE))
    assert d.read_sync(0, 8 * PAGE) == before
    # same-fill writes need no memory and still succeed at the limit
    d.write_sync(100 * PAGE, bytes(50 * PAGE))
    d.write_sync(0, b"\x07" * PAGE)
    assert d.read_sync(0, PAGE) == b"\x07" * PAGE
    d.close()


async def test_nospace_async_offloaded() -> None:
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(256 * PAGE, executor=ex)
        before = text_page(8, 32 * PAGE)
        await d.write(0, before)
        d.mem_limit = d.pool.total_bytes + 8 * PAGE
        with pytest.raises(NoSpace):
            await d.write(PAGE // 2, os.urandom(2 * OFFLOAD_MIN_PAGES * PAGE))
        assert await d.read(0, 32 * PAGE) == before
        assert d.stats.failed_writes == 1
        assert not d._inflight
        d.mem_limit = 0
        new = os.urandom(2 * OFFLOAD_MIN_PAGES * PAGE)
        await d.write(PAGE // 2, new)
        assert await d.read(PAGE // 2, len(new)) == new
        d.close()


def _corrupt(d: ZramDevice, idx: int) -> None:
    """Replace page idx's pool object by garbage of the same size (a real corrupt blob)."""
    t = d.table
    assert t.state_mv[idx] == STORED
    size = t.size_mv[idx]
    d.pool.free(t.handle_mv[idx])
    t.handle_mv[idx] = d.pool.store(b"\xff" * size)


async def test_corrupt_object_is_eio() -> None:
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(64 * PAGE, executor=ex)
        data = text_page(11, 32 * PAGE)
        await d.write(0, data)
        _corrupt(d, 5)
        with pytest.raises(DeviceIOError):
            d.read_sync(5 * PAGE, PAGE)
        with pytest.raises(DeviceIOError):
            d.read_sync(5 * PAGE + 100, 10)
        with pytest.raises(DeviceIOError):
            await d.read(0, 32 * PAGE)  # offloaded path
        with pytest.raises(DeviceIOError):
            await d.write(5 * PAGE + 1, b"x")  # RMW needs the old page
        assert d.stats.failed_reads == 3  # per failed request, as zram (per bio)
        assert d.stats.failed_writes == 1  # the RMW write could not read its old page
        # other pages still fine; overwriting the whole page heals it
        assert d.read_sync(6 * PAGE, PAGE) == data[6 * PAGE : 7 * PAGE]
        await d.write(5 * PAGE, data[5 * PAGE : 6 * PAGE])
        assert await d.read(0, 32 * PAGE) == data
        d.close()


def test_block_status_states(dev: ZramDevice) -> None:
    dev.write_sync(2 * PAGE, bytes(2 * PAGE))  # SAME zero
    dev.write_sync(4 * PAGE, b"\x01" * PAGE)  # SAME non-zero
    dev.write_sync(5 * PAGE, text_page(1, 2 * PAGE))
    assert dev.block_status(0, 8 * PAGE) == [
        (2 * PAGE, HZ),
        (2 * PAGE, STATE_ZERO),
        (3 * PAGE, 0),
        (PAGE, HZ),
    ]
    # unaligned start/end: exact coverage
    assert dev.block_status(512, 2 * PAGE) == [(2 * PAGE - 512, HZ), (512, STATE_ZERO)]
    assert dev.block_status(4 * PAGE + 1, 1) == [(1, 0)]
    full = dev.block_status(0, dev.size)
    assert sum(n for n, _ in full) == dev.size
    assert full[-1] == (dev.size - 7 * PAGE, HZ)


def test_block_status_vectorised_matches_small_path() -> None:
    d = ZramDevice(300 * PAGE)
    rnd = random.Random(2)
    for i in range(300):
        r = rnd.random()
        if r < 0.3:
            d.write_sync(i * PAGE, bytes(PAGE))
        elif r < 0.5:
            d.write_sync(i * PAGE, text_page(i))
    for _ in range(200):
        off = rnd.randrange(d.size)
        n = rnd.randint(1, d.size - off)
        ext = d.block_status(off, n)
        assert sum(x for x, _ in ext) == n
        assert all(ext[k][1] != ext[k + 1][1] for k in range(len(ext) - 1))
        # compare with a page-by-page expectation
        pos = off
        for length, flags in ext:
            for p in range(pos >> 12, (pos + length - 1 >> 12) + 1):
                st = d.table.state_mv[p]
                exp = (
                    HZ
                    if st == EMPTY
                    else STATE_ZERO
                    if st == SAME and not d.table.handle_mv[p]
                    else 0
                )
                assert exp == flags
            pos += length
    d.close()


def test_block_status_4gib() -> None:
    d = ZramDevice(4 << 30)
    for i in range(0, 1000, 3):
        d.write_sync(i * 977 * PAGE, text_page(i))
    ext = d.block_status(0, d.size)
    assert sum(n for n, _ in ext) == d.size
    assert len(ext) == 2 * 334
    d.close()


def test_block_status_extent_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import zramd.device.blockdev as bd

    monkeypatch.setattr(bd, "MAX_EXTENTS", 5)
    d = ZramDevice(100 * PAGE)
    for i in range(0, 100, 2):
        d.write_sync(i * PAGE, text_page(i))
    ext = d.block_status(0, d.size)
    assert ext == [(PAGE, 0), (PAGE, HZ)] * 2 + [(PAGE, 0)]
    assert MAX_EXTENTS >= 1 << 20
    d.close()


def test_algorithm_switch_keeps_old_pages() -> None:
    d = ZramDevice(16 * PAGE, algorithm="lz4")
    a = text_page(1)
    d.write_sync(0, a)
    d.algorithm = "zstd"
    assert d.algorithm == "zstd"
    b = text_page(2)
    d.write_sync(PAGE, b)
    d.set_algorithm("deflate", level=9)
    c = text_page(3)
    d.write_sync(2 * PAGE, c)
    assert [d.table.codec_mv[i] for i in range(3)] == [0, 1, 2]
    d.algorithm = "lz4"
    assert d.table.codec_mv[0] == 0 and d.codec.name == "lz4"
    assert d.read_sync(0, 3 * PAGE) == a + b + c
    with pytest.raises(ValueError, match="choose one of"):
        d.algorithm = "842"  # a zram algorithm zramd does not have
    d.close()


def test_reset_and_compact() -> None:
    d = ZramDevice(512 * PAGE)
    rnd = random.Random(4)
    for i in range(512):
        d.write_sync(i * PAGE, text_page(rnd.getrandbits(20), rnd.randint(1, PAGE) // 8 * 8))
    held = d.pool.total_bytes
    for i in range(0, 512, 2):
        d.trim_sync(i * PAGE, PAGE)
    freed = d.compact()
    assert freed >= 0
    assert d.pool.total_bytes <= held
    keep = d.read_sync(0, d.size)
    d.compact()
    assert d.read_sync(0, d.size) == keep
    d.reset()
    assert d.read_sync(0, d.size) == bytes(d.size)
    st = d.stats
    assert st.orig_data_size == 0 and st.notify_free == 0 and st.compr_data_size == 0
    d.write_sync(0, text_page(1))
    assert d.read_sync(0, PAGE) == text_page(1)
    d.close()


async def test_async_paths_round_trip() -> None:
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(256 * PAGE, executor=ex, algorithm="zstd")
        big = text_page(5, 100 * PAGE + 300)
        await d.write(1000, memoryview(big))
        assert await d.read(1000, len(big)) == big
        assert await d.read(0, 1000) == bytes(1000)
        await d.trim(0, 200 * PAGE)
        await d.write_zeroes(0, 10, punch_hole=False)
        await d.flush()
        assert await d.read(0, 256 * PAGE) == bytes(256 * PAGE)
        d.close()
    # default executor (None)
    d = ZramDevice(64 * PAGE)
    data = os.urandom(40 * PAGE)
    await d.write(0, data)
    assert await d.read(0, 40 * PAGE) == data
    d.close()


def test_huge_export_works_end_to_end() -> None:
    d = ZramDevice(64 << 30)  # its table costs no RSS: test_table.test_huge_empty_table_is_free
    d.write_sync((64 << 30) - PAGE, text_page(1))
    assert d.read_sync((64 << 30) - PAGE, PAGE) == text_page(1)
    assert d.block_status(0, 1 << 30) == [(1 << 30, HZ)]
    d.trim_sync(0, 64 << 30)  # mkfs-style discard of everything
    assert d.stats.orig_data_size == 0
    d.close()


def test_trim_gives_memory_back() -> None:
    d = ZramDevice(2048 * PAGE)
    rnd = random.Random(9)
    d.write_sync(0, b"".join(text_page(rnd.getrandbits(16)) for _ in range(1024)))
    held = d.stats.mem_used_total
    assert held > 100 * PAGE
    d.trim_sync(0, d.size)
    st = d.stats
    assert st.mem_used_total <= held // 10
    assert st.mem_used_max >= held
    d.close()


def test_shared_budget_and_reset() -> None:
    from zramd.allocator import MemoryBudget

    budget = MemoryBudget(64 * PAGE)
    a = ZramDevice(256 * PAGE, budget=budget, pool_cache_pages=0)
    b = ZramDevice(256 * PAGE, budget=budget, pool_cache_pages=0)
    a.write_sync(0, os.urandom(60 * PAGE))
    with pytest.raises(NoSpace):
        b.write_sync(0, os.urandom(8 * PAGE))
    assert b.read_sync(0, 8 * PAGE) == bytes(8 * PAGE)
    assert b.stats.failed_writes == 1
    a.reset()  # gives its memory back to the shared budget
    b.write_sync(0, os.urandom(8 * PAGE))
    a.close()
    b.close()


def test_vectorised_commit_matches_per_page_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large writes switch table entries with numpy (PageStore.commit's vectorised branch); the
    per-page loop must give the same table, counters and bytes, over old entries of every state."""
    import zramd.device.store as bd

    rnd = random.Random(21)
    kinds = [
        lambda i: text_page(i),
        lambda i: bytes(PAGE),
        lambda i: bytes([i % 256]) * PAGE,
        lambda i: random.Random(i).randbytes(PAGE),
    ]
    ops = []
    for _ in range(40):
        n = rnd.randrange(1, 80)
        off = rnd.randrange(0, 256 - n) * PAGE
        ops.append((off, b"".join(rnd.choice(kinds)(rnd.getrandbits(12)) for _ in range(n))))
    devs = []
    for batch in (bd.BATCH_COMMIT_PAGES, 1 << 30):
        monkeypatch.setattr(bd, "BATCH_COMMIT_PAGES", batch)
        d = ZramDevice(256 * PAGE)
        for i, (off, data) in enumerate(ops):
            if i == 20:
                d.set_algorithm("zstd")  # codec ids 0 and 1 in the table
            d.write_sync(off, data)
            if i % 7 == 3:
                d.trim_sync(off, PAGE * 3)
        devs.append(d)
    a, b = devs
    assert a.read_sync(0, a.size) == b.read_sync(0, b.size)
    assert a.stats == b.stats
    ta, tb = a.table, b.table
    assert bytes(ta.state_mv) == bytes(tb.state_mv)
    assert bytes(ta.size_mv) == bytes(tb.size_mv)
    assert bytes(ta.codec_mv) == bytes(tb.codec_mv)
    same = [i for i in range(256) if ta.state_mv[i] == SAME]
    assert same and [ta.handle_mv[i] for i in same] == [tb.handle_mv[i] for i in same]
    for d in devs:
        d.close()


def test_zero_overwrite_of_filled_pages() -> None:
    """A zero-filled multi-page write over pages that are already zero-filled changes nothing;
    over pages filled with another word, or partly so, it re-fills them with zero."""
    d = ZramDevice(64 * PAGE)
    d.write_sync(0, bytes(40 * PAGE))
    before = d.stats
    d.write_sync(0, bytes(40 * PAGE))
    assert d.stats == before and d.stats.same_pages == 40
    d.write_sync(8 * PAGE, b"\x01" * 16 * PAGE)  # same-filled, word != 0
    d.write_sync(30 * PAGE, text_page(3))
    d.write_sync(0, bytes(40 * PAGE))
    assert d.read_sync(0, 40 * PAGE) == bytes(40 * PAGE)
    st = d.stats
    assert (st.same_pages, st.pages_stored, st.compr_data_size) == (40, 40, 0)
    assert d.block_status(0, 40 * PAGE) == [(40 * PAGE, STATE_ZERO)]
    d.close()


def _one_page_at_the_limit() -> tuple[ZramDevice, bytes]:
    """A device whose pool is exactly full, page 3 a compressed object sharing its zspage with
    pages 0-7 (freeing it first would not make room for a new huge page)."""
    d = ZramDevice(64 * PAGE, pool_cache_pages=0)
    old = text_page(30, 8 * PAGE)
    d.write_sync(0, old)
    assert d.table.state_mv[3] == STORED
    d.mem_limit = d.pool.total_bytes
    return d, old


def _assert_unchanged(d: ZramDevice, old: bytes, st0: object) -> None:
    d.pool.check()
    assert d.read_sync(0, 8 * PAGE) == old
    st = d.stats
    assert st.failed_writes == 1
    st.failed_writes = 0
    assert st == st0


@pytest.mark.parametrize("api", ["write_sync", "write_now", "write"])
async def test_one_page_nospace_changes_nothing(api: str) -> None:
    """A one-page write at the limit (the 1-page commit path) raises NoSpace and leaves the old
    page, the counters and the pool as they were."""
    d, old = _one_page_at_the_limit()
    st0 = d.stats.copy()
    new = os.urandom(PAGE)  # huge: needs a fresh pool page
    with pytest.raises(NoSpace):
        if api == "write_sync":
            d.write_sync(3 * PAGE, new)
        elif api == "write_now":
            d.write_now(3 * PAGE, new)
        else:
            await d.write(3 * PAGE, new)
    _assert_unchanged(d, old, st0)
    d.close()
