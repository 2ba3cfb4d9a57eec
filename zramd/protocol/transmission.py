"""Transmission phase: the connection's input buffer, request framing and reply encoding.

Theory of operation
-------------------
:class:`RequestReader` owns every byte the client sent that the core has not consumed yet, for the
whole life of the connection. During the handshake ``ServerConnection`` pulls raw option bytes out
of it (:meth:`RequestReader.take`, :meth:`RequestReader.skip`); once transmission starts,
:meth:`RequestReader.next_request` parses 28-byte request headers (one precompiled ``struct``) and
yields :class:`~zramd.protocol.events.Request` events.

It validates framing only (magic, payload completeness, the payload cap). It must not know about
exports, ranges or flags: ``server/dispatch.py`` validates requests against the export.

Buffering (the hot path: a 28-byte header + 4 KiB payload per request):

* ``_in`` is either a ``bytes`` object the driver handed in (zero copy: payloads are returned as
  ``memoryview`` slices of it) or a private ``bytearray`` that accumulates fragments. Consumed bytes
  are dropped from the front of the bytearray with ``del``, which CPython does in O(1) (it moves the
  start pointer), so many small ``feed`` calls cost O(total bytes), not O(n^2).
* A WRITE payload that is not complete when its header is parsed is appended, as it arrives, to one
  ``bytearray`` (the *assembly* buffer), so every payload byte is copied once (plus amortized
  growth), and no payload is ever held twice. The buffer grows with the bytes that actually arrive:
  it is never sized from the declared length, so a 28-byte header declaring a 64 MiB WRITE costs
  28 bytes, not 64 MiB (found by tests/fuzz).
* A WRITE whose declared length exceeds ``max_payload`` is *drained*: its bytes are counted and
  discarded as they arrive, then ``Request(payload_dropped=True, data=None)`` is yielded.
* Only ``bytes`` input is referenced without copying (it is immutable). ``bytearray``/``memoryview``
  input may be reused by the driver, so it is copied once on arrival.

After ``NBD_CMD_DISC`` the reader yields the DISC request and then, on the next call,
``ConnectionClosed("client sent DISC")``; later input is ignored.

Reply encoders (module functions) return lists of buffers for ``transport.writelines``; a READ
payload is passed through (sliced with ``memoryview``), never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import wire
from .events import NEED_DATA, ConnectionClosed, Request, _NeedData

_HDR = wire.REQUEST_HEADER
_HDR_SIZE = wire.REQUEST_HEADER_SIZE
_REQUEST_MAGIC = wire.REQUEST_MAGIC
_CMD_WRITE = wire.CMD_WRITE
_CMD_DISC = wire.CMD_DISC

# What reply encoders return: buffers for transport.writelines.
Buffers = list[bytes | bytearray | memoryview]

# Holes shorter than this are sent as data in structured READ replies: a hole chunk costs 32 bytes
# and a chunk boundary, which is not worth it below a page.
MIN_HOLE_CHUNK = 4096


class RequestReader:
    """The connection's input bytes; request framing in transmission (see module docstring)."""

    __slots__ = (
        "_in",
        "_pos",
        "_eof",
        "_max_payload",
        "_asm",
        "_asm_len",
        "_drain",
        "_pending",
        "_disc",
        "_done",
    )

    def __init__(self, max_payload: int) -> None:
        self._in: bytes | bytearray | memoryview = b""  # memoryview only over immutable bytes
        self._pos = 0
        self._eof = False
        self._max_payload = max_payload
        self._asm: bytearray | None = None  # WRITE payload being assembled (grows as it arrives)
        self._asm_len = 0  # its declared length
        self._drain = 0  # oversize WRITE payload bytes still to discard
        self._pending: Request | None = None  # WRITE waiting for its payload (assembly or drain)
        self._disc = False
        self._done = False

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the client; ``b""`` means EOF."""
        n = len(data)
        if n == 0:
            self._eof = True
            return
        if self._done or self._disc:
            return  # nothing after DISC / close matters
        immutable = type(data) is bytes
        if self._pending is not None:
            # The rest is ``data`` itself or a memoryview we made of it (immutable if data is).
            data = self._feed_pending(data)
            if len(data) == 0:
                return
        buf = self._in
        pos = self._pos
        if pos >= len(buf):
            # Nothing unconsumed: adopt the chunk (zero copy for immutable bytes).
            self._in = data if immutable else bytes(data)
            self._pos = 0
        elif type(buf) is not bytearray:
            nb = bytearray(memoryview(buf)[pos:])
            nb += data
            self._in = nb
            self._pos = 0
        else:
            if pos:
                del buf[:pos]  # O(1) amortized: CPython moves the bytearray's start
                self._pos = 0
            buf += data

    def close(self) -> None:
        """Drop buffered input and ignore any more (the connection is over)."""
        self._done = True
        self._in = b""
        self._pos = 0
        self._asm = None
        self._pending = None

    @property
    def done(self) -> bool:
        return self._done

    def _feed_pending(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Route bytes into the WRITE payload being assembled or drained; return the rest."""
        asm = self._asm
        if asm is not None:
            want = self._asm_len - len(asm)
            if len(data) <= want:
                asm += data
                return b""
            mv = memoryview(data)
            asm += mv[:want]
            return mv[want:]
        drain = self._drain
        if drain:
            n = len(data)
            if n <= drain:
                self._drain = drain - n
                return b""
            self._drain = 0
            return memoryview(data)[drain:]
        return data

    @property
    def available(self) -> int:
        return len(self._in) - self._pos

    @property
    def eof(self) -> bool:
        return self._eof

    def take(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes (a copy), or None if fewer are buffered. Handshake use only."""
        pos = self._pos
        if len(self._in) - pos < n:
            return None
        self._pos = pos + n
        return bytes(memoryview(self._in)[pos : pos + n])

    def skip(self, n: int) -> int:
        """Discard up to ``n`` buffered bytes without copying them; return how many were dropped."""
        k = min(n, len(self._in) - self._pos)
        self._pos += k
        return k

    # -- transmission ---------------------------------------------------------------------------

    def next_request(self) -> Request | ConnectionClosed | _NeedData:
        """The next framed request, a ConnectionClosed, or NEED_DATA."""
        if self._pending is not None:
            return self._finish_pending()
        if self._disc:
            return self._close("client sent DISC", False)
        if self._done:
            return NEED_DATA
        buf = self._in
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HDR_SIZE:
            if self._eof:
                if avail:
                    return self._close("EOF inside a request header", True)
                return self._close("client closed the connection (EOF)", False)
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _HDR.unpack_from(buf, pos)
        if magic != _REQUEST_MAGIC:
            return self._close(f"bad request magic 0x{magic:08x}", True)
        pos += _HDR_SIZE
        if command == _CMD_WRITE:
            avail -= _HDR_SIZE
            if length > self._max_payload:
                k = length if avail >= length else avail
                self._pos = pos + k
                self._drain = length - k
                req = Request(command, flags, cookie, offset, length, None, True)
                if self._drain:
                    self._pending = req
                    return self._finish_pending()
                return req
            if avail >= length:
                end = pos + length
                self._pos = end
                if type(buf) is not bytearray:  # immutable: hand out a view, no copy
                    return Request(command, flags, cookie, offset, length, memoryview(buf)[pos:end])
                return Request(
                    command, flags, cookie, offset, length, bytes(memoryview(buf)[pos:end])
                )
            # Incomplete: move what we have into the assembly buffer; feed() appends the rest.
            # Never preallocate `length`: a peer must not make us allocate bytes it never sends.
            self._asm = bytearray(memoryview(buf)[pos:])
            self._asm_len = length
            self._pos = len(buf)
            self._pending = Request(command, flags, cookie, offset, length, None)
            return self._finish_pending()
        self._pos = pos
        if command == _CMD_DISC:
            self._disc = True
        return Request(command, flags, cookie, offset, length)

    def _finish_pending(self) -> Request | ConnectionClosed | _NeedData:
        req = self._pending
        assert req is not None
        asm = self._asm
        if asm is not None:
            if len(asm) < self._asm_len:
                if self._eof:
                    return self._close("EOF inside a WRITE payload", True)
                return NEED_DATA
            req.data = memoryview(asm)
            self._asm = None
        elif self._drain:
            if self._eof:
                return self._close("EOF inside a WRITE payload", True)
            return NEED_DATA
        self._pending = None
        return req

    def _close(self, reason: str, error: bool) -> ConnectionClosed | _NeedData:
        if self._done:
            return NEED_DATA
        self.close()
        return ConnectionClosed(reason, error)


# --- reply encoders ------------------------------------------------------------------------------

_SR_MAGIC = wire.STRUCTURED_REPLY_MAGIC
_DONE = wire.REPLY_FLAG_DONE
_OFFSET_DATA = wire.CHUNK_OFFSET_DATA.pack
_OFFSET_HOLE = wire.CHUNK_OFFSET_HOLE.pack
_CHUNK = wire.CHUNK_HEADER.pack
_T_DATA = wire.REPLY_TYPE_OFFSET_DATA
_T_HOLE = wire.REPLY_TYPE_OFFSET_HOLE


def encode_message(message: str, limit: int = wire.SPEC_MAX_STRING) -> bytes:
    """UTF-8 message truncated to ``limit`` bytes without splitting a character."""
    raw = message.encode("utf-8", "replace")
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
    return raw


def structured_error(cookie: int, error: int, message: str = "") -> Buffers:
    """One ERROR chunk with DONE (nbd.md 1.6): error32, msglen16, message."""
    msg = encode_message(message)
    head = wire.CHUNK_ERROR.pack(
        _SR_MAGIC, _DONE, wire.REPLY_TYPE_ERROR, cookie, 6 + len(msg), error, len(msg)
    )
    return [head + msg]


def structured_done(cookie: int) -> Buffers:
    """A lone NONE chunk with DONE (nbd.md 1.6)."""
    return [_CHUNK(_SR_MAGIC, _DONE, wire.REPLY_TYPE_NONE, cookie, 0)]


def _hole_runs(
    length: int, zero_extents: Sequence[tuple[int, int]], min_hole: int
) -> list[tuple[int, int]]:
    """Sorted, clipped, merged hole runs (relative offset, length) worth a hole chunk."""
    runs: list[tuple[int, int]] = []
    for rel, n in sorted(zero_extents):
        start = max(rel, 0)
        end = min(rel + n, length)
        if end <= start:
            continue
        if runs and start <= runs[-1][0] + runs[-1][1]:
            prev_start, prev_len = runs[-1]
            runs[-1] = (prev_start, max(prev_start + prev_len, end) - prev_start)
        else:
            runs.append((start, end - start))
    return [r for r in runs if r[1] >= min_hole]


def structured_read_reply(
    cookie: int,
    offset: int,
    data: bytes | bytearray | memoryview,
    zero_extents: Sequence[tuple[int, int]] = (),
    df: bool = False,
    min_hole: int = MIN_HOLE_CHUNK,
) -> Buffers:
    """Successful READ as structured chunks (nbd.md 1.6).

    Data runs become OFFSET_DATA chunks, ``zero_extents`` (relative offset, length) at least
    ``min_hole`` long become OFFSET_HOLE chunks; the last chunk carries DONE. With ``df`` exactly
    one content chunk (OFFSET_DATA) is sent. A zero-length READ gets a lone NONE+DONE chunk.
    ``zero_extents`` is the device's answer as is (sorted and merged already); any other list is
    clipped and merged here. Bytes of ``data`` under a hole chunk are never read, so an all-hole
    ``data`` may be a view of shared zeros.
    """
    length = len(data)
    if length == 0:
        return structured_done(cookie)
    if df or not zero_extents:
        return [_OFFSET_DATA(_SR_MAGIC, _DONE, _T_DATA, cookie, 8 + length, offset), data]
    holes = _hole_runs(length, zero_extents, min_hole)
    if not holes:
        return [_OFFSET_DATA(_SR_MAGIC, _DONE, _T_DATA, cookie, 8 + length, offset), data]
    mv = memoryview(data)
    out: Buffers = []
    at = 0
    for rel, n in holes:
        if rel > at:
            out.append(_OFFSET_DATA(_SR_MAGIC, 0, _T_DATA, cookie, 8 + rel - at, offset + at))
            out.append(mv[at:rel])
        out.append(_OFFSET_HOLE(_SR_MAGIC, 0, _T_HOLE, cookie, 12, offset + rel, n))
        at = rel + n
    if at < length:
        out.append(_OFFSET_DATA(_SR_MAGIC, _DONE, _T_DATA, cookie, 8 + length - at, offset + at))
        out.append(mv[at:])
    else:
        # The last chunk is a hole: re-pack it with DONE set.
        rel, n = holes[-1]
        out[-1] = _OFFSET_HOLE(_SR_MAGIC, _DONE, _T_HOLE, cookie, 12, offset + rel, n)
    return out


def block_status_reply(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool = True
) -> Buffers:
    """One BLOCK_STATUS chunk (nbd.md 1.6): context id32 then (length32, flags32) per extent."""
    n = len(extents)
    head = wire.CHUNK_BLOCK_STATUS.pack(
        _SR_MAGIC,
        _DONE if done else 0,
        wire.REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * n,
        context_id,
    )
    flat = [v for ext in extents for v in ext]
    return [head + _pack_u32s(flat)]


def _pack_u32s(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}I", *values)
