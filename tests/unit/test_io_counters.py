"""Per-export request counters (issue 14 item 12): stats.IoStats in the block layer's layout,
counted by dispatch on the fast path and the awaited one, shown by ``zramd stat`` and
``list --json``; ``invalid_io`` counts requests refused for their range."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devices import PlainDevice
from tests.unit.test_cli import LoopThread, cli
from zramd.config import ExportConfig
from zramd.control.server import ControlServer
from zramd.protocol.events import Request
from zramd.protocol.wire import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
)
from zramd.server.dispatch import OK, Dispatcher, ErrorReply
from zramd.server.exports import ExportRegistry
from zramd.stats import BLOCK_STAT_FIELDS, IoStats

PAGE = 4096
SIZE = 1 << 20


def rq(cmd: int, offset: int = 0, length: int = PAGE, flags: int = 0) -> Request:
    data = bytes(length) if cmd == CMD_WRITE else None
    return Request(cmd, flags, 1, offset, length, data)


@pytest.fixture
def registry() -> Iterator[ExportRegistry]:
    reg = ExportRegistry()
    yield reg
    reg.close()


def test_block_stat_is_the_kernels_layout() -> None:
    assert BLOCK_STAT_FIELDS == (
        "read_ios", "read_merges", "read_sectors", "read_ticks",
        "write_ios", "write_merges", "write_sectors", "write_ticks",
        "in_flight", "io_ticks", "time_in_queue",
        "discard_ios", "discard_merges", "discard_sectors", "discard_ticks",
        "flush_ios", "flush_ticks",
    )  # fmt: skip
    io = IoStats()
    ms = 1_000_000
    io.done(CMD_READ, 8 * PAGE, 2 * ms)
    io.done(CMD_WRITE, PAGE, 3 * ms)
    io.done(CMD_WRITE_ZEROES, 2 * PAGE, 4 * ms)  # a write, as the kernel accounts it
    io.done(CMD_TRIM, SIZE, 5 * ms)
    io.done(CMD_FLUSH, 0, 6 * ms)
    io.done(CMD_CACHE, PAGE, 7 * ms)  # moves no data: only under its own name
    io.busy_ns = 20 * ms
    st = io.block_stat()
    assert list(st) == list(BLOCK_STAT_FIELDS)
    assert (st["read_ios"], st["read_sectors"], st["read_ticks"]) == (1, 64, 2)
    assert (st["write_ios"], st["write_sectors"], st["write_ticks"]) == (2, 24, 7)
    assert (st["discard_ios"], st["discard_sectors"], st["discard_ticks"]) == (1, 2048, 5)
    assert (st["flush_ios"], st["flush_ticks"]) == (1, 6)
    assert st["read_merges"] == st["write_merges"] == st["discard_merges"] == 0
    assert (st["in_flight"], st["io_ticks"], st["time_in_queue"]) == (0, 20, 27)
    assert io.block_stat_line().split() == [str(v) for v in st.values()]
    cmds = io.commands()
    assert cmds["cache"] == {"requests": 1, "bytes": PAGE, "time_us": 7000}
    assert cmds["write_zeroes"]["requests"] == 1 and cmds["block_status"]["requests"] == 0


def test_latency_histogram_buckets_are_cumulative() -> None:
    io = IoStats()
    for ns in (500, 1500, 1500, 3000, 10**10):
        io.done(CMD_READ, PAGE, ns)
    b = io.buckets(CMD_READ)
    # bounds 1.024 us, 2.048 us, 4.096 us, ...; 10 s is past the last shown bound (4.3 s)
    assert b[:3] == [1, 3, 4] and b[-2] == 4 and b[-1] == 5
    assert io.requests(CMD_READ) == 5 and io.requests(CMD_WRITE) == 0


async def test_fast_path_and_awaited_requests_are_counted_once(registry: ExportRegistry) -> None:
    exp = registry.add(ExportConfig("z", SIZE))
    d = Dispatcher(exp, structured=True, max_payload=SIZE)
    io = exp.io
    assert d.run_now(rq(CMD_WRITE)) is OK
    assert d.run_now(rq(CMD_READ)) is not None
    assert io.requests(CMD_WRITE) == 1 and io.requests(CMD_READ) == 1
    assert d.run_now(rq(CMD_TRIM)) is None  # not a fast-path command: nothing counted
    assert await d.execute(rq(CMD_TRIM, 0, SIZE)) is OK
    assert await d.execute(rq(CMD_WRITE_ZEROES, 0, 2 * PAGE)) is OK
    assert await d.execute(rq(CMD_FLUSH, 0, 0)) is OK
    assert await d.execute(rq(CMD_BLOCK_STATUS, 0, SIZE)) is not None
    assert await d.execute(rq(CMD_READ, 0, 64 * PAGE)) is not None
    assert [io.requests(c) for c in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_FLUSH)] == [2, 1, 1, 1]
    assert io.bytes[CMD_READ] == 65 * PAGE and io.bytes[CMD_TRIM] == SIZE
    st = io.block_stat()
    assert st["write_ios"] == 2 and st["write_sectors"] == 3 * PAGE // 512
    assert st["in_flight"] == 0 and io.busy_ns > 0
    # a second connection to the export counts into the same IoStats
    d2 = Dispatcher(exp, structured=False, max_payload=SIZE)
    assert d2.io is io


class GatedDevice(PlainDevice):
    """Writes wait for ``gate``: a request stays in flight until the test opens it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.gate.wait()
        await super().write(offset, data)


