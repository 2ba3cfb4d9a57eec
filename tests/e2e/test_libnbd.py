"""python3-libnbd as a programmable client: option haggling, the kernel's simple-reply mode,
exact error codes with strict mode off, block status and structured reads with holes."""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator

import nbd
import pytest

from .conftest import MiB, Server


def connect(
    uri: str,
    *,
    structured: bool = True,
    strict: bool = True,
    meta: bool = False,
    opt_mode: bool = False,
) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


@pytest.fixture
def handle(server: Server) -> Iterator[nbd.NBD]:
    h = connect(server.uri("zram0"), strict=False, meta=True)
    yield h
    close(h)


def close(h: nbd.NBD) -> None:
    """Disconnect politely if still connected; libnbd 1.14's Python handle has no close()."""
    try:
        if not h.aio_is_closed() and not h.aio_is_created():
            h.shutdown()
    except nbd.Error:
        pass
    del h


def _put(d: dict[str, str], k: str, v: str) -> int:
    d[k] = v
    return 0


def _add(items: list[str], item: str) -> int:
    items.append(item)
    return 0


def expect_errno(code: int, fn: Callable[[], object]) -> None:
    with pytest.raises(nbd.Error) as exc:
        fn()
    assert exc.value.errnum == code, (
        f"expected {errno.errorcode[code]}, got errnum={exc.value.errnum} ({exc.value.string})"
    )


def still_works(h: nbd.NBD, offset: int = 0) -> None:
    data = os.urandom(4096)
    h.pwrite(data, offset)
    assert h.pread(4096, offset) == data


# -- option haggling ----------------------------------------------------------------------------

def test_opt_list_info_meta_go(server: Server) -> None:
    server.require_multi_export()
    h = connect(server.uri(""), opt_mode=True)
    try:
        assert h.aio_is_negotiating()
        listed: dict[str, str] = {}
        n = h.opt_list(lambda name, desc: _put(listed, name, desc))
        assert n == 3 and listed == {
            "zram0": "first test export",
            "other": "second test export",
            "ro": "read-only test export",
        }
        h.set_full_info(True)
        for name in ("zram0", "other", "ro"):
            h.set_export_name(name)
            h.opt_info()
            assert h.get_size() == server.size(name)
            assert h.is_read_only() == (name == "ro")
            assert h.get_export_description() == listed[name]
            assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
            assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
            assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        contexts: list[str] = []
        h.opt_list_meta_context(lambda name: _add(contexts, name))
        assert contexts == ["base:allocation"]
        # INFO on an unknown export fails and negotiation continues.
        h.set_export_name("no-such-export")
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.set_export_name("other")
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.opt_go()
        assert not h.aio_is_negotiating()
        assert h.get_size() == server.size("other")
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    finally:
        close(h)


def test_opt_go_default_and_abort(server: Server) -> None:
    h = connect(server.uri("zram0"), opt_mode=True)
    try:
        h.opt_go()
        assert h.get_size() == server.size("zram0")
        assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
        assert h.can_zero() and h.can_fast_zero() and h.can_cache() and h.can_df()
        assert h.get_structured_replies_negotiated()
        h.shutdown()
    finally:
        close(h)
    h = connect(server.uri("zram0"), opt_mode=True)
    try:
        h.opt_abort()
        assert h.aio_is_closed()
    finally:
        close(h)


def test_meta_context_query(server: Server) -> None:
    h = connect(server.uri("zram0"), opt_mode=True)
    try:
        found: list[str] = []
        h.add_meta_context("base:")
        h.opt_list_meta_context(lambda name: _add(found, name))
        assert "base:allocation" in found
        h.clear_meta_contexts()
        h.add_meta_context("nosuch:context")
        found.clear()
        h.opt_list_meta_context(lambda name: _add(found, name))
        assert found == []
        h.opt_abort()
    finally:
        close(h)


# -- the kernel's view: simple replies only ------------------------------------------------------

