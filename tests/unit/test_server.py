"""In-process server tests over a Unix socket with raw NBD bytes (written from the spec).

They exercise the asyncio shell: pipelining, out-of-order replies, backpressure bounds, shutdown
with ESHUTDOWN, handshake timeout, the connection cap, and isolation between connections.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.support.devices import PlainDevice
from zramd.config import ExportConfig, ServerConfig
from zramd.server.exports import ExportRegistry
from zramd.server.listener import Server

SIZE = 64 << 20
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
REQ = struct.Struct(">IHHQQI")
REQ_MAGIC = 0x25609513
SIMPLE = struct.Struct(">IIQ")
SIMPLE_MAGIC = 0x67446698
READ, WRITE, DISC, FLUSH = 0, 1, 2, 3
ESHUTDOWN = 108
EINVAL = 22


class SlowDevice(PlainDevice):
    """PlainDevice whose reads at offsets in ``slow`` take that long; counts concurrency."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.slow: dict[int, float] = {}
        self.delay_all = 0.0
        self.active = 0
        self.peak = 0

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            delay = self.slow.get(offset, self.delay_all)
            if delay:
                await asyncio.sleep(delay)
            return await super().read(offset, length)
        finally:
            self.active -= 1


@dataclass
class Env:
    server: Server
    device: SlowDevice
    path: str


async def start(
    max_in_flight: int = 256,
    handshake_timeout: float = 10.0,
    max_connections: int = 100,
) -> Env:
    d = tempfile.mkdtemp(prefix="zramd-t")
    path = os.path.join(d, "s.sock")
    dev = SlowDevice(SIZE)
    reg = ExportRegistry()
    reg.add(ExportConfig("t", SIZE), device=dev)
    cfg = ServerConfig(
        bind=None,
        port=None,
        unix=path,
        exports=[ExportConfig("t", SIZE)],
        max_in_flight=max_in_flight,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
    )
    srv = Server(cfg, registry=reg, structured_replies=False)
    await srv.start()
    return Env(srv, dev, path)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await start()
    yield e
    await e.server.shutdown()
    shutil.rmtree(os.path.dirname(e.path), ignore_errors=True)


