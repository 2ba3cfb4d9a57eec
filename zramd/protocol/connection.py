"""The object the server drives: one NBD connection, sans I/O.

Theory of operation
-------------------
:class:`ServerConnection` glues the input buffer (``transmission.RequestReader``), the handshake
state machine (``handshake.Handshake``) and the reply encoders together. Bytes go in through
:meth:`receive_data`, events come out of :meth:`next_event` (``HandshakeComplete``, ``Request``,
``ConnectionClosed`` or ``NEED_DATA``), handshake replies come out of :meth:`data_to_send`, and
transmission replies are built with the ``reply_*`` methods (lists of buffers for
``transport.writelines``; payloads are never copied).

Invariants:

* After ``ConnectionClosed`` no further event is produced (``next_event`` returns NEED_DATA) and
  input is ignored. ``data_to_send()`` may still hold a final handshake reply (e.g. ABORT's ACK).
* After ``HandshakeComplete`` any bytes the client already pipelined stay buffered and become
  requests.
* DISC: ``Request(command=DISC)`` is yielded, then ``ConnectionClosed("client sent DISC")`` on the
  next call; the server finishes the requests in flight and closes.
* STARTTLS (``tls`` mode ``on``/``require``): ``StartTLS`` is yielded after the ACK is queued;
  if the client already sent bytes behind STARTTLS (before any TLS handshake could happen) they
  would be plaintext injected into the TLS session, so the connection is closed instead
  (``ConnectionClosed(error=True)``). The driver feeds only decrypted bytes after ``StartTLS``.
* The core validates framing only; ranges, flags and commands against the export are validated by
  ``server/dispatch.py``.

This module must not know about asyncio, sockets or devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import transmission as tx
from . import wire
from .events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportCatalog,
    ExportInfo,
    HandshakeComplete,
    StartTLS,
    _NeedData,
)
from .handshake import Handshake, State, transmission_flags
from .limits import Limits
from .transmission import Buffers


class ServerConnection:
    """One NBD connection, server side (see module docstring)."""

    def __init__(
        self,
        catalog: ExportCatalog,
        limits: Limits = Limits(),  # noqa: B008 - frozen, shared safely
        *,
        structured_replies: bool = True,
        tls: str = wire.TLS_OFF,
    ) -> None:
        self.limits = limits
        self._reader = tx.RequestReader(limits.max_payload)
        self._hs = Handshake(catalog, limits, structured_replies, tls)
        self._in_tx = False
        self._closed = False
        self._structured = False
        self.export: ExportInfo | None = None
        self.meta_contexts: dict[int, str] = {}

    # -- input / events ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the client; ``b""`` means EOF. ``bytes`` input is referenced, not copied."""
        self._reader.feed(data)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA when more input is needed (or the connection is over)."""
        if self._in_tx:
            return self._reader.next_request()
        if self._closed:
            return NEED_DATA
        return self._handshake_event()

    def data_to_send(self) -> bytes:
        """Handshake bytes queued so far (greeting, option replies); clears them."""
        out = self._hs.out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    @property
    def in_transmission(self) -> bool:
        return self._in_tx

    def begin_shutdown(self) -> None:
        """The server is shutting down: options from now on get ERR_SHUTDOWN (nbd.md)."""
        self._hs.shutting_down = True

    @property
    def closed(self) -> bool:
        return self._closed or self._reader.done

    @property
    def tls_active(self) -> bool:
        """True once STARTTLS was accepted (the driver runs the TLS handshake at ``StartTLS``)."""
        return self._hs.tls_active

    @property
    def structured_replies(self) -> bool:
        """Whether structured replies were negotiated (valid once in transmission)."""
        return self._structured

    def transmission_flags(self, export: ExportInfo) -> int:
        """The transmission flags we advertise for ``export`` given what was negotiated."""
        structured = self._structured if self._in_tx else self._hs.neg.structured
        return transmission_flags(export, structured)

    def _handshake_event(self) -> Event | _NeedData:
        hs = self._hs
        rd = self._reader
        while True:
            if hs.skip:
                hs.skip -= rd.skip(hs.skip)
                if hs.skip:
                    return self._starved()
                ev = hs.drained()
            else:
                data = rd.take(hs.need)
                if data is None:
                    return self._starved()
                ev = hs.feed(data)
            if ev is None:
                continue
            if type(ev) is StartTLS:
                extra = rd.available
                if extra or rd.eof:
                    self._closed = True
                    rd.close()
                    if not extra:
                        return ConnectionClosed("client closed the connection after STARTTLS")
                    return ConnectionClosed(
                        f"{extra} plaintext byte(s) after STARTTLS before the TLS handshake",
                        True,
                    )
                return ev
            if isinstance(ev, HandshakeComplete):
                self._in_tx = True
                self._structured = ev.structured_replies
                self.export = ev.export
                self.meta_contexts = ev.meta_contexts
            else:
                self._closed = True
                rd.close()
            return ev

    def _starved(self) -> ConnectionClosed | _NeedData:
        rd = self._reader
        if not rd.eof:
            return NEED_DATA
        self._closed = True
        hs = self._hs
        avail = rd.available
        rd.close()
        if hs.state is State.CLIENT_FLAGS and avail == 0:
            return ConnectionClosed("client closed the connection before the handshake", False)
        if hs.at_option_boundary and avail == 0:
            return ConnectionClosed("client closed the connection during the handshake", False)
        return ConnectionClosed(f"EOF in the middle of the handshake ({hs.state.value})", True)

    # -- reply encoders (transmission) -------------------------------------------------------------

    def reply_ok(self, cookie: int) -> Buffers:
        """Success without payload: a simple reply (allowed for non-READ even when structured)."""
        return [wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie)]

    def reply_error(self, cookie: int, errno: int, message: str = "") -> Buffers:
        """An error: structured ERROR chunk (with message, DONE) if negotiated, else simple."""
        if self._structured:
            return tx.structured_error(cookie, errno, message)
        return [wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, errno, cookie)]

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        zero_extents: Sequence[tuple[int, int]] = (),
        df: bool = False,
    ) -> Buffers:
        """A successful READ of ``len(data)`` bytes at ``offset``.

        Simple: header + data. Structured: OFFSET_DATA chunks for data runs and OFFSET_HOLE chunks
        for ``zero_extents`` (relative offset, length) of at least 4 KiB; the last chunk carries
        DONE; with ``df`` exactly one OFFSET_DATA chunk. ``zero_extents`` is only a hint."""
        if self._structured:
            return tx.structured_read_reply(cookie, offset, data, zero_extents, df)
        return [wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie), data]

    def reply_block_status(
        self,
        cookie: int,
        context_id: int,
        extents: Sequence[tuple[int, int]],
        *,
        done: bool = True,
    ) -> Buffers:
        """One BLOCK_STATUS chunk of (length, flags) extents; DONE unless ``done=False`` (for
        several contexts, only the last chunk may carry DONE)."""
        return tx.block_status_reply(cookie, context_id, extents, done)
