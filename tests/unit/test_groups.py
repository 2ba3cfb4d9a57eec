"""Multi-page groups: the device against a bytearray model with writes, partial overwrites,
trims, write_zeroes, idle marking, grouping (re-packs and dissolves follow from the kills)
interleaved, the counters, the registry and the pool checked after every step; NoSpace while
packing changes nothing; a corrupt group is EIO for exactly its pages."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.compress import Codec, CodecError, native
from zramd.device import DeviceIOError, pipeline
from zramd.device.blockdev import ZramDevice
from zramd.device.groups import GROUP_BYTES, MAX_GROUP_PAGES
from zramd.device.interface import DeviceBase, Unsupported
from zramd.device.table import EMPTY, GROUPED, HUGE, IDLE, SAME, STORED

PAGE = 4096
NPAGES = 48
SIZE = NPAGES * PAGE


def _payload(kind: int, n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == 0:
        return bytes(n)
    if kind == 1:  # same-fill word
        return (rnd.getrandbits(64).to_bytes(8, "little") * (n // 8 + 1))[:n]
    if kind == 2:  # compressible, and alike across pages (what groups win on)
        words = [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(3, 9))) for _ in range(30)]
        out = bytearray()
        while len(out) < n:
            out += rnd.choice(words) + b" "
        return bytes(out[:n])
    return rnd.randbytes(n)  # incompressible


def mark_idle(d: ZramDevice, first: int, last: int) -> None:
    """Mark the pages holding a pool object in ``[first, last]`` IDLE (as ``zramd idle``)."""
    t = d.table
    sl = slice(first, last + 1)
    cand = (t.state[sl] != EMPTY) & (t.state[sl] != SAME)
    t.flags[sl][cand] |= np.uint8(IDLE)


def check(d: ZramDevice) -> None:
    t = d.table
    stt = t.state
    s = d.stats
    g = d._store.groups
    assert s.pages_stored == int((stt != EMPTY).sum())
    assert s.same_pages == int((stt == SAME).sum())
    assert s.huge_pages == int((stt == HUGE).sum())
    pooled = (stt == STORED) | (stt == HUGE)
    assert s.compr_data_size == int(t.size[pooled].sum()) + g.compr_bytes
    assert s.mem_used_total == d.pool.total_bytes <= s.mem_used_max
    assert (s.groups, s.grouped_pages) == (g.count, int((stt == GROUPED).sum()))
    g.check()
    d.pool.check()


@st.composite
def _range(draw: st.DrawFn) -> tuple[int, int]:
    unit = draw(st.sampled_from([PAGE, 512, 1]))
    off = draw(st.integers(0, SIZE // unit - 1)) * unit
    n = draw(st.integers(1, (SIZE - off) // unit)) * unit
    return off, n


_pages = st.tuples(st.integers(0, NPAGES - 1), st.integers(0, NPAGES - 1)).map(sorted)
_op = st.one_of(
    st.tuples(st.just("write"), _range(), st.sampled_from([0, 1, 2, 2, 2, 3]), st.integers(0, 99)),
    st.tuples(st.just("read"), _range()),
    st.tuples(st.just("trim"), _range()),
    st.tuples(st.just("zeroes"), _range(), st.booleans()),
    st.tuples(st.just("idle"), _pages),
    st.tuples(st.just("group"), _pages, st.integers(2, MAX_GROUP_PAGES), st.booleans()),
    st.tuples(st.just("group"), _pages, st.just(MAX_GROUP_PAGES), st.booleans()),
    st.tuples(st.just("tight"), _pages, st.integers(0, 8)),
    st.tuples(st.just("compact")),
)


def _apply_model(model: bytearray, op: tuple) -> None:  # type: ignore[type-arg]
    kind = op[0]
    if kind == "write":
        (off, n), pk, seed = op[1], op[2], op[3]
        model[off : off + n] = _payload(pk, n, seed)
    elif kind == "trim":
        off, n = op[1]
        p0 = (off + PAGE - 1) // PAGE
        p1 = (off + n) // PAGE
        if p1 > p0:
            model[p0 * PAGE : p1 * PAGE] = bytes((p1 - p0) * PAGE)
    elif kind == "zeroes":
        off, n = op[1]
        model[off : off + n] = bytes(n)


def _table_copy(d: ZramDevice) -> tuple[bytes, ...]:
    t = d.table
    return (t.state.tobytes(), t.handle.tobytes(), t.size.tobytes(), t.codec.tobytes())


async def _run(ops: list[tuple], algo: str, use_native: bool, fill: int) -> None:  # type: ignore[type-arg]
    was = native.enabled
    native.enabled = use_native and was
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(
            SIZE,
            algorithm=algo,
            executor=ex,
            offload_min_pages=8,
            native_min_pages=4,
            native_offload_min_pages=12,
        )
        model = bytearray(SIZE)
        try:
            if fill:  # start from compressible data, idle, half of it grouped
                model[:] = b"".join(_payload(2, PAGE, fill * 7 + i % 5) for i in range(NPAGES))
                d.write_sync(0, bytes(model))
                mark_idle(d, 0, NPAGES - 1)
                d.group_sync(0, NPAGES // 2 - 1, group_pages=fill % MAX_GROUP_PAGES + 2 - fill % 2)
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (off, n), pk, seed = op[1], op[2], op[3]
                    await d.write(off, _payload(pk, n, seed))
                elif kind == "read":
                    off, n = op[1]
                    assert bytes(await d.read(off, n)) == model[off : off + n]
                    assert d.read_sync(off, n) == model[off : off + n]
                elif kind == "trim":
                    await d.trim(*op[1])
                elif kind == "zeroes":
                    await d.write_zeroes(*op[1], punch_hole=op[2])
                elif kind == "idle":
                    mark_idle(d, *op[1])
                elif kind == "group":
                    (a, b), gp, use_async = op[1], op[2], op[3]
                    if use_async:
                        r = await d.group(a, b, group_pages=gp)
                    else:
                        r = d.group_sync(a, b, group_pages=gp)
                    assert not r.no_space
                elif kind == "tight":
                    (a, b), room = op[1], op[2]
                    d.pool.drop_cache()
                    d.mem_limit = d.pool.total_bytes + room * PAGE
                    before = _table_copy(d), d.stats.compr_data_size, d.pool.total_bytes
                    r = d.group_sync(a, b)
                    if r.no_space and not r.groups:
                        assert (_table_copy(d), d.stats.compr_data_size) == before[:2]
                        assert d.pool.total_bytes - d.pool.cached_bytes <= before[2]
                    assert d.pool.total_bytes <= d.mem_limit
                    d.mem_limit = 0
                else:
                    d.compact()
                _apply_model(model, op)
                check(d)
            assert bytes(await d.read(0, SIZE)) == model
            assert d.read_sync(0, SIZE) == model
        finally:
            d.close()
            native.enabled = was


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_op, min_size=1, max_size=30),
    st.sampled_from(["lz4", "zstd"]),
    st.booleans(),
    st.integers(0, 20),
)
def test_groups_match_model(ops: list[tuple], algo: str, use_native: bool, fill: int) -> None:  # type: ignore[type-arg]
    asyncio.run(_run(ops, algo, use_native, fill))


def _filled(npages: int = 64, **kw: object) -> tuple[ZramDevice, bytes]:
    d = ZramDevice(npages * PAGE, **kw)  # type: ignore[arg-type]
    data = b"".join(_payload(2, PAGE, i % 7) for i in range(npages))
    d.write_sync(0, data)
    mark_idle(d, 0, npages - 1)
    return d, data


def test_group_packs_and_saves() -> None:
    d, data = _filled()
    before = d.stats.compr_data_size
    r = d.group_sync(0, 63)
    assert (r.pages, r.groups, r.no_space) == (64, 4, False)
    assert r.saved == before - d.stats.compr_data_size > before // 2
    assert d.stats.group_saved_bytes == r.saved and d.stats.groups == 4
    assert (d.table.state[:64] == GROUPED).all()
    assert d.read_sync(0, 64 * PAGE) == data
    check(d)
    # already grouped pages are not packed again; pages not idle are not packed
    assert d.group_sync(0, 63).pages == 0
    d.write_sync(64 * PAGE - PAGE, data[:PAGE])
    assert d.group_sync(0, 63).pages == 0
    assert d._store.groups.nbytes == 64 * GROUP_BYTES
    d.close()


def test_kills_repack_and_dissolve() -> None:
    d, data = _filled(16)
    d.group_sync(0, 15)
    g = d._store.groups
    model = bytearray(data)
    # 8 of 16 dead: at the bound, nothing moves
    for i in range(8):
        d.trim_sync(i * PAGE, PAGE)
        model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    assert g.counts()["dead_pages"] == 8 and g.count == 1
    check(d)
    # the 9th: re-packed as a group of the 7 live pages
    d.write_sync(8 * PAGE, b"\x01" * PAGE)
    model[8 * PAGE : 9 * PAGE] = b"\x01" * PAGE
    assert g.counts() == {
        "groups": 1,
        "grouped_pages": 7,
        "dead_pages": 0,
        "group_bytes": g.compr_bytes,
        "registry_bytes": g.nbytes,
    }
    check(d)
    # kill down to one live page: dissolved into a page of its own
    for i in range(9, 15):
        d.write_zeroes_sync(i * PAGE, PAGE)
        model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    assert g.count == 0 and d.table.state[15] in (STORED, HUGE)
    assert d.read_sync(0, 16 * PAGE) == model
    check(d)
    d.close()


def test_nospace_while_packing_changes_nothing() -> None:
    d, data = _filled(32, pool_cache_pages=0)
    d.mem_limit = d.pool.total_bytes  # no room for the first chunk page
    t0, s0 = _table_copy(d), d.stats.copy()
    r = d.group_sync(0, 31)
    assert r == (0, 0, 0, True)
    assert _table_copy(d) == t0
    s1 = d.stats
    assert (s1.compr_data_size, s1.pages_stored, s1.mem_used_total) == (
        s0.compr_data_size,
        s0.pages_stored,
        s0.mem_used_total,
    )
    assert d.read_sync(0, 32 * PAGE) == data
    check(d)
    d.mem_limit = 0
    mark_idle(d, 0, 31)  # the read made them hot again
    assert d.group_sync(0, 31).groups == 2
    check(d)
    d.close()


def test_repack_without_room_stalls_then_settles() -> None:
    d, data = _filled(16, pool_cache_pages=0)
    d.group_sync(0, 15)
    g = d._store.groups
    d.mem_limit = d.pool.total_bytes
    for i in range(9):  # the 9th kill would re-pack: no room, the group stalls
        d.write_sync(i * PAGE, bytes(PAGE))
    assert g.stalled and g.count == 1
    check(d)
    d.mem_limit = 0
    d.compact()
    assert not g.stalled and g.counts()["dead_pages"] == 0
    assert d.read_sync(0, 16 * PAGE) == bytes(9 * PAGE) + data[9 * PAGE :]
    check(d)
    d.close()


def _corrupt_group(d: ZramDevice, gid: int) -> None:
    """Replace the group's tail chunk by garbage of the same size (a real corrupt blob)."""
    g = d._store.groups
    n = int(g.csize[gid])
    k = (n - 1) // PAGE
    h = int(g.chunks[gid, k])
    size = n - k * PAGE
    d.pool.free(h)
    g.chunks[gid, k] = d.pool.store(b"\xff" * size)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
