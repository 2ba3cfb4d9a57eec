"""Handshake transcripts for the sans-I/O NBD core, from hand-written byte tables (nbd.md 1.2)."""

from __future__ import annotations

import struct

import pytest

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

H = bytes.fromhex
IHAVEOPT = H("49484156454f5054")
REPLY_MAGIC = H("0003e889045565a9")
GREETING = H("4e42444d41474943 49484156454f50540003")

ACK = 1
SERVER = 2
INFO = 3
META = 4
ERR_UNSUP = 0x80000001
ERR_INVALID = 0x80000003
ERR_UNKNOWN = 0x80000006
ERR_TOO_BIG = 0x80000009

DISK = ExportInfo("disk", 1 << 20, description="a disk")
RO = ExportInfo("ro", 0x12345, read_only=True)


class Catalog:
    def __init__(self, *exports: ExportInfo, default: ExportInfo | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        if default is not None:
            self.exports[""] = default

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return [e for n, e in self.exports.items() if n]


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def opt(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return IHAVEOPT + u32(option) + u32(len(data) if length is None else length) + data


def go_data(name: bytes, *infos: int) -> bytes:
    return u32(len(name)) + name + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta_data(name: bytes, *queries: bytes) -> bytes:
    out = u32(len(name)) + name + u32(len(queries))
    for q in queries:
        out += u32(len(q)) + q
    return out


def new(
    *, limits: Limits | None = None, structured: bool = True, client_flags: int = 3
) -> ServerConnection:
    conn = ServerConnection(
        Catalog(DISK, RO, default=DISK), limits or Limits(), structured_replies=structured
    )
    assert conn.data_to_send() == GREETING
    conn.receive_data(u32(client_flags))
    return conn


def run(conn: ServerConnection, data: bytes = b"") -> list[Event]:
    if data:
        conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not NEED_DATA:
        assert isinstance(ev, Event)
        events.append(ev)
    return events


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies: (option, type, payload)."""
    res = []
    while out:
        assert out[:8] == REPLY_MAGIC, out[:8].hex()
        option, rtype, n = struct.unpack(">III", out[8:20])
        res.append((option, rtype, out[20 : 20 + n]))
        out = out[20 + n :]
    return res


# -- greeting and client flags -------------------------------------------------------------------


def test_greeting_bytes() -> None:
    conn = ServerConnection(Catalog(DISK))
    assert conn.data_to_send() == H("4e42444d41474943 49484156454f5054 0003")
    assert conn.data_to_send() == b""
    assert not conn.in_transmission and not conn.closed


@pytest.mark.parametrize("flags", [0, 2, 4, 0x80000001, 7])
def test_bad_client_flags_close(flags: int) -> None:
    conn = new(client_flags=flags)
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and ev.error
    assert conn.closed
    assert run(conn, opt(3)) == []


# -- EXPORT_NAME -----------------------------------------------------------------------------------


def test_export_name_no_zeroes() -> None:
    conn = new(client_flags=3)
    (ev,) = run(conn, opt(1, b"disk"))
    assert isinstance(ev, HandshakeComplete)
    assert ev.export == DISK and ev.structured_replies is False and ev.meta_contexts == {}
    # size64 = 1 MiB, tflags 0x0d6d (no structured replies: no DF)
    assert conn.data_to_send() == H("0000000000100000 0d6d")
    assert conn.in_transmission


def test_export_name_with_zeroes_and_default_export() -> None:
    conn = new(client_flags=1)
    (ev,) = run(conn, opt(1, b""))
    assert isinstance(ev, HandshakeComplete) and ev.export == DISK
    assert conn.data_to_send() == H("0000000000100000 0d6d") + bytes(124)


def test_export_name_after_structured_reply_keeps_it() -> None:
    conn = new()
    run(conn, opt(8))
    (ev,) = run(conn, opt(1, b"ro"))
    assert isinstance(ev, HandshakeComplete) and ev.structured_replies
    out = conn.data_to_send()
    assert replies(out[:20]) == [(8, ACK, b"")]
    # read-only with structured replies: 0x058f
    assert out[20:] == H("0000000000012345 058f")


def test_export_name_unknown_closes() -> None:
    conn = new()
    (ev,) = run(conn, opt(1, b"nope"))
    assert isinstance(ev, ConnectionClosed) and ev.error
    assert conn.data_to_send() == b""


# -- GO / INFO -------------------------------------------------------------------------------------

INFO_EXPORT_DISK_SR = H("0000 00000000001000000ded")
INFO_BLOCK = H("0003 0000000100001000 02000000")


def test_go_without_info_requests() -> None:
    conn = new()
    run(conn, opt(8))
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete) and ev.structured_replies and ev.export == DISK
    assert replies(conn.data_to_send()) == [
        (8, ACK, b""),
        (7, INFO, INFO_EXPORT_DISK_SR),
        (7, INFO, H("0002") + b"a disk"),  # description is non-empty: sent unasked
        (7, INFO, INFO_BLOCK),
        (7, ACK, b""),
    ]


def test_go_exact_bytes_read_only_no_description() -> None:
    conn = new(structured=False)
    (ev,) = run(conn, opt(7, go_data(b"ro")))
    assert isinstance(ev, HandshakeComplete) and not ev.structured_replies
    assert conn.data_to_send() == (
        REPLY_MAGIC + H("00000007 00000003 0000000c")
        + H("0000 0000000000012345 050f")
        + REPLY_MAGIC + H("00000007 00000003 0000000e") + INFO_BLOCK
        + REPLY_MAGIC + H("00000007 00000001 00000000")
    )  # fmt: skip


def test_go_with_info_requests() -> None:
    conn = new()
    # NAME, DESCRIPTION, BLOCK_SIZE, an unknown info type 77, NAME again
    (ev,) = run(conn, opt(7, go_data(b"", 1, 2, 3, 77, 1)))
    assert isinstance(ev, HandshakeComplete) and ev.export == DISK
    assert replies(conn.data_to_send()) == [
        (7, INFO, H("0000 00000000001000000d6d")),
        (7, INFO, H("0001") + b"disk"),
        (7, INFO, H("0002") + b"a disk"),
        (7, INFO, INFO_BLOCK),
        (7, ACK, b""),
    ]


def test_info_then_go() -> None:
    conn = new()
    assert run(conn, opt(6, go_data(b"ro", 2))) == []
    info = replies(conn.data_to_send())
    assert info[-1] == (6, ACK, b"")
    assert (6, INFO, H("0002")) in info  # empty description, but requested
    (ev,) = run(conn, opt(7, go_data(b"ro")))
    assert isinstance(ev, HandshakeComplete) and ev.export == RO


def test_info_unknown_export_then_go_works() -> None:
    conn = new()
    assert run(conn, opt(6, go_data(b"missing"))) == []
    ((o, t, msg),) = replies(conn.data_to_send())
    assert (o, t) == (6, ERR_UNKNOWN) and b"missing" in msg
    msg.decode("utf-8")
    assert isinstance(run(conn, opt(7, go_data(b"disk")))[0], HandshakeComplete)


def test_go_unknown_export_is_an_error_not_a_close() -> None:
    conn = new()
    assert run(conn, opt(7, go_data(b"missing"))) == []
    assert replies(conn.data_to_send())[0][1] == ERR_UNKNOWN
    assert not conn.closed and not conn.in_transmission


@pytest.mark.parametrize(
    "data",
    [
        b"",  # too short for the name length
        u32(4) + b"di",  # name runs past the data
        u32(4) + b"disk",  # no info count
        u32(4) + b"disk" + u16(2) + u16(1),  # count says 2, one present
        u32(4) + b"disk" + u16(0) + b"x",  # trailing byte
        u32(4) + b"di\0k" + u16(0),  # NUL in name
        u32(2) + b"\xff\xfe" + u16(0),  # not UTF-8
    ],
)
def test_go_malformed_is_err_invalid(data: bytes) -> None:
    conn = new()
    assert run(conn, opt(7, data)) == []
    ((o, t, _),) = replies(conn.data_to_send())
    assert (o, t) == (7, ERR_INVALID)
    assert isinstance(run(conn, opt(7, go_data(b"disk")))[0], HandshakeComplete)


def test_name_length_over_max_string_is_too_big() -> None:
    conn = new()
    name = b"x" * 4097
    assert run(conn, opt(7, go_data(name))) == []
    assert replies(conn.data_to_send())[0][:2] == (7, ERR_TOO_BIG)
    # 0xffffffff declared inside a small option: refused before slicing anything
    assert run(conn, opt(6, u32(0xFFFFFFFF) + b"abc")) == []
    assert replies(conn.data_to_send())[0][:2] == (6, ERR_TOO_BIG)
    # a smaller configured limit is honoured
    conn = new(limits=Limits(max_string=8))
    assert run(conn, opt(7, go_data(b"123456789"))) == []
    assert replies(conn.data_to_send())[0][:2] == (7, ERR_TOO_BIG)


# -- LIST, ABORT, unknown options ------------------------------------------------------------------


def test_list() -> None:
    conn = new()
    assert run(conn, opt(3)) == []
    assert conn.data_to_send() == (
        REPLY_MAGIC + H("00000003 00000002 0000000e") + u32(4) + b"disk" + b"a disk"
        + REPLY_MAGIC + H("00000003 00000002 00000006") + u32(2) + b"ro"
        + REPLY_MAGIC + H("00000003 00000001 00000000")
    )  # fmt: skip


def test_list_with_data_is_invalid() -> None:
    conn = new()
    assert run(conn, opt(3, b"junk")) == []
    assert [r[:2] for r in replies(conn.data_to_send())] == [(3, ERR_INVALID)]
    assert run(conn, opt(3)) == []
    assert replies(conn.data_to_send())[-1] == (3, ACK, b"")


@pytest.mark.parametrize("data", [b"", b"ignored data"])
def test_abort(data: bytes) -> None:
    conn = new()
    (ev,) = run(conn, opt(2, data))
    assert isinstance(ev, ConnectionClosed) and not ev.error
    assert conn.data_to_send() == REPLY_MAGIC + H("00000002 00000001 00000000")
    assert conn.closed and run(conn, opt(3)) == []


def test_unknown_option_payload_drained_and_next_works() -> None:
    conn = new()
    assert run(conn, opt(99, b"0123456789")) == []
    ((o, t, msg),) = replies(conn.data_to_send())
    assert (o, t) == (99, ERR_UNSUP)
    msg.decode()
    (ev,) = run(conn, opt(1, b"disk"))
    assert isinstance(ev, HandshakeComplete)


@pytest.mark.parametrize("option", [4, 5, 11, 0, 0xFFFFFFFF])
def test_other_options_unsupported(option: int) -> None:
    conn = new()
    assert run(conn, opt(option, b"abc")) == []
    assert [r[:2] for r in replies(conn.data_to_send())] == [(option, ERR_UNSUP)]


def test_unknown_option_drain_arrives_in_pieces() -> None:
    conn = new()
    assert run(conn, opt(99, length=10) + b"0123") == []
    assert conn.data_to_send() == b""  # still draining
    assert run(conn, b"456789") == []
    assert replies(conn.data_to_send())[0][:2] == (99, ERR_UNSUP)


def test_oversize_option_drained_too_big_and_continues() -> None:
    limits = Limits()
    conn = new(limits=limits)
    n = limits.max_option_length + 1
    assert run(conn, opt(7, length=n)) == []
    for _ in range(n // 1000):
        assert run(conn, b"\xee" * 1000) == []
    assert conn.data_to_send() == b""
    assert run(conn, b"\xee" * (n % 1000)) == []
    assert [r[:2] for r in replies(conn.data_to_send())] == [(7, ERR_TOO_BIG)]
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)


def test_absurd_option_length_closes() -> None:
    conn = new()
    (ev,) = run(conn, opt(99, length=0xFFFFFFFF))
    assert isinstance(ev, ConnectionClosed) and ev.error


def test_oversize_export_name_closes() -> None:
    conn = new()
    (ev,) = run(conn, opt(1, b"x" * 5000))
    assert isinstance(ev, ConnectionClosed) and ev.error


def test_bad_option_magic_closes() -> None:
    conn = new()
    (ev,) = run(conn, b"IHAVEOPX" + u32(3) + u32(0))
    assert isinstance(ev, ConnectionClosed) and ev.error


def test_too_many_options_close() -> None:
    conn = new(limits=Limits(max_options=3))
    events = run(conn, opt(99) * 4)
    assert isinstance(events[-1], ConnectionClosed) and events[-1].error
    assert len(replies(conn.data_to_send())) == 3


def test_starttls_unsupported() -> None:
    conn = new()
    assert run(conn, opt(5)) == []
    assert replies(conn.data_to_send())[0][:2] == (5, ERR_UNSUP)


# -- STRUCTURED_REPLY and meta contexts ------------------------------------------------------------


def test_structured_reply_with_data_invalid_and_disabled_unsup() -> None:
    conn = new()
    run(conn, opt(8, b"x"))
    assert replies(conn.data_to_send())[0][:2] == (8, ERR_INVALID)
    conn = new(structured=False)
    run(conn, opt(8))
    assert replies(conn.data_to_send())[0][:2] == (8, ERR_UNSUP)
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete) and not ev.structured_replies


def test_set_meta_context_before_structured_reply_invalid() -> None:
    conn = new()
    run(conn, opt(10, meta_data(b"disk", b"base:allocation")))
    assert [r[:2] for r in replies(conn.data_to_send())] == [(10, ERR_INVALID)]
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete) and ev.meta_contexts == {}


def test_set_meta_context_after_structured_reply() -> None:
    conn = new()
    run(conn, opt(8))
    run(conn, opt(10, meta_data(b"disk", b"base:allocation", b"qemu:dirty-bitmap:x", b"base:foo")))
    rep = replies(conn.data_to_send())
    assert rep[0] == (8, ACK, b"")
    assert rep[1][:2] == (10, META)
    ctx_id = struct.unpack(">I", rep[1][2][:4])[0]
    assert ctx_id != 0 and rep[1][2][4:] == b"base:allocation"
    assert rep[2] == (10, ACK, b"")
    assert len(rep) == 3
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)
    assert ev.meta_contexts == {ctx_id: "base:allocation"}
    assert conn.meta_contexts == {ctx_id: "base:allocation"}


def test_set_meta_context_replaces_and_binds_to_export() -> None:
    conn = new()
    run(conn, opt(8))
    run(conn, opt(10, meta_data(b"disk", b"base:allocation")))
    run(conn, opt(10, meta_data(b"disk", b"base:")))  # base: is not a wildcard for SET
    rep = replies(conn.data_to_send())
    assert [r[1] for r in rep] == [ACK, META, ACK, ACK]
    (ev,) = run(conn, opt(7, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete) and ev.meta_contexts == {}

    conn = new()
    run(conn, opt(8))
    run(conn, opt(10, meta_data(b"disk", b"base:allocation")))
    (ev,) = run(conn, opt(7, go_data(b"ro")))  # a different export: selection does not apply
    assert isinstance(ev, HandshakeComplete) and ev.meta_contexts == {}

    conn = new()
    run(conn, opt(8))
    run(conn, opt(10, meta_data(b"disk", b"base:allocation")))
    run(conn, opt(10, meta_data(b"disk", b"base:allocation")))
    rep = replies(conn.data_to_send())
    ids = [struct.unpack(">I", r[2][:4])[0] for r in rep if r[1] == META]
    assert len(set(ids)) == 2 and 0 not in ids
    (ev,) = run(conn, opt(7, go_data(b"")))  # default export is the same export
    assert isinstance(ev, HandshakeComplete) and ev.meta_contexts == {ids[1]: "base:allocation"}


@pytest.mark.parametrize(
    "queries,expected",
    [
        ((), [b"base:allocation"]),
        ((b"base:",), [b"base:allocation"]),
        ((b"base:allocation", b"base:"), [b"base:allocation"]),
        ((b"qemu:dirty-bitmap:a",), []),
        ((b"base:nothing",), []),
    ],
)
def test_list_meta_context(queries: tuple[bytes, ...], expected: list[bytes]) -> None:
    conn = new()  # LIST does not need structured replies
    run(conn, opt(9, meta_data(b"disk", *queries)))
    rep = replies(conn.data_to_send())
    assert rep[-1] == (9, ACK, b"")
    assert [r[2] for r in rep[:-1]] == [u32(0) + e for e in expected]
    assert all(r[1] == META for r in rep[:-1])


def test_meta_context_errors() -> None:
    conn = new()
    run(conn, opt(9, meta_data(b"missing")))
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_UNKNOWN)
    run(conn, opt(9, meta_data(b"disk") + b"x"))  # trailing
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_INVALID)
    run(conn, opt(9, u32(4) + b"disk" + u32(1) + u32(100) + b"short"))
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_INVALID)
    run(conn, opt(9, u32(4) + b"disk" + u32(1) + u32(5000) + b"x" * 5000))
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_TOO_BIG)
    run(conn, opt(9, u32(4) + b"disk" + u32(129)))  # count checked before reading queries
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_TOO_BIG)
    run(conn, opt(9, meta_data(b"disk", b"base:\0")))
    assert replies(conn.data_to_send())[0][:2] == (9, ERR_INVALID)


# -- EOF, pipelining, flags ------------------------------------------------------------------------


def test_eof_at_option_boundary_is_clean() -> None:
    conn = new()
    assert run(conn, opt(3)) == []
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and not ev.error


def test_eof_inside_option_is_an_error() -> None:
    conn = new()
    run(conn, opt(7, length=20) + b"abc")
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and ev.error


def test_requests_pipelined_with_go() -> None:
    conn = new()
    req = H("25609513 00000000 00000000000000010000000000000000 00001000")
    events = run(conn, opt(7, go_data(b"disk")) + req)
    assert isinstance(events[0], HandshakeComplete)
    assert events[1] == Request(0, 0, 1, 0, 4096)


@pytest.mark.parametrize(
    "export,structured,flags",
    [(DISK, True, 0x0DED), (DISK, False, 0x0D6D), (RO, True, 0x058F), (RO, False, 0x050F)],
)
def test_transmission_flags(export: ExportInfo, structured: bool, flags: int) -> None:
    conn = new(structured=structured)
    run(conn, opt(8))
    assert conn.transmission_flags(export) == flags


def test_oversize_export_name_closes_before_buffering() -> None:
    conn = new()
    (ev,) = run(conn, opt(1, length=4097))  # only the header arrived
    assert isinstance(ev, ConnectionClosed) and ev.error


# -- server shutdown during negotiation ------------------------------------------------------------

ERR_SHUTDOWN = 0x80000007


def test_shutdown_answers_options_err_shutdown_and_abort_still_works() -> None:
    conn = new()
    assert run(conn, opt(8)) == []  # STRUCTURED_REPLY before the shutdown: accepted
    assert replies(conn.data_to_send()) == [(8, ACK, b"")]
    conn.begin_shutdown()
    assert run(conn, opt(7, go_data(b"disk")) + opt(3) + opt(99, b"xyz")) == []
    got = replies(conn.data_to_send())
    assert [(o, t) for o, t, _ in got] == [(7, ERR_SHUTDOWN), (3, ERR_SHUTDOWN), (99, ERR_SHUTDOWN)]
    assert not conn.in_transmission
    (ev,) = run(conn, opt(2))  # ABORT: acknowledged, then closed
    assert isinstance(ev, ConnectionClosed) and not ev.error
    assert replies(conn.data_to_send()) == [(2, ACK, b"")]


def test_shutdown_closes_on_export_name() -> None:
    conn = new()
    conn.begin_shutdown()
    (ev,) = run(conn, opt(1, b"disk"))
    assert isinstance(ev, ConnectionClosed) and ev.error
    assert conn.data_to_send() == b"" and not conn.in_transmission
