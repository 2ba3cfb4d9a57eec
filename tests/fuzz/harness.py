"""In-process fuzz harness: one client byte stream through the sans-I/O core and dispatch.

Theory of operation
-------------------
:class:`CoreHarness` plays one whole connection per input, the way ``server/session.py`` drives
it, but without sockets: the input (the client->server byte stream, e.g. a recorded transcript)
is fed to a :class:`~zramd.protocol.connection.ServerConnection` in chunks whose sizes come from a
PRNG seeded by the input's CRC (so splits vary but a crash replays exactly), then EOF. Events are
handled like the session does: ``HandshakeComplete`` builds a
:class:`~zramd.server.dispatch.Dispatcher` on a real small :class:`ZramDevice`, each ``Request``
runs to completion (alternately through ``run_now``, the synchronous fast path, falling back to
``execute``, and through ``execute`` alone) and its reply is *encoded* by the core and *parsed
back* here with an independent decoder.

Oracles (a violation raises :class:`Finding`, which the fuzzer reports as a crash):

* no exception escapes the core, dispatch or the encoders; dispatch never answers EIO (it does
  so only for an internal error) and only with the error codes the spec allows;
* the event stream ends: every event consumes input, so events <= len(input)/4 + 3 (no livelock);
  after ``ConnectionClosed`` no event follows;
* a plain ``bytearray`` model of every export: each successful READ (reassembled from the encoded
  simple reply or structured chunks) equals the model, OFFSET_HOLE chunks and BLOCK_STATUS zero
  extents read as zero in the model, a failed request changes nothing, TRIM leaves each byte either
  as it was or zero; at the end the whole device equals the model;
* memory bounded by what the client sent: with ``check_memory`` the tracemalloc peak of one input
  stays below ``MEM_BASE + MEM_PER_INPUT_BYTE * len(input)`` (a 28-byte header declaring a 64 MiB
  WRITE must not cost 64 MiB).

Exports (names and sizes shared with ``record_corpus.py`` so recorded transcripts address them):
see :data:`EXPORTS`. This module knows nothing of atheris; ``fuzz_core.py`` wraps it.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import tracemalloc
import zlib
from dataclasses import dataclass, field

from zramd.config import ExportConfig
from zramd.device.blockdev import ZramDevice
from zramd.device.interface import STATE_ZERO
from zramd.protocol import wire
from zramd.protocol.connection import ServerConnection
from zramd.protocol.events import NEED_DATA, ConnectionClosed, HandshakeComplete, Request
from zramd.protocol.limits import Limits
from zramd.server.dispatch import (
    OK,
    Dispatcher,
    ErrorReply,
    ReadReply,
    StatusReply,
)
from zramd.server.exports import ExportRegistry

KiB = 1024
MiB = 1024 * KiB
#: (name, size, spec options) of the exports every fuzz target serves.
EXPORTS: list[tuple[str, int, str]] = [
    ("zram0", 1 * MiB, "description=fuzz export"),
    ("ro", 64 * KiB, "read-only"),
]
#: The limits the server runs with by default.
LIMITS = Limits()
#: Largest input the fuzzers generate (libFuzzer -max_len).
MAX_INPUT = 64 * KiB
#: Memory oracle: peak traced bytes per input <= MEM_BASE + MEM_PER_INPUT_BYTE * len(input).
#: MEM_BASE covers a READ of the whole 1 MiB export plus its reply and the model slice.
MEM_BASE = 8 * MiB
MEM_PER_INPUT_BYTE = 8
#: Error codes a reply may carry (nbd.md 1.10); EIO would mean an internal error here.
ALLOWED_ERRORS = frozenset(
    {wire.EPERM, wire.EINVAL, wire.ENOSPC, wire.EOVERFLOW, wire.ESHUTDOWN, wire.ENOMEM}
)

#: Commands that may change an export (their ranges are verified after each input).
_MODIFYING = frozenset({wire.CMD_WRITE, wire.CMD_WRITE_ZEROES, wire.CMD_TRIM})
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class Finding(AssertionError):
    """An oracle failed: a bug the fuzzer reports."""


@dataclass
class Stats:
    """What one input did (for corpus statistics and tests)."""

    events: int = 0
    requests: int = 0
    handshakes: int = 0
    errors: int = 0
    closed_by_error: bool = False
    structured: bool = False
    peak_bytes: int = 0
    commands: set[int] = field(default_factory=set)
    #: (export, offset, length) of every request that could modify an export, clipped
    touched: list[tuple[str, int, int]] = field(default_factory=list)


def _chunks(data: bytes) -> list[bytes]:
    """``data`` split at PRNG-chosen points (seeded by its CRC: deterministic per input)."""
    rng = random.Random(zlib.crc32(data))
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        mode = rng.random()
        if mode < 0.5:
            n = len(data) - pos  # the rest at once (the common case for a real socket)
        elif mode < 0.8:
            n = rng.randint(1, 64)
        else:
            n = rng.randint(1, 8192)
        out.append(data[pos : pos + n])
        pos += n
    return out


class CoreHarness:
    """One connection per :meth:`run`; devices persist (reset by TRIM between inputs)."""

    def __init__(self, *, check_memory: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.registry = ExportRegistry(None)
        self.models: dict[str, bytearray] = {}
        for name, size, opts in EXPORTS:
            cfg = ExportConfig(
                name, size, read_only="read-only" in opts, description=_opt(opts, "description")
            )
            self.registry.add(cfg, ZramDevice(size))
            self.models[name] = bytearray(size)
        self.check_memory = check_memory
        #: whether this harness started tracemalloc (close() stops it: left on, it slows every
        #: allocation of the process, e.g. the rest of a pytest run, 5 to 7 times)
        self._traced = False
        self.executions = 0

    def close(self) -> None:
        self.registry.close()
        self.loop.close()
        if self._traced:
            tracemalloc.stop()
            self._traced = False

    # --- one input ---------------------------------------------------------------------------
    def run(self, data: bytes) -> Stats:
        self.executions += 1
        stats = Stats()
        if self.check_memory:
            # Left running until close(): starting and stopping tracemalloc per input grows the
            # process by ~300 bytes per cycle (measured), which a long fuzz run mistakes for a
            # leak. reset_peak() makes each input's peak its own.
            if not tracemalloc.is_tracing():
                tracemalloc.start()
                self._traced = True
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        try:
            self.loop.run_until_complete(self._connection(data, stats))
        finally:
            if self.check_memory:
                stats.peak_bytes = tracemalloc.get_traced_memory()[1] - base
        if self.check_memory:
            bound = MEM_BASE + MEM_PER_INPUT_BYTE * len(data)
            if stats.peak_bytes > bound:
                raise Finding(
                    f"peak memory {stats.peak_bytes} bytes for a {len(data)}-byte input "
                    f"(bound {bound})"
                )
        self._verify_and_reset(stats)
        return stats

    async def _connection(self, data: bytes, stats: Stats) -> None:
        conn = ServerConnection(self.registry, LIMITS, structured_replies=True)
        greeting = conn.data_to_send()
        if len(greeting) != 18:
            raise Finding(f"greeting of {len(greeting)} bytes")
        max_events = len(data) // 4 + 3
        dispatcher: Dispatcher | None = None
        closed = False
        for chunk in [*_chunks(data), b""]:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                stats.events += 1
                if closed:
                    raise Finding(f"event {ev!r} after ConnectionClosed")
                if stats.events > max_events:
                    raise Finding(f"{stats.events} events from {len(data)} bytes: livelock")
                if isinstance(ev, HandshakeComplete):
                    stats.handshakes += 1
                    stats.structured = ev.structured_replies
                    if stats.handshakes > 1 or dispatcher is not None:
                        raise Finding("second HandshakeComplete")
                    export = self.registry.get(ev.export.name)
                    if export is None:
                        raise Finding(f"handshake chose unknown export {ev.export.name!r}")
                    dispatcher = Dispatcher(
                        export,
                        structured=ev.structured_replies,
                        meta_contexts=ev.meta_contexts,
                        max_payload=LIMITS.max_payload,
                    )
                elif isinstance(ev, Request):
                    if dispatcher is None:
                        raise Finding("Request before HandshakeComplete")
                    stats.requests += 1
                    stats.commands.add(ev.command)
                    if ev.command == wire.CMD_DISC:
                        continue
                    await self._request(conn, dispatcher, ev, stats)
                elif isinstance(ev, ConnectionClosed):
                    closed = True
                    stats.closed_by_error = ev.error
                else:
                    raise Finding(f"unknown event {ev!r}")
            conn.data_to_send()  # handshake replies: produced and dropped, like a dead peer
        if not closed:
            raise Finding("EOF fed but no ConnectionClosed")

    async def _request(
        self, conn: ServerConnection, dispatcher: Dispatcher, req: Request, stats: Stats
    ) -> None:
        name = dispatcher.export.name
        model = self.models[name]
        dev = dispatcher.export.device
        before = None
        if req.command in _MODIFYING and req.offset < len(model):
            stats.touched.append((name, req.offset, min(req.length, len(model) - req.offset)))
        if req.command == wire.CMD_TRIM and req.offset + req.length <= len(model):
            before = bytes(model[req.offset : req.offset + req.length])
        # Like the session: the synchronous fast path first (when it declines, the general path);
        # every other request takes the general path only, so both are held to the model.
        reply = dispatcher.run_now(req) if stats.requests % 2 else None
        if reply is None:
            reply = await dispatcher.execute(req)
        cmd = req.command
        if isinstance(reply, ErrorReply):
            stats.errors += 1
            if reply.errno not in ALLOWED_ERRORS:
                raise Finding(f"command {cmd} answered errno {reply.errno}: {reply.message}")
            bufs = conn.reply_error(req.cookie, reply.errno, reply.message)
            raw = b"".join(bytes(b) for b in bufs)
            if _decode_error(raw, req.cookie, conn.structured_replies) != reply.errno:
                raise Finding("encoded error reply does not carry the errno")
            return
        if cmd == wire.CMD_WRITE:
            if reply is not OK or req.data is None:
                raise Finding(f"WRITE answered {reply!r}")
            model[req.offset : req.offset + req.length] = req.data
        elif cmd == wire.CMD_WRITE_ZEROES:
            model[req.offset : req.offset + req.length] = bytes(req.length)
        elif cmd == wire.CMD_TRIM:
            assert before is not None
            now = bytes(dev.read_sync(req.offset, req.length))  # type: ignore[attr-defined]
            for i in range(0, req.length, 4096):
                a, b = now[i : i + 4096], before[i : i + 4096]
                if a != b and a.count(0) != len(a) and not _either(a, b):
                    raise Finding(f"TRIM at {req.offset}+{req.length} changed data to non-zero")
            model[req.offset : req.offset + req.length] = now
        elif cmd == wire.CMD_READ:
            if not isinstance(reply, ReadReply):
                raise Finding(f"READ answered {reply!r}")
            bufs = conn.reply_read(
                req.cookie, req.offset, reply.data, zero_extents=reply.zero_extents, df=reply.df
            )
            raw = b"".join(bytes(b) for b in bufs)
            got = _decode_read(raw, req.cookie, req.offset, req.length, conn.structured_replies)
            if got != model[req.offset : req.offset + req.length]:
                raise Finding(f"READ {req.offset}+{req.length} differs from the model")
        elif cmd == wire.CMD_BLOCK_STATUS:
            if not isinstance(reply, StatusReply):
                raise Finding(f"BLOCK_STATUS answered {reply!r}")
            total = 0
            for n, flags in reply.extents:
                if n <= 0:
                    raise Finding("empty extent")
                if flags & STATE_ZERO:
                    lo = req.offset + total
                    if model[lo : lo + n].count(0) != len(model[lo : lo + n]):
                        raise Finding(f"extent {lo}+{n} claims zero but holds data")
                total += n
            if total > req.length and len(reply.extents) > 1:
                raise Finding("BLOCK_STATUS extents pass the requested length")
            b"".join(conn.reply_block_status(req.cookie, reply.context_id, reply.extents))
        elif reply is not OK:
            raise Finding(f"command {cmd} answered {reply!r}")

    def _verify_and_reset(self, stats: Stats) -> None:
        """Compare every page a request could have changed with the model (failed requests must
        have changed nothing), then trim those pages back to all-zero."""
        for name, offset, length in stats.touched:
            model = self.models[name]
            exp = self.registry.get(name)
            assert exp is not None
            dev = exp.device
            lo = offset & ~4095
            hi = min(len(model), (offset + length + 4095) & ~4095)
            got = dev.read_sync(lo, hi - lo)  # type: ignore[attr-defined]
            if got != model[lo:hi]:
                raise Finding(f"export {name}: [{lo}, {hi}) differs from the model")
        for name, offset, length in stats.touched:
            model = self.models[name]
            exp = self.registry.get(name)
            assert exp is not None
            lo = offset & ~4095
            hi = min(len(model), (offset + length + 4095) & ~4095)
            exp.device.trim_sync(lo, hi - lo)  # type: ignore[attr-defined]
            model[lo:hi] = bytes(hi - lo)


def _opt(opts: str, key: str) -> str:
    for part in opts.split(","):
        if part.startswith(key + "="):
            return part[len(key) + 1 :]
    return ""


def _either(a: bytes, b: bytes) -> bool:
    """Each byte of ``a`` is the old byte (``b``) or zero (a partial page TRIM may do either)."""
    return all(x == y or x == 0 for x, y in zip(a, b, strict=True))


def _decode_error(raw: bytes, cookie: int, structured: bool) -> int:
    if not structured:
        magic, err, ck = _SIMPLE.unpack_from(raw)
        if magic != wire.SIMPLE_REPLY_MAGIC or ck != cookie or len(raw) != _SIMPLE.size:
            raise Finding("bad simple error reply")
        return int(err)
    magic, flags, ctype, ck, length = _CHUNK.unpack_from(raw)
    if magic != wire.STRUCTURED_REPLY_MAGIC or ck != cookie or not flags & wire.REPLY_FLAG_DONE:
        raise Finding("bad structured error chunk")
    if len(raw) != _CHUNK.size + length or ctype != wire.REPLY_TYPE_ERROR:
        raise Finding("structured error chunk length mismatch")
    err, msglen = struct.unpack_from(">IH", raw, _CHUNK.size)
    if 6 + msglen != length:
        raise Finding("error message length mismatch")
    return int(err)


def _decode_read(raw: bytes, cookie: int, offset: int, length: int, structured: bool) -> bytes:
    """The data a client would reassemble from an encoded READ reply."""
    if not structured:
        magic, err, ck = _SIMPLE.unpack_from(raw)
        if magic != wire.SIMPLE_REPLY_MAGIC or err or ck != cookie:
            raise Finding("bad simple READ reply header")
        if len(raw) != _SIMPLE.size + length:
            raise Finding("simple READ reply has the wrong length")
        return raw[_SIMPLE.size :]
    out = bytearray(length)
    covered = 0
    pos = 0
    done = False
    while pos < len(raw):
        if done:
            raise Finding("chunk after DONE")
        magic, flags, ctype, ck, clen = _CHUNK.unpack_from(raw, pos)
        pos += _CHUNK.size
        if magic != wire.STRUCTURED_REPLY_MAGIC or ck != cookie:
            raise Finding("bad READ chunk header")
        body = raw[pos : pos + clen]
        pos += clen
        if len(body) != clen:
            raise Finding("truncated READ chunk")
        done = bool(flags & wire.REPLY_FLAG_DONE)
        if ctype == wire.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", body)
            rel = off - offset
            n = clen - 8
            if rel < 0 or rel + n > length:
                raise Finding("OFFSET_DATA outside the request")
            out[rel : rel + n] = body[8:]
            covered += n
        elif ctype == wire.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack_from(">QI", body)
            rel = off - offset
            if rel < 0 or rel + n > length:
                raise Finding("OFFSET_HOLE outside the request")
            covered += n
        elif ctype != wire.REPLY_TYPE_NONE:
            raise Finding(f"unexpected chunk type {ctype} in a successful READ")
    if not done:
        raise Finding("READ reply without DONE")
    if covered != length:
        raise Finding(f"READ chunks cover {covered} of {length} bytes")
    return bytes(out)


def libfuzzer_argv(argv: list[str]) -> list[str]:
    """``argv`` plus the defaults every atheris target wants, unless given: inputs capped at
    :data:`MAX_INPUT` bytes and the NBD token dictionary next to this file."""
    out = list(argv)
    if not any(a.startswith("-max_len=") for a in out):
        out.append(f"-max_len={MAX_INPUT}")
    if not any(a.startswith("-dict=") for a in out):
        out.append(f"-dict={os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nbd.dict')}")
    return out