async def test_corrupt_group_is_eio_for_its_pages_only(use_native: bool) -> None:
    was = native.enabled
    native.enabled = use_native and was
    try:
        with ThreadPoolExecutor(2) as ex:
            d, data = _filled(48, executor=ex, native_offload_min_pages=16)
            d.group_sync(0, 47)
            gid = int(d.table.handle[16])
            assert (d.table.handle[16:32] == gid).all()
            d._store.groups._cache.clear()
            _corrupt_group(d, gid)
            for p in range(16, 32):
                with pytest.raises(DeviceIOError):
                    d.read_sync(p * PAGE, PAGE)
            with pytest.raises(DeviceIOError):
                await d.read(0, 48 * PAGE)  # offloaded
            with pytest.raises(DeviceIOError):
                d.read_sync(10 * PAGE, 10 * PAGE)  # inline, across the edge
            with pytest.raises(DeviceIOError):
                d.write_sync(20 * PAGE + 1, b"x")  # RMW needs the old page
            assert d.read_sync(0, 16 * PAGE) == data[: 16 * PAGE]
            assert bytes(await d.read(32 * PAGE, 16 * PAGE)) == data[32 * PAGE :]
            # killing pages of the corrupt group: its re-pack cannot decode, it stalls
            for p in range(16, 25):
                d.write_sync(p * PAGE, data[p * PAGE : (p + 1) * PAGE])
            assert gid in d._store.groups.stalled
            check(d)
            for p in range(25, 32):
                with pytest.raises(DeviceIOError):
                    d.read_sync(p * PAGE, PAGE)
            # overwriting every page heals it (the group goes with its last page)
            await d.write(16 * PAGE, data[16 * PAGE : 32 * PAGE])
            assert bytes(await d.read(0, 48 * PAGE)) == data
            assert d._store.groups.count == 2
            check(d)
            d.close()
    finally:
        native.enabled = was