class Client:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    @classmethod
    async def connect(cls, path: str, name: str = "t", go: bool = True) -> Client:
        r, w = await asyncio.open_unix_connection(path)
        c = cls(r, w)
        magic, opt, _flags = struct.unpack(">QQH", await r.readexactly(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        w.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        if go:
            raw = name.encode()
            data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
            w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
            while True:
                m, _o, typ, ln = struct.unpack(">QIII", await r.readexactly(20))
                assert m == OPT_REPLY_MAGIC
                await r.readexactly(ln)
                assert typ < 1 << 31, hex(typ)
                if typ == REP_ACK:
                    break
        return c

    def send(self, cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> None:
        self.w.write(REQ.pack(REQ_MAGIC, 0, cmd, cookie, offset, length) + data)

    async def reply(self, read_lengths: dict[int, int]) -> tuple[int, int, bytes]:
        magic, err, cookie = SIMPLE.unpack(await self.r.readexactly(SIMPLE.size))
        assert magic == SIMPLE_MAGIC
        payload = b""
        if err == 0 and cookie in read_lengths:
            payload = await self.r.readexactly(read_lengths[cookie])
        return cookie, err, payload

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except OSError:
            pass


def pattern(i: int, n: int = 4096) -> bytes:
    return bytes([i % 251 + 1]) * n


async def test_pipeline_128_writes_then_reads(env: Env) -> None:
    c = await Client.connect(env.path)
    n = 128
    for i in range(n):
        c.send(WRITE, i, i * 4096, 4096, pattern(i))
    got = set()
    for _ in range(n):
        cookie, err, _ = await c.reply({})
        assert err == 0
        got.add(cookie)
    assert got == set(range(n))
    lengths = {1000 + i: 4096 for i in range(n)}
    for i in range(n):
        c.send(READ, 1000 + i, i * 4096, 4096)
    for _ in range(n):
        cookie, err, data = await c.reply(lengths)
        assert err == 0 and data == pattern(cookie - 1000)
    c.send(DISC, 0, 0, 0)
    assert await c.r.read() == b""  # server closes after DISC
    await c.close()


async def test_out_of_order_replies(env: Env) -> None:
    env.device.slow[0] = 0.3
    c = await Client.connect(env.path)
    c.send(READ, 1, 0, 4096)  # slow
    c.send(READ, 2, 4096, 4096)  # fast
    first = await c.reply({1: 4096, 2: 4096})
    second = await c.reply({1: 4096, 2: 4096})
    assert [first[0], second[0]] == [2, 1]
    await c.close()


async def test_max_in_flight_bounds_concurrency() -> None:
    e = await start(max_in_flight=4)
    try:
        e.device.delay_all = 0.02
        c = await Client.connect(e.path)
        n = 40
        for i in range(n):
            c.send(READ, i, i * 4096, 4096)
        lengths = dict.fromkeys(range(n), 4096)
        cookies = {(await c.reply(lengths))[0] for _ in range(n)}
        assert cookies == set(range(n))
        assert 2 <= e.device.peak <= 4
        await c.close()
    finally:
        await e.server.shutdown()


async def test_server_wide_in_flight_bound() -> None:
    """Four clients pipelining 1 MiB reads on a slow device: the bytes held by running requests,
    summed over the server, stay within the server-wide bound (plus the one request each session
    may take over it), and every reply arrives intact."""
    e = await start()
    try:
        in_flight = e.server.ctx.in_flight
        in_flight.high = 6 << 20  # per session the bound is 16 MiB: this one binds
        e.device.delay_all = 0.01
        size, n = 1 << 20, 24
        clients = [await Client.connect(e.path) for _ in range(4)]
        for k, c in enumerate(clients):
            c.send(WRITE, 999, k * size, size, bytes([k + 1]) * size)
            assert (await c.reply({}))[:2] == (999, 0)
        for k, c in enumerate(clients):
            for i in range(n):
                c.send(READ, i, k * size, size)

        async def drain(k: int, c: Client) -> None:
            lengths = dict.fromkeys(range(n), size)
            for _ in range(n):
                _cookie, err, data = await c.reply(lengths)
                assert err == 0 and data == bytes([k + 1]) * size

        await asyncio.wait_for(asyncio.gather(*(drain(k, c) for k, c in enumerate(clients))), 30)
        assert in_flight.peak <= in_flight.high + 4 * size
        assert 2 <= e.device.peak  # still concurrent
        assert in_flight.held == 0 and not in_flight.waiting
        for c in clients:
            await c.close()
    finally:
        await e.server.shutdown()


async def test_client_that_stops_reading_is_bounded(env: Env) -> None:
    c = await Client.connect(env.path)
    n, size = 400, 1 << 20  # 400 MiB of replies requested, never read
    for i in range(n):
        c.send(READ, i, (i % 64) * size, size)
    await asyncio.sleep(1.0)
    (sess,) = env.server.ctx.sessions
    assert sess.transport is not None
    buffered = sess.transport.get_write_buffer_size() + sess.flow.bytes
    assert buffered < 128 << 20, buffered
    assert sess.requests < n  # it stopped taking requests
    # now drain everything: all replies arrive intact
    lengths = dict.fromkeys(range(n), size)
    seen = set()
    for _ in range(n):
        cookie, err, data = await c.reply(lengths)
        assert err == 0 and len(data) == size
        seen.add(cookie)
    assert seen == set(range(n))
    await c.close()


async def test_shutdown_finishes_in_flight_then_eshutdown() -> None:
    e = await start()
    e.device.slow[0] = 0.5
    c = await Client.connect(e.path)
    c.send(WRITE, 7, 0, 4096, pattern(7))
    assert (await c.reply({}))[:2] == (7, 0)
    c.send(READ, 1, 0, 4096)  # slow: in flight when shutdown begins
    while not e.server.ctx.sessions or next(iter(e.server.ctx.sessions)).in_flight == 0:
        await asyncio.sleep(0.01)
    down = asyncio.create_task(e.server.shutdown())
    while not e.server.ctx.shutdown.is_set:
        await asyncio.sleep(0.01)
    c.send(READ, 2, 4096, 4096)
    lengths = {1: 4096, 2: 4096}
    r1 = await c.reply(lengths)
    assert r1 == (2, ESHUTDOWN, b"")
    r2 = await c.reply(lengths)
    assert r2 == (1, 0, pattern(7))
    # nothing is in flight now; a request sent during the grace period still gets ESHUTDOWN
    await asyncio.sleep(0.3)
    c.send(READ, 3, 0, 4096)
    assert await c.reply({3: 4096}) == (3, ESHUTDOWN, b"")
    assert await c.r.read() == b""  # then the server closes
    await asyncio.wait_for(down, 5)
    assert not os.path.exists(e.path)
    await c.close()
    # no new connections
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(e.path)


async def test_handshake_timeout_drops_idle_client() -> None:
    e = await start(handshake_timeout=0.2)
    try:
        r, w = await asyncio.open_unix_connection(e.path)
        await r.readexactly(18)
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(r.read(), 3) == b""
        assert asyncio.get_running_loop().time() - t0 < 2
        w.close()
        # a client that completes the handshake in time is not dropped later
        c = await Client.connect(e.path)
        await asyncio.sleep(0.4)
        c.send(READ, 1, 0, 512)
        assert (await c.reply({1: 512}))[:2] == (1, 0)
        await c.close()
    finally:
        await e.server.shutdown()


async def test_connection_cap() -> None:
    e = await start(max_connections=1)
    try:
        c1 = await Client.connect(e.path)
        r, w = await asyncio.open_unix_connection(e.path)
        assert await asyncio.wait_for(r.read(), 3) == b""  # accepted and closed at once
        w.close()
        assert e.server.admission.rejected == 1
        c1.send(READ, 1, 0, 512)
        assert (await c1.reply({1: 512}))[:2] == (1, 0)
        await c1.close()
        await asyncio.sleep(0.05)
        c2 = await Client.connect(e.path)  # the slot is free again
        await c2.close()
    finally:
        await e.server.shutdown()


async def test_vanishing_and_hostile_clients_do_not_disturb_others(env: Env) -> None:
    good = await Client.connect(env.path)
    good.send(WRITE, 1, 8192, 4096, pattern(3))
    assert (await good.reply({}))[:2] == (1, 0)
    # vanishes mid-payload: nothing of that write is applied
    v = await Client.connect(env.path)
    v.w.write(REQ.pack(REQ_MAGIC, 0, WRITE, 9, 0, 8192) + b"\xee" * 5000)
    await v.w.drain()
    await v.close()
    # bad request magic: that connection is dropped
    b = await Client.connect(env.path)
    b.w.write(struct.pack(">IHHQQI", 0xDEADBEEF, 0, READ, 1, 0, 512))
    assert await asyncio.wait_for(b.r.read(), 3) == b""
    await b.close()
    await asyncio.sleep(0.05)
    good.send(READ, 2, 0, 4096)
    good.send(READ, 3, 8192, 4096)
    replies = {}
    for _ in range(2):
        cookie, err, data = await good.reply({2: 4096, 3: 4096})
        assert err == 0
        replies[cookie] = data
    assert replies == {2: bytes(4096), 3: pattern(3)}
    # semantic errors keep the connection
    good.send(READ, 4, SIZE, 512)
    assert (await good.reply({4: 512}))[:2] == (4, EINVAL)
    good.send(FLUSH, 5, 0, 0)
    assert (await good.reply({}))[:2] == (5, 0)
    await good.close()


async def test_connections_share_one_store(env: Env) -> None:
    """CAN_MULTI_CONN: a second connection sees the first one's replied write."""
    a = await Client.connect(env.path)
    b = await Client.connect(env.path)
    a.send(WRITE, 1, 0, 4096, pattern(9))
    assert (await a.reply({}))[:2] == (1, 0)
    b.send(READ, 2, 0, 4096)
    assert await b.reply({2: 4096}) == (2, 0, pattern(9))
    await a.close()
    await b.close()


def test_serve_process_logs_one_line_and_exits_0_on_sigterm() -> None:
    import re
    import signal
    import subprocess
    import sys
    import time

    d = tempfile.mkdtemp(prefix="zramd-t")
    path = os.path.join(d, "s.sock")
    cmd = [sys.executable, "-m", "zramd", "serve", "--unix", path, "--export", "a=1M"]
    cmd += ["--control", ""]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert re.fullmatch(
            r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} )?"
            rf"zramd: listening on unix:{re.escape(path)} \(exports: a 1M lz4\)\n",
            line,
        ), line
        assert os.stat(path).st_mode & 0o777 == 0o600
        time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        assert out == "" and err == ""
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--export", "a=3X"], "'3X'"),
        (["--port", "x"], "--port"),
        (["--nope"], "--nope"),
        (["--stdio", "--port", "1"], "--stdio"),
    ],
)
def test_serve_bad_args_one_line(args: list[str], fragment: str) -> None:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "zramd", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zramd: error: ") and fragment in lines[0]


