"""Transmission phase of the sans-I/O NBD core: request framing and reply bytes (nbd.md 1.4-1.6)."""

from __future__ import annotations

import struct

import pytest

from zramd.protocol import (
    NEED_DATA,
    Command,
    ConnectionClosed,
    Event,
    ExportInfo,
    HandshakeComplete,
    Limits,
    Request,
    ServerConnection,
)

H = bytes.fromhex
IHAVEOPT = H("49484156454f5054")
DISK = ExportInfo("disk", 1 << 30)
COOKIE = 0x0102030405060708
C = H("0102030405060708")  # COOKIE on the wire


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK if name in ("", "disk") else None

    def list_exports(self) -> list[ExportInfo]:
        return [DISK]


def run(conn: ServerConnection, data: bytes | bytearray | memoryview = b"") -> list[Event]:
    if len(data):
        conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not NEED_DATA:
        assert isinstance(ev, Event)
        events.append(ev)
    return events


def connected(*, structured: bool = False, limits: Limits | None = None) -> ServerConnection:
    """A connection past GO (with STRUCTURED_REPLY first if ``structured``)."""
    conn = ServerConnection(Catalog(), limits or Limits())
    hs = H("00000003")
    if structured:
        hs += IHAVEOPT + H("00000008 00000000")
    hs += IHAVEOPT + H("00000007 0000000a 00000004") + b"disk" + H("0000")
    (ev,) = run(conn, hs)
    assert isinstance(ev, HandshakeComplete) and ev.structured_replies == structured
    conn.data_to_send()
    assert conn.in_transmission
    return conn


