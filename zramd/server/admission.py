"""Admission: which accepted connections become sessions.

Theory of operation
-------------------
Every accepted connection (TCP, Unix, inherited socket, stdio) meets :class:`Admission` before a
:class:`~zramd.server.session.Session` exists. The listeners' protocol factory is
:meth:`Admission.gate`: asyncio hands the new transport to a :class:`Gate`, whose
``connection_made`` asks :meth:`Admission.admit`. A refused connection gets one WARNING line and
is closed before any byte is read or sent; no session is created for it. An admitted one gets a
new session, which takes over the transport (``transport.set_protocol``) before the first read,
so from then on asyncio calls the session directly and the gate costs nothing.

Refusals, first match wins:

* the server is shutting down: ``rejecting connection #N PEER: shutting down``;
* the connection cap, ``max_connections`` sessions open (all exports together):
  ``rejecting connection #N PEER: connection limit N reached``;
* a TCP peer outside the allow list (``--allow``; Unix and stdio peers are always allowed, see
  ``server/access.py``): ``refusing connection #N PEER: address not in the allow list``.

An admitted TCP connection gets dead-peer detection (:func:`detect_dead_peer`): keepalive
probes after :data:`KEEPALIVE_IDLE_S` seconds of silence, every :data:`KEEPALIVE_INTERVAL_S`,
:data:`KEEPALIVE_PROBES` unanswered ones close it; and :data:`USER_TIMEOUT_MS`, the longest our
sent data may stay unacknowledged. A client host that vanishes without closing (power loss, a
cut network) thus frees its session, its connection slot and its export in about a minute
instead of never (an idle connection) or the kernel's ~15 minutes of retransmissions. A live
client's kernel answers the probes and acknowledges data whether or not the client reads, so
idle and slow clients are not affected.

Invariant: the cap counts ``ServerContext.sessions`` at ``connection_made``, the moment an
admitted session joins that set, so it is exact however many connections one accept burst brings.
A refused connection still takes a connection number, so log lines number every accepted
connection.

This module decides and logs; it knows no byte layouts, no device and no listener sockets.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from zramd.server.access import AllowList
from zramd.server.session import ServerContext, Session, fmt_peer

log = logging.getLogger("zramd.server")

#: TCP keepalive: first probe after this much silence, then every interval, close after this
#: many unanswered (about 60 s from the last sign of life to a closed session).
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
#: TCP_USER_TIMEOUT: sent data unacknowledged for this long closes the connection.
USER_TIMEOUT_MS = 60_000


def detect_dead_peer(transport: asyncio.BaseTransport) -> None:
    """Turn on keepalive probes and the user timeout on a TCP transport (others: nothing)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class Admission:
    """The connection cap, the shutdown state and the allow list, checked at accept."""

    def __init__(
        self, ctx: ServerContext, max_connections: int, allow: AllowList | None = None
    ) -> None:
        self.ctx = ctx
        self.max_connections = max_connections
        #: TCP clients outside these networks are closed at accept (None/empty: everyone).
        self.allow = allow
        #: connections closed at accept for the cap or shutdown
        self.rejected = 0
        #: connections closed at accept by the allow list
        self.refused = 0

    def gate(self) -> Gate:
        """The protocol factory for listeners."""
        return Gate(self)

    def admit(self, transport: asyncio.BaseTransport) -> Session | None:
        """A session serving ``transport``, or None after closing a refused connection."""
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        if ctx.shutdown.is_set or len(ctx.sessions) >= self.max_connections:
            self.rejected += 1
            why = (
                "shutting down"
                if ctx.shutdown.is_set
                else f"connection limit {self.max_connections} reached"
            )
            log.warning("rejecting connection #%d %s: %s", ctx.next_id(), fmt_peer(peer), why)
            transport.close()
            return None
        if self.allow and not self.allow.allows(peer):
            self.refused += 1
            log.warning(
                "refusing connection #%d %s: address not in the allow list",
                ctx.next_id(),
                fmt_peer(peer),
            )
            transport.close()
            return None
        detect_dead_peer(transport)
        session = Session(ctx)
        transport.set_protocol(session)
        session.connection_made(transport)
        return session


class Gate(asyncio.Protocol):
    """What asyncio first hands a new connection to; it admits a session or closes."""

    __slots__ = ("admission", "session")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        #: the session serving the connection, once admitted
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session = self.admission.admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # only a refused connection's close lands here