async def test_in_flight_and_io_ticks(registry: ExportRegistry) -> None:
    dev = GatedDevice(SIZE)
    exp = registry.add(ExportConfig("g", SIZE), device=dev)
    d = Dispatcher(exp, structured=True, max_payload=SIZE)
    io = exp.io
    tasks = [asyncio.create_task(d.execute(rq(CMD_WRITE, i * PAGE))) for i in range(3)]
    await asyncio.sleep(0.02)
    assert io.in_flight == 3 and io.block_stat()["in_flight"] == 3
    busy = io.io_ticks_ns()
    assert busy >= 15_000_000  # the current busy stretch counts while it lasts
    assert io.requests(CMD_WRITE) == 0
    dev.gate.set()
    assert await asyncio.gather(*tasks) == [OK, OK, OK]
    assert io.in_flight == 0 and io.requests(CMD_WRITE) == 3
    assert io.io_ticks_ns() >= busy and io.io_ticks_ns() == io.busy_ns
    assert io.block_stat()["write_ticks"] >= 3 * 15  # each request waited the whole time


async def test_invalid_io_counts_requests_refused_for_their_range(
    tmp_path: Path, registry: ExportRegistry
) -> None:
    exp = registry.add(ExportConfig("v", SIZE))
    ro = registry.add(ExportConfig("ro", SIZE, read_only=True))
    d = Dispatcher(exp, structured=True, max_payload=SIZE)
    bad = [
        rq(CMD_READ, SIZE - 512, 1024),  # past the end
        rq(CMD_WRITE, SIZE, PAGE),  # past the end (ENOSPC)
        rq(CMD_TRIM, 0, 0),  # zero length
        rq(CMD_FLUSH, 0, PAGE),  # FLUSH with a range
    ]
    for r in bad:
        assert isinstance(d.run_now(r) or await d.execute(r), ErrorReply)
    other = [rq(9), rq(CMD_READ, 0, PAGE, flags=1 << 12), rq(CMD_READ, 0, 2 * SIZE)]
    for r in other:  # unknown command, bad flag, past the end AND oversized: 1 more
        assert isinstance(await d.execute(r), ErrorReply)
    dro = Dispatcher(ro, structured=True, max_payload=SIZE)
    assert isinstance(await dro.execute(rq(CMD_WRITE)), ErrorReply)  # EPERM: range is fine
    srv = ControlServer(registry, str(tmp_path / "c.sock"))
    st = await srv.handle({"op": "stat", "name": "v"})
    assert st["io_stat"]["invalid_io"] == len(bad) + 1
    assert st["stat"]["read_ios"] == 0  # refused requests never reached the device
    assert (await srv.handle({"op": "stat", "name": "ro"}))["io_stat"]["invalid_io"] == 0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[LoopThread, str]]:
    path = str(tmp_path / "c.sock")
    lt = LoopThread(path)
    yield lt, path
    lt.stop()


def test_cli_stat_and_list_json_show_the_counters(daemon: tuple[LoopThread, str]) -> None:
    lt, path = daemon
    c = ("--control", path)
    assert cli("create", "z", "--size", "1M", *c).exit_code == 0
    exp = lt.registry.get("z")

    async def traffic() -> None:
        d = Dispatcher(exp, structured=False, max_payload=SIZE)
        assert d.run_now(rq(CMD_WRITE, 0, 2 * PAGE)) is OK
        await d.execute(rq(CMD_READ, 0, PAGE))
        await d.execute(rq(CMD_TRIM, 0, SIZE))
        await d.execute(rq(CMD_READ, SIZE, PAGE))  # invalid

    lt.run(traffic())
    r = cli("stat", "z", *c)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    stat_line = next(line for line in lines if line.startswith("stat: "))
    fields = [int(x) for x in stat_line.split()[1:]]
    assert len(fields) == 17
    st = dict(zip(BLOCK_STAT_FIELDS, fields, strict=True))
    assert (st["read_ios"], st["read_sectors"], st["write_ios"], st["write_sectors"]) == (
        1, 8, 1, 16,
    )  # fmt: skip
    assert (st["discard_ios"], st["discard_sectors"]) == (1, SIZE // 512)
    assert ["read_ios", "1"] in [line.split() for line in lines]
    assert any(line.startswith("  read          1 requests, 4096 bytes, ") for line in lines)
    assert "io_stat: 0 0 1 256" in lines  # invalid_io; 256 pages freed by the trim
    r = cli("stat", "z", "--json", *c)
    js = json.loads(r.stdout)
    assert js["stat"] == st and js["requests"]["write"]["bytes"] == 2 * PAGE
    r = cli("list", "--json", "-o", "name", *c)
    (row,) = json.loads(r.stdout)["exports"]
    assert row["name"] == "z" and row["stat"]["read_ios"] == 1
    assert row["stat"]["write_sectors"] == 16
