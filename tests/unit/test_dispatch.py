"""server/dispatch.py: the validation table and the device calls, against a real PlainDevice."""

from __future__ import annotations

import pytest

from tests.support.devices import CorruptReadDevice, PlainDevice
from zramd.config import ExportConfig
from zramd.device.interface import STATE_HOLE, STATE_ZERO, DeviceIOError, NoSpace
from zramd.protocol.events import Request
from zramd.server.dispatch import (
    BLOCK_STATUS,
    CACHE,
    DF,
    EINVAL,
    EIO,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    ESHUTDOWN,
    FAST_ZERO,
    FLUSH,
    FUA,
    NO_HOLE,
    OK,
    READ,
    REQ_ONE,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    Dispatcher,
    ErrorReply,
    ReadReply,
    ShutdownFlag,
    StatusReply,
    clip_extents,
)
from zramd.server.exports import Export

SIZE = 1 << 20
MAX_PAYLOAD = 64 << 20
CTX = 7


def make(
    *,
    read_only: bool = False,
    structured: bool = True,
    contexts: bool = True,
    device: PlainDevice | None = None,
) -> Dispatcher:
    exp = Export(ExportConfig("t", SIZE, read_only=read_only), device or PlainDevice(SIZE))
    return Dispatcher(
        exp,
        structured=structured,
        meta_contexts={CTX: "base:allocation"} if contexts else {},
        max_payload=MAX_PAYLOAD,
    )


def req(
    cmd: int, offset: int = 0, length: int = 512, flags: int = 0, data: bytes | None = None
) -> Request:
    if cmd == WRITE and data is None:
        data = b"x" * length
    return Request(cmd, flags, 1, offset, length, data)


# (description, dispatcher kwargs, request, expected errno)
TABLE = [
    ("unknown command", {}, req(9), EINVAL),
    ("RESIZE is not supported", {}, req(8), EINVAL),
    ("READ past end", {}, req(READ, SIZE - 256, 512), EINVAL),
    ("READ offset beyond size", {}, req(READ, SIZE, 1), EINVAL),
    ("READ huge offset", {}, req(READ, 1 << 62, 512), EINVAL),
    ("TRIM past end", {}, req(TRIM, SIZE - 256, 512), EINVAL),
    ("CACHE past end", {}, req(CACHE, SIZE, 4096), EINVAL),
    ("BLOCK_STATUS past end", {}, req(BLOCK_STATUS, SIZE - 1, 2), EINVAL),
    ("WRITE past end", {}, req(WRITE, SIZE - 256, 512), ENOSPC),
    ("WRITE_ZEROES past end", {}, req(WRITE_ZEROES, SIZE, 4096), ENOSPC),
    ("WRITE read-only", {"read_only": True}, req(WRITE, 0, 512), EPERM),
    ("TRIM read-only", {"read_only": True}, req(TRIM, 0, 512), EPERM),
    ("WRITE_ZEROES read-only", {"read_only": True}, req(WRITE_ZEROES, 0, 512), EPERM),
    ("read-only checked before range", {"read_only": True}, req(WRITE, SIZE, 512), EPERM),
    ("NO_HOLE on READ", {}, req(READ, flags=NO_HOLE), EINVAL),
    ("DF on WRITE", {}, req(WRITE, flags=DF), EINVAL),
    ("REQ_ONE on READ", {}, req(READ, flags=REQ_ONE), EINVAL),
    ("FAST_ZERO on TRIM", {}, req(TRIM, flags=FAST_ZERO), EINVAL),
    ("unknown flag 0x8000", {}, req(READ, flags=0x8000), EINVAL),
    ("PAYLOAD_LEN flag", {}, req(WRITE, flags=0x20), EINVAL),
    ("DF without structured", {"structured": False}, req(READ, flags=DF), EINVAL),
    ("BLOCK_STATUS without structured", {"structured": False}, req(BLOCK_STATUS), EINVAL),
    ("BLOCK_STATUS without context", {"contexts": False}, req(BLOCK_STATUS), EINVAL),
    ("FLUSH with length", {}, req(FLUSH, 0, 512), EINVAL),
    ("FLUSH with offset", {}, req(FLUSH, 512, 0), EINVAL),
    ("READ length 0", {}, req(READ, 0, 0), EINVAL),
    ("WRITE length 0", {}, req(WRITE, 0, 0, data=b""), EINVAL),
    ("TRIM length 0", {}, req(TRIM, 0, 0), EINVAL),
    ("WRITE_ZEROES length 0", {}, req(WRITE_ZEROES, 0, 0), EINVAL),
]


