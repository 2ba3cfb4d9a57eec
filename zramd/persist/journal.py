"""The journal of a durable export: its writes, zeroes and trims since its last snapshot, on disk.

Theory of operation
-------------------
**Owns** the byte layout of journal files, their names beside the snapshot and reading them
back, nothing else: it knows neither devices nor requests nor when anything is synced
(:mod:`zramd.server.durable` decides that). A journal is a sequence of *generations*, one file
each, ``PATH.journal-GGGGGGGGGGGGGGGG`` beside the snapshot ``PATH`` (the generation in 16
hex digits, so the names sort in order). A snapshot names the first generation it does not
contain (:attr:`~zramd.persist.ImageMeta.journal_gen`): a restore loads the snapshot, then
replays the generations from that one on, in order; older ones are left over from before the
snapshot and are deleted.

Layout (all integers little-endian)::

    HEADER  magic ZRAMDJNL, version, page size, export size, generation, created (ns);
            then the CRC-32 of those
    FRAME * magic ZJFR, sequence number (from 0 in each file), records' raw length, stored
            length, CRC-32 of the stored bytes, then the CRC-32 of those fields;
            the stored bytes: the records, as an LZ4 block (when that is smaller) or raw
    record  kind (WRITE, ZERO, TRIM, RESET), offset (uint64), length (uint32); a WRITE's data

A frame is whole or it does not count: a reader takes the frames of a file in order and stops
at the first one that is short, has a bad magic, a sequence number out of turn or a checksum
mismatch (a write torn by a crash, or the zeros of a file extended but not yet written): what
follows is ignored, so a crash can only cut a journal's tail, never make a page torn or
garbage. Page data goes into a frame as the client wrote it, compressed with the frame (LZ4 at
several hundred MB/s, in the writer's thread); the device compresses it again on replay.

:class:`JournalFile` writes one generation (blocking: run it in a thread): the header is
written and synced with the directory when the file is created, frames are appended with one
``write`` each, :meth:`JournalFile.sync` is ``fdatasync``. :func:`read_journal` yields a file's
records; :func:`journal_files` lists the generations beside a snapshot.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lz4.block

from zramd.checksum import crc32

MAGIC = b"ZRAMDJNL"
FRAME_MAGIC = b"ZJFR"
VERSION = 1
#: magic, version, page size, export size, generation, created (ns); then their CRC-32
_HEADER_FIELDS = struct.Struct("<8sHIQQQ")
HEADER = struct.Struct(_HEADER_FIELDS.format + "I")
#: magic, sequence, raw length, stored length, CRC-32 of the stored bytes; then their CRC-32
_FRAME_FIELDS = struct.Struct("<4sQIII")
FRAME = struct.Struct(_FRAME_FIELDS.format + "I")
#: kind, offset, length (a WRITE's data follows)
RECORD = struct.Struct("<BQI")
#: record kinds
WRITE, ZERO, TRIM, RESET = 1, 2, 3, 4
KINDS = (WRITE, ZERO, TRIM, RESET)
#: a frame's raw records are at most this long (a reader refuses longer ones as garbage)
MAX_FRAME_RAW = 64 << 20
#: what a journal file's name adds to the snapshot's, before the generation
SUFFIX = ".journal-"
_NAME = re.compile(r"\.journal-([0-9a-f]{16})$")

#: one record: kind, offset, length, and a WRITE's data (else empty)
Record = tuple[int, int, int, bytes | memoryview]


class JournalError(Exception):
    """A journal file that cannot be used (not a journal, of another geometry): names the file
    and what is wrong."""


@dataclass
class JournalHeader:
    page_size: int
    size: int
    generation: int
    created: float


def journal_path(snapshot: str, generation: int) -> str:
    """The file of ``generation`` of the journal beside ``snapshot``."""
    return f"{snapshot}{SUFFIX}{generation:016x}"


def journal_files(snapshot: str) -> list[tuple[int, str]]:
    """The journal generations beside ``snapshot``, as (generation, path), oldest first."""
    head, tail = os.path.split(snapshot)
    out = []
    try:
        names = os.listdir(head or ".")
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(tail + SUFFIX):
            m = _NAME.search(name[len(tail) :])
            if m is not None and len(name) == len(tail) + len(SUFFIX) + 16:
                out.append((int(m.group(1), 16), os.path.join(head, name)))
    return sorted(out)


def encode_frame(seq: int, records: Sequence[Record]) -> bytes:
    """One frame holding ``records`` (see the module doc)."""
    parts: list[bytes | memoryview] = []
    for kind, offset, length, data in records:
        parts.append(RECORD.pack(kind, offset, length))
        if kind == WRITE:
            parts.append(data)
    raw = b"".join(parts)
    packed = lz4.block.compress(raw, store_size=False)
    stored = packed if len(packed) < len(raw) else raw
    fields = _FRAME_FIELDS.pack(FRAME_MAGIC, seq, len(raw), len(stored), crc32(stored))
    return fields + struct.pack("<I", crc32(fields)) + stored


def _sync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class JournalFile:
    """One generation being written (see the module doc). Blocking: run it in a thread."""

    def __init__(self, snapshot: str, generation: int, size: int, page_size: int) -> None:
        self.path = journal_path(snapshot, generation)
        self.generation = generation
        self.seq = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fields = _HEADER_FIELDS.pack(
                MAGIC, VERSION, page_size, size, generation, time.time_ns()
            )
            self._fd = fd
            self.written = 0
            self._write(fields + struct.pack("<I", crc32(fields)))
            os.fdatasync(fd)
            _sync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise

    def _write(self, data: bytes) -> None:
        mv = memoryview(data)
        while mv:
            n = os.write(self._fd, mv)
            mv = mv[n:]
        self.written += len(data)

    def append(self, records: Sequence[Record]) -> int:
        """Append one frame of ``records``; returns its bytes."""
        frame = encode_frame(self.seq, records)
        self._write(frame)
        self.seq += 1
        return len(frame)

    def sync(self) -> None:
        """Everything appended so far on stable storage."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_header(path: str, data: bytes) -> JournalHeader | None:
    """The header at the start of ``data`` (the file ``path``), or None when it is torn or
    missing (a crash while the file was created). Raises JournalError for a file that is not a
    journal of this version."""
    if len(data) < HEADER.size:
        return None
    *fields, crc = HEADER.unpack_from(data, 0)
    magic, version, page_size, size, generation, created = fields
    if crc32(data[: _HEADER_FIELDS.size]) != crc:
        if magic == MAGIC:
            return None
        raise JournalError(f"journal {path}: not a zramd journal (bad magic)")
    if version != VERSION:
        raise JournalError(f"journal {path}: format version {version}, this zramd reads {VERSION}")
    return JournalHeader(page_size, size, generation, created / 1e9)


