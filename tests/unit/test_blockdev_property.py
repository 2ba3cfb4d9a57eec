"""Property tests: random op sequences at any alignment read back as a bytearray model would;
concurrent overlapping async requests never tear a page or lose an acknowledged write."""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.device.blockdev import OFFLOAD_MIN_PAGES, ZramDevice
from zramd.device.table import EMPTY, HUGE, SAME, STORED

PAGE = 4096
NPAGES = 40  # > 2 * OFFLOAD_MIN_PAGES so async ops exercise the worker-thread path
SIZE = NPAGES * PAGE


def _payload(kind: int, n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == 0:
        return bytes(n)
    if kind == 1:  # same-fill word
        return (rnd.getrandbits(64).to_bytes(8, "little") * (n // 8 + 1))[:n]
    if kind == 2:  # compressible
        chunk = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64)))
        return (chunk * (n // len(chunk) + 1))[:n]
    return rnd.randbytes(n)  # incompressible


@st.composite
def _range(draw: st.DrawFn) -> tuple[int, int]:
    aligned = draw(st.sampled_from(["page", "sector", "byte"]))
    unit = {"page": PAGE, "sector": 512, "byte": 1}[aligned]
    off = draw(st.integers(0, SIZE // unit - 1)) * unit
    n = draw(st.integers(1, (SIZE - off) // unit)) * unit
    return off, n


_op = st.one_of(
    st.tuples(st.just("write"), _range(), st.integers(0, 3), st.integers(0, 2**32)),
    st.tuples(st.just("read"), _range()),
    st.tuples(st.just("trim"), _range()),
    st.tuples(st.just("zeroes"), _range(), st.booleans()),
    st.tuples(st.just("compact")),
)


def _check_accounting(d: ZramDevice) -> None:
    t = d.table
    stt = t.state
    s = d.stats
    assert s.pages_stored == int((stt != EMPTY).sum())
    assert s.same_pages == int((stt == SAME).sum())
    assert s.huge_pages == int((stt == HUGE).sum())
    pooled = stt >= STORED
    assert s.compr_data_size == int(t.size[pooled].sum())
    assert s.mem_used_total == d.pool.total_bytes


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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, min_size=1, max_size=25), st.sampled_from(["lz4", "zstd", "deflate"]))
def test_sync_ops_match_model(ops: list[tuple], algo: str) -> None:  # type: ignore[type-arg]
    d = ZramDevice(SIZE, algorithm=algo)
    model = bytearray(SIZE)
    try:
        for op in ops:
            kind = op[0]
            if kind == "write":
                (off, n), pk, seed = op[1], op[2], op[3]
                d.write_sync(off, _payload(pk, n, seed))
            elif kind == "read":
                off, n = op[1]
                assert d.read_sync(off, n) == model[off : off + n]
            elif kind == "trim":
                d.trim_sync(*op[1])
            elif kind == "zeroes":
                d.write_zeroes_sync(*op[1], punch_hole=op[2])
            else:
                d.compact()
            _apply_model(model, op)
        assert d.read_sync(0, SIZE) == model
        _check_accounting(d)
    finally:
        d.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, min_size=1, max_size=15))
def test_async_ops_sequential_match_model(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    async def run() -> None:
        with ThreadPoolExecutor(2) as ex:
            d = ZramDevice(SIZE, executor=ex)
            model = bytearray(SIZE)
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (off, n), pk, seed = op[1], op[2], op[3]
                    await d.write(off, _payload(pk, n, seed))
                elif kind == "read":
                    off, n = op[1]
                    assert await d.read(off, n) == model[off : off + n]
                elif kind == "trim":
                    await d.trim(*op[1])
                elif kind == "zeroes":
                    await d.write_zeroes(*op[1], punch_hole=op[2])
                else:
                    d.compact()
                _apply_model(model, op)
            assert await d.read(0, SIZE) == model
            _check_accounting(d)
            d.close()

    asyncio.run(run())


def _writer_page(writer: int, page: int) -> bytes:
    """A page content unique to (writer, page), half compressible so both paths run."""
    head = f"writer {writer:04d} page {page:05d} ".encode()
    body = random.Random(writer * 100003 + page).randbytes(PAGE // 2)
    return (head * (PAGE // 2 // len(head) + 1))[: PAGE // 2] + body


async def test_concurrent_overlapping_writes_no_torn_pages() -> None:
    npages = 96
    rnd = random.Random(12)
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(npages * PAGE, executor=ex)
        writers: list[tuple[int, int]] = []  # (first page, n pages)
        for _ in range(60):
            n = rnd.choice([1, 2, OFFLOAD_MIN_PAGES, 40])
            writers.append((rnd.randrange(npages - n + 1), n))

        async def do_write(w: int) -> None:
            first, n = writers[w]
            data = b"".join(_writer_page(w, p) for p in range(first, first + n))
            await d.write(first * PAGE, data)

        async def do_read() -> None:
            first = rnd.randrange(npages - 30)
            got = await d.read(first * PAGE, 30 * PAGE)
            for i in range(30):
                page = bytes(got[i * PAGE : (i + 1) * PAGE])
                p = first + i
                valid = {bytes(PAGE)} | {
                    _writer_page(w, p) for w, (f, n) in enumerate(writers) if f <= p < f + n
                }
                assert page in valid, f"torn page {p} in a concurrent read"

        tasks = [do_write(w) for w in range(len(writers))] + [do_read() for _ in range(10)]
        rnd.shuffle(tasks)
        await asyncio.gather(*tasks)
        final = d.read_sync(0, npages * PAGE)
        for p in range(npages):
            page = bytes(final[p * PAGE : (p + 1) * PAGE])
            covering = [w for w, (f, n) in enumerate(writers) if f <= p < f + n]
            valid = {_writer_page(w, p) for w in covering} or {bytes(PAGE)}
            assert page in valid, f"page {p} is no writer's content"
        _check_accounting(d)
        d.close()


async def test_overlapping_requests_keep_arrival_order() -> None:
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(128 * PAGE, executor=ex)
        big = os.urandom(64 * PAGE)  # offloaded: in flight across an await
        small = b"S" * 100
        tail = os.urandom(PAGE)
        t_big = asyncio.ensure_future(d.write(0, big))
        await asyncio.sleep(0)  # big has registered its range and is compressing in a thread
        assert d._inflight
        t_small = asyncio.ensure_future(d.write(10 * PAGE + 5, small))  # overlaps: must wait
        t_zero = asyncio.ensure_future(d.write_zeroes(20 * PAGE, PAGE))  # overlaps: must wait
        t_trim = asyncio.ensure_future(d.trim(30 * PAGE, PAGE))
        await d.write(100 * PAGE, tail)  # no overlap: completes at once, inline
        assert not t_big.done()
        assert d.read_sync(100 * PAGE, PAGE) == tail
        await asyncio.gather(t_big, t_small, t_zero, t_trim)
        expect = bytearray(big)
        expect[10 * PAGE + 5 : 10 * PAGE + 105] = small
        expect[20 * PAGE : 21 * PAGE] = bytes(PAGE)
        expect[30 * PAGE : 31 * PAGE] = bytes(PAGE)
        assert d.read_sync(0, 64 * PAGE) == expect
        assert d.read_sync(100 * PAGE, PAGE) == tail  # the acknowledged later write survived
        assert not d._inflight
        d.close()


async def test_many_unaligned_overlapping_rmw_writers() -> None:
    """Sub-page writers to the same pages must not lose each other's bytes (RMW races)."""
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(64 * PAGE, executor=ex)
        rnd = random.Random(3)
        # disjoint byte ranges that share pages: big unaligned ones (offloaded, their edge
        # pages read-modify-written across an await) and tiny ones on the shared edge pages
        cuts: set[int] = set()
        for big_start in range(0, 64 * PAGE, 20 * PAGE):
            a = big_start + rnd.randrange(1, PAGE)
            cuts.add(a)
            cuts.add(min(a + 18 * PAGE, 64 * PAGE - 1))
            for _ in range(4):
                cuts.add(a - rnd.randrange(1, 200))
                cuts.add(a + 18 * PAGE + rnd.randrange(1, 200))
        bounds = [0, *sorted(c for c in cuts if 0 < c < 64 * PAGE), 64 * PAGE]
        chunks = [
            (bounds[i], rnd.randbytes(bounds[i + 1] - bounds[i])) for i in range(len(bounds) - 1)
        ]
        rnd.shuffle(chunks)
        await asyncio.gather(*(d.write(off, data) for off, data in chunks))
        expect = bytearray(64 * PAGE)
        for off, data in chunks:
            expect[off : off + len(data)] = data
        assert await d.read(0, 64 * PAGE) == expect
        d.close()


async def test_compaction_and_frees_during_offloaded_read() -> None:
    """An offloaded read decompresses bytes copied on the loop thread: pages freed, rewritten
    and compacted while it runs do not change what it returns."""
    with ThreadPoolExecutor(1) as ex:
        d = ZramDevice(256 * PAGE, executor=ex)
        before = b"".join(_writer_page(1, p) for p in range(256))
        d.write_sync(0, before)
        for _ in range(5):
            t_read = asyncio.ensure_future(d.read(0, 256 * PAGE))
            await asyncio.sleep(0)  # snapshot taken, decompression running in the worker
            d.trim_sync(0, 128 * PAGE)
            d.compact()
            d.write_sync(PAGE, os.urandom(PAGE))
            assert await t_read == before
            d.write_sync(0, before)
        d.close()
