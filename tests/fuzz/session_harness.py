"""In-process fuzz harness for the asyncio shell: one byte stream through a real ``Session``.

Theory of operation
-------------------
:class:`SessionHarness` plays one connection per input against
:class:`zramd.server.session.Session` on a real event loop, over :class:`FakeTransport` instead
of a socket. The input is split into chunks like :mod:`harness` does; a PRNG seeded by the input
also decides, per chunk, whether the "client" reads what the server wrote (when it does not, the
transport's buffer grows and ``pause_writing`` fires past the session's high-water mark, exactly
like a real transport) and how many loop iterations pass between chunks (so requests finish
inline, in tasks, or in the codec thread pool in varying orders). Like a real transport it never
delivers data while reading is paused; EOF is delivered once reading resumes.

Oracles (a violation raises :class:`harness.Finding`):

* nothing is logged at ERROR or above (the session and dispatch log unexpected exceptions so);
* no hang: after EOF the session closes (``closed`` resolves) within :data:`CLOSE_TIMEOUT_S`;
  reading paused while the client drains everything and nothing runs must resume;
* afterwards no session is registered, no request is in flight, the transport was closed;
* bytes written after ``close()``/``abort()`` are a finding (a reply into a dead transport).

Shares the exports (and their devices) of a :class:`harness.CoreHarness`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from typing import Any

from harness import CoreHarness, Finding, _chunks

from zramd.server.session import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, ServerContext, Session

#: Seconds a session may take to close after EOF (requests run in a thread pool meanwhile).
CLOSE_TIMEOUT_S = 10.0
#: Loop iterations allowed for a paused session to resume while the client drains everything.
RESUME_STEPS = 200


class _ErrorTrap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class FakeTransport(asyncio.Transport):
    """A socket transport's behaviour without the socket: write buffer with water marks, pause
    and resume of reading, close (flush, then connection_lost soon) and abort."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proto: Session) -> None:
        super().__init__()
        self.loop = loop
        self.proto = proto
        self.buffered = 0  # bytes the client has not read yet
        self.total = 0
        self.high = WRITE_BUFFER_HIGH
        self.low = WRITE_BUFFER_LOW
        self.reading = True
        self.writing_paused = False
        self.closing = False
        self.lost = False
        self.late_writes = 0

    # -- transport API used by the session --
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return None if name in ("peername", "sockname", "socket", "ssl_object") else default

    def is_closing(self) -> bool:
        return self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high
        self.low = low if low is not None else self.low

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: Any) -> None:
        if self.closing:
            self.late_writes += 1
            return
        n = memoryview(data).nbytes
        self.buffered += n
        self.total += n
        if not self.writing_paused and self.buffered > self.high:
            self.writing_paused = True
            self.proto.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for d in list_of_data:
            self.write(d)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.closing = True
        self._lose()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.proto.connection_lost(None)

    # -- the client side --
    def client_reads(self) -> None:
        """The client reads everything written so far."""
        self.buffered = 0
        if self.writing_paused and not self.lost:
            self.writing_paused = False
            self.proto.resume_writing()


class SessionHarness:
    def __init__(self, core: CoreHarness | None = None) -> None:
        self.core = core or CoreHarness()
        self.loop = self.core.loop
        self.trap = _ErrorTrap()
        logging.getLogger("zramd").addHandler(self.trap)
        self.executions = 0

    def close(self) -> None:
        logging.getLogger("zramd").removeHandler(self.trap)
        self.core.close()

    def run(self, data: bytes) -> int:
        """One connection; returns the bytes the server wrote."""
        self.executions += 1
        self.trap.records.clear()
        try:
            return self.loop.run_until_complete(self._connection(data))
        finally:
            self._reset_devices()

    async def _steps(self, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def _connection(self, data: bytes) -> int:
        rng = random.Random(zlib.crc32(data) ^ 0x5E55)
        ctx = ServerContext(self.core.registry, handshake_timeout=60.0)
        sess = Session(ctx)
        tr = FakeTransport(self.loop, sess)
        sess.connection_made(tr)
        for chunk in [*_chunks(data), b""]:
            if tr.lost:
                break
            await self._wait_reading(tr, sess)
            if tr.lost:
                break
            if chunk:
                sess.data_received(chunk)
            else:
                sess.eof_received()
            if rng.random() < 0.7:
                tr.client_reads()
            await self._steps(rng.choice((0, 1, 3)))
        tr.client_reads()
        try:
            await asyncio.wait_for(asyncio.shield(sess.closed), CLOSE_TIMEOUT_S)
        except TimeoutError:
            raise Finding(
                f"session not closed {CLOSE_TIMEOUT_S} s after EOF "
                f"(in_flight={sess.in_flight}, reading={tr.reading})"
            ) from None
        await self._steps(2)
        self._check(ctx, sess, tr)
        return tr.total

    async def _wait_reading(self, tr: FakeTransport, sess: Session) -> None:
        """Like a socket: no data is delivered while reading is paused. The client drains what
        we wrote; running requests (thread pool) may need real time to finish."""
        steps = 0
        while not tr.reading and not tr.lost:
            tr.client_reads()
            if sess.in_flight:
                await asyncio.sleep(0.001)
                continue
            await asyncio.sleep(0)
            steps += 1
            if steps > RESUME_STEPS:
                raise Finding("reading stays paused with nothing in flight and nothing buffered")

    def _check(self, ctx: ServerContext, sess: Session, tr: FakeTransport) -> None:
        if self.trap.records:
            r = self.trap.records[0]
            raise Finding(f"logged at {r.levelname}: {r.getMessage()}\n{r.exc_text or ''}")
        if ctx.sessions:
            raise Finding("a closed session is still registered")
        if sess.in_flight:
            raise Finding(f"{sess.in_flight} requests in flight after close")
        if not tr.closing:
            raise Finding("the transport was never closed")
        if tr.late_writes:
            raise Finding(f"{tr.late_writes} writes after the transport was closed")
        for exp in self.core.registry:
            if exp.sessions:
                raise Finding(f"export {exp.name} still lists a closed session")

    def _reset_devices(self) -> None:
        for name, model in self.core.models.items():
            exp = self.core.registry.get(name)
            assert exp is not None
            exp.device.trim_sync(0, len(model))  # type: ignore[attr-defined]
