"""The snapshot file: one export's page table, codec list, group registry and objects, as stored.

Theory of operation
-------------------
**Owns** the byte layout of a snapshot file and its atomic replacement, nothing else: it knows
neither what a table column means nor how objects are compressed. The device
(:mod:`zramd.device.image`) hands it an :class:`ImageMeta` (geometry, codec list, the table's
columns, the group registry's columns, how many objects and bytes follow) and then the objects
in slices, in an order only the device interprets; a restore gives the device the same back.

Layout (all integers little-endian)::

    HEADER        magic ZRAMDSNP, version, export size, page size, pages, groups, objects,
                  object bytes, meta section length and CRC-32, creation time; CRC-32 of it all
    meta section  zstd of: the codec list (name, level, dictionary), then each TABLE_COLUMNS
                  column over every page, then each GROUP_COLUMNS column over every group,
                  then the backing store's UUID (16 bytes, zeros: none) and the generation
                  (uint64) of each page left in the backing store, in page order, then (version
                  3) the journal generation that follows this snapshot (uint64)
    chunk *       CHUNK (magic ZSCK, object count, data bytes, CRC-32 of lengths and data),
                  the objects' lengths (uint32 each), the objects end to end
    FOOTER        magic ZRAMDEND, the footer's own offset, chunk count, the header's CRC-32,
                  CRC-32 of the footer

Most of a table is EMPTY pages: zero columns, which zstd shrinks about a thousandfold, so the
meta section of a 4 GiB export (15 MiB of columns) is a few KiB when little is written. Objects
are stored as they are (compressed pages, huge pages raw, a group's blob once); same-fill pages
are only their fill word in the handle column and holes are nothing.

**Pages written back** (the device's BACKED state) are not copied: their table entry keeps its
locator in the backing store, and the meta section names that store (its UUID) and, per such
page, the generation of the segment its locator lies in, so that a restore can tell the
locator still holds what it held (see :mod:`zramd.device.image`). Version 1 files (before
that) have neither and are still read.

**Refusal before restore.** :class:`SnapshotReader` checks, before it yields a single object,
the header (magic, version, CRC), the footer at the end of the file (its magic, that it sits
where it says, that it names this header's CRC: a truncated or torn file has no such footer)
and the meta section (length, CRC, decompressed size). Each chunk's CRC is checked as it is
read and the totals at the end; the caller restores into a fresh device it throws away on any
:class:`SnapshotError`, so a bad file never becomes a half-restored export.

**Dirty pages bounded.** The writer starts writeback of every :data:`WRITEBACK_BYTES` it wrote
and waits for the range before (``sync_file_range``): a snapshot of gigabytes does not fill the
page cache with dirty pages that another file's fsync (a durable export's journal, on the same
file system) would wait behind.

**Atomic replace.** :class:`SnapshotWriter` writes ``.NAME.tmp`` beside the target, fsyncs it,
renames it over the target and fsyncs the directory: a crash at any point leaves the previous
snapshot or the new one, whole. :func:`set_aside` renames a file that cannot be used out of the
way, never deleting it.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from zramd.checksum import crc32
from zramd.system import (
    SYNC_FILE_RANGE_WAIT_AFTER,
    SYNC_FILE_RANGE_WAIT_BEFORE,
    SYNC_FILE_RANGE_WRITE,
    sync_file_range,
)

MAGIC = b"ZRAMDSNP"
FOOTER_MAGIC = b"ZRAMDEND"
CHUNK_MAGIC = b"ZSCK"
FORMAT_VERSION = 3
#: the versions this zramd reads (1: no backing section; 2: no journal generation)
READ_VERSIONS = (1, 2, 3)
#: bytes of a backing store's UUID
UUID_BYTES = 16
#: the table's columns as stored, in order: (name, dtype)
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("state", "<u1"),
    ("handle", "<u8"),
    ("size", "<u2"),
    ("codec", "<u1"),
    ("flags", "<u1"),
    ("atime", "<u2"),
)
#: the group registry's columns as stored (one row per group; chunk handles are not stored)
GROUP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("first", "<i8"),
    ("csize", "<u4"),
    ("members", "<u2"),
    ("live", "<u2"),
    ("codec", "<u1"),
)
#: magic, version, page size, export size, pages, groups, objects, object bytes, meta length,
#: meta CRC, meta raw length, created (ns); then the CRC-32 of the bytes before it
_HEADER_FIELDS = struct.Struct("<8sHIQQQQQQIQQ")
HEADER = struct.Struct(_HEADER_FIELDS.format + "I")
#: magic, object count, data bytes, CRC-32 of the lengths and the data
CHUNK = struct.Struct("<4sIII")
#: magic, footer offset, chunks, header CRC; then the CRC-32 of those
_FOOTER_FIELDS = struct.Struct("<8sQQI")
FOOTER = struct.Struct(_FOOTER_FIELDS.format + "I")
#: zstd level of the meta section (columns of mostly zeros: level 3 is as small as 19 here)
META_LEVEL = 3
#: largest object a chunk may list (a group blob of 16 pages is at most 64 KiB)
MAX_OBJECT = 1 << 20
#: largest chunk a reader accepts
MAX_CHUNK_BYTES = 256 << 20
#: a snapshot being written starts writeback of every this many bytes (SnapshotWriter)
WRITEBACK_BYTES = 8 << 20
_CODEC = struct.Struct("<BiI")  # name length, level, dictionary length


class SnapshotError(Exception):
    """A snapshot file that cannot be used: names the file and what is wrong."""


@dataclass
class CodecSpec:
    """One codec of the list the table's codec column indexes."""

    name: str
    level: int
    dictionary: bytes = b""