async def test_remove_export_busy_and_forced(env: Env) -> None:
    from zramd.server.exports import ExportBusy

    env.device.slow[0] = 0.3
    c = await Client.connect(env.path)
    c.send(READ, 1, 0, 4096)
    while not env.device.active:
        await asyncio.sleep(0.01)
    with pytest.raises(ExportBusy):
        env.server.registry.remove("t")
    env.server.registry.remove("t", force=True)
    assert not env.device.closed  # a request is still running on it
    assert await c.reply({1: 4096}) == (1, 0, bytes(4096))  # it completes and is answered
    assert await asyncio.wait_for(c.r.read(), 3) == b""  # then the session closes
    await asyncio.sleep(0.05)
    assert env.device.closed
    assert env.server.registry.lookup("t") is None
    await c.close()


async def test_shutdown_during_negotiation_answers_err_shutdown() -> None:
    e = await start()
    c = await Client.connect(e.path, go=False)  # greeting and client flags only
    while not e.server.ctx.sessions:
        await asyncio.sleep(0.01)
    down = asyncio.create_task(e.server.shutdown())
    while not e.server.ctx.shutdown.is_set:
        await asyncio.sleep(0.01)
    data = struct.pack(">I", 1) + b"t" + struct.pack(">H", 0)
    c.w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    magic, opt, typ, ln = struct.unpack(">QIII", await c.r.readexactly(20))
    assert (magic, opt, typ) == (OPT_REPLY_MAGIC, OPT_GO, 0x80000007)  # NBD_REP_ERR_SHUTDOWN
    await c.r.readexactly(ln)
    assert await asyncio.wait_for(c.r.read(), 5) == b""  # closed after the grace period
    await asyncio.wait_for(down, 5)
    await c.close()


async def test_a_request_that_runs_long_is_reported_once(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request still running after SLOW_REQUEST_S is logged once, with what it is and what
    the device says requests may wait for; a quick one is not."""
    from zramd.server import session

    monkeypatch.setattr(session, "SLOW_REQUEST_S", 0.1)
    env.device.slow[8192] = 0.4
    c = await Client.connect(env.path)
    with caplog.at_level("WARNING", logger="zramd.server"):
        c.send(READ, 1, 0, 4096)
        await c.reply({1: 4096})
        c.send(READ, 2, 8192, 4096)
        await c.reply({2: 4096})
    slow = [r.getMessage() for r in caplog.records if "has run for" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "read of 4096 bytes at offset 8192" in slow[0] and "export t" in slow[0]
    assert "the device reports nothing" in slow[0]  # a test device without waits()
    await c.close()
