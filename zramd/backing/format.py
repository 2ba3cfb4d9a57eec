"""The on-disk format of a backing store: header, segments, records, locators.

Theory of operation
-------------------
**Owns** the byte layout of a backing file or device and nothing else: pure functions and
constants, no I/O, no state. :mod:`zramd.backing.store` does the I/O with them.

Layout (offsets in bytes; all integers little-endian)::

    [0, 4 KiB)                    header (HEADER struct, then zeros up to 4 KiB)
    [4 KiB, data_offset)          metadata region, reserved for the persistence layer (snapshot
                                  pointer, journal; issue 13); this module writes nothing there
    [data_offset + i * segment_size, +segment_size)
                                  segment i, i = 0 .. capacity / segment_size - 1

**Header** (``HEADER``, 92 bytes, checksummed): magic ``ZRAMDBAK``, format version, header
size, flags (block device or file), segment size, record alignment, a UUID made at format time,
the creation time, the metadata region (offset, length), the data offset, the capacity of the
segment area in bytes (0: grows until the filesystem is full or the locator range ends), the
sequence limit (below), and a CRC-32 of all the fields before it. A reader refuses another
magic, a version it does not know, a bad checksum or a geometry it cannot use
(:class:`FormatError`, with what is wrong).

**Segment** (``SEGMENT_SIZE`` default, 64 KiB .. 4 MiB, a power of two): a ``SEGMENT_HEADER``
of 32 bytes (magic ``ZBSG``, segment index, the segment's sequence number, the first 8 bytes of
the store's UUID, a CRC-32 of those) and then records packed back to back, each aligned to
``ALIGN`` (8) bytes. A segment is written append-only between two frees; each time it is opened
for writing it gets the next sequence number of the store, so a byte range of a segment is
written at most once per sequence number. Sequence numbers never repeat across opens: the
store hands out numbers below the header's ``seq_limit`` only, and moves the limit forward
(``SEQ_RESERVE`` at a time, the header rewritten and synced) before it reaches it, so a reopened
store starts at the old limit without scanning the segments.

**Record**: an 8-byte header (``crc32``, ``length``) and ``length`` payload bytes, padded to
``ALIGN``. The CRC-32 covers the store's UUID, the segment's sequence number, the record's
absolute offset, its length and the payload, so a record read from the wrong place, an older
generation of the segment (a block device whose discard does not zero), another store formatted
on the same device, a torn write (a zero or partly written record) or a flipped bit fails the
check. CRC-32 (zlib's, the IEEE polynomial, through :func:`zramd.checksum.crc32`: by carry-less
multiplication where the CPU has it, else ``zlib.crc32``, the same value either way) rather than
CRC-32C or xxhash: it needs no dependency, runs far above the disk, and releases the GIL on
large buffers; it detects every burst error up to 32 bits and misses random corruption with
probability 2**-32, which is what a per-object check needs (this is not a cryptographic
integrity check).

**Locator**: what a write returns and a read or free takes, one unsigned 64-bit integer
``(record offset / ALIGN) << LEN_BITS | payload length``: the record's absolute byte offset
(40 bits of 8-byte units: up to 8 TiB) and its payload length (24 bits). A read knows the
exact extent from the locator alone (one pread) and checks that the record agrees. It fits the
page table's uint64 handle column.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

from zramd.checksum import crc32

MAGIC = b"ZRAMDBAK"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
#: header flags
FLAG_BLOCK_DEVICE = 1
#: record alignment in the segments
ALIGN = 8
#: the metadata region after the header, reserved for the persistence layer, and where the
#: segments start: 1 MiB, so that the segments are aligned for the disk
DEFAULT_DATA_OFFSET = 1 << 20
SEGMENT_SIZE = 256 << 10
MIN_SEGMENT_SIZE = 64 << 10
MAX_SEGMENT_SIZE = 4 << 20

#: sequence numbers reserved by one header write
SEQ_RESERVE = 1 << 16

#: magic, version, header bytes, flags, segment size, align, uuid, created, meta offset,
#: meta length, data offset, capacity, seq limit; then the CRC-32 of the bytes before it
_HEADER_FIELDS = struct.Struct("<8sHHIII16sQQQQQQ")
HEADER = struct.Struct(_HEADER_FIELDS.format + "I")

SEGMENT_MAGIC = b"ZBSG"
#: magic, segment index, sequence number, UUID prefix, CRC-32 of the bytes before it, pad
_SEGMENT_FIELDS = struct.Struct("<4sIQ8s")
SEGMENT_HEADER = struct.Struct("<4sIQ8sI4x")
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size
#: crc32, payload length
RECORD_HEADER = struct.Struct("<II")
RECORD_HEADER_BYTES = RECORD_HEADER.size
#: what the record CRC is seeded with besides the segment's seed: absolute offset, length
_RECORD_SEED = struct.Struct("<QI")

LEN_BITS = 24
LEN_MASK = (1 << LEN_BITS) - 1
OFFSET_BITS = 64 - LEN_BITS
#: the highest byte address a record may start at (8 TiB)
MAX_OFFSET = ((1 << OFFSET_BITS) - 1) * ALIGN

assert _SEGMENT_FIELDS.size + 8 == SEGMENT_HEADER_BYTES
assert SEGMENT_HEADER_BYTES % ALIGN == 0


class FormatError(Exception):
    """The bytes are not a backing store this version can use; the message says what is
    wrong."""


@dataclass(frozen=True)
class Header:
    """The decoded header of a backing store."""

    flags: int
    segment_size: int
    uuid: bytes
    created: int
    meta_offset: int
    meta_length: int
    data_offset: int
    capacity: int
    seq_limit: int = SEQ_RESERVE
    version: int = FORMAT_VERSION
    align: int = ALIGN

    @property
    def block_device(self) -> bool:
        return bool(self.flags & FLAG_BLOCK_DEVICE)

    @property
    def uuid_text(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def max_segments(self) -> int:
        """How many segments the store may use (``capacity``, else the locator range)."""
        room = self.capacity if self.capacity else MAX_OFFSET + 1 - self.data_offset
        return room // self.segment_size


def check_segment_size(size: int) -> None:
    """Raise ValueError unless ``size`` is a power of two in [MIN, MAX_SEGMENT_SIZE]."""
    if size & (size - 1) or not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment size {size} must be a power of two from {MIN_SEGMENT_SIZE} to "
            f"{MAX_SEGMENT_SIZE}"
        )


def max_object(segment_size: int) -> int:
    """The largest payload a segment of ``segment_size`` holds."""
    return min(segment_size - SEGMENT_HEADER_BYTES - RECORD_HEADER_BYTES, LEN_MASK)


def encode_header(h: Header) -> bytes:
    """The header block (HEADER_BYTES long) of ``h``."""
    body = _HEADER_FIELDS.pack(
        MAGIC, h.version, HEADER_BYTES, h.flags, h.segment_size, h.align, h.uuid, h.created,
        h.meta_offset, h.meta_length, h.data_offset, h.capacity, h.seq_limit,
    )
    return (body + struct.pack("<I", crc32(body))).ljust(HEADER_BYTES, b"\0")


def decode_header(block: bytes) -> Header:
    """The header in ``block`` (the file's first bytes). Raises FormatError saying what is
    wrong."""
    if len(block) < HEADER.size:
        raise FormatError(f"too short for a header ({len(block)} bytes)")
    (magic, version, hbytes, flags, seg, align, uid, created, moff, mlen, doff, cap, seq_limit,
     crc) = HEADER.unpack_from(block)
    if magic != MAGIC:
        raise FormatError("not a zramd backing store (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"format version {version}, this zramd reads {FORMAT_VERSION}")
    if crc32(block[: _HEADER_FIELDS.size]) != crc:
        raise FormatError("header checksum mismatch")
    if hbytes != HEADER_BYTES or align != ALIGN:
        raise FormatError(f"unsupported geometry (header {hbytes} B, alignment {align} B)")
    try:
        check_segment_size(seg)
    except ValueError as e:
        raise FormatError(str(e)) from None
    if not HEADER_BYTES <= doff <= MAX_OFFSET or doff % 4096 or moff + mlen > doff:
        raise FormatError(f"bad layout (metadata {moff}+{mlen}, data at {doff})")
    return Header(flags=flags, segment_size=seg, uuid=uid, created=created, meta_offset=moff,
                  meta_length=mlen, data_offset=doff, capacity=cap, seq_limit=seq_limit,
                  version=version,
                  align=align)


def encode_segment_header(index: int, seq: int, uid: bytes) -> bytes:
    body = _SEGMENT_FIELDS.pack(SEGMENT_MAGIC, index, seq, uid[:8])
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, index, seq, uid[:8], crc32(body))


def decode_segment_header(raw: bytes, index: int, uid: bytes) -> int | None:
    """The sequence number in a segment header, or None when ``raw`` is not a valid header of
    segment ``index`` of the store ``uid`` (a free, punched or foreign segment)."""
    if len(raw) < SEGMENT_HEADER_BYTES:
        return None
    magic, idx, seq, prefix, crc = SEGMENT_HEADER.unpack_from(raw)
    if magic != SEGMENT_MAGIC or idx != index or prefix != uid[:8]:
        return None
    if crc32(raw[: _SEGMENT_FIELDS.size]) != crc:
        return None
    return int(seq)


def segment_seed(uid: bytes, seq: int) -> int:
    """The CRC-32 state every record of one generation of a segment starts from."""
    return crc32(struct.pack("<Q", seq), crc32(uid))


def record_crc(seed: int, offset: int, payload: bytes | bytearray | memoryview) -> int:
    """The CRC-32 of the record of ``payload`` at absolute ``offset`` (see the module doc)."""
    return crc32(payload, crc32(_RECORD_SEED.pack(offset, len(payload)), seed))


def record_bytes(length: int) -> int:
    """Bytes a record of a ``length``-byte payload takes in a segment (header and padding)."""
    return (RECORD_HEADER_BYTES + length + ALIGN - 1) & ~(ALIGN - 1)


def make_locator(offset: int, length: int) -> int:
    return (offset // ALIGN) << LEN_BITS | length


def locator_offset(loc: int) -> int:
    return (loc >> LEN_BITS) * ALIGN


def locator_length(loc: int) -> int:
    return loc & LEN_MASK
