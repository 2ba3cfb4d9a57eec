"""Fixed-newstyle handshake (option haggling) as a table-driven state machine.

Theory of operation
-------------------
The :class:`Handshake` never touches a buffer or a socket. At every step it states what it wants
next: ``need`` bytes (handed to :meth:`Handshake.feed` all at once) or, when ``skip`` is nonzero,
that many bytes to be discarded unseen (then :meth:`Handshake.drained` is called). The driver
(``ServerConnection``) satisfies those wants from its input buffer. Replies accumulate in ``out``.

States and what they consume (``_STATE_TABLE``)::

    CLIENT_FLAGS   4 bytes   client flags32          -> OPTION_HEADER
    OPTION_HEADER  16 bytes  IHAVEOPT, opt32, len32  -> OPTION_DATA, or drain then reply
    OPTION_DATA    len bytes the option's data       -> OPTION_HEADER, DONE (GO, EXPORT_NAME)
    DONE / CLOSED  nothing more

Options are dispatched through ``_OPTION_TABLE``: each entry says whether the option's data is
buffered (bounded by ``Limits.max_option_length``) and passed to its handler, or drained unseen
(options that take no data). Unknown options are drained and answered ``NBD_REP_ERR_UNSUP``.

Invariants:

* Every length the client controls (option length, name length, query count, query length) is
  checked against a ``Limits`` field before anything is buffered or sliced. Option data larger than
  ``max_option_length`` is drained and answered ``NBD_REP_ERR_TOO_BIG`` (the spec's "request too
  large to process"); strings longer than ``max_string`` also get ``ERR_TOO_BIG``. Framing that no
  honest client produces (bad option magic, options longer than ``max_option_drain``, more than
  ``max_options`` options, unknown client flags) ends the connection.
* Everything negotiated that a later STARTTLS must forget lives in :class:`Negotiated`, which has
  one ``reset()`` (CVE-2021-3716: plaintext STRUCTURED_REPLY surviving STARTTLS).
* TLS (nbd.md 5) follows the ``tls`` mode: ``off`` (NOTLS) answers STARTTLS ``ERR_UNSUP`` and never
  says ``ERR_TLS_REQD``; ``on`` makes STARTTLS optional; ``require`` (FORCEDTLS) answers every
  option but STARTTLS and ABORT with ``ERR_TLS_REQD`` until TLS is up (its data drained unseen),
  and closes on EXPORT_NAME (which cannot carry an error). An accepted STARTTLS replies ACK, resets
  :class:`Negotiated` and yields :class:`~zramd.protocol.events.StartTLS`; the TLS handshake itself
  is the driver's. STARTTLS with data, or once TLS is up, gets ``ERR_INVALID``.
* Once the driver calls ``begin_shutdown`` (server shutting down), every option but ABORT has its
  data drained and gets ``ERR_SHUTDOWN``; EXPORT_NAME (which cannot carry an error) closes.
* Meta-context selections remember the export they were made for; they are only handed over if the
  client then selects that same export.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import wire
from .errors import OptionError, ProtocolError
from .events import (
    ConnectionClosed,
    Event,
    ExportCatalog,
    ExportInfo,
    HandshakeComplete,
    StartTLS,
)
from .limits import Limits

OFFERED_HANDSHAKE_FLAGS = wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES

# Flags advertised for every export (nbd.md 1.3, section 6 "Minimum" and "Excellent adds").
_TFLAGS_COMMON = (
    wire.TFLAG_HAS_FLAGS
    | wire.TFLAG_SEND_FLUSH
    | wire.TFLAG_SEND_FUA
    | wire.TFLAG_SEND_CACHE
    | wire.TFLAG_CAN_MULTI_CONN
)
_TFLAGS_WRITABLE = wire.TFLAG_SEND_TRIM | wire.TFLAG_SEND_WRITE_ZEROES | wire.TFLAG_SEND_FAST_ZERO


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """What we advertise for ``export``: rw 0xded / ro 0x58f with structured replies (nbd.md 2)."""
    flags = _TFLAGS_COMMON
    if export.read_only:
        flags |= wire.TFLAG_READ_ONLY
    else:
        flags |= _TFLAGS_WRITABLE
    if structured:
        flags |= wire.TFLAG_SEND_DF
    return flags


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    DONE = "done"
    CLOSED = "closed"


# Bytes each state needs before it can act (OPTION_DATA: the option's length, set at runtime).
_STATE_NEED = {
    State.CLIENT_FLAGS: wire.CLIENT_FLAGS.size,
    State.OPTION_HEADER: wire.OPTION_HEADER.size,
}


@dataclass
class Negotiated:
    """Option state that STARTTLS must drop (CVE-2021-3716). Reset it in one place."""

    structured: bool = False
    meta_export: str | None = None  # ExportInfo.name the selection was made for
    meta_contexts: dict[int, str] = field(default_factory=dict)

    def reset(self) -> None:
        self.structured = False
        self.meta_export = None
        self.meta_contexts = {}


@dataclass(frozen=True)
class OptionSpec:
    """One row of the option table."""

    name: str
    takes_data: bool  # True: data buffered and passed to handler; False: drained, length passed
    handler: Callable[[Handshake, bytes, int], Event | None]


def _check_string(raw: bytes, what: str) -> str:
    """Strings are UTF-8 without NUL (nbd.md 1.2)."""
    if b"\0" in raw:
        raise OptionError(wire.REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(wire.REP_ERR_INVALID, f"{what} is not valid UTF-8") from None


class Handshake:
    """The negotiation phase of one connection (see module docstring)."""

    def __init__(
        self,
        catalog: ExportCatalog,
        limits: Limits,
        structured_replies: bool = True,
        tls: str = wire.TLS_OFF,
    ) -> None:
        if tls not in wire.TLS_MODES:
            raise ValueError(f"tls mode must be one of {', '.join(wire.TLS_MODES)}, not {tls!r}")
        self.catalog = catalog
        self.tls_mode = tls
        self.tls_active = False
        self.limits = limits
        self.structured_allowed = structured_replies
        self.out = bytearray()
        self.state = State.CLIENT_FLAGS
        self.need = _STATE_NEED[State.CLIENT_FLAGS]
        self.skip = 0
        self.no_zeroes = False
        self.options_seen = 0
        self.neg = Negotiated()
        self._next_context_id = 1
        self._opt = 0
        self._opt_len = 0
        self._after_drain: Callable[[], Event | None] | None = None
        #: the server is shutting down: options get ERR_SHUTDOWN (nbd.md: "during negotiation")
        self.shutting_down = False
        self.out += wire.GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT, OFFERED_HANDSHAKE_FLAGS)

    # -- driver interface -------------------------------------------------------------------------

    def feed(self, data: bytes) -> Event | None:
        """Consume exactly ``self.need`` bytes; an event ends the handshake."""
        handler = _STATE_TABLE[self.state]
        try:
            return handler(self, data)
        except ProtocolError as e:
            return self._close(str(e))

    def drained(self) -> Event | None:
        """The ``skip`` bytes have been discarded; run what was waiting for them."""
        cb = self._after_drain
        assert cb is not None and self.skip == 0
        self._after_drain = None
        try:
            return cb()
        except ProtocolError as e:
            return self._close(str(e))

    @property
    def at_option_boundary(self) -> bool:
        """True when the client could stop here without breaking framing."""
        return self.state is State.OPTION_HEADER and not self.skip

    # -- state handlers ---------------------------------------------------------------------------

    def _on_client_flags(self, data: bytes) -> Event | None:
        (flags,) = wire.CLIENT_FLAGS.unpack(data)
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"client flags 0x{flags:x} include flags we did not offer")
        if not flags & wire.FLAG_C_FIXED_NEWSTYLE:
            raise ProtocolError("client does not support fixed newstyle")
        self.no_zeroes = bool(flags & wire.FLAG_C_NO_ZEROES)
        self._expect_option()
        return None

    def _on_option_header(self, data: bytes) -> Event | None:
        magic, opt, length = wire.OPTION_HEADER.unpack(data)
        if magic != wire.IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:x}")
        self.options_seen += 1
        if self.options_seen > self.limits.max_options:
            raise ProtocolError(f"more than {self.limits.max_options} options")
        if length > self.limits.max_option_drain:
            raise ProtocolError(f"option {opt} length {length} is absurd")
        self._opt = opt
        self._opt_len = length
        if self.shutting_down and opt != wire.OPT_ABORT:
            if opt == wire.OPT_EXPORT_NAME:
                raise ProtocolError("EXPORT_NAME while the server is shutting down")
            return self._drain_then(length, self._reply_shutdown)
        if (
            self.tls_mode == wire.TLS_REQUIRE
            and not self.tls_active
            and opt not in _ALLOWED_BEFORE_TLS
        ):
            if opt == wire.OPT_EXPORT_NAME:
                # Cannot be answered with an error (nbd.md 1.2, 5): close without reading the name.
                raise ProtocolError("EXPORT_NAME before STARTTLS while TLS is required")
            return self._drain_then(length, self._reply_tls_required)
        spec = _OPTION_TABLE.get(opt)
        if spec is None:
            return self._drain_then(length, self._reply_unsupported)
        if not spec.takes_data:
            return self._drain_then(length, lambda: self._run(spec, b""))
        if opt == wire.OPT_EXPORT_NAME and length > self.limits.max_string:
            # EXPORT_NAME cannot be answered with an error (nbd.md 1.2): close before buffering.
            raise ProtocolError(f"EXPORT_NAME length {length} exceeds {self.limits.max_string}")
        if length > self.limits.max_option_length:
            return self._drain_then(length, self._reply_too_big)
        self.state = State.OPTION_DATA
        self.need = length
        return None

    def _on_option_data(self, data: bytes) -> Event | None:
        spec = _OPTION_TABLE[self._opt]
        return self._run(spec, data)

    def _on_finished(self, data: bytes) -> Event | None:  # pragma: no cover - driver bug
        raise AssertionError(f"handshake fed in state {self.state}")

    # -- helpers ----------------------------------------------------------------------------------

    def _expect_option(self) -> None:
        self.state = State.OPTION_HEADER
        self.need = _STATE_NEED[State.OPTION_HEADER]

    def _drain_then(self, length: int, cb: Callable[[], Event | None]) -> Event | None:
        if length == 0:
            return cb()
        self.skip = length
        self.need = 0
        self._after_drain = cb
        return None

    def _run(self, spec: OptionSpec, data: bytes) -> Event | None:
        try:
            ev = spec.handler(self, data, self._opt_len)
        except OptionError as e:
            self._reply(e.reply_type, _message(e.message, self.limits.max_string))
            ev = None
        if ev is None and self.state not in (State.DONE, State.CLOSED):
            self._expect_option()
        return ev

    def _close(self, reason: str, error: bool = True) -> ConnectionClosed:
        self.state = State.CLOSED
        self.need = 0
        self.skip = 0
        return ConnectionClosed(reason, error)

    def _reply(self, rtype: int, payload: bytes = b"") -> None:
        self.out += wire.OPTION_REPLY_HEADER.pack(
            wire.OPTION_REPLY_MAGIC, self._opt, rtype, len(payload)
        )
        self.out += payload

    def _reply_unsupported(self) -> Event | None:
        self._reply(wire.REP_ERR_UNSUP, f"option {self._opt} is not supported".encode())
        self._expect_option()
        return None

    def _reply_shutdown(self) -> Event | None:
        self._reply(wire.REP_ERR_SHUTDOWN, b"the server is shutting down")
        self._expect_option()
        return None

    def _reply_tls_required(self) -> Event | None:
        self._reply(wire.REP_ERR_TLS_REQD, b"TLS is required: send STARTTLS first")
        self._expect_option()
        return None

    def _reply_too_big(self) -> Event | None:
        msg = f"option data of {self._opt_len} bytes exceeds {self.limits.max_option_length}"
        self._reply(wire.REP_ERR_TOO_BIG, msg.encode())
        self._expect_option()
        return None

    def _parse_name(self, data: bytes, pos: int, what: str) -> tuple[str, int]:
        """A length-prefixed (u32) string at ``pos``; returns it and the position after it."""
        if pos + 4 > len(data):
            raise OptionError(wire.REP_ERR_INVALID, f"option data too short for {what} length")
        (n,) = wire.U32.unpack_from(data, pos)
        if n > self.limits.max_string:
            raise OptionError(
                wire.REP_ERR_TOO_BIG, f"{what} of {n} bytes exceeds {self.limits.max_string}"
            )
        pos += 4
        if pos + n > len(data):
            raise OptionError(wire.REP_ERR_INVALID, f"{what} runs past the option data")
        return _check_string(data[pos : pos + n], what), pos + n

    def _lookup(self, name: str) -> ExportInfo:
        export = self.catalog.lookup(name)
        if export is None:
            raise OptionError(wire.REP_ERR_UNKNOWN, f"unknown export {name!r}")
        return export

    def _complete(self, export: ExportInfo) -> HandshakeComplete:
        self.state = State.DONE
        self.need = 0
        neg = self.neg
        contexts = dict(neg.meta_contexts) if neg.meta_export == export.name else {}
        return HandshakeComplete(export, neg.structured, contexts)

    # -- option handlers --------------------------------------------------------------------------

    def _opt_export_name(self, data: bytes, length: int) -> Event | None:
        # nbd.md 1.2: cannot error, so every failure closes.
        if len(data) > self.limits.max_string:
            raise ProtocolError(f"EXPORT_NAME of {len(data)} bytes is too long")
        try:
            name = _check_string(data, "export name")
        except OptionError as e:
            raise ProtocolError(f"EXPORT_NAME: {e.message}") from None
        export = self.catalog.lookup(name)
        if export is None:
            raise ProtocolError(f"EXPORT_NAME: unknown export {name!r}")
        self.out += wire.EXPORT_NAME_REPLY.pack(
            export.size, transmission_flags(export, self.neg.structured)
        )
        if not self.no_zeroes:
            self.out += bytes(wire.EXPORT_NAME_PADDING)
        return self._complete(export)

    def _opt_info_go(self, data: bytes, length: int) -> Event | None:
        name, pos = self._parse_name(data, 0, "export name")
        if pos + 2 > len(data):
            raise OptionError(wire.REP_ERR_INVALID, "option data too short for info count")
        (n,) = wire.U16.unpack_from(data, pos)
        pos += 2
        if pos + 2 * n != len(data):
            raise OptionError(wire.REP_ERR_INVALID, "info request count does not match length")
        requested = set(struct.unpack_from(f">{n}H", data, pos))
        export = self._lookup(name)
        tflags = transmission_flags(export, self.neg.structured)
        self._reply(
            wire.REP_INFO, wire.INFO_EXPORT_LAYOUT.pack(wire.INFO_EXPORT, export.size, tflags)
        )
        if wire.INFO_NAME in requested:
            self._reply(wire.REP_INFO, wire.U16.pack(wire.INFO_NAME) + export.name.encode())
        if export.description or wire.INFO_DESCRIPTION in requested:
            desc = _message(export.description, self.limits.max_string)
            self._reply(wire.REP_INFO, wire.U16.pack(wire.INFO_DESCRIPTION) + desc)
        max_payload = min(wire.BLOCK_SIZE_MAX_PAYLOAD, self.limits.max_payload)
        self._reply(
            wire.REP_INFO,
            wire.INFO_BLOCK_SIZE_LAYOUT.pack(
                wire.INFO_BLOCK_SIZE, wire.BLOCK_SIZE_MIN, wire.BLOCK_SIZE_PREFERRED, max_payload
            ),
        )
        self._reply(wire.REP_ACK)
        if self._opt == wire.OPT_GO:
            return self._complete(export)
        return None

    def _opt_abort(self, data: bytes, length: int) -> Event | None:
        # nbd.md 1.2: MUST ACK (the client may already be gone), data ignored.
        self._reply(wire.REP_ACK)
        return self._close("client sent ABORT", error=False)

    def _opt_list(self, data: bytes, length: int) -> Event | None:
        if length:
            raise OptionError(wire.REP_ERR_INVALID, "LIST takes no data")
        for export in self.catalog.list_exports():
            name = export.name.encode()
            desc = _message(export.description, self.limits.max_string)
            self._reply(wire.REP_SERVER, wire.U32.pack(len(name)) + name + desc)
        self._reply(wire.REP_ACK)
        return None

    def _opt_starttls(self, data: bytes, length: int) -> Event | None:
        if self.tls_mode == wire.TLS_OFF:
            # NOTLS (nbd.md 5): ERR_UNSUP, never ERR_TLS_REQD.
            raise OptionError(wire.REP_ERR_UNSUP, "TLS is not configured on this server")
        if length:
            raise OptionError(wire.REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_active:
            raise OptionError(wire.REP_ERR_INVALID, "TLS is already active")
        self._reply(wire.REP_ACK)
        # Forget everything negotiated in plaintext (CVE-2021-3716); option ids restart too.
        self.neg.reset()
        self._next_context_id = 1
        self.tls_active = True
        self._expect_option()
        return StartTLS()

    def _opt_structured_reply(self, data: bytes, length: int) -> Event | None:
        if length:
            raise OptionError(wire.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        if not self.structured_allowed:
            raise OptionError(wire.REP_ERR_UNSUP, "structured replies are disabled")
        self.neg.structured = True
        self._reply(wire.REP_ACK)
        return None

    def _opt_meta_context(self, data: bytes, length: int) -> Event | None:
        is_set = self._opt == wire.OPT_SET_META_CONTEXT
        if is_set:
            # A SET replaces the selection, also when it fails.
            self.neg.meta_contexts = {}
            self.neg.meta_export = None
            if not self.neg.structured:
                raise OptionError(
                    wire.REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies first"
                )
        name, pos = self._parse_name(data, 0, "export name")
        if pos + 4 > len(data):
            raise OptionError(wire.REP_ERR_INVALID, "option data too short for query count")
        (nq,) = wire.U32.unpack_from(data, pos)
        pos += 4
        if nq > self.limits.max_meta_queries:
            raise OptionError(
                wire.REP_ERR_TOO_BIG, f"{nq} queries exceed {self.limits.max_meta_queries}"
            )
        queries: list[str] = []
        for _ in range(nq):
            query, pos = self._parse_name(data, pos, "meta context query")
            queries.append(query)
        if pos != len(data):
            raise OptionError(wire.REP_ERR_INVALID, "trailing bytes after the queries")
        export = self._lookup(name)
        matches: list[str] = []
        if not queries and not is_set:
            matches = [wire.META_BASE_ALLOCATION]
        for query in queries:
            for ctx in _match_context(query, is_list=not is_set):
                if ctx not in matches:
                    matches.append(ctx)
        selected: dict[int, str] = {}
        for ctx in matches:
            if is_set:
                ctx_id = self._next_context_id
                self._next_context_id += 1
                selected[ctx_id] = ctx
            else:
                ctx_id = 0  # LIST: the id field is unused and zero
            self._reply(wire.REP_META_CONTEXT, wire.U32.pack(ctx_id) + ctx.encode())
        if is_set:
            self.neg.meta_contexts = selected
            self.neg.meta_export = export.name
        self._reply(wire.REP_ACK)
        return None


def _match_context(query: str, is_list: bool) -> list[str]:
    """Contexts a query names: ``base:allocation``; ``base:`` is a wildcard for LIST only (1.8).
    Unknown namespaces and unknown ``base:`` leaves match nothing."""
    if query == wire.META_BASE_ALLOCATION:
        return [wire.META_BASE_ALLOCATION]
    if is_list and query == wire.META_NS_BASE:
        return [wire.META_BASE_ALLOCATION]
    return []


def _message(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
    return raw


_STATE_TABLE: dict[State, Callable[[Handshake, bytes], Event | None]] = {
    State.CLIENT_FLAGS: Handshake._on_client_flags,
    State.OPTION_HEADER: Handshake._on_option_header,
    State.OPTION_DATA: Handshake._on_option_data,
    State.DONE: Handshake._on_finished,
    State.CLOSED: Handshake._on_finished,
}

#: Options answered normally in ``require`` mode before TLS is up (nbd.md 5, FORCEDTLS).
_ALLOWED_BEFORE_TLS = frozenset({wire.OPT_STARTTLS, wire.OPT_ABORT})

_OPTION_TABLE: dict[int, OptionSpec] = {
    wire.OPT_EXPORT_NAME: OptionSpec("EXPORT_NAME", True, Handshake._opt_export_name),
    wire.OPT_ABORT: OptionSpec("ABORT", False, Handshake._opt_abort),
    wire.OPT_LIST: OptionSpec("LIST", False, Handshake._opt_list),
    wire.OPT_STARTTLS: OptionSpec("STARTTLS", False, Handshake._opt_starttls),
    wire.OPT_INFO: OptionSpec("INFO", True, Handshake._opt_info_go),
    wire.OPT_GO: OptionSpec("GO", True, Handshake._opt_info_go),
    wire.OPT_STRUCTURED_REPLY: OptionSpec(
        "STRUCTURED_REPLY", False, Handshake._opt_structured_reply
    ),
    wire.OPT_LIST_META_CONTEXT: OptionSpec("LIST_META_CONTEXT", True, Handshake._opt_meta_context),
    wire.OPT_SET_META_CONTEXT: OptionSpec("SET_META_CONTEXT", True, Handshake._opt_meta_context),
}
