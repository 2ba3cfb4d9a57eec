"""NBD wire constants and struct layouts.

Theory of operation
-------------------
Every number the NBD protocol puts on the wire lives here, each with the section of the NBD
specification (NetworkBlockDevice/nbd ``doc/proto.md``, cited as ``nbd.md`` with section numbers)
it comes from, plus the precompiled :class:`struct.Struct` layouts the handshake and
transmission code use. All wire integers are big-endian. This module holds data only: no
state, no I/O, no policy.
"""

from __future__ import annotations

import struct
from typing import Final

# --- Magics (nbd.md 1.1, 1.4) ----------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes of every greeting (1.1)
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request (1.1)
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9  # fixed-newstyle option reply (1.1)
REQUEST_MAGIC: Final = 0x25609513  # transmission request (1.4)
SIMPLE_REPLY_MAGIC: Final = 0x67446698  # simple reply (1.4)
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF  # structured reply chunk (1.4)
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71  # extended headers, experimental; not supported (1.4)
EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C  # extended headers, experimental; not supported (1.4)

# --- Handshake flags, server -> client, 16 bits (nbd.md 1.1) -----------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1

# --- Client flags, client -> server, 32 bits (nbd.md 1.1) --------------------------------------
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# --- Options (nbd.md 1.2) ----------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4  # withdrawn
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11  # experimental branch; we answer ERR_UNSUP

# --- TLS modes of the server (nbd.md 5): NOTLS, opportunistic, FORCEDTLS ----------------------
TLS_OFF: Final = "off"  # STARTTLS answered ERR_UNSUP, never ERR_TLS_REQD
TLS_ON: Final = "on"  # STARTTLS optional
TLS_REQUIRE: Final = "require"  # every option but STARTTLS/ABORT: ERR_TLS_REQD; EXPORT_NAME closes
TLS_MODES: Final = (TLS_OFF, TLS_ON, TLS_REQUIRE)

# --- Option reply types (nbd.md 1.2) -----------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31  # error replies have bit 31 set
REP_ERR_UNSUP: Final = REP_FLAG_ERROR + 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR + 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR + 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR + 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR + 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR + 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR + 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR + 9
REP_ERR_EXT_HEADER_REQD: Final = REP_FLAG_ERROR + 10  # experimental

# --- Info types for NBD_OPT_INFO / NBD_OPT_GO (nbd.md 1.2) -------------------------------------
INFO_EXPORT: Final = 0  # size64 + tflags16 (reply length 12)
INFO_NAME: Final = 1  # name string
INFO_DESCRIPTION: Final = 2  # description string
INFO_BLOCK_SIZE: Final = 3  # min32, preferred32, max-payload32 (reply length 14)

# --- Transmission flags, 16 bits (nbd.md 1.3) --------------------------------------------------
TFLAG_HAS_FLAGS: Final = 1 << 0
TFLAG_READ_ONLY: Final = 1 << 1
TFLAG_SEND_FLUSH: Final = 1 << 2
TFLAG_SEND_FUA: Final = 1 << 3
TFLAG_ROTATIONAL: Final = 1 << 4
TFLAG_SEND_TRIM: Final = 1 << 5
TFLAG_SEND_WRITE_ZEROES: Final = 1 << 6
TFLAG_SEND_DF: Final = 1 << 7  # only if structured replies were negotiated
TFLAG_CAN_MULTI_CONN: Final = 1 << 8
TFLAG_SEND_RESIZE: Final = 1 << 9  # experimental
TFLAG_SEND_CACHE: Final = 1 << 10
TFLAG_SEND_FAST_ZERO: Final = 1 << 11  # requires SEND_WRITE_ZEROES
TFLAG_BLOCK_STATUS_PAYLOAD: Final = 1 << 12  # experimental

# --- Commands (nbd.md 1.5); also zramd.protocol.events.Command ---------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8  # experimental

# --- Command flags (nbd.md 1.5) ----------------------------------------------------------------
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1  # WRITE_ZEROES
CMD_FLAG_DF: Final = 1 << 2  # READ, structured replies only
CMD_FLAG_REQ_ONE: Final = 1 << 3  # BLOCK_STATUS
CMD_FLAG_FAST_ZERO: Final = 1 << 4  # WRITE_ZEROES
CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5  # experimental (extended headers)

# --- Structured reply chunks (nbd.md 1.6) ------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6  # experimental
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

# --- Error values in replies (nbd.md 1.7) ------------------------------------------------------
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# --- base:allocation (nbd.md 1.8) --------------------------------------------------------------
META_NS_BASE: Final = "base:"
META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# --- Sizes fixed by the spec (nbd.md 1.2, 1.9) -------------------------------------------------
SPEC_MAX_STRING: Final = 4096  # strings MUST be <= 4096 bytes
EXPORT_NAME_PADDING: Final = 124  # zeros after the EXPORT_NAME reply unless NO_ZEROES
BLOCK_SIZE_MIN: Final = 1  # INFO_BLOCK_SIZE we advertise (1.9 defaults)
BLOCK_SIZE_PREFERRED: Final = 4096
BLOCK_SIZE_MAX_PAYLOAD: Final = 32 * 1024 * 1024  # interoperable maximum payload

# --- Struct layouts ----------------------------------------------------------------------------
# Greeting: NBDMAGIC, IHAVEOPT, handshake flags16 (1.1)
GREETING: Final = struct.Struct(">QQH")
# Client flags32 after the greeting (1.1)
CLIENT_FLAGS: Final = struct.Struct(">I")
# Option request header: IHAVEOPT, option32, length32 (1.1)
OPTION_HEADER: Final = struct.Struct(">QII")
# Option reply header: magic64, option32, reply type32, length32 (1.1)
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
# EXPORT_NAME reply: size64 + tflags16 (1.2)
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
# NBD_INFO_EXPORT: type16, size64, tflags16 (1.2)
INFO_EXPORT_LAYOUT: Final = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: type16, min32, preferred32, max32 (1.2)
INFO_BLOCK_SIZE_LAYOUT: Final = struct.Struct(">HIII")
# uint16 / uint32 fields inside option data
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
U32_U32: Final = struct.Struct(">II")
# Request: magic32, flags16, type16, cookie64, offset64, length32 = 28 bytes (1.4)
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
# Simple reply: magic32, error32, cookie64 = 16 bytes (1.4)
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
# Structured chunk header: magic32, flags16, type16, cookie64, length32 = 20 bytes (1.4)
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
# Chunk header + offset64: OFFSET_DATA prefix (1.6)
CHUNK_OFFSET_DATA: Final = struct.Struct(">IHHQIQ")
# Chunk header + offset64 + size32: a whole OFFSET_HOLE chunk (1.6)
CHUNK_OFFSET_HOLE: Final = struct.Struct(">IHHQIQI")
# Chunk header + error32 + message length16: ERROR chunk prefix (1.6)
CHUNK_ERROR: Final = struct.Struct(">IHHQIIH")
# Chunk header + context id32: BLOCK_STATUS prefix (1.6)
CHUNK_BLOCK_STATUS: Final = struct.Struct(">IHHQII")

REQUEST_HEADER_SIZE: Final = REQUEST_HEADER.size  # 28
OFFSET_DATA_MIN_DATA: Final = 1  # OFFSET_DATA length >= 9: at least one data byte (1.6)
