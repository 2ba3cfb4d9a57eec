"""STARTTLS in the sans-I/O core: the three TLS modes, state reset, injection (nbd.md 5)."""

from __future__ import annotations

import pytest
from test_protocol_handshake import (
    ACK,
    ERR_INVALID,
    ERR_UNSUP,
    GREETING,
    META,
    Catalog,
    go_data,
    meta_data,
    opt,
    replies,
    run,
    u32,
)

from zramd.protocol import (
    ConnectionClosed,
    ExportInfo,
    HandshakeComplete,
    Limits,
    ServerConnection,
    StartTLS,
)

ERR_TLS_REQD = 0x80000005
STARTTLS, ABORT, LIST, INFO, GO, EXPORT_NAME, STRUCTURED, SET_META = 5, 2, 3, 6, 7, 1, 8, 10

DISK = ExportInfo("disk", 1 << 20)


def new(tls: str) -> ServerConnection:
    conn = ServerConnection(Catalog(DISK, default=DISK), Limits(), tls=tls)
    assert conn.data_to_send() == GREETING
    conn.receive_data(u32(3))
    return conn


def starttls(conn: ServerConnection) -> None:
    events = run(conn, opt(STARTTLS))
    assert len(events) == 1 and isinstance(events[0], StartTLS)
    assert [r[:2] for r in replies(conn.data_to_send())] == [(STARTTLS, ACK)]
    assert conn.tls_active


def test_bad_mode_refused() -> None:
    with pytest.raises(ValueError):
        ServerConnection(Catalog(DISK), Limits(), tls="maybe")


def test_off_starttls_unsup_never_tls_reqd() -> None:
    conn = new("off")
    assert run(conn, opt(STARTTLS) + opt(LIST) + opt(99)) == []
    got = [r[:2] for r in replies(conn.data_to_send())]
    assert got[0] == (STARTTLS, ERR_UNSUP)
    assert all(t != ERR_TLS_REQD for _, t in got)
    assert not conn.tls_active


def test_on_mode_starttls_optional() -> None:
    conn = new("on")  # plaintext GO still works
    (ev,) = run(conn, opt(GO, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)
    conn = new("on")
    starttls(conn)
    (ev,) = run(conn, opt(GO, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)


@pytest.mark.parametrize("option", [LIST, INFO, GO, STRUCTURED, SET_META, 9, 99, 11])
def test_require_mode_options_get_tls_reqd(option: int) -> None:
    conn = new("require")
    data = go_data(b"disk") if option in (INFO, GO) else b"xyz" if option == 99 else b""
    assert run(conn, opt(option, data)) == []
    assert [r[:2] for r in replies(conn.data_to_send())] == [(option, ERR_TLS_REQD)]
    # framing intact: STARTTLS still works afterwards, then GO does
    starttls(conn)
    (ev,) = run(conn, opt(GO, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)


def test_require_mode_export_name_closes() -> None:
    conn = new("require")
    (ev,) = run(conn, opt(EXPORT_NAME, b"disk"))
    assert isinstance(ev, ConnectionClosed) and ev.error
    assert conn.data_to_send() == b""


def test_require_mode_abort_acked() -> None:
    conn = new("require")
    (ev,) = run(conn, opt(ABORT))
    assert isinstance(ev, ConnectionClosed) and not ev.error
    assert [r[:2] for r in replies(conn.data_to_send())] == [(ABORT, ACK)]


def test_require_mode_export_name_after_tls_works() -> None:
    conn = new("require")
    starttls(conn)
    (ev,) = run(conn, opt(EXPORT_NAME, b"disk"))
    assert isinstance(ev, HandshakeComplete)


def test_starttls_twice_invalid_and_with_data_invalid() -> None:
    conn = new("on")
    run(conn, opt(STARTTLS, b"x"))
    assert [r[:2] for r in replies(conn.data_to_send())] == [(STARTTLS, ERR_INVALID)]
    assert not conn.tls_active
    starttls(conn)
    assert run(conn, opt(STARTTLS)) == []
    assert [r[:2] for r in replies(conn.data_to_send())] == [(STARTTLS, ERR_INVALID)]


def test_state_negotiated_before_starttls_is_forgotten() -> None:
    """CVE-2021-3716: plaintext STRUCTURED_REPLY / SET_META_CONTEXT must not survive STARTTLS."""
    conn = new("on")
    run(conn, opt(STRUCTURED) + opt(SET_META, meta_data(b"disk", b"base:allocation")))
    got = [r[:2] for r in replies(conn.data_to_send())]
    assert got == [(STRUCTURED, ACK), (SET_META, META), (SET_META, ACK)]
    starttls(conn)
    (ev,) = run(conn, opt(GO, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)
    assert not ev.structured_replies and ev.meta_contexts == {}
    assert not conn.structured_replies
    # and the flags advertised in GO's INFO_EXPORT lack SEND_DF (structured-only)
    info = [r for r in replies(conn.data_to_send()) if r[1] == 3][0][2]
    assert not int.from_bytes(info[10:12], "big") & (1 << 7)


def test_state_negotiated_after_starttls_kept() -> None:
    conn = new("require")
    starttls(conn)
    run(conn, opt(STRUCTURED) + opt(SET_META, meta_data(b"disk", b"base:allocation")))
    (ev,) = run(conn, opt(GO, go_data(b"disk")))
    assert isinstance(ev, HandshakeComplete)
    assert ev.structured_replies and ev.meta_contexts == {1: "base:allocation"}


def test_plaintext_pipelined_after_starttls_closes() -> None:
    """Bytes sent behind STARTTLS before the TLS handshake would be injected: close."""
    conn = new("on")
    events = run(conn, opt(STARTTLS) + opt(STRUCTURED))
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed) and events[0].error
    assert "after STARTTLS" in events[0].reason
    # the ACK is still queued (harmless), and nothing else is processed afterwards
    assert [r[:2] for r in replies(conn.data_to_send())] == [(STARTTLS, ACK)]
    assert run(conn, opt(GO, go_data(b"disk"))) == []


def test_eof_right_after_starttls_is_a_quiet_close() -> None:
    conn = new("on")
    conn.receive_data(opt(STARTTLS))
    conn.receive_data(b"")
    (ev,) = run(conn)
    assert isinstance(ev, ConnectionClosed) and not ev.error
