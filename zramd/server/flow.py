"""Flow control: how much a connection, and the whole server, may hold in running requests.

Theory of operation
-------------------
Every request that does not complete inline (``Dispatcher.run_now``) runs in a task and holds
memory until its reply is queued: its WRITE payload, or the READ data it will send. A
:class:`Flow` (one per session) counts its running requests and the bytes they hold; the
:class:`InFlight` of the server sums those bytes over every session. The session asks
:meth:`Flow.blocked` before it takes each request from the protocol core; while it is blocked the
session takes nothing and pauses reading the socket, so the core holds at most one partial
request plus one socket read.

A session is blocked when any of these holds:

* its running requests reach ``max_requests`` (config ``max-in-flight``);
* the bytes they hold reach ``max_bytes`` (:data:`IN_FLIGHT_BYTES_HIGH`);
* its transport's write buffer is above the high-water mark (``pause_writing``), so a client
  that stops reading cannot make us buffer replies without bound;
* the server-wide total reaches ``InFlight.high`` (config ``max-in-flight-bytes``) *and* the
  session has a request running. A session with nothing running may always take one request,
  so sessions can never all wait for each other; each session may go over the bound by the one
  request it took last.

A session blocked by the server-wide bound is remembered in ``InFlight.waiting``; when a finishing
request brings the total below :data:`IN_FLIGHT_LOW_FRACTION` of the bound, every waiting
session (but the one finishing, which looks again by itself) is woken through its ``wake``
callback and the waiting set is emptied: those still blocked register again.

Reading: :meth:`Flow.pause_reading` and :meth:`Flow.resume_reading` say whether the session must
switch its transport now (each switch happens once); reading resumes only when no bound holds.

This module is pure bookkeeping: it knows no sockets, transports, asyncio or NBD bytes.
"""

from __future__ import annotations

from collections.abc import Callable

#: Bytes of WRITE payload + pending READ data held by one session's running requests before it
#: stops reading. Requests running when a slow reader stops reading still land their replies in
#: the write buffer, so a connection can cost about twice this: 64 MiB let one client that never
#: reads its READ replies grow the server by ~130 MiB, 16 MiB by ~34 MiB
#: (tests/e2e/test_load.py). One request larger than this (up to max_payload) is still admitted
#: when nothing else runs.
IN_FLIGHT_BYTES_HIGH = 16 << 20
#: sessions blocked by the server-wide bound are woken below this fraction of it
IN_FLIGHT_LOW_FRACTION = 0.75


class InFlight:
    """Bytes held by running requests, all sessions of one server together."""

    __slots__ = ("high", "held", "peak", "waiting")

    def __init__(self, high: int) -> None:
        #: the server-wide bound (config ``max-in-flight-bytes``)
        self.high = high
        self.held = 0
        #: the largest ``held`` seen (tests check the bound with it)
        self.peak = 0
        #: flows blocked by ``high``, woken once ``held`` falls below ``low``
        self.waiting: set[Flow] = set()

    @property
    def low(self) -> int:
        return int(self.high * IN_FLIGHT_LOW_FRACTION)


class Flow:
    """One session's running requests and the bytes they hold (module docstring)."""

    __slots__ = (
        "shared",
        "max_requests",
        "max_bytes",
        "wake",
        "requests",
        "bytes",
        "writing_paused",
        "reading_paused",
    )

    def __init__(
        self,
        shared: InFlight,
        max_requests: int,
        wake: Callable[[], None],
        *,
        max_bytes: int = IN_FLIGHT_BYTES_HIGH,
    ) -> None:
        self.shared = shared
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        #: called when the server-wide total fell low enough for this blocked session to go on
        self.wake = wake
        self.requests = 0
        self.bytes = 0
        #: the transport's write buffer is above its high-water mark
        self.writing_paused = False
        #: the session has paused reading its transport
        self.reading_paused = False

    def blocked(self) -> bool:
        """Whether the session must not take another request now."""
        shared = self.shared
        if shared.held >= shared.high and self.requests:
            shared.waiting.add(self)
            return True
        return (
            self.requests >= self.max_requests
            or self.bytes >= self.max_bytes
            or self.writing_paused
        )

    def start(self, nbytes: int) -> None:
        """A request holding ``nbytes`` starts running."""
        self.requests += 1
        self.bytes += nbytes
        shared = self.shared
        shared.held += nbytes
        if shared.held > shared.peak:
            shared.peak = shared.held

    def finish(self, nbytes: int) -> None:
        """A request that held ``nbytes`` finished; wake the sessions waiting for memory when the
        server-wide total is low again."""
        self.requests -= 1
        self.bytes -= nbytes
        shared = self.shared
        shared.held -= nbytes
        if shared.waiting and shared.held < shared.low:
            waiting = list(shared.waiting)
            shared.waiting.clear()
            for flow in waiting:
                if flow is not self:
                    flow.wake()

    def leave(self) -> None:
        """The session is gone: never wake it. (Its running requests still ``finish``.)"""
        self.shared.waiting.discard(self)

    def pause_reading(self) -> bool:
        """Mark reading paused; True if the session must pause its transport now."""
        if self.reading_paused:
            return False
        self.reading_paused = True
        return True

    def resume_reading(self) -> bool:
        """Mark reading resumed if no bound holds; True if the session must resume its transport
        now."""
        if not self.reading_paused or self.blocked():
            return False
        self.reading_paused = False
        return True