@pytest.mark.parametrize("desc,kwargs,request_,errno", TABLE, ids=[t[0] for t in TABLE])
async def test_rejections(
    desc: str, kwargs: dict[str, bool], request_: Request, errno: int
) -> None:
    d = make(**kwargs)
    reply = await d.execute(request_)
    assert isinstance(reply, ErrorReply), desc
    assert reply.errno == errno, (desc, reply)
    assert reply.message


async def test_rejected_write_changes_nothing() -> None:
    d = make(read_only=True)
    await d.device.write(0, b"\1" * 4096)
    await d.execute(req(WRITE, 0, 4096, data=b"\2" * 4096))
    assert await d.device.read(0, 4096) == b"\1" * 4096


async def test_oversized_read_and_dropped_write_payload() -> None:
    big = PlainDevice(128 << 20)
    exp = Export(ExportConfig("big", 128 << 20), big)
    d = Dispatcher(exp, structured=False, max_payload=MAX_PAYLOAD)
    r = await d.execute(Request(READ, 0, 1, 0, MAX_PAYLOAD + 4096))
    assert isinstance(r, ErrorReply) and r.errno == EOVERFLOW
    r = await d.execute(Request(WRITE, 0, 1, 0, MAX_PAYLOAD + 4096, None, True))
    assert isinstance(r, ErrorReply) and r.errno == EOVERFLOW
    # exactly the cap works; 48 MiB works
    r = await d.execute(Request(READ, 0, 1, 0, 48 << 20))
    assert isinstance(r, ReadReply) and len(r.data) == 48 << 20
    # TRIM / WRITE_ZEROES may be any length inside the export
    assert await d.execute(Request(TRIM, 0, 1, 0, 128 << 20)) is OK
    assert await d.execute(Request(WRITE_ZEROES, 0, 1, 0, 128 << 20)) is OK


async def test_shutdown_answers_eshutdown() -> None:
    d = make()
    flag = ShutdownFlag()
    d.shutdown = flag
    assert await d.execute(req(READ)) is not None
    flag.is_set = True
    r = await d.execute(req(READ))
    assert isinstance(r, ErrorReply) and r.errno == ESHUTDOWN


@pytest.mark.parametrize(
    "cmd,flags",
    [
        (READ, FUA),
        (WRITE, FUA),
        (FLUSH, FUA),
        (TRIM, FUA),
        (CACHE, FUA),
        (WRITE_ZEROES, FUA | NO_HOLE | FAST_ZERO),
        (BLOCK_STATUS, FUA | REQ_ONE),
        (READ, DF),
    ],
)
async def test_valid_flags_accepted(cmd: int, flags: int) -> None:
    d = make()
    length = 0 if cmd == FLUSH else 4096
    r = await d.execute(req(cmd, 0, length, flags))
    assert not isinstance(r, ErrorReply), r


async def test_write_read_roundtrip_and_zero_runs() -> None:
    d = make()
    data = bytes(range(256)) * 16
    assert await d.execute(req(WRITE, 8192, 4096, data=data)) is OK
    r = await d.execute(req(READ, 4096, 3 * 4096))
    assert isinstance(r, ReadReply)
    assert bytes(r.data) == bytes(4096) + data + bytes(4096)
    assert r.zero_extents == [(0, 4096), (8192, 4096)]
    # unaligned read: runs relative to the request and clipped to it
    r = await d.execute(req(READ, 6000, 4000))
    assert isinstance(r, ReadReply)
    assert bytes(r.data) == bytes(2192) + data[:1808]
    assert r.zero_extents == [(0, 2192)]
    # all-zero range: answered without a data copy, as one zero run
    r = await d.execute(req(READ, 65536, 65536))
    assert isinstance(r, ReadReply) and r.zero_extents == [(0, 65536)]
    assert bytes(r.data) == bytes(65536)


