"""Request dispatch: validate a request against its export, call the device, map errors.

Theory of operation
-------------------
This is the one place where a transmission-phase :class:`~zramd.protocol.events.Request` meets an
export. :func:`validate` checks it and returns ``None`` or an ``(errno, message)`` rejection;
:meth:`Dispatcher.execute` runs an accepted request on the device and returns a *reply
description* (:data:`OK`, :class:`ReadReply`, :class:`StatusReply`, :class:`ErrorReply`). The
session turns that into bytes through the protocol core's encoders: no byte layouts here, and no
sockets. The device is used only through :class:`~zramd.device.interface.BlockDevice`.

:meth:`Dispatcher.run_now` is the synchronous fast path: it validates exactly as ``execute``
does, then asks the device's synchronous attempt (``read_with_zeros_now`` / ``write_now``),
which alone decides whether the request completes inline. A READ's zero extents go from the
device into :class:`ReadReply` unchanged (structured replies without DF only).

Rejections, in the order they are checked (first match wins; nbd.md 1.7 and 1.10):

==========================================================  ==========  ===========================
situation                                                   errno       why
==========================================================  ==========  ===========================
server shutting down                                        ESHUTDOWN   1.10
unknown command (incl. experimental RESIZE)                 EINVAL      1.10
flag not valid for the command (FUA is valid on all)         EINVAL      1.5, 1.10
DF on READ without structured replies                       EINVAL      1.5: DF needs structured
BLOCK_STATUS without structured replies or a context         EINVAL      1.5
WRITE / TRIM / WRITE_ZEROES on a read-only export           EPERM       1.7 (checked before range)
WRITE whose payload exceeded max_payload (core drained it)  EOVERFLOW   see below
FLUSH with offset or length != 0                            EINVAL      1.5 (as nbdkit)
zero length (READ/WRITE/TRIM/WRITE_ZEROES/CACHE/BLOCK_STATUS) EINVAL     1.5; as nbdkit
READ / TRIM / CACHE / BLOCK_STATUS past the end             EINVAL      1.10
WRITE / WRITE_ZEROES past the end                           ENOSPC      1.10
READ longer than max_payload                                EOVERFLOW   see below
==========================================================  ==========  ===========================

Choices where the spec leaves room:

* Length 0: the spec calls a zero-length READ unspecified; nbdkit answers EINVAL for every
  zero-length data command, and so do we (the connection goes on).
* Oversized READ: a payload-less request whose reply would exceed our cap gets EOVERFLOW
  (nbd.md 1.7: "oversized payload-less request"); nbdkit says ENOMEM, which the spec asks servers
  to avoid. An oversized WRITE (payload drained by the core, connection kept) gets EOVERFLOW too,
  so "too big" reads the same both ways. TRIM and WRITE_ZEROES have no payload and may be any
  length inside the export (1.9).
* FAST_ZERO on WRITE_ZEROES succeeds: zeroing RAM pages is never slower than writing them.
* FUA is accepted everywhere. Once a request's coroutine returns, its data is in the store every
  connection reads (RAM has no volatile cache), so without a journal FUA needs no action and
  FLUSH is immediate. An export in durable mode (``sync=flush``) has a
  :class:`~zramd.server.durable.Journal`: every WRITE, WRITE_ZEROES and TRIM the device
  completed is recorded in it at once (before anything else runs on the loop, so overlapping
  requests are recorded in the order the device applied them), and a FLUSH, or any request
  with FUA, is answered only after :meth:`~zramd.server.durable.Journal.sync` (stable storage).
  The fast path declines a write with FUA, or while the journal's backlog is full.

Errors from the device map through :data:`EXCEPTION_ERRNO` (NoSpace -> ENOSPC, DeviceIOError ->
EIO); anything else is a bug: logged with a traceback and answered EIO, the connection goes on.
A NoSpace names its cause through the allocator's PoolFull it was raised from (the export's own
memory limit, the server's budget, or the system): counted per cause, and logged as a warning
naming it, at most once per :data:`NOSPACE_LOG_INTERVAL_NS` per export and cause (a swap device
that runs full refuses thousands of writes a second).

Counting. Every request that reaches the device is counted here, in the export's
:class:`~zramd.stats.IoStats` (shared by its connections): its command, bytes and time, as it
finishes, whether on the fast path (``run_now``) or awaited (``execute``, which also keeps
``in_flight`` and the busy time); a request refused for its range counts in ``invalid_io``. The
fast path pays two clock reads and four counter updates for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from time import perf_counter_ns

from zramd.allocator import CAUSE_LIMIT, PoolFull
from zramd.config import format_size
from zramd.device.interface import (
    MAX_EXTENTS,
    Buffer,
    DeviceIOError,
    Extents,
    NoSpace,
    ReadResult,
    ZeroExtents,
)
from zramd.protocol import wire
from zramd.protocol.events import Request
from zramd.server.durable import Journal
from zramd.server.exports import Export
from zramd.stats import HIST_CMD_SHIFT, HIST_SHIFT, IoStats

log = logging.getLogger("zramd.server")

EPERM = wire.EPERM
EIO = wire.EIO
EINVAL = wire.EINVAL
ENOSPC = wire.ENOSPC
EOVERFLOW = wire.EOVERFLOW
ESHUTDOWN = wire.ESHUTDOWN

FUA = wire.CMD_FLAG_FUA
NO_HOLE = wire.CMD_FLAG_NO_HOLE
DF = wire.CMD_FLAG_DF
REQ_ONE = wire.CMD_FLAG_REQ_ONE
FAST_ZERO = wire.CMD_FLAG_FAST_ZERO

READ = wire.CMD_READ
WRITE = wire.CMD_WRITE
DISC = wire.CMD_DISC
FLUSH = wire.CMD_FLUSH
TRIM = wire.CMD_TRIM
CACHE = wire.CMD_CACHE
WRITE_ZEROES = wire.CMD_WRITE_ZEROES
BLOCK_STATUS = wire.CMD_BLOCK_STATUS

#: Command flags each command accepts (nbd.md 1.5). FUA is accepted on every command.
ALLOWED_FLAGS: dict[int, int] = {
    READ: FUA | DF,
    WRITE: FUA,
    DISC: FUA,
    FLUSH: FUA,
    TRIM: FUA,
    CACHE: FUA,
    WRITE_ZEROES: FUA | NO_HOLE | FAST_ZERO,
    BLOCK_STATUS: FUA | REQ_ONE,
}
#: Commands that modify the export (EPERM on a read-only one).
WRITING = frozenset({WRITE, TRIM, WRITE_ZEROES})
#: Commands whose range past the end is ENOSPC (writes), the others are EINVAL.
RANGE_ENOSPC = frozenset({WRITE, WRITE_ZEROES})
#: Commands that carry a range (offset, length > 0).
RANGED = frozenset({READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS})
#: Device exceptions -> NBD error values (anything else: EIO and a logged traceback).
EXCEPTION_ERRNO: dict[type[BaseException], int] = {NoSpace: ENOSPC, DeviceIOError: EIO}
#: The meta context whose extents BLOCK_STATUS reports.
BASE_ALLOCATION = wire.META_BASE_ALLOCATION
#: At most one ENOSPC warning per export and cause in this many nanoseconds.
NOSPACE_LOG_INTERVAL_NS = 60 * 1_000_000_000


class ShutdownFlag:
    """Shared by every session of a server: set once shutdown begins."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False


