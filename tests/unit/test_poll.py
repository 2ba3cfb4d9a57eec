"""Busy polling (zramd/server/session.py, "Busy polling") with a real client in another thread.

libnbd runs its blocking calls without the GIL, so from a worker thread it is a real peer of the
in-process server: while the loop thread polls, the client can send its next request.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator

import pytest

from zramd.config import ExportConfig, ServerConfig
from zramd.server.exports import ExportRegistry
from zramd.server.listener import Server

nbd = pytest.importorskip("nbd")

SIZE = 16 << 20
PAGE = 4096


async def start(poll_us: int) -> tuple[Server, str]:
    path = os.path.join(tempfile.mkdtemp(prefix="zramd-poll"), "s.sock")
    reg = ExportRegistry()
    reg.add(ExportConfig("t", SIZE))  # a real ZramDevice
    cfg = ServerConfig(
        bind=None, port=None, unix=path, exports=[ExportConfig("t", SIZE)], poll_us=poll_us
    )
    srv = Server(cfg, registry=reg)
    await srv.start()
    return srv, path


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, str]]:
    srv, path = await start(poll_us=1000)  # a wide window: hits do not depend on timing luck
    yield srv, path
    await srv.shutdown()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def qd1_io(path: str, n: int, seed: int) -> None:
    """n QD1 write+read pairs of distinct pages, each read checked (runs in a thread)."""
    h = nbd.NBD()
    h.set_export_name("t")
    h.connect_unix(path)
    rnd = random.Random(seed)
    for i in range(n):
        off = rnd.randrange(SIZE // PAGE) * PAGE
        page = rnd.randbytes(PAGE // 2) + bytes(PAGE // 2)
        h.pwrite(page, off)
        assert h.pread(PAGE, off) == page, i
    h.shutdown()


async def test_lone_connection_is_polled(server: tuple[Server, str]) -> None:
    srv, path = server
    await asyncio.to_thread(qd1_io, path, 300, 1)
    # most of the 600 requests arrive while the loop thread polls (not all: the first of a burst
    # and any request later than the window come through epoll)
    assert srv.ctx.poll_hits > 100, srv.ctx.poll_hits


async def test_two_connections_are_not_polled(server: tuple[Server, str]) -> None:
    srv, path = server
    idle = nbd.NBD()
    idle.set_export_name("t")
    await asyncio.to_thread(idle.connect_unix, path)
    try:
        await asyncio.to_thread(qd1_io, path, 100, 2)
    finally:
        await asyncio.to_thread(idle.shutdown)
    assert srv.ctx.poll_hits == 0


async def test_poll_off() -> None:
    srv, path = await start(poll_us=0)
    try:
        await asyncio.to_thread(qd1_io, path, 100, 3)
        assert srv.ctx.poll_hits == 0
    finally:
        await srv.shutdown()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


async def test_eof_and_pipelined_disconnect_while_polling(server: tuple[Server, str]) -> None:
    """A client that sends requests then DISC and closes, and one that just vanishes: both are
    served, both sessions end, and the server still serves a new client."""
    srv, path = server

    def raw_client(disc: bool) -> bytes:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        f = s.makefile("rwb")
        f.read(18)
        f.write(struct.pack(">I", 3))
        data = struct.pack(">I", 1) + b"t" + struct.pack(">H", 0)
        f.write(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        f.flush()
        while True:
            _m, _o, typ, ln = struct.unpack(">QIII", f.read(20))
            f.read(ln)
            if typ == 1:
                break
        req = struct.Struct(">IHHQQI")
        f.write(req.pack(0x25609513, 0, 1, 1, 0, PAGE) + b"\x07" * PAGE)
        f.flush()
        hdr = f.read(16)  # the write's reply; the server is now polling
        f.write(req.pack(0x25609513, 0, 0, 2, 0, PAGE))
        if disc:
            f.write(req.pack(0x25609513, 0, 2, 3, 0, 0))
        f.flush()
        reply = f.read(16 + PAGE)
        s.close()
        return hdr + reply

    for disc in (True, False):
        got = await asyncio.to_thread(raw_client, disc)
        assert got[16 + 16 :] == b"\x07" * PAGE
        for _ in range(200):
            if not srv.ctx.sessions:
                break
            await asyncio.sleep(0.01)
        assert not srv.ctx.sessions
    await asyncio.to_thread(qd1_io, path, 20, 4)