def test_sequential_read_decodes_each_group_once(monkeypatch: pytest.MonkeyPatch) -> None:
    d, data = _filled(64)
    d.group_sync(0, 63)
    d._store.groups._cache.clear()
    calls = []
    real = pipeline.decode_group

    def counting(codec: Codec, blob: bytes, size: int) -> bytes:
        calls.append(size)
        return real(codec, blob, size)

    monkeypatch.setattr(pipeline, "decode_group", counting)
    for p in range(64):
        assert d.read_sync(p * PAGE, PAGE) == data[p * PAGE : (p + 1) * PAGE]
    assert calls == [16 * PAGE] * 4
    d.close()


def test_block_status_reset_and_settings() -> None:
    d, data = _filled(32)
    d.write_zeroes_sync(8 * PAGE, PAGE, punch_hole=False)
    mark_idle(d, 0, 31)
    d.group_sync(0, 31, group_pages=8, algorithm="zstd", level=9)
    assert d.block_status(0, 32 * PAGE) == [(8 * PAGE, 0), (PAGE, 2), (23 * PAGE, 0)]
    with pytest.raises(ValueError):
        d.group_sync(0, 31, group_pages=17)
    with pytest.raises(ValueError):
        ZramDevice(PAGE, group_pages=1)
    d.reset()
    assert d._store.groups.count == 0 and d.read_sync(0, 32 * PAGE) == bytes(32 * PAGE)
    check(d)
    d.close()


