"""Load: many connections, the connection cap, the handshake timeout, pipelining, a slow reader.

Theory of operation
-------------------
Each test starts its own ``zramd serve`` (a TCP port on 127.0.0.1 plus a Unix socket in a private
directory, ``--control ''``) with the flags it needs (:func:`launch`), drives it with raw asyncio
NBD clients written here from the spec (fixed newstyle, GO, simple replies: the kernel's shape),
and reads the server's RSS from ``/proc``. Every test asserts a number:

* 1000 idle connections held at once; server RSS growth per connection below
  :data:`MAX_RSS_PER_IDLE_CONN`; the next connection past ``--max-connections`` is refused
  (closed before the greeting) with a log line, and a slot freed is usable again. The server is
  started with a soft RLIMIT_NOFILE of :data:`SERVER_SOFT_NOFILE`: it must raise its own.
* a client that never finishes the handshake is dropped after ``--handshake-timeout 1``.
* 64 clients each pipelining 128 WRITEs then 128 READs of 4 KiB: all 16384 replies correct.
* a client sending 2 GiB worth of 1 MiB READs and never reading: server RSS growth stays below
  :data:`MAX_SLOW_READER_GROWTH` while another client keeps being served.

:func:`launch` and the ``Nbd`` client are reused by ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, free_port, zramd_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KiB = 1024
MiB = 1024 * KiB
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
ENOSPC = 28
ESHUTDOWN = 108
REQ = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")

#: Idle connections held at once.
IDLE_CONNECTIONS = 1000
#: Bound on server RSS growth per idle connection (measured about 2 KiB with uvloop).
MAX_RSS_PER_IDLE_CONN = 16 * KiB
#: Soft RLIMIT_NOFILE the server is started with: below IDLE_CONNECTIONS, so it must raise it.
SERVER_SOFT_NOFILE = 512
#: Slow reader: READ size, total bytes requested, and the bound on server RSS growth (by design
#: about 2 x IN_FLIGHT_BYTES_HIGH (16 MiB) + the 4 MiB write buffer; measured about 34 MiB).
SLOW_READ_SIZE = 1 * MiB
SLOW_READ_TOTAL = 2 * 1024 * MiB
MAX_SLOW_READER_GROWTH = 64 * MiB
#: Pipelining: clients x requests each.
PIPE_CLIENTS = 64
PIPE_DEPTH = 128
START_TIMEOUT_S = 15.0


# --- server ------------------------------------------------------------------------------------
@dataclass
class Zramd:
    proc: subprocess.Popen[bytes]
    port: int
    sock: str
    stderr_path: Path
    args: list[str] = field(default_factory=list)

    def rss(self) -> int:
        """Resident set size in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"server did not exit on SIGTERM\n{self.stderr()[-3000:]}"
            ) from None


def _lower_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SERVER_SOFT_NOFILE, hard), hard))