async def test_simple_replies_have_no_zero_runs() -> None:
    d = make(structured=False)
    r = await d.execute(req(READ, 0, 4096))
    assert isinstance(r, ReadReply) and r.zero_extents == [] and r.data == bytes(4096)


async def test_df_read_is_one_chunk() -> None:
    d = make()
    r = await d.execute(req(READ, 0, 8192, DF))
    assert isinstance(r, ReadReply) and r.df and r.zero_extents == []


async def test_write_zeroes_no_hole_and_trim() -> None:
    d = make()
    await d.execute(req(WRITE, 0, 3 * 4096, data=b"\xff" * 3 * 4096))
    assert await d.execute(req(WRITE_ZEROES, 0, 4096, NO_HOLE)) is OK
    assert await d.execute(req(WRITE_ZEROES, 4096, 4096)) is OK
    assert await d.execute(req(TRIM, 8192, 4096)) is OK
    r = await d.execute(req(BLOCK_STATUS, 0, 4 * 4096))
    assert isinstance(r, StatusReply) and r.context_id == CTX
    assert r.extents == [(4096, STATE_ZERO), (3 * 4096, STATE_HOLE | STATE_ZERO)]
    r = await d.execute(req(READ, 0, 8192))
    assert isinstance(r, ReadReply) and bytes(r.data) == bytes(8192)


async def test_block_status_req_one_and_clipping() -> None:
    d = make()
    await d.execute(req(WRITE, 4096, 4096, data=b"\1" * 4096))
    r = await d.execute(req(BLOCK_STATUS, 0, SIZE, REQ_ONE))
    assert isinstance(r, StatusReply) and r.extents == [(4096, STATE_HOLE | STATE_ZERO)]
    r = await d.execute(req(BLOCK_STATUS, 100, 5000))
    assert isinstance(r, StatusReply)
    assert sum(n for n, _ in r.extents) == 5000
    assert r.extents == [(3996, STATE_HOLE | STATE_ZERO), (1004, 0)]


def test_clip_extents() -> None:
    ext = [(4096, 3), (4096, 3), (8192, 0), (1 << 30, 3)]
    assert clip_extents(ext, 10000, False) == [(8192, 3), (1808, 0)]
    assert clip_extents(ext, 10000, True) == [(8192, 3)]
    assert clip_extents(ext, 100, True) == [(100, 3)]
    assert clip_extents([], 512, False) == [(512, 0)]
    assert clip_extents([(0, 3), (512, 1)], 512, False) == [(512, 1)]


class _Failing(PlainDevice):
    def __init__(self, size: int, exc: BaseException) -> None:
        super().__init__(size)
        self.exc = exc

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise self.exc

    async def read(self, offset: int, length: int) -> bytes:
        raise self.exc


@pytest.mark.parametrize(
    "exc,errno",
    [(NoSpace("full"), ENOSPC), (DeviceIOError("bad page"), EIO), (RuntimeError("bug"), EIO)],
)
async def test_device_exceptions_map(exc: BaseException, errno: int) -> None:
    d = make(device=_Failing(SIZE, exc))
    r = await d.execute(req(WRITE, 0, 512))
    assert isinstance(r, ErrorReply) and r.errno == errno
    r = await d.execute(req(READ, 0, 512, DF))
    assert isinstance(r, ErrorReply) and r.errno == errno


async def test_corrupt_read_device_flips_nonzero_pages_only() -> None:
    dev = CorruptReadDevice(SIZE)
    await dev.write(4096, b"\5" * 4096)
    got = await dev.read(0, 3 * 4096)
    assert got[:4096] == bytes(4096) and got[8192:] == bytes(4096)
    assert got[4096:8192] != b"\5" * 4096
    assert sum(a != b for a, b in zip(got[4096:8192], b"\5" * 4096, strict=True)) == 1
