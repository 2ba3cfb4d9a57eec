"""Events the sans-I/O NBD core hands to its driver, and the export facts it needs from it.

Theory of operation
-------------------
This module is the contract between ``protocol/`` (bytes in, events out) and ``server/``
(sockets, tasks, devices). The protocol core never calls a device: during the handshake it learns
about exports only through an :class:`ExportCatalog` the server passes in, and in transmission it
yields :class:`Request` events that the server validates (``server/dispatch.py``) and answers
through the connection's reply encoders. Nothing here does I/O.

Driving a connection (see ``protocol/connection.py``)::

    conn = ServerConnection(catalog, limits)
    send(conn.data_to_send())              # the greeting
    loop:
        conn.receive_data(chunk)           # b"" means EOF
        while (ev := conn.next_event()) is not NEED_DATA:
            ... handle ev ...
        send(conn.data_to_send())          # handshake replies accumulate here

In transmission the server builds replies with ``conn.reply_*`` methods, which return a list of
buffers for ``transport.writelines`` (payloads are not copied).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""


class ExportCatalog(Protocol):
    def lookup(self, name: str) -> ExportInfo | None:
        """The export for ``name``; ``""`` is the default export. None if unknown."""
        ...

    def list_exports(self) -> list[ExportInfo]:
        """Every export, for NBD_OPT_LIST."""
        ...


class Command(enum.IntEnum):
    """NBD_CMD_* (nbd.md 1.5)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class _NeedData:
    """Sentinel: the core needs more bytes before it can produce another event."""

    _instance: _NeedData | None = None

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Event:
    """Base class of everything next_event() returns (besides NEED_DATA)."""

    __slots__ = ()


@dataclass(slots=True)
class HandshakeComplete(Event):
    """The client chose an export (GO or EXPORT_NAME); transmission begins.

    ``meta_contexts`` maps the context ids the server assigned in SET_META_CONTEXT to their names
    (only ``base:allocation`` exists today)."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class Request(Event):
    """One transmission-phase request, framing already checked.

    ``command`` is the raw 16-bit type (may be an unknown value: the server answers EINVAL).
    For WRITE, ``data`` is the complete payload, unless the declared length exceeded the
    configured payload cap: then the core drained (discarded) the payload without buffering it,
    ``data`` is None and ``payload_dropped`` is True; the server must answer with an error and the
    connection goes on."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: memoryview | bytes | None = None
    payload_dropped: bool = False


@dataclass(slots=True)
class StartTLS(Event):
    """The client asked for STARTTLS and it was accepted: the ACK is in ``data_to_send()``.

    The driver must send that ACK in plaintext, then run the TLS handshake (server side) on the
    same connection and feed the decrypted bytes to the same ``ServerConnection``. It must not
    feed any plaintext received after this event: the core has already checked that nothing was
    pipelined behind STARTTLS (that would be an injection, CVE-2021-3716 / CVE-2011-0411 style)
    and everything negotiated before STARTTLS has been forgotten."""


@dataclass(slots=True)
class ConnectionClosed(Event):
    """The connection is over. ``reason`` is human readable (EOF, ABORT, bad magic, DISC, ...).

    ``error`` is True for a protocol violation (the server logs it). The server must flush
    ``data_to_send()`` (it may hold a final reply, e.g. the ACK to ABORT) and close. No more events
    follow. After NBD_CMD_DISC the server first finishes the requests in flight."""

    reason: str
    error: bool = False