async def test_contract_group() -> None:
    with pytest.raises(Unsupported):
        await DeviceBase().group(0, 0)
    with ThreadPoolExecutor(2) as ex:
        d, data = _filled(600, executor=ex)
        r = await d.group(0, 599)
        assert r.pages == 600 and r.groups == 38  # windows of 16 pages, the last one 8
        assert bytes(await d.read(0, 600 * PAGE)) == data
        assert not d._inflight
        check(d)
        d.close()


def test_group_image_decoded_by_two_threads_at_once() -> None:
    """Split reads decode one image in two workers: neither may see the blob dropped before
    the pages are set."""
    import threading

    from zramd.compress import get_codec
    from zramd.device.pipeline import GroupImage

    codec = get_codec("zstd", level=1)
    pages = b"".join(_payload(2, PAGE, i) for i in range(16))
    blob = codec.compress(pages)
    for _ in range(200):
        img = GroupImage(codec, blob, len(pages))
        start = threading.Barrier(2)
        got: list[bytes] = []

        def decode(
            img: GroupImage = img, start: threading.Barrier = start, got: list[bytes] = got
        ) -> None:
            start.wait()
            got.append(img.pages())

        threads = [threading.Thread(target=decode) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert got == [pages, pages]


@pytest.mark.parametrize("use_native", [True, False])
def test_group_decode_in_c_matches_the_codec(use_native: bool) -> None:
    was = native.enabled
    native.enabled = use_native and native.BUILT
    try:
        d, data = _filled(64)
        d.group_sync(0, 63)
        g = d._store.groups
        for gid in range(4):
            g._cache.clear()
            img = g.image(gid)
            blob = img.blob
            assert blob is not None and img.data is None
            assert len(blob) == g.csize[gid] > PAGE  # the blob's chunks, joined
            codec = img.codec
            joined = codec.decompress(blob, img.size)
            out = bytearray(img.size)
            img.decode_into(memoryview(out))  # straight from the blob, nothing kept
            assert out == joined and img.data is None and img.blob is blob
            with pytest.raises(CodecError):  # a destination of another size does not decode
                pipeline.decode_group_into(codec, blob, memoryview(bytearray(img.size - 1)))
            assert img.pages() == joined == data[gid * 16 * PAGE : (gid + 1) * 16 * PAGE]
            assert img.blob is None
            out[:] = bytes(img.size)
            img.decode_into(memoryview(out))  # decoded already: copied
            assert out == joined
        _corrupt_group(d, 0)
        g._cache.clear()
        with pytest.raises(CodecError):
            g.image(0).decode_into(memoryview(bytearray(16 * PAGE)))
        d.close()
    finally:
        native.enabled = was


async def test_cold_group_read_through_the_async_path() -> None:
    """A 4 KiB read of a grouped page whose group is not cached, through the server's door and
    the async path: decoded once, the group cached after; a corrupt one is EIO there too."""
    with ThreadPoolExecutor(2) as ex:
        d, data = _filled(64, executor=ex)
        d.group_sync(0, 63)
        g = d._store.groups
        g._cache.clear()
        off = 21 * PAGE
        got = d.read_with_zeros_now(off, PAGE)
        assert got is not None and bytes(got[0]) == data[off : off + PAGE]
        assert list(g._cache) == [1] and g._cache[1].data is not None
        g._cache.clear()
        assert bytes(await d.read(off + 100, 10)) == data[off + 100 : off + 110]
        g._cache.clear()
        _corrupt_group(d, 0)
        with pytest.raises(DeviceIOError):
            await d.read(0, PAGE)
        with pytest.raises(DeviceIOError):
            await d.read(0, 64 * PAGE)
        assert bytes(await d.read(off, 2 * PAGE)) == data[off : off + 2 * PAGE]
        check(d)
        d.close()


async def test_group_compacts_in_slices_and_reports_its_holds() -> None:
    """The compaction after packing runs COMPACT_SLICE_PAGES at a time with other tasks running
    between the slices, to the end (nothing left to win); ``on_hold`` hears every stretch: the
    members copied out and the groups installed per step, and each compaction slice; ``pace``
    is awaited between the steps and between the slices."""
    from zramd.device.blockdev import COMPACT_SLICE_PAGES, GROUP_STEP_PAGES

    npages = 8192
    d = ZramDevice(npages * PAGE)
    data = b"".join(_payload(2, PAGE, i % 97) for i in range(npages))
    d.write_sync(0, data)
    for w in range(0, npages, 32):  # every other window: the zspages are left half full
        mark_idle(d, w, w + 15)
    pool = d._store.pool
    pool.auto_compact = False
    calls: list[int] = []
    real = pool.compact

    def sliced(*, max_pages: int = 0) -> int:
        assert max_pages == COMPACT_SLICE_PAGES
        n = real(max_pages=max_pages)
        calls.append(n)
        return n

    pool.compact = sliced  # type: ignore[method-assign]
    seen: list[int] = []
    stop = False

    async def other() -> None:
        while not stop:
            seen.append(len(calls))
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    holds: list[float] = []
    paced = 0

    async def pace() -> None:
        nonlocal paced
        paced += 1
        await asyncio.sleep(0)

    res = await d.group(0, npages - 1, on_hold=holds.append, pace=pace)
    stop = True
    await task
    assert res.groups == npages // 32
    assert len(calls) > 2 and calls[-1] < COMPACT_SLICE_PAGES <= min(calls[:-1])
    assert set(range(1, len(calls))) <= set(seen)  # the loop ran between the slices
    assert pool.compactable_pages() == 0
    assert len(holds) == 1 + 2 * (npages // GROUP_STEP_PAGES) + len(calls)
    assert paced == npages // GROUP_STEP_PAGES - 1 + len(calls) - 1  # between steps and slices
    assert d.read_sync(0, npages * PAGE) == data
    check(d)
    d.close()


async def test_group_stops_its_compaction_when_the_device_is_reset_meanwhile() -> None:
    """A reset between two compaction slices (the caller's ``pace`` ran it): the call returns
    what it packed, compacts the old store no more, and the device works on."""
    from zramd.device.blockdev import GROUP_STEP_PAGES

    npages = 8192
    d = ZramDevice(npages * PAGE)
    d.write_sync(0, b"".join(_payload(2, PAGE, i % 97) for i in range(npages)))
    for w in range(0, npages, 32):
        mark_idle(d, w, w + 15)
    old = d._store.pool
    old.auto_compact = False
    steps = npages // GROUP_STEP_PAGES
    paced = 0
    after_reset: list[int] = []
    real = old.compact

    def compact(*, max_pages: int = 0) -> int:
        if d._store.pool is not old:
            after_reset.append(max_pages)
        return real(max_pages=max_pages)

    old.compact = compact  # type: ignore[method-assign]

    async def pace() -> None:
        nonlocal paced
        paced += 1
        if paced == steps:  # the first pause between compaction slices
            d.reset()

    res = await d.group(0, npages - 1, pace=pace)
    assert res.groups == npages // 32 and paced == steps
    assert after_reset == []  # the old store's pool was not compacted after the reset
    assert d.read_sync(0, npages * PAGE) == bytes(npages * PAGE)
    d.write_sync(0, b"x" * PAGE)
    assert d.read_sync(0, PAGE) == b"x" * PAGE
    check(d)
    d.close()


@pytest.mark.parametrize("algorithm", ["zstd", "lz4hc", ""])
async def test_a_1m_read_of_groups_runs_in_one_part(algorithm: str) -> None:
    """A 1 MiB read of zstd or lz4hc groups, or of pages compressed one by one (""), is one
    call in the workers (below SPLIT_MIN_PAGES): a part's whole groups decode in one C call, so
    a second part only adds a hop."""
    from zramd.device.blockdev import SPLIT_MIN_PAGES

    npages = 256
    assert npages < SPLIT_MIN_PAGES
    with ThreadPoolExecutor(2) as ex:
        d, data = _filled(npages, executor=ex)
        if algorithm:
            d.group_sync(0, npages - 1, algorithm=algorithm)
            d._store.groups._cache.clear()
        calls: list[tuple[int, int]] = []
        real = d._run_in_executor

        def counted(fn: object, *args: object) -> asyncio.Future[object]:
            calls.append((args[0], args[1]))  # type: ignore[arg-type]
            return real(fn, *args)  # type: ignore[arg-type]

        d._run_in_executor = counted  # type: ignore[method-assign]
        assert bytes(await d.read(0, npages * PAGE)) == data
        assert calls == [(0, npages)]
        d.close()


@pytest.mark.parametrize("use_native", [True, False])
async def test_split_read_over_group_runs(use_native: bool) -> None:
    """A read large enough to be split between two workers (SPLIT_MIN_PAGES) whose cut falls
    inside a run of group members, over groups with dead pages (runs broken), a group cached
    (decoded) and not: the same bytes as the model, on the C path and the Python one."""
    from zramd.device.blockdev import SPLIT_MIN_PAGES, SPLIT_PARTS

    was = native.enabled
    native.enabled = use_native and was
    npages = 2 * SPLIT_MIN_PAGES + 40  # cut at 552: inside group 34 (pages 544-559)
    assert (npages // SPLIT_PARTS) % 16 not in (0, 15)
    try:
        with ThreadPoolExecutor(2) as ex:
            d, data = _filled(npages, executor=ex)
            model = bytearray(data)
            d.group_sync(0, npages - 1)
            for p in (5, 550, 553, 1000):  # dead members: runs end and start again
                page = _payload(3, PAGE, p)
                await d.write(p * PAGE, page)
                model[p * PAGE : (p + 1) * PAGE] = page
            d._store.groups._cache.clear()
            assert d.read_sync(540 * PAGE, PAGE) == model[540 * PAGE : 541 * PAGE]  # cached
            assert bytes(await d.read(0, npages * PAGE)) == model
            assert bytes(await d.read(3 * PAGE + 7, (npages - 5) * PAGE)) == bytes(
                model[3 * PAGE + 7 : (npages - 2) * PAGE + 7]
            )
            assert d.read_sync(0, npages * PAGE) == model
            check(d)
            d.close()
    finally:
        native.enabled = was