def test_no_structured_replies_client(server: Server) -> None:
    h = connect(server.uri("zram0"), structured=False)
    try:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df(), "DF only makes sense with structured replies"
        base = 48 * MiB
        data = os.urandom(3 * MiB + 517)
        h.pwrite(data, base + 123)
        h.flush()
        assert h.pread(len(data), base + 123) == data
        h.pwrite(data[:4096], base, nbd.CMD_FLAG_FUA)
        h.trim(1 * MiB, base + 1 * MiB)
        got = h.pread(1 * MiB, base + 1 * MiB)
        assert got == bytes(MiB), "trimmed range must read back as zero on a RAM disk"
        h.zero(64 * 1024, base + 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(64 * 1024, base + 2 * MiB) == bytes(64 * 1024)
        h.cache(MiB, base)
        assert h.pread(4096, base) == data[:4096]
        h.shutdown()
    finally:
        close(h)


# -- exact errors, connection kept ---------------------------------------------------------------

def test_read_past_end_einval(server: Server, handle: nbd.NBD) -> None:
    size = server.size("zram0")
    expect_errno(errno.EINVAL, lambda: handle.pread(4096, size - 2048))
    expect_errno(errno.EINVAL, lambda: handle.pread(512, size))
    still_works(handle)


def test_write_past_end_enospc(server: Server, handle: nbd.NBD) -> None:
    size = server.size("zram0")
    expect_errno(errno.ENOSPC, lambda: handle.pwrite(b"x" * 4096, size - 2048))
    expect_errno(errno.ENOSPC, lambda: handle.zero(8192, size - 4096))
    expect_errno(errno.EINVAL, lambda: handle.trim(8192, size - 4096))
    # The in-range part of a refused write must not have been applied.
    assert handle.pread(2048, size - 2048) != b"x" * 2048
    still_works(handle)


def test_unknown_flags_einval(handle: nbd.NBD) -> None:
    expect_errno(errno.EINVAL, lambda: handle.pread(4096, 0, 0x100))
    expect_errno(errno.EINVAL, lambda: handle.pwrite(b"q" * 4096, 0, 0x100))
    expect_errno(errno.EINVAL, lambda: handle.flush(0x200))
    still_works(handle)


def test_read_only_export_eperm(server: Server) -> None:
    server.require_multi_export()
    h = connect(server.uri("ro"), strict=False)
    try:
        assert h.is_read_only()
        expect_errno(errno.EPERM, lambda: h.pwrite(b"w" * 4096, 0))
        expect_errno(errno.EPERM, lambda: h.trim(4096, 0))
        expect_errno(errno.EPERM, lambda: h.zero(4096, 0))
        assert h.pread(4096, 0) == bytes(4096)
        h.flush()
        h.shutdown()
    finally:
        close(h)


@pytest.mark.slow
def test_48mib_read_and_write(server: Server, handle: nbd.NBD) -> None:
    size = 48 * MiB
    data = os.urandom(size)
    handle.pwrite(data, 64 * MiB)
    assert handle.pread(size, 64 * MiB) == data
    still_works(handle)


# -- block status and structured reads -----------------------------------------------------------

def extents(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        assert off == offset
        out.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def state_map(h: nbd.NBD, length: int, offset: int) -> list[tuple[int, int, int]]:
    """(start, end, flags) covering [offset, offset+length), asking again where short."""
    result = []
    pos = offset
    while pos < offset + length:
        ext = extents(h, offset + length - pos, pos)
        assert ext, "empty block status reply"
        for ln, fl in ext:
            assert ln > 0
            result.append((pos, pos + ln, fl))
            pos += ln
    return result


def flags_at(m: list[tuple[int, int, int]], at: int) -> int:
    for start, end, fl in m:
        if start <= at < end:
            return fl
    raise AssertionError(at)


def test_block_status_base_allocation(fresh_server: Server) -> None:
    h = connect(fresh_server.uri("zram0"), meta=True)
    try:
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        size = fresh_server.size("zram0")
        m = state_map(h, size, 0)
        assert all(fl == nbd.STATE_HOLE | nbd.STATE_ZERO for _, _, fl in m), m[:8]
        h.pwrite(os.urandom(64 * 1024), 1 * MiB)
        h.pwrite(bytes(64 * 1024), 2 * MiB)
        h.pwrite(os.urandom(64 * 1024), 3 * MiB)
        h.trim(64 * 1024, 3 * MiB)
        h.pwrite(os.urandom(64 * 1024), 4 * MiB)
        h.zero(64 * 1024, 4 * MiB)
        m = state_map(h, 8 * MiB, 0)
        assert flags_at(m, 0) == 3
        assert flags_at(m, 1 * MiB) == 0
        assert flags_at(m, 1 * MiB + 64 * 1024 - 1) == 0
        assert flags_at(m, 1 * MiB + 64 * 1024) == 3
        assert flags_at(m, 3 * MiB) == 3, "trimmed = hole|zero"
        assert flags_at(m, 4 * MiB) & nbd.STATE_ZERO, "write-zeroed = zero"
        if not fresh_server.is_nbdkit:
            assert flags_at(m, 2 * MiB) & nbd.STATE_ZERO, "zero-filled = zero (same-fill)"
        # REQ_ONE: exactly one extent no longer than asked.
        one = extents(h, 2 * MiB, 1 * MiB, nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1 and one[0] == (64 * 1024, 0), one
        # Block status past the end is EINVAL (with strict mode off).
        h2 = connect(fresh_server.uri("zram0"), meta=True, strict=False)
        expect_errno(errno.EINVAL, lambda: extents(h2, 8192, size))
        close(h2)
        h.shutdown()
    finally:
        close(h)


def test_structured_read_reports_holes(fresh_server: Server) -> None:
    h = connect(fresh_server.uri("zram0"))
    try:
        assert h.get_structured_replies_negotiated()
        data = os.urandom(8192)
        h.pwrite(data, 1 * MiB)
        chunks: list[tuple[int, int, int]] = []

        def cb(subbuf: bytes, offset: int, status: int, err: int) -> int:
            chunks.append((offset, len(subbuf), status))
            return 0

        got = h.pread_structured(4 * MiB, 0, cb)
        assert got[1 * MiB : 1 * MiB + 8192] == data
        assert got[: 1 * MiB] == bytes(MiB)
        holes = [(o, n) for o, n, s in chunks if s == nbd.READ_HOLE]
        datas = [(o, n) for o, n, s in chunks if s == nbd.READ_DATA]
        if not fresh_server.is_nbdkit:  # nbdkit's memory plugin sends data chunks only
            assert holes, f"no OFFSET_HOLE chunk for never-written ranges: {chunks[:10]}"
            assert any(o <= 2 * MiB < o + n for o, n in holes), chunks
        covered = sorted(holes + datas)
        assert sum(n for _, n in covered) == 4 * MiB, "chunks must cover the read exactly once"
        assert any(o <= 1 * MiB and 1 * MiB + 8192 <= o + n for o, n in datas), chunks
        # DF: one content chunk at most.
        chunks.clear()
        got = h.pread_structured(256 * 1024, 1 * MiB - 4096, cb, nbd.CMD_FLAG_DF)
        assert got[4096 : 4096 + 8192] == data
        assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks
        h.shutdown()
    finally:
        close(h)


def test_fua_accepted_on_every_command(handle: nbd.NBD) -> None:
    base = 120 * MiB
    fua = nbd.CMD_FLAG_FUA
    handle.pwrite(b"f" * 8192, base, fua)
    handle.zero(4096, base, fua | nbd.CMD_FLAG_NO_HOLE)
    handle.zero(4096, base + 4096, fua | nbd.CMD_FLAG_FAST_ZERO)
    handle.trim(4096, base + 8192, fua)
    handle.flush(fua)
    handle.cache(4096, base, fua)
    assert handle.pread(8192, base, nbd.CMD_FLAG_DF) == bytes(8192)
    still_works(handle, base)


def drain(h: nbd.NBD, cookies: list[int]) -> None:
    """Run the handle until nothing is in flight; each command must have succeeded."""
    deadline = time.monotonic() + 60
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, "requests still in flight after 60 s"
        h.poll(1000)
    for c in cookies:
        assert h.aio_command_completed(c), f"command {c} not completed"


def test_aio_many_in_flight(server: Server) -> None:
    """256 writes of assorted sizes and alignments in flight on one connection, then reads."""
    h = connect(server.uri("zram0"))
    try:
        rng = random.Random(1234)
        base = 112 * MiB
        pieces: list[tuple[int, bytes]] = []
        pos = base
        for _ in range(256):
            pos += rng.randrange(0, 3000)
            length = rng.choice([1, 511, 4096, 4097, 12000, 65536])
            pieces.append((pos, rng.randbytes(length)))
            pos += length
        assert pos < server.size("zram0")
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off)
                   for off, d in pieces]
        drain(h, cookies)
        bufs = [(nbd.Buffer(len(d)), off, d) for off, d in pieces]
        rcookies = [h.aio_pread(b, off) for b, off, _ in bufs]
        drain(h, rcookies)
        for b, off, d in bufs:
            assert b.to_bytearray() == d, f"wrong data at {off}"
    finally:
        close(h)
