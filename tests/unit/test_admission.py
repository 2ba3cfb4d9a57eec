"""Admission at accept (zramd/server/admission.py): cap, shutdown, allow list, one log line each.

A fake transport stands in for the socket: these tests check the decision, the log line, the
counters, and that an admitted session owns the transport from the first byte on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from zramd.server.access import AllowList
from zramd.server.admission import Admission, Gate
from zramd.server.exports import ExportRegistry
from zramd.server.session import ServerContext, Session


class FakeTransport(asyncio.Transport):
    """Records what admission and the session do to it."""

    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: Any) -> None:
        assert not self.closed
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def admission(max_connections: int = 2, allow: list[str] | None = None) -> Admission:
    ctx = ServerContext(ExportRegistry())
    return Admission(ctx, max_connections, AllowList(allow) if allow else None)


def close_all(adm: Admission) -> None:
    for s in list(adm.ctx.sessions):
        s.abort()
        s.connection_lost(None)


async def test_admitted_session_takes_over_the_transport() -> None:
    adm = admission()
    t = FakeTransport(("127.0.0.1", 40000))
    gate = adm.gate()
    assert isinstance(gate, Gate)
    gate.connection_made(t)
    assert isinstance(gate.session, Session)
    assert t.protocol is gate.session  # data goes straight to the session
    assert gate.session in adm.ctx.sessions
    assert t.written.startswith(b"NBDMAGIC")  # the session greeted
    assert gate.session.label == "#1 127.0.0.1:40000"
    close_all(adm)


async def test_cap_rejects_with_one_line_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    adm = admission(max_connections=2)
    first = [adm.admit(FakeTransport(("127.0.0.1", 40000 + i))) for i in range(2)]
    assert all(isinstance(s, Session) for s in first)
    t = FakeTransport(("::1", 40009, 0, 0))
    with caplog.at_level(logging.WARNING, logger="zramd.server"):
        assert adm.admit(t) is None
    assert t.closed and not t.written and t.protocol is None
    assert adm.rejected == 1 and adm.refused == 0
    assert [r.getMessage() for r in caplog.records] == [
        "rejecting connection #3 [::1]:40009: connection limit 2 reached"
    ]
    assert len(adm.ctx.sessions) == 2
    # a slot freed is a slot taken again; refused connections still take a number
    s = first[0]
    assert s is not None
    s.abort()
    s.connection_lost(None)
    again = adm.admit(FakeTransport(("127.0.0.1", 40010)))
    assert again is not None and again.label == "#4 127.0.0.1:40010"
    close_all(adm)


async def test_shutdown_rejects_every_connection(caplog: pytest.LogCaptureFixture) -> None:
    adm = admission()
    adm.ctx.shutdown.is_set = True
    t = FakeTransport("")
    with caplog.at_level(logging.WARNING, logger="zramd.server"):
        assert adm.admit(t) is None
    assert t.closed and adm.rejected == 1
    assert [r.getMessage() for r in caplog.records] == [
        "rejecting connection #1 local: shutting down"
    ]


async def test_allow_list_refuses_tcp_peers_outside_it(caplog: pytest.LogCaptureFixture) -> None:
    adm = admission(max_connections=4, allow=["10.0.0.0/8"])
    t = FakeTransport(("192.0.2.7", 5555))
    with caplog.at_level(logging.WARNING, logger="zramd.server"):
        assert adm.admit(t) is None
    assert t.closed and not t.written
    assert (adm.refused, adm.rejected) == (1, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "refusing connection #1 192.0.2.7:5555: address not in the allow list"
    ]
    assert adm.admit(FakeTransport(("10.1.2.3", 5555))) is not None
    assert adm.admit(FakeTransport("/run/zramd.sock")) is not None  # Unix peers are local
    assert adm.admit(FakeTransport("stdio")) is not None
    assert adm.refused == 1
    close_all(adm)


async def test_cap_is_checked_before_the_allow_list() -> None:
    adm = admission(max_connections=1, allow=["10.0.0.0/8"])
    assert adm.admit(FakeTransport(("10.0.0.1", 1))) is not None
    assert adm.admit(FakeTransport(("192.0.2.1", 1))) is None
    assert (adm.rejected, adm.refused) == (1, 0)
    close_all(adm)


async def test_tcp_sessions_detect_dead_peers() -> None:
    """An admitted TCP connection has keepalive probes and a user timeout, on the real socket."""
    import socket

    from zramd.server.admission import (
        KEEPALIVE_IDLE_S,
        KEEPALIVE_INTERVAL_S,
        KEEPALIVE_PROBES,
        USER_TIMEOUT_MS,
    )

    admission = Admission(ServerContext(ExportRegistry()), max_connections=4)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(admission.gate, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if admission.ctx.sessions:
                break
            await asyncio.sleep(0.01)
        (session,) = admission.ctx.sessions
        assert session.transport is not None
        sock = session.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
        writer.close()
    finally:
        server.close()
        for s in list(admission.ctx.sessions):
            s.abort()
        await server.wait_closed()


async def test_the_last_session_to_close_gives_the_heap_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """malloc keeps some free heap for the next requests (system.tune_malloc); when the last
    client disconnects it all goes back to the OS, once, in a worker thread (it can take
    milliseconds, which the loop must not be held for)."""
    from zramd.server import session as session_module

    trims: list[int] = []
    monkeypatch.setattr(session_module, "trim_heap", lambda: trims.append(threading.get_ident()))
    adm = admission()
    a, b = FakeTransport(("127.0.0.1", 40001)), FakeTransport(("127.0.0.1", 40002))
    adm.gate().connection_made(a)
    adm.gate().connection_made(b)
    sa, sb = a.get_protocol(), b.get_protocol()
    assert isinstance(sa, Session) and isinstance(sb, Session)
    sa.abort()
    sa.connection_lost(None)
    assert trims == []  # another client is still connected
    sb.abort()
    sb.connection_lost(None)
    sb.connection_lost(None)  # a second detach of the same session trims nothing more
    for _ in range(200):
        if trims:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert len(trims) == 1 and trims[0] != threading.get_ident() and not adm.ctx.sessions