def req(cmd: int, flags: int = 0, cookie: int = COOKIE, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def as_bytes(events: list[Event]) -> list[Event]:
    for ev in events:
        if isinstance(ev, Request) and ev.data is not None:
            ev.data = bytes(ev.data)
    return events


# -- request parsing -------------------------------------------------------------------------------


def test_header_exact_bytes() -> None:
    conn = connected()
    raw = H("25609513 00050007 01020304050607080000000123456789 00010000")
    assert run(conn, raw) == [Request(7, 5, COOKIE, 0x123456789, 0x10000)]


@pytest.mark.parametrize(
    "cmd", [Command.READ, Command.FLUSH, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES,
            Command.BLOCK_STATUS, 8, 99, 0xFFFF]
)  # fmt: skip
def test_payloadless_commands(cmd: int) -> None:
    conn = connected()
    (ev,) = run(conn, req(cmd, 0x1F, 42, 4096, 0xFFFFFFFF))  # huge length: no payload follows
    assert ev == Request(cmd, 0x1F, 42, 4096, 0xFFFFFFFF)
    assert ev.data is None and not ev.payload_dropped
    (ev2,) = run(conn, req(Command.READ, cookie=43, length=512))
    assert ev2 == Request(0, 0, 43, 0, 512)


def test_write_in_one_chunk_is_zero_copy() -> None:
    conn = connected()
    payload = bytes(range(256)) * 16
    chunk = req(Command.WRITE, 1, 7, 8192, len(payload)) + payload + req(Command.FLUSH, cookie=8)
    w, f = run(conn, chunk)
    assert isinstance(w, Request) and w.command == Command.WRITE and w.flags == 1
    assert w.cookie == 7 and w.offset == 8192 and w.length == 4096
    assert isinstance(w.data, memoryview) and w.data.obj is chunk  # a view of the chunk
    assert bytes(w.data) == payload
    assert f == Request(Command.FLUSH, 0, 8, 0, 0)


def test_write_zero_length() -> None:
    conn = connected()
    (ev,) = run(conn, req(Command.WRITE, length=0))
    assert isinstance(ev, Request) and ev.data is not None and bytes(ev.data) == b""


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_write_payload_split_across_many_chunks(kind: type) -> None:
    conn = connected()
    payload = bytes(range(251)) * 41  # 10291 bytes, not a multiple of anything
    stream = req(Command.READ, cookie=1, length=9) + req(Command.WRITE, cookie=2, length=len(
        payload)) + payload + req(Command.DISC, cookie=3)  # fmt: skip
    events: list[Event] = []
    for i in range(0, len(stream), 7):
        events += run(conn, kind(stream[i : i + 7]))
    assert as_bytes(events) == [
        Request(0, 0, 1, 0, 9),
        Request(1, 0, 2, 0, len(payload), payload),
        Request(2, 0, 3, 0, 0),
        ConnectionClosed("client sent DISC", False),
    ]


def test_fed_buffer_may_be_reused_by_the_driver() -> None:
    conn = connected()
    buf = bytearray(req(Command.WRITE, cookie=2, length=4) + b"abcd")
    (ev,) = run(conn, buf)
    buf[:] = bytes(len(buf))  # the driver reuses its receive buffer
    assert isinstance(ev, Request) and ev.data is not None and bytes(ev.data) == b"abcd"
    buf = bytearray(req(Command.WRITE, cookie=2, length=8) + b"abcd")
    assert run(conn, buf) == []
    buf[:] = bytes(len(buf))
    (ev,) = run(conn, bytearray(b"efgh"))
    assert isinstance(ev, Request) and ev.data is not None and bytes(ev.data) == b"abcdefgh"


def test_oversize_write_drained_without_storing() -> None:
    limits = Limits(max_payload=64 * 1024)
    conn = connected(limits=limits)
    n = limits.max_payload + 1
    assert run(conn, req(Command.WRITE, cookie=5, offset=0, length=n) + b"\xaa" * 1000) == []
    for _ in range(n // 1000 - 1):
        assert run(conn, b"\xaa" * 1000) == []
    events = run(conn, b"\xaa" * (n % 1000) + req(Command.READ, cookie=6, length=512))
    assert events == [
        Request(Command.WRITE, 0, 5, 0, n, None, payload_dropped=True),
        Request(Command.READ, 0, 6, 0, 512),
    ]
    assert not conn.closed


def test_oversize_write_in_one_chunk() -> None:
    conn = connected(limits=Limits(max_payload=4096))
    events = run(conn, req(Command.WRITE, cookie=5, length=5000) + bytes(5000) + req(0, cookie=6))
    assert events == [Request(1, 0, 5, 0, 5000, None, True), Request(0, 0, 6, 0, 0)]


def test_write_at_exactly_max_payload_is_kept() -> None:
    conn = connected(limits=Limits(max_payload=4096))
    (ev,) = run(conn, req(Command.WRITE, length=4096) + bytes(4096))
    assert isinstance(ev, Request) and not ev.payload_dropped and len(ev.data or b"") == 4096


def test_bad_magic_closes() -> None:
    conn = connected()
    bad = H("25609514") + req(0)[4:]
    events = run(conn, req(0, cookie=1) + bad + req(0, cookie=2))
    assert events[0] == Request(0, 0, 1, 0, 0)
    assert isinstance(events[1], ConnectionClosed) and events[1].error
    assert len(events) == 2 and conn.closed
    assert run(conn, req(0)) == []


def test_disc_then_closed_and_later_input_ignored() -> None:
    conn = connected()
    events = run(conn, req(Command.DISC) + req(Command.READ))
    assert events == [Request(2, 0, COOKIE, 0, 0), ConnectionClosed("client sent DISC", False)]
    assert conn.closed
    assert run(conn, req(Command.READ)) == []


def test_eof_clean_and_mid_header_and_mid_payload() -> None:
    conn = connected()
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and not ev.error

    conn = connected()
    assert run(conn, req(0)[:10]) == []
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and ev.error

    conn = connected()
    assert run(conn, req(1, length=100) + bytes(50)) == []
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and ev.error

    conn = connected(limits=Limits(max_payload=4096))
    assert run(conn, req(1, length=10000) + bytes(50)) == []
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and ev.error


def test_many_tiny_chunks_linear() -> None:
    """1 MiB of pipelined requests fed 16 bytes at a time: must not be quadratic."""
    conn = connected()
    one = req(Command.WRITE, length=100) + bytes(100)
    stream = one * (1024 * 1024 // len(one))
    count = 0
    for i in range(0, len(stream), 16):
        conn.receive_data(stream[i : i + 16])
        while conn.next_event() is not NEED_DATA:
            count += 1
    assert count == len(stream) // len(one)


# -- replies ---------------------------------------------------------------------------------------


def joined(bufs: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def test_simple_replies_exact_bytes() -> None:
    conn = connected()
    assert joined(conn.reply_ok(COOKIE)) == H("67446698 00000000") + C
    assert joined(conn.reply_error(COOKIE, 22, "ignored")) == H("67446698 00000016") + C
    data = b"hello"
    out = conn.reply_read(COOKIE, 0, data, [(0, 5)], df=True)
    assert out[1] is data  # payload passed through
    assert joined(out) == H("67446698 00000000") + C + b"hello"


def test_structured_ok_is_simple_and_error_is_chunk() -> None:
    conn = connected(structured=True)
    assert joined(conn.reply_ok(COOKIE)) == H("67446698 00000000") + C
    # ERROR chunk: magic, flags DONE, type 0x8001, cookie, len 6+5, error 22, msglen 5, msg
    assert joined(conn.reply_error(COOKIE, 22, "oops!")) == (
        H("668e33ef 00018001") + C + H("0000000b 000000160005") + b"oops!"
    )
    assert joined(conn.reply_error(COOKIE, 5)) == (
        H("668e33ef 00018001") + C + H("00000006 000000050000")
    )
    long = conn.reply_error(COOKIE, 5, "é" * 3000)  # truncated on a character boundary
    raw = joined(long)
    (msglen,) = struct.unpack(">H", raw[24:26])
    assert msglen <= 4096 and raw[26:].decode() == "é" * (msglen // 2)


def test_structured_read_single_chunk() -> None:
    conn = connected(structured=True)
    data = b"hello"
    out = conn.reply_read(COOKIE, 0x1000, data)
    assert out[-1] is data
    assert joined(out) == (H("668e33ef 00010001") + C + H("0000000d 0000000000001000") + b"hello")


def test_structured_read_zero_length_is_none_done() -> None:
    conn = connected(structured=True)
    assert joined(conn.reply_read(COOKIE, 0, b"")) == H("668e33ef 00010000") + C + H("00000000")


def test_structured_read_holes() -> None:
    conn = connected(structured=True)
    data = bytes([1]) * 4096 + bytes(8192) + bytes([2]) * 100
    out = conn.reply_read(COOKIE, 0x10000, data, [(4096, 8192)])
    assert joined(out) == (
        H("668e33ef 0000 0001") + C + H("00001008 0000000000010000") + bytes([1]) * 4096
        + H("668e33ef 0000 0002") + C + H("0000000c 0000000000011000 00002000")
        + H("668e33ef 0001 0001") + C + H("0000006c 0000000000013000") + bytes([2]) * 100
    )  # fmt: skip
    data_chunks = [b for b in out if isinstance(b, memoryview)]
    assert all(b.obj is data for b in data_chunks)  # slices, not copies


def test_structured_read_trailing_and_whole_holes() -> None:
    conn = connected(structured=True)
    data = bytes([7]) * 10 + bytes(4096)
    assert joined(conn.reply_read(COOKIE, 0, data, [(10, 4096)])) == (
        H("668e33ef 0000 0001") + C + H("00000012 0000000000000000") + bytes([7]) * 10
        + H("668e33ef 0001 0002") + C + H("0000000c 000000000000000a 00001000")
    )  # fmt: skip
    whole = bytes(8192)
    assert joined(conn.reply_read(COOKIE, 512, whole, [(0, 4096), (4096, 4096)])) == (
        H("668e33ef 00010002") + C + H("0000000c 000000000000020000002000")
    )


def test_structured_read_small_holes_and_df_ignored() -> None:
    conn = connected(structured=True)
    data = bytes(8192)
    single = H("668e33ef 00010001") + C + H("00002008 0000000000000000") + data
    assert joined(conn.reply_read(COOKIE, 0, data, [(0, 512), (1024, 100)])) == single
    assert joined(conn.reply_read(COOKIE, 0, data, [(0, 8192)], df=True)) == single
    # extents outside the request are clipped away
    assert joined(conn.reply_read(COOKIE, 0, data, [(8192, 4096), (-4096, 4096)])) == single


def test_block_status_chunk() -> None:
    conn = connected(structured=True)
    out = conn.reply_block_status(COOKIE, 1, [(0x1000, 3), (0x2000, 0)])
    assert joined(out) == (
        H("668e33ef 0001 0005") + C + H("00000014 00000001")
        + H("00001000 00000003 00002000 00000000")
    )  # fmt: skip
    out = conn.reply_block_status(COOKIE, 9, [(512, 2)], done=False)
    assert joined(out) == H("668e33ef 0000 0005") + C + H("0000000c 00000009 00000200 00000002")


def test_bytes_after_an_assembled_payload_stay_zero_copy() -> None:
    conn = connected()
    first = req(Command.WRITE, cookie=1, length=8) + b"abcd"
    second = b"efgh" + req(Command.WRITE, cookie=2, length=4) + b"wxyz" + req(0, cookie=3)[:10]
    assert run(conn, first) == []
    w1, w2 = run(conn, second)
    assert isinstance(w1, Request) and isinstance(w2, Request)
    assert bytes(w1.data or b"") == b"abcdefgh"
    assert isinstance(w2.data, memoryview) and w2.data.obj is second and bytes(w2.data) == b"wxyz"
    (r,) = run(conn, req(0, cookie=3)[10:])  # leftover of a view joined with new bytes
    assert r == Request(0, 0, 3, 0, 0)


def test_input_after_close_is_dropped() -> None:
    conn = connected()
    run(conn, H("deadbeef") + bytes(24))
    assert conn.closed
    conn.receive_data(b"x" * 100000)
    assert run(conn) == []