# --- reply descriptions ---------------------------------------------------------------------------
class _Ok:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OK"


OK = _Ok()


@dataclass(slots=True)
class ReadReply:
    data: Buffer
    #: the device's runs that read as zero, (offset relative to the request, length); empty for
    #: simple replies and DF
    zero_extents: ZeroExtents = field(default_factory=list)
    df: bool = False


@dataclass(slots=True)
class StatusReply:
    context_id: int
    extents: list[tuple[int, int]]


@dataclass(slots=True)
class ErrorReply:
    errno: int
    message: str = ""


Reply = _Ok | ReadReply | StatusReply | ErrorReply


def validate(
    req: Request,
    export: Export,
    structured: bool,
    context_id: int | None,
    max_payload: int,
    shutting_down: bool = False,
) -> tuple[int, str] | None:
    """``None`` if ``req`` may run on ``export``, else ``(errno, message)`` (see the table)."""
    cmd = req.command
    info = export.info
    if cmd <= WRITE and not req.flags & ~FUA and not shutting_down and not req.payload_dropped:
        # the common READ / WRITE, accepted at once (every check below would pass)
        length = req.length
        if 0 < length and req.offset + length <= info.size:
            if length <= max_payload if cmd == READ else not info.read_only:
                return None
    if shutting_down:
        return ESHUTDOWN, "server is shutting down"
    allowed = ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return EINVAL, f"unknown command {cmd}"
    if req.flags & ~allowed:
        return EINVAL, f"flags 0x{req.flags & ~allowed:x} not valid for command {cmd}"
    if req.flags & DF and not structured:
        return EINVAL, "DF requires structured replies"
    if cmd == BLOCK_STATUS:
        if not structured:
            return EINVAL, "BLOCK_STATUS requires structured replies"
        if context_id is None:
            return EINVAL, "BLOCK_STATUS without a selected meta context"
    if cmd in WRITING and info.read_only:
        return EPERM, "export is read-only"
    if req.payload_dropped:
        return EOVERFLOW, f"payload of {req.length} bytes exceeds the maximum of {max_payload}"
    if cmd == FLUSH:
        if req.offset or req.length:
            return EINVAL, "FLUSH offset and length must be 0"
        return None
    if cmd in RANGED:
        if req.length == 0:
            return EINVAL, "zero-length request"
        if req.offset + req.length > info.size:
            err = ENOSPC if cmd in RANGE_ENOSPC else EINVAL
            return err, f"request [{req.offset}, +{req.length}) beyond the end ({info.size})"
        if cmd == READ and req.length > max_payload:
            return EOVERFLOW, f"read of {req.length} bytes exceeds the maximum of {max_payload}"
    return None