@dataclass
class JournalRead:
    """What reading one generation found: its header (None: torn at creation), its frames and
    records, the bytes it holds in whole frames, and whether anything followed the last whole
    frame (a torn tail, ignored)."""

    header: JournalHeader | None
    records: list[Record]
    frames: int
    good_bytes: int
    torn: bool


def read_journal(path: str) -> JournalRead:
    """Read one journal file: its whole frames' records, in order. Raises JournalError (not a
    journal), OSError. Blocking: run it in a thread."""
    with open(path, "rb") as f:
        data = f.read()
    header = read_header(path, data)
    if header is None:
        return JournalRead(None, [], 0, 0, bool(data))
    pos = HEADER.size
    records: list[Record] = []
    frames = 0
    mv = memoryview(data)
    while pos + FRAME.size <= len(data):
        *fields, fcrc = FRAME.unpack_from(data, pos)
        magic, seq, raw_len, stored_len, crc = fields
        if (
            magic != FRAME_MAGIC
            or crc32(mv[pos : pos + _FRAME_FIELDS.size]) != fcrc
            or seq != frames
            or raw_len > MAX_FRAME_RAW
            or stored_len > raw_len
        ):
            break
        start = pos + FRAME.size
        stored = mv[start : start + stored_len]
        if len(stored) != stored_len or crc32(stored) != crc:
            break
        try:
            raw = (
                bytes(stored)
                if stored_len == raw_len
                else lz4.block.decompress(stored, uncompressed_size=raw_len)
            )
            records += _decode_records(raw)
        except (lz4.block.LZ4BlockError, ValueError):
            break
        frames += 1
        pos = start + stored_len
    return JournalRead(header, records, frames, pos, pos < len(data))


def _decode_records(raw: bytes) -> list[Record]:
    out: list[Record] = []
    mv = memoryview(raw)
    pos = 0
    while pos < len(raw):
        if pos + RECORD.size > len(raw):
            raise ValueError("record header past the frame's end")
        kind, offset, length = RECORD.unpack_from(raw, pos)
        pos += RECORD.size
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind}")
        data: bytes | memoryview = b""
        if kind == WRITE:
            if pos + length > len(raw):
                raise ValueError("record data past the frame's end")
            data = mv[pos : pos + length]
            pos += length
        out.append((kind, offset, length, data))
    return out


def remove(path: str) -> None:
    """Delete one journal file and sync its directory (a missing file is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _sync_dir(path)


def cut(path: str, length: int) -> None:
    """Truncate one journal file to its first ``length`` bytes (its whole frames) and sync it:
    a torn tail is gone before anything is appended after it."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