def launch(workdir: Path, args: list[str], *, low_nofile: bool = False) -> Zramd:
    """Start zramd with ``args`` (exports and limits) on TCP + Unix; wait until it accepts."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "nbd.sock")
    port = free_port()
    errpath = workdir / "server.stderr"
    argv = zramd_argv() + [
        "serve", "--bind", "127.0.0.1", "--port", str(port), "--unix", sock, "--control", "",
    ] + args
    with open(errpath, "wb") as errf:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=_lower_nofile if low_nofile else None,
        )
    srv = Zramd(proc, port, sock, errpath, args)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"zramd exited {proc.returncode}\n{srv.stderr()}")
        if "listening on" in srv.stderr():
            return srv
        if time.monotonic() > deadline:
            srv.stop()
            raise AssertionError(f"zramd did not start\n{srv.stderr()}")
        time.sleep(0.05)


@pytest.fixture
def zramd_factory(tmp_path: Path) -> Iterator[list[Zramd]]:
    started: list[Zramd] = []
    yield started
    for s in started:
        if s.alive():
            s.stop()


def start(started: list[Zramd], tmp: Path, args: list[str], **kw: bool) -> Zramd:
    srv = launch(tmp / f"srv{len(started)}", args, **kw)
    started.append(srv)
    return srv


async def wait_for_log(srv: Zramd, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        err = srv.stderr()
        if text in err:
            return err
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the server log:\n{err[-3000:]}")
        await asyncio.sleep(0.05)


# --- a raw asyncio NBD client ------------------------------------------------------------------
class Nbd:
    """Fixed newstyle, OPT_GO, no structured replies (simple replies, like the kernel)."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r = r
        self.w = w
        self.size = 0

    @classmethod
    async def connect(cls, srv: Zramd, name: str = "zram0", unix: bool = False) -> Nbd:
        if unix:
            r, w = await asyncio.open_unix_connection(srv.sock, limit=4 * MiB)
        else:
            r, w = await asyncio.open_connection("127.0.0.1", srv.port, limit=4 * MiB)
        c = cls(r, w)
        await c.handshake(name)
        return c

    async def handshake(self, name: str) -> None:
        magic, ihaveopt, _flags = struct.unpack(">QQH", await self.r.readexactly(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self.w.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", await self.r.readexactly(20))
            assert magic == OPT_REPLY_MAGIC
            payload = await self.r.readexactly(length)
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, hex(rtype)
            if struct.unpack(">H", payload[:2])[0] == 0:
                self.size = struct.unpack(">Q", payload[2:10])[0]
        assert self.size > 0

    def send(self, cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"") -> None:
        self.w.write(REQ.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length))
        if payload:
            self.w.write(payload)

    async def reply(self) -> tuple[int, int]:
        """(cookie, error) of the next simple reply (READ data is left to the caller)."""
        magic, err, cookie = REPLY.unpack(await self.r.readexactly(REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return cookie, err

    async def write(self, offset: int, data: bytes, cookie: int = 1) -> int:
        self.send(CMD_WRITE, offset, len(data), cookie, data)
        ck, err = await self.reply()
        assert ck == cookie
        return err

    async def read(self, offset: int, length: int, cookie: int = 2) -> bytes:
        self.send(CMD_READ, offset, length, cookie)
        ck, err = await self.reply()
        assert ck == cookie and err == 0, (ck, err)
        return await self.r.readexactly(length)

    async def close(self) -> None:
        try:
            self.send(CMD_DISC, 0, 0, 0)
            await self.w.drain()
        except ConnectionError:
            pass
        self.w.close()
        try:
            await self.w.wait_closed()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        tr = self.w.transport
        sk = tr.get_extra_info("socket")
        if sk is not None and sk.family == socket.AF_INET:  # RST instead of FIN
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tr.abort()


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard < n:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def pattern(i: int, j: int, n: int = 4 * KiB) -> bytes:
    head = struct.pack(">QQ", i, j)
    return (head * (n // len(head) + 1))[:n]


# --- tests -------------------------------------------------------------------------------------
async def test_thousand_idle_connections_and_the_cap(
    zramd_factory: list[Zramd], tmp_path: Path
) -> None:
    raise_nofile(IDLE_CONNECTIONS * 2 + 200)
    srv = start(
        zramd_factory, tmp_path,
        ["--export", "zram0=64M", "--max-connections", str(IDLE_CONNECTIONS)],
        low_nofile=True,
    )
    # warm up the paths a connection uses, then measure
    warm = [await Nbd.connect(srv) for _ in range(8)]
    assert await warm[0].write(0, pattern(0, 0)) == 0
    for c in warm:
        await c.close()
    await asyncio.sleep(0.3)
    before = srv.rss()
    conns: list[Nbd] = []
    for _ in range(IDLE_CONNECTIONS // 50):
        conns += await asyncio.gather(*(Nbd.connect(srv) for _ in range(50)))
    assert len(conns) == IDLE_CONNECTIONS
    await asyncio.sleep(0.5)
    after = srv.rss()
    per_conn = (after - before) / IDLE_CONNECTIONS
    print(f"{IDLE_CONNECTIONS} idle connections: server RSS {before // KiB} -> {after // KiB} KiB, "
          f"{per_conn / KiB:.1f} KiB per connection")
    assert per_conn < MAX_RSS_PER_IDLE_CONN

    # every held connection still works (spot check a spread of them)
    for k in range(0, IDLE_CONNECTIONS, 97):
        assert await conns[k].read(0, 4 * KiB, cookie=k) == pattern(0, 0)

    # one more: refused cleanly (closed before any greeting) and logged
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    assert await asyncio.wait_for(r.read(18), 10) == b""
    w.close()
    err = await wait_for_log(srv, f"connection limit {IDLE_CONNECTIONS} reached")
    assert err.count("connection limit") == 1

    # a freed slot is usable again
    await conns.pop().close()
    await asyncio.sleep(0.3)
    extra = await asyncio.wait_for(Nbd.connect(srv), 10)
    assert await extra.read(0, 4 * KiB) == pattern(0, 0)
    conns.append(extra)

    for c in conns:
        c.abort()
    assert srv.stop() == 0


async def test_handshake_timeout_drops_silent_clients(
    zramd_factory: list[Zramd], tmp_path: Path
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=16M", "--handshake-timeout", "1"])
    t0 = time.monotonic()
    # silent after the greeting; and one stuck half way through an option
    r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
    r2, w2 = await asyncio.open_unix_connection(srv.sock)
    assert len(await r1.readexactly(18)) == 18
    await r2.readexactly(18)
    w2.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"zr")
    # a client that finished in time stays
    good = await Nbd.connect(srv)
    assert await asyncio.wait_for(r1.read(1), 5) == b""
    assert await asyncio.wait_for(r2.read(1), 5) == b""
    dropped_after = time.monotonic() - t0
    print(f"silent clients dropped after {dropped_after:.2f} s (handshake timeout 1 s)")
    assert 0.9 <= dropped_after < 3.0
    err = await wait_for_log(srv, "handshake not finished within 1.0 s")
    assert err.count("handshake not finished") == 2
    await asyncio.sleep(0.5)
    assert await good.read(0, 4096) == bytes(4096)
    await good.close()
    w1.close()
    w2.close()
    assert srv.stop() == 0


async def test_64_clients_pipelining_128_requests(
    zramd_factory: list[Zramd], tmp_path: Path
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=64M"])
    ok = 0

    async def client(i: int) -> int:
        c = await Nbd.connect(srv, unix=bool(i % 2))
        base = i * PIPE_DEPTH
        for j in range(PIPE_DEPTH):
            c.send(CMD_WRITE, (base + j) * 4 * KiB, 4 * KiB, j, pattern(i, j))
        await c.w.drain()
        seen = set()
        for _ in range(PIPE_DEPTH):
            ck, err = await c.reply()
            assert err == 0
            seen.add(ck)
        assert seen == set(range(PIPE_DEPTH))
        for j in range(PIPE_DEPTH):
            c.send(CMD_READ, (base + j) * 4 * KiB, 4 * KiB, 1000 + j)
        good = 0
        for _ in range(PIPE_DEPTH):
            ck, err = await c.reply()
            assert err == 0
            data = await c.r.readexactly(4 * KiB)
            assert data == pattern(i, ck - 1000), f"client {i} cookie {ck}: wrong data"
            good += 1
        await c.close()
        return good + len(seen)

    t0 = time.monotonic()
    ok = sum(await asyncio.gather(*(client(i) for i in range(PIPE_CLIENTS))))
    dt = time.monotonic() - t0
    print(f"{PIPE_CLIENTS} clients x {PIPE_DEPTH} pipelined writes + reads: {ok} correct replies "
          f"in {dt:.2f} s")
    assert ok == PIPE_CLIENTS * PIPE_DEPTH * 2
    assert srv.stop() == 0


def test_slow_reader_is_bounded_and_others_are_served(
    zramd_factory: list[Zramd], tmp_path: Path
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=64M"])

    async def fill_and_measure() -> int:
        # incompressible data, so every READ really decompresses/copies 1 MiB
        w = await Nbd.connect(srv)
        blob = os.urandom(SLOW_READ_SIZE)
        for k in range(8):
            assert await w.write(k * SLOW_READ_SIZE, blob, cookie=k) == 0
        await w.close()
        await asyncio.sleep(0.3)
        return srv.rss()

    before = asyncio.run(fill_and_measure())

    # the slow reader: a blocking socket that sends READs and never reads
    slow = socket.create_connection(("127.0.0.1", srv.port))
    slow.settimeout(10)
    greet = b""
    while len(greet) < 18:
        greet += slow.recv(18 - len(greet))
    name = b"zram0"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    slow.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go)
    time.sleep(0.3)  # GO replies sit in our receive buffer: never read either
    n_reqs = SLOW_READ_TOTAL // SLOW_READ_SIZE
    reqs = b"".join(
        REQ.pack(REQUEST_MAGIC, 0, CMD_READ, k, (k % 8) * SLOW_READ_SIZE, SLOW_READ_SIZE)
        for k in range(n_reqs)
    )
    slow.setblocking(False)
    sent = 0

    async def meanwhile() -> tuple[int, int, float]:
        nonlocal sent
        other = await Nbd.connect(srv, unix=True)
        peak = srv.rss()
        served = 0
        worst = 0.0
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            if sent < len(reqs):
                try:
                    sent += slow.send(reqs[sent : sent + 65536])
                except BlockingIOError:
                    pass
            t0 = time.monotonic()
            data = os.urandom(4096)
            assert await other.write(64 * MiB - 8192, data, cookie=served) == 0
            assert await other.read(64 * MiB - 8192, 4096, cookie=served) == data
            worst = max(worst, time.monotonic() - t0)
            served += 1
            peak = max(peak, srv.rss())
        await other.close()
        return peak, served, worst

    peak, served, worst = asyncio.run(meanwhile())
    growth = peak - before
    print(f"slow reader: {sent} request bytes sent ({sent // REQ.size} READs of 1 MiB = "
          f"{sent // REQ.size} MiB asked for), server RSS growth {growth / MiB:.1f} MiB; "
          f"other client served {served} write+read pairs, worst {worst * 1000:.0f} ms")
    assert sent // REQ.size >= 256  # the slow client really asked for far more than the bound
    assert growth < MAX_SLOW_READER_GROWTH
    assert served >= 50
    assert worst < 2.0
    slow.close()  # disappears with replies pending
    time.sleep(0.3)
    assert srv.alive()
    assert "Traceback" not in srv.stderr()
    assert srv.stop() == 0
