"""Hot-path shortcuts: Dispatcher.run_now, ZramDevice.read_now/write_now, the all-zero write
path and large requests split over the codec workers. Each must give exactly what the general
path gives (same replies, same data, same counters)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from zramd.compress import native
from zramd.config import ExportConfig
from zramd.device.blockdev import (
    OFFLOAD_MIN_PAGES,
    SERVER_OFFLOAD_MIN_PAGES,
    SPLIT_MIN_PAGES,
    ZramDevice,
)
from zramd.device.samefill import ZERO_PAGE
from zramd.protocol.events import Request
from zramd.server.dispatch import (
    DF,
    FLUSH,
    FUA,
    OK,
    READ,
    WRITE,
    Dispatcher,
    ErrorReply,
    ReadReply,
    ShutdownFlag,
)
from zramd.server.exports import Export

PAGE = 4096
SIZE = 1 << 20


def _page(i: int) -> bytes:
    """A compressible, non-same-filled page distinct per ``i``."""
    return (i.to_bytes(4, "little") + random.Random(i).randbytes(60)) * 32 + bytes(PAGE - 2048)


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("execute suspended on a request that should run inline")


def _dispatcher(
    dev: ZramDevice, *, read_only: bool = False, structured: bool = True, shutdown: bool = False
) -> Dispatcher:
    flag = ShutdownFlag()
    flag.is_set = shutdown
    return Dispatcher(
        Export(ExportConfig("t", dev.size, read_only=read_only), dev),
        structured=structured,
        max_payload=64 << 20,
        shutdown=flag,
    )


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is ErrorReply:
        return bool(a.errno == b.errno)
    if type(a) is ReadReply:
        return bytes(a.data) == bytes(b.data) and a.zero_extents == b.zero_extents and a.df == b.df
    return a is b


CASES = [
    Request(READ, 0, 1, 0, PAGE),  # data page
    Request(READ, 0, 2, 5 * PAGE, PAGE),  # EMPTY page
    Request(READ, 0, 3, 6 * PAGE, PAGE),  # zero-written page
    Request(READ, FUA, 4, PAGE, PAGE),
    Request(READ, DF, 5, PAGE, PAGE),
    Request(READ, 0, 6, 100, 3000),  # unaligned inside one page
    Request(READ, 0, 7, 0, 3 * PAGE),  # several pages, some zero
    Request(READ, 0, 8, SIZE - PAGE, 2 * PAGE),  # past the end
    Request(READ, 0, 9, 0, 0),  # zero length
    Request(READ, 0x8000, 10, 0, PAGE),  # unknown flag
    Request(WRITE, 0, 11, 2 * PAGE, PAGE, _page(50)),
    Request(WRITE, FUA, 12, 3 * PAGE + 7, 100, b"y" * 100),
    Request(WRITE, 0, 13, SIZE - PAGE, 2 * PAGE, b"z" * 2 * PAGE),  # ENOSPC
    Request(WRITE, 0, 14, 0, 1 << 30, None, True),  # payload dropped
    Request(WRITE, 0, 15, 0, OFFLOAD_MIN_PAGES * PAGE, b"w" * OFFLOAD_MIN_PAGES * PAGE),
    Request(FLUSH, 0, 16, 0, 0),
]


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("variant", ["normal", "read_only", "shutdown"])
def test_run_now_matches_execute(structured: bool, variant: str) -> None:
    """run_now answers exactly as execute does (or defers with None), on twin devices."""

    def fresh() -> tuple[ZramDevice, Dispatcher]:
        dev = ZramDevice(SIZE)
        for i in range(5):
            dev.write_sync(i * PAGE, _page(i))
        dev.write_sync(6 * PAGE, bytes(PAGE))
        d = _dispatcher(
            dev,
            read_only=variant == "read_only",
            structured=structured,
            shutdown=variant == "shutdown",
        )
        return dev, d

    dev_a, fast = fresh()
    dev_b, slow = fresh()
    answered = 0
    for r in CASES:
        got = fast.run_now(r)
        if got is None:
            got = asyncio.run(fast.execute(r))
        else:
            answered += 1
        want = asyncio.run(slow.execute(r))
        assert _same(got, want), (r, got, want)
        assert dev_a.read_sync(0, 16 * PAGE) == dev_b.read_sync(0, 16 * PAGE)
    assert answered >= 8  # the fast path really answers (errors included)


def test_run_now_defers_for_other_devices() -> None:
    from tests.support.devices import PlainDevice

    d = Dispatcher(
        Export(ExportConfig("t", SIZE), PlainDevice(SIZE)), structured=True, max_payload=1 << 20
    )
    assert d.run_now(Request(READ, 0, 1, 0, PAGE)) is None
    assert d.run_now(Request(WRITE, 0, 1, 0, PAGE, b"a" * PAGE)) is None


def test_read_now_zero_flag_and_sizes() -> None:
    dev = ZramDevice(SIZE)
    dev.write_sync(0, _page(1))
    dev.write_sync(PAGE, bytes(PAGE))
    dev.write_sync(2 * PAGE, b"\x01" * PAGE)  # same-filled, not zero
    assert dev.read_now(0, PAGE) == (_page(1), False)
    assert dev.read_now(PAGE, PAGE) == (ZERO_PAGE, True)
    assert dev.read_now(2 * PAGE, PAGE) == (b"\x01" * PAGE, False)
    assert dev.read_now(3 * PAGE, PAGE) == (ZERO_PAGE, True)  # EMPTY
    assert dev.read_now(10, 100) == (_page(1)[10:110], False)
    assert dev.read_now(0, 3 * PAGE) == (_page(1) + bytes(PAGE) + b"\x01" * PAGE, False)
    assert dev.read_now(0, OFFLOAD_MIN_PAGES * PAGE) is None


def test_write_now_defers_when_large_or_overlapping() -> None:
    async def main() -> None:
        dev = ZramDevice(SIZE, executor=ThreadPoolExecutor(2))
        assert not dev.write_now(0, b"a" * OFFLOAD_MIN_PAGES * PAGE)
        assert dev.write_now(0, _page(3))
        big = asyncio.ensure_future(dev.write(PAGE, b"b" * (OFFLOAD_MIN_PAGES * PAGE)))
        await asyncio.sleep(0)  # the big write registers its range and waits for its worker
        assert not dev.write_now(2 * PAGE, b"c" * PAGE)  # overlaps: must wait behind it
        assert dev.write_now(40 * PAGE, b"d" * PAGE)  # disjoint: done at once
        await big
        assert dev.read_sync(0, PAGE) == _page(3)
        assert dev.read_sync(2 * PAGE, PAGE) == b"b" * PAGE
        assert dev.read_sync(40 * PAGE, PAGE) == b"d" * PAGE
        dev.close()

    asyncio.run(main())


def test_large_zero_write_is_same_filled_without_the_pool() -> None:
    async def main() -> None:
        dev = ZramDevice(4 * SIZE, executor=ThreadPoolExecutor(2))
        n = 64
        await dev.write(0, b"".join(_page(i) for i in range(n)))
        assert dev.stats.pages_stored == n and dev.stats.same_pages == 0
        assert dev.pool.obj_count == n
        await dev.write(0, memoryview(bytearray(n * PAGE)))  # all zero, over data
        s = dev.stats
        assert s.pages_stored == n and s.same_pages == n and s.compr_data_size == 0
        assert dev.pool.obj_count == 0
        assert await dev.read(0, n * PAGE) == bytes(n * PAGE)
        # zero except the last byte: not the zero path, stored normally
        data = bytearray(n * PAGE)
        data[-1] = 1
        await dev.write(n * PAGE, data)
        assert await dev.read(n * PAGE, n * PAGE) == bytes(data)
        assert dev.stats.same_pages == 2 * n - 1
        dev.close()

    asyncio.run(main())


@pytest.mark.parametrize("skew", [0, 1000])
def test_split_requests_roundtrip(skew: int) -> None:
    """Writes and reads of >= SPLIT_MIN_PAGES pages (split over the workers) keep every byte,
    aligned or not (head/tail pages read-modify-written)."""

    async def main() -> None:
        dev = ZramDevice(4 * SPLIT_MIN_PAGES * PAGE, executor=ThreadPoolExecutor(2))
        base = bytearray(b"".join(_page(1000 + i) for i in range(3 * SPLIT_MIN_PAGES)))
        await dev.write(0, bytes(base))
        n = 2 * SPLIT_MIN_PAGES * PAGE + 123
        payload = b"".join(_page(i) for i in range(2 * SPLIT_MIN_PAGES + 1))[:n]
        await dev.write(PAGE + skew, payload)
        base[PAGE + skew : PAGE + skew + n] = payload
        assert await dev.read(0, len(base)) == bytes(base)
        assert await dev.read(skew, n) == bytes(base[skew : skew + n])
        assert dev.read_sync(0, len(base)) == bytes(base)
        dev.close()

    asyncio.run(main())


def test_run_now_write_then_execute_read() -> None:
    dev = ZramDevice(SIZE)
    d = _dispatcher(dev)
    assert d.run_now(Request(WRITE, 0, 1, 0, PAGE, memoryview(_page(9)))) is OK
    reply = _drive(d.execute(Request(READ, 0, 2, 0, PAGE)))
    assert type(reply) is ReadReply and bytes(reply.data) == _page(9)


def test_offload_min_pages_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server devices run requests below SERVER_OFFLOAD_MIN_PAGES inline (no await), larger ones
    in the workers; both give the same bytes and counters, zero-filled ones included. (With the
    native extension, large requests go to the workers anyway: tests/unit/test_native.py.)"""
    monkeypatch.setattr(native, "enabled", False)

    async def main() -> None:
        ex = ThreadPoolExecutor(2)
        n = SERVER_OFFLOAD_MIN_PAGES
        devs = [
            ZramDevice(4 * n * PAGE, executor=ex, offload_min_pages=n),
            ZramDevice(4 * n * PAGE, executor=ex),
        ]
        payload = b"".join(_page(i) for i in range(n // 4))  # a quarter: inline on devs[0]
        big = b"".join(_page(i) for i in range(n + 3))[: (n + 2) * PAGE + 5]  # offloaded on both
        for d in devs:
            assert d.write_now(PAGE, payload) is (d is devs[0])
            await d.write(PAGE, payload)
            await d.write(n * PAGE + 77, big)
            await d.write(3 * n * PAGE, bytes(n // 2 * PAGE))  # zero, inline on devs[0]
            got = d.read_now(0, n // 4 * PAGE)
            assert (got is None) is (d is devs[1])
        a, b = devs
        assert await a.read(0, 4 * n * PAGE) == await b.read(0, 4 * n * PAGE)
        assert a.read_sync(PAGE, len(payload)) == payload
        sa, sb = a.stats, b.stats
        assert (sa.pages_stored, sa.same_pages, sa.compr_data_size) == (
            sb.pages_stored,
            sb.same_pages,
            sb.compr_data_size,
        )
        assert sa.same_pages >= n // 2
        with pytest.raises(ValueError):
            ZramDevice(PAGE, offload_min_pages=0)
        for d in devs:
            d.close()
        ex.shutdown()

    asyncio.run(main())


def test_run_now_maps_device_errors() -> None:
    """The fast path maps device errors as execute does: ENOSPC for a one-page write at the
    memory limit, EIO for a read of a corrupted page (both answered inline)."""
    from zramd.device.table import STORED
    from zramd.server.dispatch import EIO, ENOSPC

    dev = ZramDevice(SIZE, pool_cache_pages=0)
    d = _dispatcher(dev)
    for i in range(8):
        dev.write_sync(i * PAGE, _page(i))
    dev.mem_limit = dev.pool.total_bytes
    full = d.run_now(Request(WRITE, 0, 1, 20 * PAGE, PAGE, random.Random(1).randbytes(PAGE)))
    assert type(full) is ErrorReply and full.errno == ENOSPC
    t = dev.table
    assert t.state_mv[3] == STORED
    dev.pool.free(t.handle_mv[3])
    t.handle_mv[3] = dev.pool.store(b"\xff" * t.size_mv[3])
    bad = d.run_now(Request(READ, 0, 2, 3 * PAGE, PAGE))
    assert type(bad) is ErrorReply and bad.errno == EIO
    assert dev.stats.failed_writes == 1 and dev.stats.failed_reads == 1
    dev.close()