def bad_range(req: Request, size: int) -> bool:
    """Whether ``req``'s range is invalid (zero length, past the end, FLUSH with a range):
    what ``invalid_io`` counts among refused requests."""
    cmd = req.command
    if cmd == FLUSH:
        return bool(req.offset or req.length)
    return cmd in RANGED and (req.length == 0 or req.offset + req.length > size)


def clip_extents(extents: Extents, length: int, req_one: bool) -> Extents:
    """Extents for a BLOCK_STATUS reply: merged, clipped to ``length`` (the sum never passes it),
    at most :data:`MAX_EXTENTS`, exactly one with REQ_ONE (nbd.md 1.8)."""
    out: Extents = []
    total = 0
    for ext_len, flags in extents:
        if total >= length:
            break
        if ext_len <= 0:
            continue
        n = min(ext_len, length - total)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            if len(out) == MAX_EXTENTS:
                break
            out.append((n, flags))
        total += n
        if req_one and len(out) > 1:
            break
    if req_one and out:
        out = out[:1]
    if not out:
        out = [(length, 0)]  # status 0 is always a safe answer (1.8)
    return out


class Dispatcher:
    """Executes the requests of one connection on its export."""

    __slots__ = (
        "export",
        "device",
        "structured",
        "context_id",
        "max_payload",
        "shutdown",
        "io",
        "journal",
    )

    def __init__(
        self,
        export: Export,
        *,
        structured: bool,
        meta_contexts: dict[int, str] | None = None,
        max_payload: int,
        shutdown: ShutdownFlag | None = None,
    ) -> None:
        self.export = export
        self.device = export.device
        self.structured = structured
        self.context_id: int | None = None
        for cid, name in (meta_contexts or {}).items():
            if name == BASE_ALLOCATION:
                self.context_id = cid
        self.max_payload = max_payload
        self.shutdown = shutdown or ShutdownFlag()
        self.io: IoStats = export.io
        self.journal: Journal | None = export.journal

    def check(self, req: Request) -> tuple[int, str] | None:
        # positional: this runs once per request, and keyword calls cost more
        return validate(
            req,
            self.export,
            self.structured,
            self.context_id,
            self.max_payload,
            self.shutdown.is_set,
        )

    def run_now(self, req: Request) -> Reply | None:
        """The synchronous fast path: the reply of a READ/WRITE the device completes without
        waiting (or its rejection), else None (then ``execute`` must run it). Never raises."""
        cmd = req.command
        if cmd != READ and cmd != WRITE:
            return None
        bad = self.check(req)
        if bad is not None:
            return self._refuse(req, bad)
        t0 = perf_counter_ns()
        reply: Reply
        try:
            if cmd == WRITE:
                assert req.data is not None
                journal = self.journal
                if journal is None:
                    if not self.device.write_now(req.offset, req.data):
                        return None
                elif req.flags & FUA or journal.backlogged:
                    return None
                elif self.device.write_now(req.offset, req.data):
                    journal.write(req.offset, req.data)
                else:
                    return None
                reply = OK
            else:
                got = self.device.read_with_zeros_now(req.offset, req.length)
                if got is None:
                    return None
                reply = self._read_reply(req, got)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the connection
            reply = self._error(req, e)
        elapsed = perf_counter_ns() - t0
        io = self.io
        if not io.in_flight:
            io.busy_ns += elapsed
        # IoStats.done, inline: this is the per-request cost of the 4 KiB path
        io.bytes[cmd] += req.length
        io.ns[cmd] += elapsed
        io.histogram[cmd << HIST_CMD_SHIFT | (elapsed >> HIST_SHIFT).bit_length()] += 1
        return reply

    def _read_reply(self, req: Request, got: ReadResult) -> ReadReply:
        if req.flags & DF:
            return ReadReply(got[0], [], True)
        if self.structured:
            return ReadReply(got[0], got[1])
        return ReadReply(got[0])

    async def execute(self, req: Request) -> Reply:
        """Validate and run ``req``; never raises (except CancelledError)."""
        bad = self.check(req)
        if bad is not None:
            return self._refuse(req, bad)
        io = self.io
        t0 = perf_counter_ns()
        if not io.in_flight:
            io.busy_since = t0
        io.in_flight += 1
        try:
            return await self._run(req)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the connection
            return self._error(req, e)
        finally:
            t1 = perf_counter_ns()
            io.in_flight -= 1
            if not io.in_flight:
                io.busy_ns += t1 - io.busy_since
            io.done(req.command, req.length, t1 - t0)

    def _refuse(self, req: Request, bad: tuple[int, str]) -> ErrorReply:
        if bad_range(req, self.export.info.size):
            self.io.invalid_io += 1
        return ErrorReply(*bad)

    def _error(self, req: Request, e: Exception) -> ErrorReply:
        """The reply to a device error; a NoSpace is counted and logged by cause."""
        if isinstance(e, NoSpace):
            self._no_space(e)
        elif not isinstance(e, DeviceIOError):
            log.exception("export %s: command %d failed", self.export.name, req.command)
            return ErrorReply(EIO, f"internal error: {type(e).__name__}")
        return ErrorReply(_errno_for(e), str(e))

    def _no_space(self, e: NoSpace) -> None:
        full = e.__context__
        cause = full.cause if isinstance(full, PoolFull) else CAUSE_LIMIT
        io = self.io
        io.nospace[cause] += 1
        now = perf_counter_ns()
        last = io.nospace_logged.get(cause)
        if last is not None and now - last[0] < NOSPACE_LOG_INTERVAL_NS:
            return
        count = io.nospace[cause]
        io.nospace_logged[cause] = (now, count)
        more = count - last[1] - 1 if last is not None else 0
        log.warning(
            "export %s: write refused with ENOSPC: %s%s",
            self.export.name,
            self._no_space_why(cause, full),
            f" ({more} more since the last such line)" if more > 0 else "",
        )

    def _no_space_why(self, cause: str, full: BaseException | None) -> str:
        st = self.device.stats
        held = format_size(st.mem_used_total)
        if cause == CAUSE_LIMIT:
            return f"its mem-limit {format_size(st.mem_limit)} is reached (it holds {held})"
        if isinstance(full, PoolFull) and full.budget is not None:
            b = full.budget
            own = format_size(st.mem_limit) if st.mem_limit else "none"
            return (
                f"the server's memory budget {format_size(b.limit)} is reached "
                f"({format_size(b.used)} used by all exports; this one holds {held}, "
                f"its own mem-limit: {own})"
            )
        return f"{full} (it holds {held})"

    async def _run(self, req: Request) -> Reply:
        cmd = req.command
        dev = self.device
        if cmd == READ:
            return self._read_reply(req, await dev.read_with_zeros(req.offset, req.length))
        journal = self.journal
        if journal is not None and cmd in _JOURNALED:
            return await self._run_journaled(req, journal)
        if cmd == WRITE:
            assert req.data is not None
            await dev.write(req.offset, req.data)
            return OK
        if cmd == FLUSH:
            await dev.flush()
            return OK
        if cmd == TRIM:
            await dev.trim(req.offset, req.length)
            return OK
        if cmd == WRITE_ZEROES:
            await dev.write_zeroes(req.offset, req.length, punch_hole=not req.flags & NO_HOLE)
            return OK
        if cmd == CACHE:
            return OK
        if cmd == BLOCK_STATUS:
            assert self.context_id is not None
            ext = dev.block_status(req.offset, req.length)
            return StatusReply(
                self.context_id, clip_extents(ext, req.length, bool(req.flags & REQ_ONE))
            )
        return ErrorReply(EINVAL, f"unexpected command {cmd}")  # DISC never reaches here

    async def _run_journaled(self, req: Request, journal: Journal) -> Reply:
        """A mutating request or FLUSH of an export in durable mode: each mutation is recorded
        as soon as the device completed it (no await in between), a FLUSH or FUA waits for the
        journal's sync."""
        cmd = req.command
        dev = self.device
        if cmd == WRITE:
            assert req.data is not None
            if journal.backlogged:
                await journal.drain()
            await dev.write(req.offset, req.data)
            journal.write(req.offset, req.data)
        elif cmd == TRIM:
            await dev.trim(req.offset, req.length)
            journal.trim(req.offset, req.length)
        elif cmd == WRITE_ZEROES:
            await dev.write_zeroes(req.offset, req.length, punch_hole=not req.flags & NO_HOLE)
            journal.zero(req.offset, req.length)
        if cmd == FLUSH or req.flags & FUA:
            await journal.sync()
        return OK


#: the commands an export's journal takes part in
_JOURNALED = frozenset((WRITE, FLUSH, TRIM, WRITE_ZEROES))


def _errno_for(e: BaseException) -> int:
    for cls, err in EXCEPTION_ERRNO.items():
        if isinstance(e, cls):
            return err
    return EIO
