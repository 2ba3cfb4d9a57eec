"""Raw-socket tests: hostile and out-of-spec peers, speaking bytes the real clients never send.

After every hostile case: the server process is still alive, a sentinel written at module start
by another client is intact, and a new client can write and read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from . import nbdraw as raw
from .conftest import MiB, Server

SENTINEL_OFFSET = 32 * MiB
SENTINEL = os.urandom(256 * 1024)
SCRATCH = 40 * MiB  # each test below uses its own 1 MiB slot from here on


@pytest.fixture(scope="module")
def srv(server: Server) -> Iterator[Server]:
    with raw.RawClient(server.addr()).connect_export("zram0") as c:
        assert c.write(SENTINEL_OFFSET, SENTINEL) == 0
        assert c.flush() == 0
        c.disconnect()
    yield server


@pytest.fixture(autouse=True)
def _still_healthy(srv: Server) -> Iterator[None]:
    yield
    assert_healthy(srv)


def assert_healthy(srv: Server) -> None:
    srv.assert_alive()
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        assert c.read(SENTINEL_OFFSET, len(SENTINEL)) == SENTINEL, "another client's data changed"
        probe = os.urandom(4096)
        assert c.write(SCRATCH - 4096, probe) == 0
        assert c.read(SCRATCH - 4096, 4096) == probe
        c.disconnect()


def test_bad_request_magic_disconnects(srv: Server) -> None:
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.request(raw.CMD_READ, 0, 4096, cookie=1, magic=0xDEADBEEF)
        assert c.wait_closed(), "server kept a connection that sent a bad request magic"


def test_truncated_header_then_close(srv: Server) -> None:
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.send(struct.pack(">IHHQ", raw.REQUEST_MAGIC, 0, raw.CMD_READ, 5)[:13])
    # And a half header during the handshake.
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send(struct.pack(">Q", raw.IHAVEOPT) + b"\x00\x00")


def test_garbage_instead_of_client_flags(srv: Server) -> None:
    with raw.RawClient(srv.addr()) as c:
        c.recv_exact(18)
        c.send(b"\xff\xff\xff\xff" + os.urandom(200))
        assert c.wait_closed(), "server must close on client flags it did not offer"


def test_garbage_instead_of_option(srv: Server) -> None:
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
        assert c.wait_closed(), "server must close on a bad option magic"


def test_oversized_option_length(srv: Server) -> None:
    rss_before = srv.rss_kib()
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_GO, b"\x00" * 64, length=0xFFFFFFFF)
        # The server may answer with an error reply or close; it must not wait for 4 GiB.
        try:
            _opt, rtype, _data = c.read_option_reply()
            assert rtype & 0x80000000, f"oversized option answered with non-error {rtype:#x}"
        except raw.PeerClosed:
            pass
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_LIST, b"", length=0x7FFFFFFF)
        try:
            _opt, rtype, _data = c.read_option_reply()
            assert rtype & 0x80000000
        except raw.PeerClosed:
            pass
    # No allocation sized by the claimed length (allow 64 MiB of noise).
    assert srv.rss_kib() - rss_before < 64 * 1024


def test_unknown_option_then_go(srv: Server) -> None:
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(99, b"some payload that must be drained")
        opt, rtype, _ = c.read_option_reply()
        assert (opt, rtype) == (99, raw.REP_ERR_UNSUP)
        c.go("zram0")
        assert c.size > 0
        assert c.read(SENTINEL_OFFSET, 4096) == SENTINEL[:4096]
        c.disconnect()


def test_go_unknown_export_is_an_error(srv: Server) -> None:
    srv.require_multi_export()
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_GO, struct.pack(">I", 7) + b"nothere" + struct.pack(">H", 0))
        opt, rtype, _ = c.read_option_reply()
        assert opt == raw.OPT_GO and rtype == raw.REP_ERR_UNKNOWN, hex(rtype)
        c.go("zram0")  # and the haggling goes on


def test_unknown_command_einval_connection_kept(srv: Server) -> None:
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.request(99, 0, 0, cookie=0x99)
        assert c.read_simple_reply(0x99) == raw.EINVAL
        assert c.read(SENTINEL_OFFSET, 4096) == SENTINEL[:4096]
        c.disconnect()


def test_unknown_flag_einval_connection_kept(srv: Server) -> None:
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.request(raw.CMD_READ, 0, 4096, cookie=3, flags=0x100)
        assert c.read_simple_reply(3) == raw.EINVAL
        # A rejected WRITE still has its payload consumed.
        c.request(raw.CMD_WRITE, SCRATCH, 4096, cookie=4, flags=0x100, payload=b"\xee" * 4096)
        assert c.read_simple_reply(4) == raw.EINVAL
        assert c.read(SCRATCH, 4096) != b"\xee" * 4096
        assert c.read(SENTINEL_OFFSET, 4096) == SENTINEL[:4096]
        c.disconnect()


def test_client_vanishes_mid_write_payload(srv: Server) -> None:
    base = SCRATCH + 1 * MiB
    before = os.urandom(1 * MiB)
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        assert c.write(base, before) == 0
        c.disconnect()
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.request(raw.CMD_WRITE, base, 1 * MiB, cookie=5, payload=b"\xff" * (MiB // 2 + 123))
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        assert c.read(base, 1 * MiB) == before, "part of an incomplete WRITE was applied"
        c.disconnect()


def test_write_above_cap_errors_and_connection_kept(srv: Server) -> None:
    """READ/WRITE above 64 MiB: an error reply (payload drained), the connection goes on."""
    big = 64 * MiB + 4096
    with raw.RawClient(srv.addr(), timeout=60).connect_export("zram0") as c:
        c.request(raw.CMD_WRITE, 0, big, cookie=11, payload=b"\xcc" * big)
        err = c.read_simple_reply(11)
        assert err != 0, "a WRITE above the 64 MiB cap must fail"
        assert err in (raw.EINVAL, raw.ENOMEM, raw.EOVERFLOW, raw.ENOSPC), err
        assert c.read(SENTINEL_OFFSET, len(SENTINEL)) == SENTINEL
        c.request(raw.CMD_READ, 0, big, cookie=12)
        err = c.read_simple_reply(12)
        assert err != 0, "a READ above the 64 MiB cap must fail"
        assert c.read(SENTINEL_OFFSET, 4096) == SENTINEL[:4096]
        c.disconnect()


def test_many_hostile_connections_at_once(srv: Server) -> None:
    clients = []
    for i in range(20):
        c = raw.RawClient(srv.addr())
        if i % 2:
            c.greeting()
        clients.append(c)
    for c in clients:
        c.close()


def test_many_requests_in_flight(srv: Server) -> None:
    """200 pipelined requests on one connection: every one answered once, cookies echoed."""
    base = SCRATCH + 3 * MiB
    n = 200
    with raw.RawClient(srv.addr(), timeout=30).connect_export("zram0") as c:
        batch = bytearray()
        for i in range(n):
            payload = bytes([i & 0xFF]) * 4096
            batch += raw.REQUEST.pack(raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 0x1000 + i,
                                       base + i * 4096, 4096) + payload
        c.send(bytes(batch))
        seen = set()
        for _ in range(n):
            err = c.read_simple_reply()
            assert err == 0
        # cookies: read them back in a second round so we can check them one by one
        batch = bytearray()
        for i in range(n):
            batch += raw.REQUEST.pack(raw.REQUEST_MAGIC, 0, raw.CMD_READ, 0x5000 + i,
                                       base + i * 4096, 4096)
        c.send(bytes(batch))
        for _ in range(n):
            magic, err, cookie = raw.SIMPLE_REPLY.unpack(c.recv_exact(16))
            assert magic == raw.SIMPLE_REPLY_MAGIC and err == 0
            assert 0x5000 <= cookie < 0x5000 + n and cookie not in seen
            seen.add(cookie)
            i = cookie - 0x5000
            assert c.recv_exact(4096) == bytes([i & 0xFF]) * 4096, f"request {i} read wrong data"
        assert len(seen) == n
        c.disconnect()


def test_disc_finishes_writes_in_flight(srv: Server) -> None:
    base = SCRATCH + 5 * MiB
    data = os.urandom(2 * MiB)
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.send(
            raw.REQUEST.pack(raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, base, len(data)) + data
            + raw.REQUEST.pack(raw.REQUEST_MAGIC, 0, raw.CMD_DISC, 2, 0, 0)
        )
        # The write is answered; then the server closes (no reply to DISC).
        err = c.read_simple_reply(1)
        assert c.wait_closed(), "server must close after NBD_CMD_DISC"
    if srv.is_nbdkit and err == raw.ESHUTDOWN:
        return  # nbdkit's worker threads may see DISC first and refuse the write
    assert err == 0, f"a WRITE sent before DISC must be carried out, got error {err}"
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        assert c.read(base, len(data)) == data
        c.disconnect()


def test_simple_reply_errors_keep_stream_in_sync(srv: Server) -> None:
    """Without structured replies an errored READ carries no payload."""
    size = srv.size("zram0")
    with raw.RawClient(srv.addr()).connect_export("zram0") as c:
        c.request(raw.CMD_READ, size - 512, 4096, cookie=21)
        assert c.read_simple_reply(21) == raw.EINVAL
        c.request(raw.CMD_WRITE, size - 512, 4096, cookie=22, payload=b"\x01" * 4096)
        assert c.read_simple_reply(22) == raw.ENOSPC
        c.request(raw.CMD_TRIM, size, 4096, cookie=23)
        assert c.read_simple_reply(23) == raw.EINVAL
        # 32 MiB + 4 KiB, below the 64 MiB cap: must work.
        big = 32 * MiB + 4096
        payload = os.urandom(big)
        assert c.write(SCRATCH + 8 * MiB, payload, cookie=24) == 0
        assert c.read(SCRATCH + 8 * MiB, big, cookie=25) == payload
        assert c.read(SENTINEL_OFFSET, 4096) == SENTINEL[:4096]
        c.disconnect()


def test_overlong_export_name(srv: Server) -> None:
    """A 64 KiB export name (limit is 4096): an error reply or a close, never a crash."""
    name = b"n" * 65536
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        try:
            opt, rtype, _ = c.read_option_reply()
            assert rtype & 0x80000000, f"64 KiB name accepted with reply {rtype:#x}"
        except (raw.PeerClosed, BrokenPipeError):
            pass


def test_inconsistent_go_payload(srv: Server) -> None:
    """GO whose inner name length overruns the option length, and a huge info-request count."""
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_GO, struct.pack(">I", 1000) + b"zram0" + struct.pack(">H", 0))
        try:
            _opt, rtype, _ = c.read_option_reply()
            assert rtype & 0x80000000, f"malformed GO accepted: {rtype:#x}"
            c.go("zram0")  # the session may continue after ERR_INVALID
        except raw.PeerClosed:
            pass
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_GO, struct.pack(">I", 5) + b"zram0" + struct.pack(">H", 0xFFFF))
        try:
            _opt, rtype, _ = c.read_option_reply()
            assert rtype & 0x80000000, f"GO with 65535 info requests but no data: {rtype:#x}"
        except raw.PeerClosed:
            pass


def test_list_with_data_and_meta_context_abuse(srv: Server) -> None:
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_LIST, b"unexpected")
        _opt, rtype, _ = c.read_option_reply()
        assert rtype == raw.REP_ERR_INVALID, hex(rtype)
        # SET_META_CONTEXT claiming 2^32-1 queries in a short payload.
        c.send_option(raw.OPT_STRUCTURED_REPLY)
        assert c.read_option_reply()[1] == raw.REP_ACK
        body = struct.pack(">I", 5) + b"zram0" + struct.pack(">I", 0xFFFFFFFF)
        c.send_option(10, body + struct.pack(">I", 15) + b"base:allocation")
        try:
            _opt, rtype, _ = c.read_option_reply()
            if not srv.is_nbdkit:  # nbdkit 1.32 answers this leniently
                assert rtype & 0x80000000, f"query count 2^32-1 accepted: {rtype:#x}"
                c.go("zram0")
        except raw.PeerClosed:
            pass


def test_export_name_option_unknown_export_closes(srv: Server) -> None:
    srv.require_multi_export()
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_EXPORT_NAME, b"no-such-export")
        assert c.wait_closed(), "EXPORT_NAME of an unknown export must close the connection"


# Transmission flags (nbd.md 1.3) the issue requires on a writable export.
TF_HAS_FLAGS, TF_READ_ONLY, TF_FLUSH, TF_FUA, TF_ROTATIONAL = 0x1, 0x2, 0x4, 0x8, 0x10
TF_TRIM, TF_WRITE_ZEROES, TF_DF, TF_MULTI_CONN, TF_CACHE, TF_FAST_ZERO = (
    0x20, 0x40, 0x80, 0x100, 0x400, 0x800)
TF_RW_SIMPLE = (TF_HAS_FLAGS | TF_FLUSH | TF_FUA | TF_TRIM | TF_WRITE_ZEROES | TF_MULTI_CONN
                | TF_CACHE | TF_FAST_ZERO)


def test_transmission_flags_exact(srv: Server) -> None:
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.go("zram0")
        assert c.tflags == TF_RW_SIMPLE, f"{c.tflags:#x} != {TF_RW_SIMPLE:#x} (no DF without SR)"
        c.disconnect()
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_STRUCTURED_REPLY)
        assert c.read_option_reply()[1] == raw.REP_ACK
        c.go("zram0")
        assert c.tflags == TF_RW_SIMPLE | TF_DF, f"{c.tflags:#x}"
        c.disconnect()


def test_read_only_flags(srv: Server) -> None:
    srv.require_multi_export()
    with raw.RawClient(srv.addr()) as c:
        c.greeting()
        c.go("ro")
        assert c.tflags & TF_HAS_FLAGS and c.tflags & TF_READ_ONLY
        assert not c.tflags & TF_ROTATIONAL
        c.request(raw.CMD_WRITE, 0, 4096, cookie=31, payload=b"\x01" * 4096)
        assert c.read_simple_reply(31) == raw.EPERM
        c.request(raw.CMD_TRIM, 0, 4096, cookie=32)
        assert c.read_simple_reply(32) == raw.EPERM
        c.request(6, 0, 4096, cookie=33)  # WRITE_ZEROES
        assert c.read_simple_reply(33) == raw.EPERM
        assert c.read(0, 4096) == bytes(4096)
        c.disconnect()


def _sr_client(srv: Server) -> raw.RawClient:
    c = raw.RawClient(srv.addr())
    c.greeting()
    c.send_option(raw.OPT_STRUCTURED_REPLY)
    assert c.read_option_reply()[1] == raw.REP_ACK
    c.go("zram0")
    return c


def test_structured_read_chunks_on_the_wire(srv: Server) -> None:
    base = SCRATCH + 6 * MiB
    data = os.urandom(4096)
    with _sr_client(srv) as c:
        c.request(raw.CMD_TRIM, base, 1 * MiB, cookie=40)
        assert c.read_simple_or_chunk_error(40) == 0
        c.request(raw.CMD_WRITE, base + 64 * 1024, 4096, cookie=41, payload=data)
        assert c.read_simple_or_chunk_error(41) == 0
        c.request(raw.CMD_READ, base, 256 * 1024, cookie=42)
        chunks = c.read_chunks(42)
        got = bytearray(256 * 1024)
        covered = 0
        for _flags, ctype, payload in chunks:
            assert ctype in (raw.CHUNK_OFFSET_DATA, raw.CHUNK_OFFSET_HOLE, raw.CHUNK_NONE), ctype
            if ctype == raw.CHUNK_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                rel = off - base
                assert 0 <= rel and rel + len(payload) - 8 <= len(got)
                got[rel : rel + len(payload) - 8] = payload[8:]
                covered += len(payload) - 8
            elif ctype == raw.CHUNK_OFFSET_HOLE:
                off, hole = struct.unpack(">QI", payload)
                rel = off - base
                assert 0 <= rel and rel + hole <= len(got)
                covered += hole
        assert covered == len(got), "content chunks must cover the read exactly"
        assert bytes(got[64 * 1024 : 64 * 1024 + 4096]) == data
        assert bytes(got[: 64 * 1024]) == bytes(64 * 1024)
        if not srv.is_nbdkit:
            assert any(t == raw.CHUNK_OFFSET_HOLE for _, t, _ in chunks), "no OFFSET_HOLE chunk"
        # An errored READ answers with an ERROR chunk and the stream goes on.
        c.request(raw.CMD_READ, srv.size("zram0") - 512, 4096, cookie=43)
        chunks = c.read_chunks(43)
        errs = [p for _, t, p in chunks if t in (raw.CHUNK_ERROR, raw.CHUNK_ERROR_OFFSET)]
        assert errs and struct.unpack(">I", errs[0][:4])[0] == raw.EINVAL, chunks
        # BLOCK_STATUS with no meta context selected: EINVAL, connection kept.
        c.request(7, base, 4096, cookie=44)
        assert c.read_simple_or_chunk_error(44) == raw.EINVAL
        c.request(raw.CMD_READ, base + 64 * 1024, 4096, cookie=45)
        chunks = c.read_chunks(45)
        assert b"".join(p[8:] for _, t, p in chunks if t == raw.CHUNK_OFFSET_DATA) == data
        c.disconnect()