@dataclass
class ImageMeta:
    """Everything of an export but its objects: geometry, codecs, table and group columns (in
    TABLE_COLUMNS / GROUP_COLUMNS order and dtypes), and the objects' count and bytes."""

    size: int
    page_size: int
    codecs: list[CodecSpec]
    table: list[npt.NDArray[Any]]
    groups: list[npt.NDArray[Any]]
    objects: int
    object_bytes: int
    created: float = field(default_factory=time.time)
    #: the UUID of the backing store the BACKED pages are in (b"": none)
    backing: bytes = b""
    #: per BACKED page, in page order: the generation of its locator's segment
    generations: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    #: the first journal generation whose records are not in this snapshot (0: every journal
    #: found beside the file is newer, :mod:`zramd.persist.journal`)
    journal_gen: int = 0

    @property
    def npages(self) -> int:
        return len(self.table[0]) if self.table else 0

    @property
    def ngroups(self) -> int:
        return len(self.groups[0]) if self.groups else 0


def _encode_meta(meta: ImageMeta) -> bytes:
    parts: list[bytes] = [struct.pack("<H", len(meta.codecs))]
    for c in meta.codecs:
        name = c.name.encode()
        parts += [_CODEC.pack(len(name), c.level, len(c.dictionary)), name, c.dictionary]
    for (_name, dtype), col in zip(TABLE_COLUMNS, meta.table, strict=True):
        assert len(col) == meta.npages
        parts.append(np.ascontiguousarray(col, dtype=dtype).tobytes())
    for (_name, dtype), col in zip(GROUP_COLUMNS, meta.groups, strict=True):
        assert len(col) == meta.ngroups
        parts.append(np.ascontiguousarray(col, dtype=dtype).tobytes())
    assert len(meta.backing) in (0, UUID_BYTES)
    parts.append(meta.backing or bytes(UUID_BYTES))
    parts.append(np.ascontiguousarray(meta.generations, dtype="<u8").tobytes())
    parts.append(struct.pack("<Q", meta.journal_gen))
    return b"".join(parts)


