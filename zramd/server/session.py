"""One client connection: socket bytes -> protocol core -> dispatch -> reply bytes.

Theory of operation
-------------------
:class:`Session` is an ``asyncio.Protocol``: the transport calls ``data_received`` with whatever
arrived, the sans-I/O :class:`~zramd.protocol.connection.ServerConnection` buffers and parses it,
and :meth:`Session._pump` drains its events. Handshake replies come from ``data_to_send()``;
each transmission :class:`~zramd.protocol.events.Request` is first offered to
:meth:`Dispatcher.run_now <zramd.server.dispatch.Dispatcher.run_now>` (a small request the device
completes at once: no coroutine at all); otherwise
:meth:`Dispatcher.execute <zramd.server.dispatch.Dispatcher.execute>` runs inline until it first
suspends, then a Task finishes it (``server/inline.py``). The encoded reply is written with
``writelines``; replies completed inline during one pump are batched into one ``writelines`` (one
syscall for many small replies). Replies go out in completion order (allowed: nbd.md 1.4).

Backpressure (every quantity a peer can push on is bounded): before taking each request from the
core the session asks its :class:`~zramd.server.flow.Flow` (running requests and the bytes they
hold, the server-wide total in ``ServerContext.in_flight``, the write buffer's high-water mark;
the rules are in ``server/flow.py``). While the flow is blocked we stop pulling events from the
core *and* pause reading the socket; the core then holds at most one partial request
(<= max_payload) plus one socket read. A finishing request, ``resume_writing`` or the flow's
``wake`` (the server-wide total fell) takes buffered requests again and resumes reading.

Lifecycle: the handshake must finish within ``handshake_timeout`` or the connection is aborted.
``ConnectionClosed`` (EOF, DISC, protocol violation, ABORT) stops event intake; the session closes
once its in-flight requests have finished and their replies are queued. If the peer vanishes,
running requests still complete (so nothing is half applied) and their replies are dropped; a
request whose payload never fully arrived was never yielded by the core, so it is never applied.
A request that runs in a task for :data:`SLOW_REQUEST_S` is logged once at warning: what it is
and what the device says requests may wait for (``BlockDevice.waits``: the page ranges of the
mutating requests in flight, writes waiting for room, pressure writeback), so that a client's
timeout can be told apart from a request stuck in the server.
Server shutdown: :class:`~zramd.server.dispatch.ShutdownFlag` makes new requests fail with
ESHUTDOWN; sessions still in the handshake answer options with ERR_SHUTDOWN (``begin_shutdown``)
until the listener closes them with the others after the grace period.

STARTTLS (``ServerContext.tls`` on/require): when the core yields ``StartTLS`` its ACK is written
in plaintext, reading pauses, and a task runs ``loop.start_tls(transport, self, ...)``; the
decrypted stream then feeds the same ``ServerConnection`` and ``self.transport`` becomes the TLS
transport. Plaintext pipelined behind STARTTLS is caught by the core (close); any plaintext
delivered while the TLS handshake is pending is a protocol violation (abort). A failed TLS
handshake (bad/missing client certificate with verify-peer, garbage) closes the connection.

Busy polling (``ServerContext.poll_us``, default 50 µs, 0 = off): on a VM, a request that
arrives while the loop thread sleeps in epoll costs a cross-CPU wake-up of an idle vCPU (about
25 µs here: fio QD1 4 KiB reads run at 81k IOPS with client and server on one CPU, 13k on two).
So after serving a burst, a session that is the only one in transmission, plain (no TLS), with
nothing running in a task, nothing left unsent and reading not paused, reads its socket without
blocking for up to ``poll_us`` for the client's next request, and serves it at once; each hit
restarts the window. It returns to the loop after :data:`POLL_MAX_ROUNDS` requests in a row
(timers, signals and new connections are never starved) and as soon as any condition fails.
EOF and socket errors end the poll; the loop then sees them itself (they are sticky).

Admission (the connection cap, shutdown, the allow list) happened before a session exists
(``server/admission.py``): every session was admitted and counts in ``ServerContext.sessions``
from ``connection_made`` until it is detached. When the last one detaches, the heap's free
pages go back to the OS (``trim_heap``, in a worker: malloc keeps some for the next requests,
see ``zramd/system.py``).

This module knows no byte layouts (the core encodes), no device semantics (dispatch does), no
listening sockets or admission rules (listener, admission) and no flow arithmetic (flow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from typing import Any

from zramd.config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT_BYTES,
)
from zramd.protocol.connection import ServerConnection
from zramd.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    HandshakeComplete,
    Request,
    StartTLS,
)
from zramd.protocol.limits import Limits
from zramd.server.dispatch import (
    DISC,
    OK,
    READ,
    Dispatcher,
    ErrorReply,
    ReadReply,
    Reply,
    ShutdownFlag,
    StatusReply,
)
from zramd.server.exports import Export, ExportRegistry
from zramd.server.flow import Flow, InFlight
from zramd.server.inline import start_inline
from zramd.stats import IO_COMMANDS
from zramd.system import trim_heap

log = logging.getLogger("zramd.server")

#: Transport write buffer high/low water marks (pause_writing / resume_writing thresholds).
WRITE_BUFFER_HIGH = 4 << 20
WRITE_BUFFER_LOW = 1 << 20
#: busy polling: a poll serves at most this many socket reads before returning to the loop
POLL_MAX_ROUNDS = 64
#: busy polling: bytes taken per socket read (a burst of requests, as the loop's own reads)
POLL_READ_SIZE = 256 << 10
#: Replies completed inline during one pump are sent together; flushed early past this size.
BATCH_FLUSH_BYTES = 1 << 20
#: a request running this long is logged once, with what the device says it may wait for (a
#: kernel client gives up after its timeout, 30 s by default for nbd-client)
SLOW_REQUEST_S = 10.0


class ServerContext:
    """What every session of one server shares."""

    def __init__(
        self,
        registry: ExportRegistry,
        *,
        limits: Limits | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
        poll_us: int = 0,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        structured_replies: bool = True,
        tls: str = "off",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        #: STARTTLS mode (off|on|require) and the context TLS handshakes use (set before serving).
        self.tls = tls
        self.ssl_context = ssl_context
        #: the protocol core's limits (the listener fills them from the config once)
        self.limits = limits if limits is not None else Limits()
        #: running requests per session (each session's Flow)
        self.max_in_flight = max_in_flight
        #: bytes held by running requests, all sessions together (server/flow.py)
        self.in_flight = InFlight(max_in_flight_bytes)
        self.poll_s = poll_us / 1e6
        #: sessions past the handshake (busy polling only serves a lone one)
        self.transmitting: set[Session] = set()
        #: socket reads that busy polling found data for (each saved an epoll wake-up)
        self.poll_hits = 0
        self.handshake_timeout = handshake_timeout
        self.structured_replies = structured_replies
        self.shutdown = ShutdownFlag()
        self.sessions: set[Session] = set()
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id


class Session(asyncio.Protocol):
    """One NBD connection."""

    def __init__(self, ctx: ServerContext, label: str = "") -> None:
        self.ctx = ctx
        self.id = ctx.next_id()
        self.label = label or f"#{self.id}"
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.export: Export | None = None
        self.dispatcher: Dispatcher | None = None
        self.flow = Flow(ctx.in_flight, ctx.max_in_flight, self._maybe_resume)
        self.requests = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # no more events taken; close once idle
        self._pumping = False  # inside _pump: nested resumes are left to the outer loop
        self._batch: list[bytes | bytearray | memoryview] | None = None  # queued in _pump
        self._batch_bytes = 0
        self._lost = False
        # STARTTLS: _tls_plain_gate from the ACK until the TLS layer owns the socket (any plaintext
        # then is injection); _tls_handshaking while start_tls runs (decrypted bytes that arrive
        # before it returns are buffered, not pumped: replies need the TLS transport); _tls after.
        self._tls_plain_gate = False
        self._tls_handshaking = False
        self._tls = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._poll_fd = -1  # the plain socket's fd, once in transmission, if polling is on
        self._idle: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.label == f"#{self.id}":
            self.label = f"#{self.id} {fmt_peer(transport.get_extra_info('peername'))}"
        ctx = self.ctx
        ctx.sessions.add(self)
        log.debug("connection %s opened", self.label)
        try:
            transport.set_write_buffer_limits(  # type: ignore[attr-defined]
                high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW
            )
        except (AttributeError, NotImplementedError):
            pass
        self.conn = ServerConnection(
            ctx.registry, ctx.limits, structured_replies=ctx.structured_replies, tls=ctx.tls
        )
        self._handshake_timer = asyncio.get_running_loop().call_later(
            ctx.handshake_timeout, self._on_handshake_timeout
        )
        self._write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self._closing or self.conn is None:
            return
        if self._tls_plain_gate:  # plaintext between our STARTTLS ACK and the TLS layer
            log.info("connection %s: protocol error: plaintext after STARTTLS", self.label)
            self.abort()
            return
        self.conn.receive_data(data)  # while _tls_handshaking: decrypted, buffered until TLS is up
        self._pump()
        if self._poll_fd >= 0 and self._can_poll():
            self._poll()

    def eof_received(self) -> bool:
        if not self._closing and self.conn is not None:
            self.conn.receive_data(b"")
            self._pump()
        # Keep the write side open until our replies are out; we close it ourselves. (TLS cannot
        # half-close: the SSL layer shuts down after flushing.)
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        if exc is not None:
            log.debug("connection %s lost: %s", self.label, exc)
        self._cancel_handshake_timer()
        self._detach()
        if self.flow.requests == 0:
            self._resolve_closed()

    def pause_writing(self) -> None:
        self.flow.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.flow.writing_paused = False
        self._maybe_resume()

    # --- public ----------------------------------------------------------------------------------
    @property
    def in_transmission(self) -> bool:
        return self.dispatcher is not None

    @property
    def in_flight(self) -> int:
        """Requests of this session running in tasks."""
        return self.flow.requests

    def close(self, reason: str = "") -> None:
        """Stop taking requests; close once the running ones have finished."""
        if reason:
            log.debug("closing connection %s: %s", self.label, reason)
        self._closing = True
        if self.flow.requests == 0:
            self._finish()

    def begin_shutdown(self) -> None:
        """Server shutdown: a session still negotiating answers options ERR_SHUTDOWN until the
        listener closes it after the grace period (transmission uses the ShutdownFlag)."""
        if self.conn is not None and not self.in_transmission:
            self.conn.begin_shutdown()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    async def wait_idle(self) -> None:
        """Return once no request of this session is running."""
        if self.flow.requests == 0:
            return
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)

    # --- internals -------------------------------------------------------------------------------
    def _can_poll(self) -> bool:
        t = self.transport
        return (
            self.flow.requests == 0
            and not self._closing
            and not self._lost
            and not self.flow.reading_paused
            and not self._tls
            and len(self.ctx.transmitting) == 1
            and not self.ctx.shutdown.is_set
            and t is not None
            and not t.get_write_buffer_size()
        )

    def _poll(self) -> None:
        """Busy-poll the socket for the next request (module docstring, "Busy polling")."""
        fd, window, conn = self._poll_fd, self.ctx.poll_s, self.conn
        assert conn is not None
        clock = time.perf_counter
        for _ in range(POLL_MAX_ROUNDS):
            deadline = clock() + window
            while True:
                try:
                    data = os.read(fd, POLL_READ_SIZE)
                    break
                except BlockingIOError:
                    if clock() > deadline:
                        return
                except OSError:
                    return  # the loop's own read reports it
            if not data:
                return  # EOF: the loop's own read sees it too
            self.ctx.poll_hits += 1
            conn.receive_data(data)
            self._pump()
            if not self._can_poll():
                return

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._lost and self.flow.pause_reading():
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def _maybe_resume(self) -> None:
        """Take requests again and resume reading once the flow allows (``Flow.wake``)."""
        flow = self.flow
        if self._pumping or not flow.reading_paused or self._closing or flow.blocked():
            return
        self._pump()  # events the core already buffered come first
        if not self._closing and flow.resume_reading():
            if self.transport is not None and not self._lost:
                try:
                    self.transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass

    def _pump(self) -> None:
        if self._tls_plain_gate or self._tls_handshaking:
            return  # replies must wait for the TLS transport (_start_tls pumps once it is up)
        conn = self.conn
        assert conn is not None
        self._pumping = True
        self._batch = []  # replies completed inline go out in one writelines at the end
        try:
            self._pump_events(conn)
            out = conn.data_to_send()
            if out:
                self._write(out)
        finally:
            self._pumping = False
            self._flush_batch()
            self._batch = None
        if self._closing and self.flow.requests == 0:
            self._finish()

    def _pump_events(self, conn: ServerConnection) -> None:
        flow = self.flow
        while not self._closing:
            if flow.blocked():
                self._pause_reading()
                break
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if type(ev) is Request:
                self._start(ev)
            elif type(ev) is HandshakeComplete:
                self._write(conn.data_to_send())
                self._on_handshake(ev)
            elif type(ev) is ConnectionClosed:
                self._write(conn.data_to_send())
                self._on_closed(ev)
            elif type(ev) is StartTLS:
                self._write(conn.data_to_send())  # the ACK, in plaintext, before TLS starts
                self._begin_tls()
                break

    def _begin_tls(self) -> None:
        """Pause reading and start the TLS handshake once the queued ACK has been written."""
        sslctx = self.ctx.ssl_context
        transport = self.transport
        if sslctx is None or transport is None:  # a tls mode without a context: config bug
            log.error("connection %s: STARTTLS accepted but no TLS context", self.label)
            self._closing = True
            return
        self._tls_plain_gate = True
        try:
            transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass
        task = asyncio.get_running_loop().create_task(self._start_tls(transport, sslctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_tls(self, raw: asyncio.Transport, sslctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._lost or raw.is_closing():
                raise ConnectionError("connection closed before the TLS handshake")
            # start_tls hands the socket to the TLS layer before its first suspension, so from
            # here on data_received only ever sees decrypted bytes.
            self._tls_plain_gate = False
            self._tls_handshaking = True
            tls = await loop.start_tls(
                raw,
                self,
                sslctx,
                server_side=True,
                ssl_handshake_timeout=self.ctx.handshake_timeout,
            )
            if tls is None or tls.is_closing() or raw.is_closing():
                # asyncio resolves start_tls without error when the socket dies mid-handshake
                raise ConnectionError("connection lost during the TLS handshake")
        except Exception as e:  # noqa: BLE001 - any TLS failure ends this connection only
            self._tls_plain_gate = self._tls_handshaking = False
            if not self._lost:
                log.info("connection %s: TLS handshake failed: %s", self.label, e)
            self._closing = True
            if not raw.is_closing():
                raw.abort()
            if not self._lost:  # the TLS layer does not report connection_lost before success
                self.connection_lost(None)
            return
        self._tls_handshaking = False
        if self._lost:
            return
        self.transport = tls
        self._tls = True
        try:
            tls.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        except (AttributeError, NotImplementedError):
            pass
        if log.isEnabledFor(logging.DEBUG):
            from zramd.server.tls import peer_summary

            log.debug(
                "connection %s: TLS up (%s)",
                self.label,
                peer_summary(tls.get_extra_info("ssl_object")),
            )
        if not self._closing:
            self._pump()  # options that arrived while start_tls was returning

    def _on_handshake(self, ev: HandshakeComplete) -> None:
        self._cancel_handshake_timer()
        export = self.ctx.registry.get(ev.export.name)
        if export is None or self.ctx.shutdown.is_set:
            self.close("export gone" if export is None else "shutting down")
            return
        self.export = export
        export.sessions.add(self)
        self.ctx.transmitting.add(self)
        if self.ctx.poll_s > 0 and not self._tls and self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.type == socket.SOCK_STREAM:
                fd = sock.fileno()
                if fd >= 0 and not os.get_blocking(fd):  # never block the loop in a read
                    self._poll_fd = fd
        self.dispatcher = Dispatcher(
            export,
            structured=ev.structured_replies,
            meta_contexts=ev.meta_contexts,
            max_payload=self.ctx.limits.max_payload,
            shutdown=self.ctx.shutdown,
        )
        log.debug(
            "connection %s: export %s (structured=%s contexts=%s)",
            self.label,
            export.name,
            ev.structured_replies,
            ev.meta_contexts,
        )

    def _on_closed(self, ev: ConnectionClosed) -> None:
        self._closing = True
        self._cancel_handshake_timer()
        if ev.error:
            log.info("connection %s: protocol error: %s", self.label, ev.reason)
        else:
            log.debug("connection %s: closed (%s)", self.label, ev.reason)

    def _start(self, req: Request) -> None:
        """Run one request, the cheapest way first: ``run_now`` answers it on the spot (no
        coroutine); otherwise ``_handle`` starts inline and gets a Task only if it really waits
        (``server/inline.py``). Only the latter counts in the flow: an answer given on the spot
        holds nothing once it is queued."""
        if req.command == DISC:
            return  # the core follows with ConnectionClosed; running requests finish first
        dispatcher = self.dispatcher
        if dispatcher is None:  # cannot happen with a correct core
            self._closing = True
            return
        reply = dispatcher.run_now(req)
        if reply is not None:
            self.requests += 1
            try:
                self._reply(req, reply)
            except Exception:  # noqa: BLE001 - as in _handle
                log.exception("connection %s: request failed", self.label)
                self.abort()
            return
        nbytes = len(req.data) if req.data is not None else 0
        if req.command == READ:
            nbytes += req.length  # the reply it will send
        self.flow.start(nbytes)
        self.requests += 1
        start_inline(self._handle(req, nbytes), self._tasks)

    async def _handle(self, req: Request, nbytes: int) -> None:
        """Execute ``req``, queue its reply, and always give back the ``nbytes`` it held. A
        request still running after :data:`SLOW_REQUEST_S` is reported (:meth:`_slow`)."""
        loop = asyncio.get_running_loop()
        slow = loop.call_later(SLOW_REQUEST_S, self._slow, req, loop.time())
        try:
            assert self.dispatcher is not None
            reply = await self.dispatcher.execute(req)
            self._reply(req, reply)
        except Exception:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("connection %s: request failed", self.label)
            self.abort()
        finally:
            slow.cancel()
            self.flow.finish(nbytes)
            self._request_done()

    def _slow(self, req: Request, started: float) -> None:
        """Log a request that has run for :data:`SLOW_REQUEST_S` (once): what it is, and what
        the device says requests may be waiting for, so that a client's timeout can be told
        apart from a request stuck in the server."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            return
        name = IO_COMMANDS.get(req.command, str(req.command))
        log.warning(
            "connection %s: %s of %d bytes at offset %d has run for %.0f s on export %s (%d "
            "requests in flight); %s",
            self.label,
            name,
            req.length,
            req.offset,
            asyncio.get_running_loop().time() - started,
            dispatcher.export.name,
            dispatcher.io.in_flight,
            dispatcher.device.waits() or "the device reports nothing",
        )

    def _reply(self, req: Request, reply: Reply) -> None:
        if self._lost:
            return
        conn = self.conn
        assert conn is not None and self.transport is not None
        if reply is OK:
            bufs = conn.reply_ok(req.cookie)
        elif type(reply) is ReadReply:
            bufs = conn.reply_read(
                req.cookie, req.offset, reply.data, zero_extents=reply.zero_extents, df=reply.df
            )
        elif type(reply) is ErrorReply:
            bufs = conn.reply_error(req.cookie, reply.errno, reply.message)
        else:
            assert type(reply) is StatusReply
            bufs = conn.reply_block_status(req.cookie, reply.context_id, reply.extents)
        batch = self._batch
        if batch is None:
            self.transport.writelines(bufs)
            return
        batch.extend(bufs)
        self._batch_bytes += len(reply.data) if type(reply) is ReadReply else 64
        if self._batch_bytes >= BATCH_FLUSH_BYTES:
            self._flush_batch()

    def _flush_batch(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            self._batch_bytes = 0
            t = self.transport
            if t is not None and not self._lost and not t.is_closing():
                t.writelines(batch)

    def _request_done(self) -> None:
        if self.flow.requests == 0:
            if self._idle is not None:
                if not self._idle.done():
                    self._idle.set_result(None)
                self._idle = None
            if self._lost:
                self._resolve_closed()
                return
            if self._closing:
                self._finish()
                return
        self._maybe_resume()

    def _finish(self) -> None:
        self._flush_batch()
        self._detach()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _detach(self) -> None:
        sessions = self.ctx.sessions
        if self in sessions:
            sessions.discard(self)
            if not sessions:  # the last client is gone: its buffers' free heap pages go back
                self._trim_heap()
        self.flow.leave()
        self.ctx.transmitting.discard(self)
        self._poll_fd = -1
        if self.export is not None:
            self.export.sessions.discard(self)

    @staticmethod
    def _trim_heap() -> None:
        """``trim_heap`` in a worker of the loop's default executor: giving tens of megabytes
        back takes milliseconds (9 ms for 70 MB freed in 70 KiB pieces), which the loop thread
        would hold the other exports' clients for. Not once the executor is shut down (the
        server is stopping)."""
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().run_in_executor(None, trim_heap)

    def _resolve_closed(self) -> None:
        self._detach()
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self, data: bytes) -> None:
        if self._batch is not None:
            if data:
                self._batch.append(data)
            return
        t = self.transport
        if data and t is not None and not self._lost and not t.is_closing():
            t.write(data)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.dispatcher is None and not self._lost:
            log.info(
                "connection %s: handshake not finished within %.1f s; dropping",
                self.label,
                self.ctx.handshake_timeout,
            )
            self.abort()


def fmt_peer(peer: Any) -> str:
    """A transport's ``peername`` for log lines: ``host:port``, ``[v6]:port``, ``unix:PATH``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    if peer:
        return f"unix:{peer}" if isinstance(peer, str) else str(peer)
    return "local"
