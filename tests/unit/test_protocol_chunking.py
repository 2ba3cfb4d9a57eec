"""Property tests: chunking never changes what the core sees, and no input crashes it."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportInfo,
    HandshakeComplete,
    Limits,
    Request,
    ServerConnection,
)

IHAVEOPT = b"IHAVEOPT"
DISK = ExportInfo("disk", 1 << 20, description="d")
LIMITS = Limits(max_payload=4096, max_option_length=16 * 1024)


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK if name in ("", "disk") else None

    def list_exports(self) -> list[ExportInfo]:
        return [DISK]


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def req(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def meta(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


TRANSCRIPT = b"".join(
    [
        struct.pack(">I", 3),
        opt(99, bytes(range(10))),  # unknown: drained, ERR_UNSUP
        opt(8),  # STRUCTURED_REPLY
        opt(3),  # LIST
        opt(9, meta(b"disk")),  # LIST_META_CONTEXT, no queries
        opt(6, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)),  # INFO: ERR_UNKNOWN
        opt(7, b"\xff" * 20000),  # oversize option: drained, ERR_TOO_BIG
        opt(10, meta(b"disk", b"base:allocation")),  # SET_META_CONTEXT
        opt(7, struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3)),  # GO
        req(0, 1, 0, 4096),
        req(1, 2, 4096, 5) + b"hello",
        req(1, 3, 0, 4096) + bytes(range(256)) * 16,
        req(1, 4, 0, 6000) + b"\x55" * 6000,  # oversize: dropped
        req(7, 5, 0, 1 << 20, flags=8),
        req(3, 6),
        req(1, 7, 0, 3000) + b"\x77" * 3000,
        req(2, 8),  # DISC
        req(0, 9),  # ignored after DISC
    ]
)


def drive(chunks: list[bytes | bytearray | memoryview]) -> tuple[list[Event], bytes]:
    conn = ServerConnection(Catalog(), LIMITS)
    out = conn.data_to_send()
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, Event)
            if isinstance(ev, Request) and ev.data is not None:
                ev.data = bytes(ev.data)
            events.append(ev)
        out += conn.data_to_send()
    return events, out


REFERENCE = drive([TRANSCRIPT])


def test_reference_transcript_events() -> None:
    events, out = REFERENCE
    hc = events[0]
    assert isinstance(hc, HandshakeComplete) and hc.structured_replies
    assert list(hc.meta_contexts.values()) == ["base:allocation"]
    reqs = [e for e in events[1:-1] if isinstance(e, Request)]
    assert len(reqs) == len(events) - 2
    assert [(e.command, e.cookie, e.payload_dropped) for e in reqs] == [
        (0, 1, False),
        (1, 2, False),
        (1, 3, False),
        (1, 4, True),
        (7, 5, False),
        (3, 6, False),
        (1, 7, False),
        (2, 8, False),
    ]
    assert reqs[1].data == b"hello"
    assert events[-1] == ConnectionClosed("client sent DISC", False)
    assert out.startswith(b"NBDMAGICIHAVEOPT\x00\x03")


kinds = st.sampled_from([bytes, bytearray, memoryview])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(0, len(TRANSCRIPT)), max_size=60),
    kind=kinds,
)
def test_random_chunking_gives_same_events(cuts: list[int], kind: type) -> None:
    points = sorted(set(cuts) | {0, len(TRANSCRIPT)})
    chunks = [kind(TRANSCRIPT[a:b]) for a, b in zip(points, points[1:], strict=False) if b > a]
    assert drive(chunks) == REFERENCE


def test_byte_by_byte_gives_same_events() -> None:
    assert drive([TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))]) == REFERENCE


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", struct.pack(">I", 3), struct.pack(">I", 3) + opt(7, meta(b""))]),
    junk=st.lists(st.binary(max_size=64), max_size=8),
    eof=st.booleans(),
)
def test_garbage_never_raises(prefix: bytes, junk: list[bytes], eof: bool) -> None:
    """Random bytes at any point: the core answers or closes; it never raises."""
    conn = ServerConnection(Catalog(), LIMITS)
    conn.data_to_send()
    for chunk in [prefix, *junk] + ([b""] if eof else []):
        conn.receive_data(chunk)
        closed = 0
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, Event)
            closed += isinstance(ev, ConnectionClosed)
        assert closed <= 1
        conn.data_to_send()
    if eof:
        assert conn.closed


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(0, 9),
            st.integers(0, 0xFFFF),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.integers(0, 6000),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(0, 200_000), max_size=30),
)
def test_requests_roundtrip(
    requests: list[tuple[int, int, int, int, int]], cuts: list[int]
) -> None:
    """Any well-framed request sequence comes back field for field, however it is chunked."""
    stream = struct.pack(">I", 3) + opt(1, b"disk")
    expected: list[Event] = []
    for cmd, flags, cookie, offset, length in requests:
        if cmd == 2:
            continue  # DISC ends the stream; covered elsewhere
        stream += req(cmd, cookie, offset, length, flags)
        data = None
        dropped = False
        if cmd == 1:
            payload = bytes([cookie & 0xFF]) * length
            stream += payload
            if length > LIMITS.max_payload:
                dropped = True
            else:
                data = payload
        expected.append(Request(cmd, flags, cookie, offset, length, data, dropped))
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    events, _ = drive([stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a])
    assert isinstance(events[0], HandshakeComplete)
    assert events[1:] == expected