def _decode_meta(
    raw: bytes, npages: int, ngroups: int, version: int
) -> tuple[
    list[CodecSpec],
    list[npt.NDArray[Any]],
    list[npt.NDArray[Any]],
    bytes,
    npt.NDArray[np.uint64],
    int,
]:
    mv = memoryview(raw)
    (n,) = struct.unpack_from("<H", mv, 0)
    pos = 2
    codecs: list[CodecSpec] = []
    for _ in range(n):
        nlen, level, dlen = _CODEC.unpack_from(mv, pos)
        pos += _CODEC.size
        name = bytes(mv[pos : pos + nlen]).decode()
        pos += nlen
        codecs.append(CodecSpec(name, level, bytes(mv[pos : pos + dlen])))
        pos += dlen

    def columns(spec: tuple[tuple[str, str], ...], rows: int) -> list[npt.NDArray[Any]]:
        nonlocal pos
        out = []
        for _name, dtype in spec:
            nbytes = rows * np.dtype(dtype).itemsize
            if pos + nbytes > len(mv):
                raise ValueError("meta section too short for its columns")
            out.append(np.frombuffer(raw, dtype=dtype, count=rows, offset=pos))
            pos += nbytes
        return out

    table = columns(TABLE_COLUMNS, npages)
    groups = columns(GROUP_COLUMNS, ngroups)
    backing = b""
    generations = np.zeros(0, np.uint64)
    journal_gen = 0
    if version >= 2:
        if pos + UUID_BYTES > len(mv):
            raise ValueError("meta section too short for its backing store's UUID")
        uid = bytes(mv[pos : pos + UUID_BYTES])
        backing = uid if uid.strip(b"\0") else b""
        pos += UUID_BYTES
        tail = 8 if version >= 3 else 0
        (generations,) = columns((("generation", "<u8"),), (len(mv) - pos - tail) // 8)
        if tail:
            if pos + tail > len(mv):
                raise ValueError("meta section too short for its journal generation")
            (journal_gen,) = struct.unpack_from("<Q", mv, pos)
            pos += tail
    if pos != len(mv):
        raise ValueError(f"meta section has {len(mv) - pos} bytes past its columns")
    return codecs, table, groups, backing, generations, journal_gen


def pack(objects: Sequence[bytes]) -> tuple[bytes, bytes]:
    """A piece of a chunk: the objects' lengths (uint32 each) and the objects end to end."""
    lengths = np.fromiter(map(len, objects), dtype="<u4", count=len(objects)).tobytes()
    return lengths, b"".join(objects)


class SnapshotWriter:
    """Writes one snapshot beside ``path`` and replaces ``path`` with it on :meth:`commit`.
    Blocking file I/O: run it in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        head, tail = os.path.split(path)
        self.tmp = os.path.join(head, f".{tail}.tmp")
        self._f = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 - closed by commit/abort
        self._header_crc = 0
        self._chunks = 0
        self._objects = 0
        self._bytes = 0
        self._meta: ImageMeta | None = None
        #: bytes written, and the meta section's share of them
        self.written = 0
        self.meta_bytes = 0
        #: the ranges handed to writeback: [_started, _flushed) started last, before it done
        self._started = 0
        self._flushed = 0

    def write_meta(self, meta: ImageMeta) -> None:
        """The header and the meta section (first, once)."""
        assert self._meta is None
        self._meta = meta
        raw = _encode_meta(meta)
        packed = zstandard.ZstdCompressor(level=META_LEVEL).compress(raw)
        fields = _HEADER_FIELDS.pack(
            MAGIC,
            FORMAT_VERSION,
            meta.page_size,
            meta.size,
            meta.npages,
            meta.ngroups,
            meta.objects,
            meta.object_bytes,
            len(packed),
            crc32(packed),
            len(raw),
            int(meta.created * 1e9),
        )
        self._header_crc = crc32(fields)
        self._write(fields + struct.pack("<I", self._header_crc))
        self._write(packed)
        self.meta_bytes = len(packed)

    def write_chunk(self, objects: Sequence[bytes]) -> None:
        """One chunk of objects, in the device's order."""
        if objects:
            self.write_pieces([pack(objects)])

    def write_pieces(self, pieces: Sequence[tuple[bytes, bytes]]) -> None:
        """One chunk made of :func:`pack`-ed pieces, in order. The objects were joined by
        whoever packed them: here only checksums and writes run, which release the GIL."""
        assert self._meta is not None
        lengths = b"".join(p[0] for p in pieces)
        crc = crc32(lengths)
        nbytes = 0
        for _lengths, data in pieces:
            crc = crc32(data, crc)
            nbytes += len(data)
        count = len(lengths) // 4
        self._write(CHUNK.pack(CHUNK_MAGIC, count, nbytes, crc) + lengths)
        for _lengths, data in pieces:
            self._write(data)
        self._chunks += 1
        self._objects += count
        self._bytes += nbytes

    def commit(self) -> None:
        """The footer, then fsync, rename over the target, fsync of the directory."""
        meta = self._meta
        assert meta is not None
        assert (self._objects, self._bytes) == (meta.objects, meta.object_bytes), (
            self._objects,
            self._bytes,
            meta.objects,
            meta.object_bytes,
        )
        fields = _FOOTER_FIELDS.pack(FOOTER_MAGIC, self.written, self._chunks, self._header_crc)
        self._write(fields + struct.pack("<I", crc32(fields)))
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        """Drop the partial file (the previous snapshot stays)."""
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def _write(self, data: bytes) -> None:
        mv = memoryview(data)
        while mv:
            n = self._f.write(mv)
            assert n is not None
            mv = mv[n:]
        self.written += len(data)
        if self.written - self._flushed >= WRITEBACK_BYTES:
            self._writeback()

    def _writeback(self) -> None:
        """Start writing out what was written since the last call, and wait for what the call
        before started: the file never has more than about 2 x WRITEBACK_BYTES dirty in the
        page cache, so its final fsync is short and an fsync of another file (a durable
        export's journal) does not wait behind a whole snapshot of dirty pages."""
        fd = self._f.fileno()
        start, end = self._flushed, self.written
        try:
            if self._started < start:
                wait = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                wait |= SYNC_FILE_RANGE_WAIT_AFTER
                sync_file_range(fd, self._started, start - self._started, wait)
            sync_file_range(fd, start, end - start, SYNC_FILE_RANGE_WRITE)
        except OSError:
            pass  # a file system without it: the final fsync does it all
        self._started, self._flushed = start, end


class SnapshotReader:
    """Opens and checks a snapshot (header, footer, meta section); :meth:`chunks` then yields
    its objects, each chunk checked. Raises FileNotFoundError when there is no file,
    SnapshotError when it is not a whole snapshot of this format. Blocking: run in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.meta = self._open()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {self.path}: {what}")

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise self._bad("truncated (ends inside a chunk)")
        return data

    def _read_into(self, view: memoryview) -> None:
        """:meth:`_read` of ``len(view)`` bytes into ``view``."""
        if self._f.readinto(view) != len(view):
            raise self._bad("truncated (ends inside a chunk)")

    def _open(self) -> ImageMeta:
        f = self._f
        st = os.fstat(f.fileno())
        self.file_size = st.st_size
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise self._bad("not a zramd snapshot (bad magic or too short)")
        (
            _magic,
            version,
            page_size,
            size,
            npages,
            ngroups,
            nobjects,
            nbytes,
            meta_len,
            meta_crc,
            meta_raw,
            created,
            crc,
        ) = HEADER.unpack(raw)
        if crc32(raw[: _HEADER_FIELDS.size]) != crc:
            raise self._bad("header checksum mismatch")
        if version not in READ_VERSIONS:
            raise self._bad(
                f"format version {version}, this zramd reads "
                + " and ".join(map(str, READ_VERSIONS))
            )
        if self.file_size < HEADER.size + meta_len + FOOTER.size:
            raise self._bad(f"truncated ({self.file_size} bytes, no footer)")
        f.seek(self.file_size - FOOTER.size)
        foot = f.read(FOOTER.size)
        fmagic, where, chunks, hcrc, fcrc = FOOTER.unpack(foot)
        if (
            fmagic != FOOTER_MAGIC
            or crc32(foot[: _FOOTER_FIELDS.size]) != fcrc
            or where != self.file_size - FOOTER.size
            or hcrc != crc
        ):
            raise self._bad(
                f"truncated or torn ({self.file_size} bytes, no valid footer at the end)"
            )
        self._chunks_expected = chunks
        self._data_end = where
        f.seek(HEADER.size)
        packed = self._read(meta_len)
        if crc32(packed) != meta_crc:
            raise self._bad("meta section checksum mismatch")
        try:
            raw_meta = zstandard.ZstdDecompressor().decompress(packed, max_output_size=meta_raw)
            if len(raw_meta) != meta_raw:
                raise ValueError(f"meta section is {len(raw_meta)} bytes, header says {meta_raw}")
            codecs, table, groups, backing, generations, journal_gen = _decode_meta(
                raw_meta, npages, ngroups, version
            )
        except (zstandard.ZstdError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise self._bad(f"meta section unreadable: {e}") from None
        return ImageMeta(
            size=size,
            page_size=page_size,
            codecs=codecs,
            table=table,
            groups=groups,
            objects=nobjects,
            object_bytes=nbytes,
            created=created / 1e9,
            backing=backing,
            generations=generations,
            journal_gen=journal_gen,
        )

    def chunks(
        self, batch: int = 0, buffers: int = 2
    ) -> Iterator[tuple[npt.NDArray[np.uint32], memoryview]]:
        """The objects, checked chunk by chunk, as their lengths and their bytes end to end; the
        totals are checked at the end. One chunk per item, in new bytes; or, with ``batch``,
        consecutive chunks joined up to ``batch`` bytes (a larger chunk alone) in ``buffers``
        buffers used in turn, whose pages are faulted in once rather than for every chunk: an
        item's bytes stay valid until ``buffers - 1`` more items have been taken and the next
        one is read."""
        f = self._f
        objects = nbytes = chunks = 0
        ring = [bytearray() for _ in range(buffers if batch else 0)]
        turn = used = 0
        joined: list[npt.NDArray[np.uint32]] = []
        while f.tell() < self._data_end:
            magic, count, dlen, crc = CHUNK.unpack(self._read(CHUNK.size))
            if magic != CHUNK_MAGIC or dlen > MAX_CHUNK_BYTES or count > dlen:
                raise self._bad(f"chunk {chunks}: bad chunk header")
            lengths = self._read(4 * count)
            data: bytes | memoryview
            if batch:
                if joined and used + dlen > batch:
                    yield np.concatenate(joined), memoryview(ring[turn])[:used]
                    turn, used, joined = (turn + 1) % buffers, 0, []
                if len(ring[turn]) < used + dlen:  # used == 0 here: no more than the file has
                    ring[turn] = bytearray(max(dlen, min(batch, self._data_end - f.tell())))
                data = memoryview(ring[turn])[used : used + dlen]
                self._read_into(data)
            else:
                data = self._read(dlen)
            if crc32(data, crc32(lengths)) != crc:
                raise self._bad(f"chunk {chunks}: checksum mismatch")
            sizes = np.frombuffer(lengths, dtype="<u4")
            if int(sizes.sum(dtype=np.int64)) != dlen or (count and int(sizes.max()) > MAX_OBJECT):
                raise self._bad(f"chunk {chunks}: object lengths do not add up")
            objects += count
            nbytes += dlen
            chunks += 1
            if objects > self.meta.objects:
                raise self._bad("more objects than the header says")
            if batch:
                joined.append(sizes)
                used += dlen
            else:
                yield sizes, memoryview(data)
        if joined:
            yield np.concatenate(joined), memoryview(ring[turn])[:used]
        if (objects, nbytes, chunks) != (
            self.meta.objects,
            self.meta.object_bytes,
            self._chunks_expected,
        ):
            raise self._bad(
                f"{objects} objects in {chunks} chunks, the header and footer say "
                f"{self.meta.objects} in {self._chunks_expected}"
            )

    def close(self) -> None:
        self._f.close()


def set_aside(path: str) -> str:
    """Rename the snapshot ``path`` to ``PATH.bad-<UTC time>`` (a free name), sync its
    directory and return the new name: a file that cannot be used, kept for the operator."""
    base = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    aside, n = base, 1
    while os.path.lexists(aside):
        aside, n = f"{base}.{n}", n + 1
    os.rename(path, aside)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return aside
