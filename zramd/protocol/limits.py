"""Every length a peer can push on during a connection, named, with its default.

Theory of operation
-------------------
:class:`Limits` is a frozen value the server fills once from its configuration (fields it does
not configure keep the defaults here) and hands to every
:class:`~zramd.protocol.connection.ServerConnection`; the handshake and the request reader check
each length against it before anything is buffered or sliced. ``__post_init__`` refuses values
that would break the protocol itself (strings over the spec's 4096 bytes, an option buffer that
cannot hold an export name and a query, a payload cap outside the 32-bit length field).

This module knows no configuration file, no asyncio and no device.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire

#: Largest READ/WRITE payload served (nbdkit allows 64 MiB); at least the 32 MiB that must always
#: work (nbd.md 1.9), at most what the 32-bit length field holds.
DEFAULT_MAX_PAYLOAD = 64 << 20


@dataclass(frozen=True)
class Limits:
    """Every length a peer can push on, named (DESIGN.md "Named limits")."""

    # Export names, descriptions, meta-context queries; the spec says MUST <= 4096 (nbd.md 1.2).
    # Longer strings in INFO/GO/*_META_CONTEXT get NBD_REP_ERR_TOO_BIG; in EXPORT_NAME: close.
    max_string: int = wire.SPEC_MAX_STRING
    # An option's data is buffered up to this size. Longer option data is drained without
    # buffering and answered NBD_REP_ERR_TOO_BIG; negotiation continues.
    max_option_length: int = 64 * 1024
    # Options longer than this are not drained but end the connection (absurd framing).
    max_option_drain: int = 1024 * 1024
    # Queries in one LIST/SET_META_CONTEXT; more get NBD_REP_ERR_TOO_BIG.
    max_meta_queries: int = 128
    # WRITE payload cap (the server should use it for READ length too). A WRITE above it is drained
    # and yielded with payload_dropped=True. Keep >= 32 MiB for interoperability (nbd.md 1.9).
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # Options per handshake before we hang up (anti-haggling-forever).
    max_options: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_string <= wire.SPEC_MAX_STRING:
            raise ValueError(f"max_string must be in 1..{wire.SPEC_MAX_STRING}")
        if self.max_option_length < 2 * self.max_string + 8:
            raise ValueError("max_option_length must hold an export name and a query")
        if self.max_option_drain < self.max_option_length:
            raise ValueError("max_option_drain must be >= max_option_length")
        if self.max_meta_queries < 1 or self.max_options < 1:
            raise ValueError("max_meta_queries and max_options must be >= 1")
        if not wire.BLOCK_SIZE_PREFERRED <= self.max_payload < 1 << 32:
            raise ValueError("max_payload must be in 4096..2**32-1")
