"""The backing store: opaque byte objects packed densely in segments of a file or block device.

Theory of operation
-------------------
**Owns** one backing file or block device (:mod:`zramd.backing.format` is its layout) and the
space map of its segments. It stores opaque byte objects (a compressed page as it is, a raw
page, a group blob) and hands back a :mod:`locator <zramd.backing.format>` per object; like the
pool it knows nothing of pages, codecs or the device.

**Dense packing.** Objects are appended back to back (8-byte aligned, 8-byte record header)
into one *open* segment at a time; a segment that cannot take the next object is sealed and the
lowest free segment is opened. A freed object leaves a dead hole in its segment; a segment
whose last object is freed is given back at once (hole punched in a file, discarded on a
device) and reused. *Cleaning* (:meth:`BackingStore.clean`) picks the sealed segments with the
fewest live bytes (under ``threshold`` of a segment), copies their live objects to the open
segment and returns ``(old, new)`` locator pairs; the caller switches its references and then
frees the old locators, which empties the victims, which are then given back.

*The trade-off, with figures.* One object per 4 KiB block (zram's way) needs no cleaning, but
writes and holds 4 KiB per page: 2.7x the compressed bytes at lz4's usual 2.7:1, 1.95x for
objects of 600..3600 B, on every writeback and for as long as the pages stay out. Packing
writes the compressed bytes plus 8..15 B each (record header and padding, 0.5% at 1.5 KiB); what
it costs is cleaning: a victim at live fraction u costs u bytes copied per 1 - u bytes won,
at most 1 B per B with the default ``threshold`` 0.5 (3 B per B at 0.75), and until cleaning
runs the space held is at most 1 / threshold = 2x the live bytes. Measured
(``python -m zramd.bench micro``, ``backing`` section: 20000 objects of 600..3600 B, half freed
at random): space held / live bytes 2.02 before cleaning; after cleaning at threshold 0.5,
1.44 (0.86 B moved per B won); at 0.75 or 0.9, 1.02 (0.99 B per B); one 4 KiB block per
object would hold 1.95 throughout. Once cleaned, packing holds at most 1 / threshold of the
live bytes (2x at 0.5: what 4 KiB blocks hold at 2:1 compression) and usually far less. When to
clean and at which threshold is the caller's policy; the store guarantees room for it.

**Capacity**: a block device's size; a regular file's size if it has one (an operator's
``truncate -s 1G``), else it grows as needed (sparse) until the file system is full, which is
:class:`BackingFull` too. Formatting or opening gives back what is not live in a file (holes
punched: metadata work), but does not discard a block device as a whole (minutes on a large
SSD, and an export is made on the loop thread): a device's segments are discarded as they are
freed.

**Segment size** (default 256 KiB): big enough that a batch of a writeback slice is one or two
``pwritev`` calls and that a group blob (up to 64 KiB) fits, small enough that cleaning one
segment is a short job and that a freed segment is quickly given back.

**Space map**, in memory, per segment: state (FREE, OPEN, SEALED, RELEASING), write pointer,
sequence number and CRC seed, live objects and bytes, writes in flight; and the sorted
``array('Q')`` of the locators written into it with a parallel dead flag per object (9 bytes
per object: about 6 MiB per GiB of 1.5 KiB objects), so a free is one bisect and cleaning knows
the live objects and their lengths without reading headers. Free segments are a min-heap (the
lowest first, so a file stays compact); segments past the high-water mark were never used. One
segment is kept in reserve for cleaning: a write that would need it gets :class:`BackingFull`,
so cleaning can always make progress.

**Opening an existing store** (:meth:`BackingStore.open`) rebuilds the space map from the
file's metadata: with the caller's list of live locators (the persisted page table) it reads the
header and the headers of the segments they are in, and every other segment is free; without
it, it walks every segment's records and takes every record that passes its check as live (a
recovery scan; a torn tail ends a segment). New writes always go to a fresh segment.

**Threads.** State (the space map, counters) is changed only on the caller's thread: the event
loop for the async API (``write_many``, ``read``, ``read_many``, ``free``, ``clean``,
``aclose``), one thread for the ``*_sync`` API (tests, tools); never both at once. Each
operation is one generator that changes the state and yields its I/O jobs; the sync API runs
the jobs inline, the async API in the store's own bounded thread pool (``io_threads``): the
loop never waits for the device. One copy does run on the loop: an async read of a few objects
(up to :data:`CACHED_READ_MAX_OBJECTS`) is first tried there with ``RWF_NOWAIT``, which copies
from the page cache or fails with EAGAIN at once, and goes to a thread only then (a thread hop
costs the loop tens of microseconds, a cached 4 KiB read a few: fio random 4 KiB reads of
written-back pages at QD16 ran at 26-37 MB/s before, 61-74 MB/s with it). The jobs
(``os.pwritev`` of whole runs, ``os.pread`` of merged extents, the CRCs, punch/discard) touch
no state. A write is planned (space reserved) on the loop, written in a
thread, then committed; a segment with writes in flight is never cleaned nor given back, and a
segment being given back is not reused until the punch has returned. A cancelled async call
still runs its operation to the end (a write's objects are then freed again). The GIL: a
record's CRC-32 (:mod:`zramd.checksum`) holds it for about 0.3 us per 4 KiB object (the C
function lets go only from 16 KiB on), so a 1 MiB batch holds it for well under a millisecond
in small pieces; writeback slices of a few hundred KiB keep the loop's latency where the rest
of zramd keeps it.

**Faults** cost only the request that meets them, and the store stays usable:

* a write that fails (EIO, a short or refused write, ENOSPC of the file system) raises
  :class:`BackingIOError` or :class:`BackingFull` and rolls back: its objects are dead, its
  locators never returned; the space map is as if it had not been asked (but for the dead
  bytes in the open segment);
* the store's own room (its capacity, less the cleaning reserve) or the write budget
  (``write_limit``, zram's writeback_limit) refuses a write with :class:`BackingFull` /
  :class:`BudgetSpent` before anything is written;
* a read past the end (a truncated file) raises :class:`BackingIOError`; an object whose record
  fails its CRC or does not match its locator raises :class:`BackingCorrupt` for that object
  only; cleaning leaves such an object where it is, reports it, and pins its segment (not
  cleaned again) until the caller frees it.

**Invariants**: a locator is valid from the return of the write that made it until it is freed;
every written object is live or dead in exactly one segment's array; ``live_bytes`` and
``live_count`` of a segment are its records not marked dead; a FREE segment holds no live
object and has no write in flight.

Knows nothing of pages, tables, codecs or the event loop's other work.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import time
import uuid as uuidlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from zramd.backing import osio
from zramd.backing.format import (
    ALIGN,
    DEFAULT_DATA_OFFSET,
    FLAG_BLOCK_DEVICE,
    HEADER_BYTES,
    LEN_BITS,
    LEN_MASK,
    RECORD_HEADER,
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    SEGMENT_SIZE,
    SEQ_RESERVE,
    FormatError,
    Header,
    check_segment_size,
    decode_header,
    decode_segment_header,
    encode_header,
    encode_segment_header,
    locator_length,
    locator_offset,
    make_locator,
    max_object,
    record_bytes,
    record_crc,
    segment_seed,
)

Buffer = bytes | bytearray | memoryview

#: I/O threads of one store (reads of several requests and a writeback slice overlap)
DEFAULT_IO_THREADS = 4
#: an async read of at most this many objects is first tried from the page cache, on the
#: caller's thread (``BackingStore.read_cached``); larger ones go to the threads at once
CACHED_READ_MAX_OBJECTS = 16
#: the kernel reads without waiting for the device, or refuses (os.preadv flag, Linux 4.14+)
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: the fewest segments a store must have room for (one open, one cleaning reserve)
MIN_SEGMENTS = 4
#: cleaning takes sealed segments whose live bytes are below this fraction of a segment
CLEAN_THRESHOLD = 0.5
#: segments kept for cleaning: a write that would need them is refused (BackingFull)
CLEAN_RESERVE_SEGMENTS = 1
#: iovecs per pwritev call (the kernel's IOV_MAX is 1024)
MAX_IOV = 1020
#: objects of one read this close to each other are read with one pread (the gap read too)
READ_MERGE_GAP = 4096

FREE, OPEN, SEALED, RELEASING = 0, 1, 2, 3
#: what giving one range back did
_RELEASED, _RELEASE_UNSUPPORTED, _RELEASE_FAILED = 0, 1, 2

_T = TypeVar("_T")
#: an operation: a generator that yields I/O jobs, is sent their results, returns its own
_Op = Generator[Callable[[], Any], Any, _T]

_PADS = [bytes(n) for n in range(ALIGN)]


class BackingError(Exception):
    """A backing store operation failed; the store is still usable."""


class BackingIOError(BackingError):
    """An I/O error of the backing file or device (the device answers EIO). ``errno`` is the
    OS error, ``offset`` where it happened."""

    def __init__(self, message: str, *, err: int = errno.EIO, offset: int = -1) -> None:
        super().__init__(message)
        self.errno = err
        self.offset = offset


class BackingCorrupt(BackingIOError):
    """An object failed its checksum or does not match its locator (EIO for that object)."""

    def __init__(self, message: str, *, locator: int, offset: int) -> None:
        super().__init__(message, offset=offset)
        self.locator = locator


class _NotCached(Exception):
    """A page-cache read (:meth:`BackingStore.read_cached`) would have to wait for the device;
    ``unsupported``: the file system cannot tell (RWF_NOWAIT refused)."""

    def __init__(self, unsupported: bool = False) -> None:
        super().__init__()
        self.unsupported = unsupported


class BackingFull(BackingError):
    """No room: the store's capacity (less the cleaning reserve) or the file system is full
    (the device answers ENOSPC). ``cleanable`` is how many bytes cleaning could win."""

    def __init__(self, message: str, *, cleanable: int = 0) -> None:
        super().__init__(message)
        self.cleanable = cleanable


class BudgetSpent(BackingFull):
    """The write budget (``write_limit``) does not cover the write."""


class BackingOpenError(BackingError):
    """The path cannot be used as a backing store (missing, busy, too small, foreign or damaged
    content); the message names the path and says what is wrong."""


@dataclass
class BackingCounters:
    """Cumulative counters of one store (zram's ``bd_stat`` and more)."""

    #: objects written by ``write_many`` (zram bd_writes counts pages; the device converts)
    bd_writes: int = 0
    #: objects read
    bd_reads: int = 0
    #: bytes written to the file or device (records, segment headers, cleaning moves)
    write_bytes: int = 0
    #: bytes read
    read_bytes: int = 0
    #: bytes given back (holes punched, ranges discarded)
    punched_bytes: int = 0
    #: segments that could not be given back (no hole punching or discard there)
    punch_unsupported: int = 0
    #: I/O errors met (reads, writes, punches)
    io_errors: int = 0
    #: objects that failed their check on a read or in cleaning
    corrupt: int = 0
    #: writes refused for want of room (the store's or the file system's) or of budget
    full_refusals: int = 0
    budget_refusals: int = 0
    #: segments emptied by cleaning, objects and bytes it moved
    cleaned_segments: int = 0
    moved_objects: int = 0
    moved_bytes: int = 0


@dataclass
class Cleaning:
    """What one :meth:`BackingStore.clean` did. The caller switches each ``old`` reference to
    ``new`` and frees ``old`` (or, when it freed ``old`` meanwhile, frees ``new``)."""

    relocations: list[tuple[int, int]] = field(default_factory=list)
    #: live objects that failed their check: left in place, their segment pinned
    corrupt: list[int] = field(default_factory=list)
    #: victims cleaned
    segments: int = 0


@dataclass(slots=True)
class _Run:
    """Records to write contiguously into one segment (a part of one write plan)."""

    seg: int
    start: int  # absolute offset of the run's first byte
    seed: int
    head: bytes | None  # segment header, when the run opens the segment
    items: list[tuple[int, int]]  # (object index in the plan, absolute record offset)


@dataclass(slots=True)
class _Plan:
    runs: list[_Run]
    locs: list[int]
    header: bytes | None  # a header rewrite (sequence limit moved) to write first
    nbytes: int
    charged: int  # taken from the write budget (given back if the write fails)
    sealed: list[int]  # segments this plan sealed (given back after it if empty)


class BackingStore:
    """One backing file or block device (see the module doc). Build with :meth:`create` or
    :meth:`open`."""

    def __init__(
        self, path: str, fd: int, header: Header, *, io_threads: int = DEFAULT_IO_THREADS
    ) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.segment_size = header.segment_size
        self._data_offset = header.data_offset
        self.max_object = max_object(header.segment_size)
        self.nsegments = header.max_segments()
        self.counters = BackingCounters()
        #: bytes a write may still write (zram writeback_limit), None: no limit
        self.write_limit: int | None = None
        self._next_seq = header.seq_limit
        self._state = bytearray()
        self._fill = array("I")
        self._seq = array("Q")
        self._seed = array("I")
        self._live_count = array("I")
        self._live_bytes = array("Q")
        self._pending = array("I")
        self._locs: list[array[int] | None] = []
        self._dead: list[bytearray | None] = []
        self._free: list[int] = []
        self._pinned: set[int] = set()
        self._cleaning: set[int] = set()
        self._open = -1
        #: the header (a moved sequence limit) still has to be written
        self._header_dirty = False
        self._live_objects = 0
        self._live_payload = 0
        #: dead bytes in sealed segments (what cleaning could win)
        self._dead_sealed = 0
        self._executor = ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="zramd-backing"
        )
        #: jobs running in the threads (``aclose`` waits for them)
        self._inflight: set[asyncio.Future[Any]] = set()
        self._closed = False
        #: page-cache reads on the caller's thread (off where the file system refuses them)
        self._nowait = bool(_RWF_NOWAIT)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        *,
        size: int = 0,
        segment_size: int = SEGMENT_SIZE,
        io_threads: int = DEFAULT_IO_THREADS,
    ) -> BackingStore:
        """Format ``path`` as a new, empty store (what it held is given back): a block device
        (its whole size), or a regular file, sparse, whose size bounds the store: ``size`` if
        given, else the capacity of the store it holds, else its own size; a new or empty file
        grows until the file system is full. Refuses (BackingOpenError) a path held by another
        opener, one too small for MIN_SEGMENTS segments, and a non-empty file or device holding
        something else than a backing store (its first 4 KiB must be zeros or a store's
        header)."""
        check_segment_size(segment_size)
        fd, is_blk = _open(path, create=True)
        try:
            first = os.pread(fd, HEADER_BYTES, 0)
            old: Header | None = None
            if first.strip(b"\0"):
                try:
                    old = decode_header(first)
                except FormatError:
                    raise BackingOpenError(
                        f"{path}: holds something else than a zramd backing store; wipe it "
                        "first (its first 4 KiB must be zeros)"
                    ) from None
            if is_blk:
                limit = osio.device_size(fd)
                if size:
                    limit = min(limit, size)
            elif size:
                limit = size
            elif old is not None:
                limit = old.data_offset + old.capacity if old.capacity else 0
            else:
                limit = os.fstat(fd).st_size
            capacity = 0
            if limit:
                capacity = (limit - DEFAULT_DATA_OFFSET) // segment_size * segment_size
                if capacity < MIN_SEGMENTS * segment_size:
                    raise BackingOpenError(
                        f"{path}: too small: {limit} bytes, a store needs at least "
                        f"{DEFAULT_DATA_OFFSET + MIN_SEGMENTS * segment_size}"
                    )
            header = Header(
                flags=FLAG_BLOCK_DEVICE if is_blk else 0,
                segment_size=segment_size,
                uuid=uuidlib.uuid4().bytes,
                created=int(time.time()),
                meta_offset=HEADER_BYTES,
                meta_length=DEFAULT_DATA_OFFSET - HEADER_BYTES,
                data_offset=DEFAULT_DATA_OFFSET,
                capacity=capacity,
                seq_limit=1 + SEQ_RESERVE,
            )
            if capacity and not is_blk:  # a device is not discarded as a whole ("Capacity")
                end = header.data_offset + capacity
                os.ftruncate(fd, end)
                osio.release(fd, HEADER_BYTES, end - HEADER_BYTES, block_device=False)
            elif not is_blk:
                os.ftruncate(fd, 0)
            _write_all(fd, encode_header(header), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise BackingOpenError(f"{path}: {e.strerror or e}") from None
        except BaseException:
            os.close(fd)
            raise
        store = cls(path, fd, header, io_threads=io_threads)
        store._next_seq = 1
        return store

    @classmethod
    def open(
        cls,
        path: str,
        *,
        live: Iterable[int] | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
    ) -> BackingStore:
        """Open an existing store and rebuild its space map: from ``live`` (the locators the
        caller still references; every other segment is given back), or, without it, by
        walking every segment's records (each valid one is live). Raises BackingOpenError
        naming the path and what is wrong (missing, busy, not a store, another version, bad
        checksum, smaller than its header says, a live locator in a segment that is not
        there)."""
        try:
            fd, is_blk = _open(path, create=False)
        except OSError as e:
            raise BackingOpenError(f"{path}: {e.strerror or e}") from None
        try:
            try:
                header = decode_header(os.pread(fd, HEADER_BYTES, 0))
            except FormatError as e:
                raise BackingOpenError(f"{path}: {e}") from None
            if is_blk != header.block_device:
                raise BackingOpenError(f"{path}: the header says the store is on a "
                                       f"{'block device' if header.block_device else 'file'}")
            if is_blk and osio.device_size(fd) < header.data_offset + header.capacity:
                raise BackingOpenError(f"{path}: the device is smaller than its header says")
            store = cls(path, fd, header, io_threads=io_threads)
        except OSError as e:
            os.close(fd)
            raise BackingOpenError(f"{path}: {e.strerror or e}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            store._rebuild(live)
            store._reserve_seq()
            _write_all(fd, encode_header(store.header), 0)
            os.fsync(fd)
        except OSError as e:
            store.close()
            raise BackingOpenError(f"{path}: {e.strerror or e}") from None
        except BaseException:
            store.close()
            raise
        return store

    def _rebuild(self, live: Iterable[int] | None) -> None:
        """The space map from the segments' metadata (see :meth:`open`)."""
        per_seg: dict[int, list[int]] = {}
        seqs: dict[int, int] = {}
        if live is None:
            for seg in range(self._scan_limit()):
                raw = self._pread(self._seg_start(seg), self.segment_size)
                seq = decode_segment_header(raw, seg, self.header.uuid)
                if seq is None:
                    continue
                seqs[seg] = seq
                per_seg[seg] = self._walk(raw, seg, seq)
        else:
            for loc in live:
                try:
                    seg = self._seg_of(loc)
                except ValueError as e:
                    raise BackingOpenError(str(e)) from None
                per_seg.setdefault(seg, []).append(loc)
            for seg in sorted(per_seg):
                raw = self._pread(self._seg_start(seg), SEGMENT_HEADER_BYTES)
                seq = decode_segment_header(raw, seg, self.header.uuid)
                if seq is None:
                    raise BackingOpenError(
                        f"{self.path}: segment {seg} holds {len(per_seg[seg])} live objects "
                        "but has no valid segment header (truncated or overwritten)"
                    )
                seqs[seg] = seq
        high = max(per_seg, default=-1) + 1
        self._grow(high)
        for seg, locs in per_seg.items():
            locs.sort()
            if not locs:
                continue
            ends = [locator_offset(x) + record_bytes(locator_length(x)) for x in locs]
            if any(locator_offset(b) < a for a, b in zip(ends, locs[1:], strict=False)):
                raise BackingOpenError(
                    f"{self.path}: the live objects given for segment {seg} overlap"
                )
            last = locs[-1]
            self._state[seg] = SEALED
            self._seq[seg] = seqs[seg]
            self._seed[seg] = segment_seed(self.header.uuid, seqs[seg])
            self._fill[seg] = (locator_offset(last) - self._seg_start(seg)
                               + record_bytes(locator_length(last)))
            self._locs[seg] = array("Q", locs)
            self._dead[seg] = bytearray(len(locs))
            nbytes = sum(record_bytes(locator_length(x)) for x in locs)
            self._live_count[seg] = len(locs)
            self._live_bytes[seg] = nbytes
            self._dead_sealed += self._fill[seg] - SEGMENT_HEADER_BYTES - nbytes
            self._live_objects += len(locs)
            self._live_payload += sum(locator_length(x) for x in locs)
        for seg in range(high):
            if self._state[seg] == FREE:
                heapq.heappush(self._free, seg)
        if not self.header.block_device:  # punch what is not live (see "Capacity")
            start = -1
            for seg in range(high + 1):
                if seg < high and self._state[seg] == FREE:
                    start = seg if start < 0 else start
                elif start >= 0:
                    self._release_io([(self._seg_start(start), self._seg_start(seg)
                                       - self._seg_start(start))])
                    start = -1
            end = os.fstat(self._fd).st_size
            if end > self._seg_start(high):
                self._release_io([(self._seg_start(high), end - self._seg_start(high))])

    def _scan_limit(self) -> int:
        """Segments that may have been written (a file's size bounds them)."""
        if self.header.block_device:
            return self.nsegments
        size = os.fstat(self._fd).st_size
        used = max(0, size - self.header.data_offset)
        return min(self.nsegments, -(-used // self.segment_size))

    def _walk(self, raw: bytes, seg: int, seq: int) -> list[int]:
        """The valid records of one segment's bytes, in order, up to the first invalid one."""
        base = self._seg_start(seg)
        seed = segment_seed(self.header.uuid, seq)
        pos, out = SEGMENT_HEADER_BYTES, []
        end = len(raw)
        while pos + RECORD_HEADER_BYTES <= end:
            crc, n = RECORD_HEADER.unpack_from(raw, pos)
            stop = pos + RECORD_HEADER_BYTES + n
            if n == 0 or stop > end:
                break
            payload = memoryview(raw)[pos + RECORD_HEADER_BYTES : stop]
            if record_crc(seed, base + pos, payload) != crc:
                break
            out.append(make_locator(base + pos, n))
            pos += record_bytes(n)
        return out

    # --- geometry and the space map -------------------------------------------------------

    def _seg_start(self, seg: int) -> int:
        return self.header.data_offset + seg * self.segment_size

    def _seg_of(self, loc: int) -> int:
        """The segment of ``loc``. Raises ValueError when its record cannot be in one."""
        seg, pos = divmod((loc >> LEN_BITS) * ALIGN - self._data_offset, self.segment_size)
        if not (0 <= seg < self.nsegments and SEGMENT_HEADER_BYTES <= pos
                and pos + RECORD_HEADER_BYTES + (loc & LEN_MASK) <= self.segment_size):
            raise ValueError(f"locator {loc:#x} is outside the segments of {self.path}")
        return seg

    def _grow(self, nseg: int) -> None:
        """Extend the per-segment arrays to ``nseg`` segments (new ones FREE)."""
        add = nseg - len(self._state)
        if add <= 0:
            return
        self._state.extend(bytes(add))
        for arr in (self._fill, self._seq, self._seed, self._live_count, self._live_bytes,
                    self._pending):
            arr.extend(bytes(add * arr.itemsize))
        self._locs.extend([None] * add)
        self._dead.extend([None] * add)

    def _room(self, *, cleaning: bool) -> int:
        """Segments a write may still open."""
        n = len(self._free) + self.nsegments - len(self._state)
        return n if cleaning else n - CLEAN_RESERVE_SEGMENTS

    def _take_segment(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        seg = len(self._state)
        self._grow(seg + 1)
        return seg

    def _reserve_seq(self) -> None:
        """Move the header's sequence limit forward (the header must then be written)."""
        h = self.header
        self.header = Header(
            flags=h.flags, segment_size=h.segment_size, uuid=h.uuid, created=h.created,
            meta_offset=h.meta_offset, meta_length=h.meta_length, data_offset=h.data_offset,
            capacity=h.capacity, seq_limit=self._next_seq + SEQ_RESERVE,
        )

    def _plan(self, objs: Sequence[Buffer], *, cleaning: bool = False) -> _Plan:
        """Reserve room for ``objs`` (all or nothing): their locators and the runs to write.
        Raises ValueError (an object too big or empty), BackingFull, BudgetSpent."""
        seg_size = self.segment_size
        max_obj = self.max_object
        lens = [len(o) for o in objs]
        recs = [(RECORD_HEADER_BYTES + n + ALIGN - 1) & -ALIGN for n in lens]
        if min(lens) < 1 or max(lens) > max_obj:
            bad = next(n for n in lens if not 0 < n <= max_obj)
            raise ValueError(f"object of {bad} bytes (1 to {max_obj} allowed)")
        nbytes = 0
        need = 0
        left = seg_size - self._fill[self._open] if self._open >= 0 else 0
        for r in recs:
            nbytes += r
            if r > left:
                need += 1
                left = seg_size - SEGMENT_HEADER_BYTES
                nbytes += SEGMENT_HEADER_BYTES
            left -= r
        if need > self._room(cleaning=cleaning):
            self.counters.full_refusals += 1
            raise BackingFull(
                f"{self.path}: backing store full ({self.used_bytes()} of "
                f"{self.nsegments * seg_size} bytes in use)",
                cleanable=self.cleanable_bytes(),
            )
        if not cleaning and self.write_limit is not None and nbytes > self.write_limit:
            self.counters.budget_refusals += 1
            raise BudgetSpent(
                f"{self.path}: write budget spent ({self.write_limit} bytes left, "
                f"{nbytes} needed)"
            )
        header: bytes | None = None
        sealed: list[int] = []
        runs: list[_Run] = []
        locs: list[int] = []
        fill = self._fill
        i, nobj = 0, len(objs)
        while i < nobj:
            seg = self._open
            head: bytes | None = None
            if seg < 0 or fill[seg] + recs[i] > seg_size:
                if seg >= 0:
                    self._seal(seg)
                    sealed.append(seg)
                seg = self._take_segment()
                if self._next_seq >= self.header.seq_limit:
                    self._reserve_seq()
                    self._header_dirty = True
                seq = self._next_seq
                self._next_seq += 1
                self._open = seg
                self._state[seg] = OPEN
                self._seq[seg] = seq
                self._seed[seg] = segment_seed(self.header.uuid, seq)
                fill[seg] = SEGMENT_HEADER_BYTES
                self._locs[seg] = array("Q")
                self._dead[seg] = bytearray()
                head = encode_segment_header(seg, seq, self.header.uuid)
            base = self._seg_start(seg)
            first = cur = fill[seg]
            items: list[tuple[int, int]] = []
            new: list[int] = []
            j = i
            while j < nobj and cur + recs[j] <= seg_size:
                off = base + cur
                items.append((j, off))
                new.append((off // ALIGN) << LEN_BITS | lens[j])
                cur += recs[j]
                j += 1
            runs.append(_Run(seg, base if head is not None else base + first, self._seed[seg],
                             head, items))
            self._locs[seg].extend(new)  # type: ignore[union-attr]
            self._dead[seg].extend(bytes(j - i))  # type: ignore[union-attr]
            self._live_count[seg] += j - i
            self._live_bytes[seg] += cur - first
            fill[seg] = cur
            locs += new
            i = j
        if self._header_dirty:
            header = encode_header(self.header)
        self._live_objects += nobj
        self._live_payload += sum(lens)
        charged = 0
        if self.write_limit is not None:
            charged = min(self.write_limit, nbytes)
            self.write_limit -= charged
        for run in runs:
            self._pending[run.seg] += 1
        return _Plan(runs, locs, header, nbytes, charged, sealed)

    def _seal(self, seg: int) -> None:
        self._state[seg] = SEALED
        self._dead_sealed += self._fill[seg] - SEGMENT_HEADER_BYTES - self._live_bytes[seg]
        if self._open == seg:
            self._open = -1

    def _finish(self, plan: _Plan, ok: bool) -> list[int]:
        """After a plan's I/O: drop the in-flight marks; on failure kill its objects. Returns
        the segments now empty, to give back."""
        for run in plan.runs:
            self._pending[run.seg] -= 1
        if ok and plan.header is not None and plan.header == encode_header(self.header):
            self._header_dirty = False
        if not ok:
            self._kill(plan.locs)
            if self.write_limit is not None:
                self.write_limit += plan.charged
        segs = {run.seg for run in plan.runs}.union(plan.sealed)
        return sorted(s for s in segs if self._releasable(s))

    def _releasable(self, seg: int) -> bool:
        return (self._state[seg] == SEALED and self._live_count[seg] == 0
                and self._pending[seg] == 0 and seg not in self._cleaning)

    def _find(self, loc: int) -> tuple[int, int]:
        """(segment, index in its arrays) of the live object ``loc``. Raises ValueError when
        ``loc`` is not live (freed, relocated and freed, or never written)."""
        seg = self._seg_of(loc)
        if seg < len(self._state):
            arr, dead = self._locs[seg], self._dead[seg]
            if arr is not None and dead is not None:
                i = bisect_left(arr, loc)
                if i < len(arr) and arr[i] == loc and not dead[i]:
                    return seg, i
        raise ValueError(f"locator {loc:#x} is not live in {self.path}")

    def _kill(self, locs: Iterable[int]) -> list[int]:
        """Mark ``locs`` dead; the sealed segments they empty (to give back). Raises ValueError
        for a locator that is not live (a double free, or foreign)."""
        return self._kill_found([(loc, *self._find(loc)) for loc in locs])

    def _kill_found(self, found: list[tuple[int, int, int]]) -> list[int]:
        """Mark the objects ``(locator, segment, index)`` dead (see :meth:`_kill`)."""
        empty: list[int] = []
        dead_of, count, nbytes, state = self._dead, self._live_count, self._live_bytes, self._state
        payload = 0
        for loc, seg, i in found:
            dead_of[seg][i] = 1  # type: ignore[index]
            n = loc & LEN_MASK
            payload += n
            count[seg] -= 1
            r = (RECORD_HEADER_BYTES + n + ALIGN - 1) & -ALIGN
            nbytes[seg] -= r
            if state[seg] == SEALED:
                self._dead_sealed += r
            if count[seg] == 0:
                self._pinned.discard(seg)
                if self._releasable(seg):
                    empty.append(seg)
        self._live_objects -= len(found)
        self._live_payload -= payload
        return empty

    def _start_release(self, segs: list[int]) -> list[tuple[int, int]]:
        """Mark ``segs`` RELEASING; the byte ranges to give back."""
        out = []
        for seg in segs:
            self._state[seg] = RELEASING
            self._dead_sealed -= self._fill[seg] - SEGMENT_HEADER_BYTES
            self._locs[seg] = None
            self._dead[seg] = None
            self._fill[seg] = 0
            out.append((self._seg_start(seg), self.segment_size))
        return out

    def _end_release(self, segs: list[int]) -> None:
        for seg in segs:
            self._state[seg] = FREE
            heapq.heappush(self._free, seg)

    # --- thread-side I/O: pure functions of their arguments (no state, no counters) ---------

    def _pread(self, offset: int, n: int, nowait: bool = False) -> bytes:
        """``n`` bytes at ``offset``. ``nowait``: only if the page cache holds all of them,
        else _NotCached; an error is left for the threads' read to meet and report."""
        if nowait:
            buf = bytearray(n)
            try:
                got = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)
            except OSError as e:
                raise _NotCached(e.errno in (errno.EOPNOTSUPP, errno.EINVAL)) from None
            if got < n:
                raise _NotCached
            return bytes(buf)
        try:
            return os.pread(self._fd, n, offset)
        except OSError as e:
            raise BackingIOError(
                f"{self.path}: read of {n} bytes at {offset}: {e.strerror}",
                err=e.errno or errno.EIO, offset=offset,
            ) from None

    def _write_io(self, plan: _Plan, objs: Sequence[Buffer]) -> None:
        """Write a plan's runs (record headers and CRCs made here, in the thread)."""
        try:
            if plan.header is not None:
                _write_all(self._fd, plan.header, 0)
                os.fdatasync(self._fd)
            for run in plan.runs:
                iov: list[Buffer] = []
                if run.head is not None:
                    iov.append(run.head)
                for i, off in run.items:
                    o = objs[i]
                    n = len(o)
                    iov.append(RECORD_HEADER.pack(record_crc(run.seed, off, o), n))
                    iov.append(o)
                    pad = -(RECORD_HEADER_BYTES + n) % ALIGN
                    if pad:
                        iov.append(_PADS[pad])
                _writev_all(self._fd, iov, run.start)
        except OSError as e:
            where = plan.runs[0].start if plan.runs else 0
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise BackingFull(f"{self.path}: {e.strerror} writing at {where}") from None
            raise BackingIOError(
                f"{self.path}: write at {where}: {e.strerror}", err=e.errno or errno.EIO,
                offset=where,
            ) from None

    def _read_io(
        self, locs: Sequence[int], seeds: Sequence[int], nowait: bool = False
    ) -> tuple[list[bytes], int]:
        """Read and check ``locs`` (adjacent records merged into one pread); the payloads and
        the bytes read. ``nowait``: from the page cache only (:meth:`_pread`)."""
        if len(locs) == 1:
            loc = locs[0]
            off = locator_offset(loc)
            n = RECORD_HEADER_BYTES + locator_length(loc)
            return [self._check(self._pread(off, n, nowait), off, loc, seeds[0])], n
        order = sorted(range(len(locs)), key=locs.__getitem__)
        out: list[bytes] = [b""] * len(locs)
        k = nread = 0
        while k < len(order):
            first = locs[order[k]]
            start = locator_offset(first)
            end = start + RECORD_HEADER_BYTES + locator_length(first)
            j = k + 1
            while j < len(order):
                nxt = locs[order[j]]
                off = locator_offset(nxt)
                if not end <= off <= end + READ_MERGE_GAP:
                    break
                end = off + RECORD_HEADER_BYTES + locator_length(nxt)
                j += 1
            raw = self._pread(start, end - start, nowait)
            nread += len(raw)
            for idx in order[k:j]:
                out[idx] = self._check(raw, start, locs[idx], seeds[idx])
            k = j
        return out, nread

    def _check(self, raw: bytes, base: int, loc: int, seed: int) -> bytes:
        """The payload of ``loc`` in ``raw`` (read from ``base``), checked."""
        off = locator_offset(loc)
        n = locator_length(loc)
        pos = off - base
        if len(raw) < pos + RECORD_HEADER_BYTES + n:
            raise BackingIOError(
                f"{self.path}: short read at {off} (file truncated?)", offset=off
            )
        crc, length = RECORD_HEADER.unpack_from(raw, pos)
        payload = raw[pos + RECORD_HEADER_BYTES : pos + RECORD_HEADER_BYTES + n]
        if length != n or record_crc(seed, off, payload) != crc:
            raise BackingCorrupt(
                f"{self.path}: object at {off} ({n} bytes) fails its checksum",
                locator=loc, offset=off,
            )
        return payload

    def _release_io(self, ranges: list[tuple[int, int]]) -> list[int]:
        """Give ``ranges`` back; per range RELEASED, UNSUPPORTED or an I/O error."""
        out = []
        for off, n in ranges:
            try:
                done = osio.release(self._fd, off, n, block_device=self.header.block_device)
            except OSError:
                out.append(_RELEASE_FAILED)
                continue
            out.append(_RELEASED if done else _RELEASE_UNSUPPORTED)
        return out

    def _clean_read(
        self, seg: int, fill: int, locs: list[int], seed: int
    ) -> tuple[list[bytes | None], int]:
        """The payloads of a victim's live objects (None: fails its check), bytes read."""
        base = self._seg_start(seg)
        raw = self._pread(base, fill)
        out: list[bytes | None] = []
        for loc in locs:
            try:
                out.append(self._check(raw, base, loc, seed))
            except BackingIOError:
                out.append(None)
        return out, len(raw)

    # --- operations: generators on the owner thread that yield their I/O jobs ---------------
    #
    # The sync API runs each job inline, the async API in the store's threads; every change of
    # state and of the counters happens in the generators, on the owner thread.

    def _op_write(self, objs: Sequence[Buffer], cleaning: bool = False) -> _Op[list[int]]:
        plan = self._plan(objs, cleaning=cleaning)
        try:
            yield partial(self._write_io, plan, objs)
        except (BackingIOError, BackingFull) as e:
            self.counters.io_errors += 1
            self.counters.full_refusals += isinstance(e, BackingFull)
            yield from self._op_release(self._finish(plan, ok=False))
            raise
        except BaseException:
            yield from self._op_release(self._finish(plan, ok=False))
            raise
        self.counters.write_bytes += plan.nbytes
        yield from self._op_release(self._finish(plan, ok=True))
        return plan.locs

    def _op_read(self, locs: Sequence[int], nowait: bool = False) -> _Op[list[bytes]]:
        seeds = self._seeds(locs)
        try:
            out, nread = yield partial(self._read_io, locs, seeds, nowait)
        except BackingCorrupt:
            self.counters.corrupt += 1
            raise
        except BackingIOError:
            self.counters.io_errors += 1
            raise
        c = self.counters
        c.bd_reads += len(locs)
        c.read_bytes += nread
        return cast(list[bytes], out)

    def _op_release(self, segs: list[int]) -> _Op[None]:
        if not segs:
            return
        ranges = self._start_release(segs)
        try:
            results = yield partial(self._release_io, ranges)
        finally:
            self._end_release(segs)
        c = self.counters
        for (_, n), r in zip(ranges, results, strict=True):
            if r == _RELEASED:
                c.punched_bytes += n
            elif r == _RELEASE_UNSUPPORTED:
                c.punch_unsupported += 1
            else:
                c.io_errors += 1

    def _op_free(self, locs: Iterable[int]) -> _Op[None]:
        yield from self._op_release(self._free_checked(locs))

    def _op_clean(self, max_segments: int, threshold: float) -> _Op[Cleaning]:
        result = Cleaning()
        for seg in self._victims(max_segments, threshold):
            args = self._clean_begin(seg)
            done = False
            try:
                try:
                    payloads, nread = yield partial(self._clean_read, *args)
                except BackingIOError:
                    self.counters.io_errors += 1
                    raise
                self.counters.read_bytes += nread
                objs, olds = self._clean_select(seg, args[2], payloads, result)
                if objs:
                    try:
                        new = yield from self._op_write(objs, cleaning=True)
                    except BackingFull:
                        break
                    result.relocations.extend(zip(olds, new, strict=True))
                    self.counters.moved_objects += len(olds)
                    self.counters.moved_bytes += sum(map(len, objs))
                done = True
            finally:
                empty = self._clean_end(seg, result, done)
                yield from self._op_release(empty)
        return result

    def _run(self, op: _Op[_T]) -> _T:
        """Drive ``op`` with its jobs run inline (the sync API)."""
        self._check_open()
        try:
            job = next(op)
            while True:
                try:
                    res = job()
                except BaseException as e:  # noqa: BLE001 - handed to the operation
                    job = op.throw(e)
                else:
                    job = op.send(res)
        except StopIteration as stop:
            return cast(_T, stop.value)

    async def _arun(
        self, op: _Op[_T], undo: Callable[[_T], _Op[None]] | None = None
    ) -> _T:
        """Drive ``op`` with its jobs run in the store's threads (the async API). A caller
        cancelled meanwhile gets CancelledError only once the operation is complete, and after
        ``undo`` of its result (a write's objects are freed again), so no state is lost."""
        self._check_open()
        value, cancelled = await self._adrive(op)
        if cancelled:
            if undo is not None:
                await self._adrive(undo(value))
            raise asyncio.CancelledError
        return value

    async def _adrive(self, op: _Op[_T]) -> tuple[_T, bool]:
        """Run ``op`` to its end whatever happens to the caller: (its value, cancelled)."""
        loop = asyncio.get_running_loop()
        cancelled = False
        try:
            job = next(op)
            while True:
                if self._closed:  # closed under it (its caller was cancelled): no more I/O
                    job = op.throw(
                        BackingIOError(f"{self.path}: the backing store is closed", err=errno.EBADF)
                    )
                    continue
                fut = loop.run_in_executor(self._executor, job)
                self._inflight.add(fut)
                fut.add_done_callback(self._inflight.discard)
                while not fut.done():
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        cancelled = True
                    except BaseException:  # noqa: BLE001 - read from fut below
                        pass
                exc = fut.exception()
                job = op.throw(exc) if exc is not None else op.send(fut.result())
        except StopIteration as stop:
            return cast(_T, stop.value), cancelled

    # --- the synchronous API (one thread, no async call in flight) --------------------------

    def write_many_sync(self, objs: Sequence[Buffer]) -> list[int]:
        """Store ``objs`` (each 1..``max_object`` bytes, any buffer, unchanged until the call
        returns); their locators, in order. All or nothing: raises BackingFull, BudgetSpent,
        BackingIOError, ValueError."""
        if not objs:
            return []
        locs = self._run(self._op_write(objs))
        self.counters.bd_writes += len(objs)
        return locs

    def read_sync(self, loc: int) -> bytes:
        """The object at ``loc``. Raises BackingCorrupt, BackingIOError."""
        return self._run(self._op_read([loc]))[0]

    def read_many_sync(self, locs: Sequence[int]) -> list[bytes]:
        """The objects at ``locs``, in order (raises for the first that fails)."""
        if not locs:
            return []
        return self._run(self._op_read(locs))

    def free_sync(self, locs: Iterable[int]) -> None:
        """Free ``locs``; segments they empty are given back. Raises ValueError for a locator
        that is not live (nothing freed then)."""
        self._run(self._op_free(locs))

    def clean_sync(self, max_segments: int = 1, threshold: float = CLEAN_THRESHOLD) -> Cleaning:
        """Clean up to ``max_segments`` victims (see the module doc): their live objects are
        copied; the caller switches each ``old`` to ``new`` and frees ``old``. Stops early when
        there is no room to copy into."""
        return self._run(self._op_clean(max_segments, threshold))

    def datasync(self) -> None:
        """Every object written so far on stable storage (``fdatasync``; blocking, any thread:
        a snapshot that references objects calls it before it is committed, and fails with
        the OSError as a snapshot file's own write would)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the file (async work must have been awaited: see :meth:`aclose`)."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        os.close(self._fd)

    # --- the async API (event-loop thread only) ---------------------------------------------

    async def write_many(self, objs: Sequence[Buffer]) -> list[int]:
        """As :meth:`write_many_sync`, the I/O in the store's threads. Cancelled, it waits for
        its write and frees the objects again before raising CancelledError."""
        if not objs:
            return []
        locs = await self._arun(self._op_write(objs), undo=self._op_free)
        self.counters.bd_writes += len(objs)
        return locs

    async def read(self, loc: int) -> bytes:
        """As :meth:`read_sync`: from the page cache at once, or in a thread."""
        return (await self.read_many([loc]))[0]

    async def read_many(self, locs: Sequence[int]) -> list[bytes]:
        """As :meth:`read_many_sync`: from the page cache at once, or in a thread."""
        if not locs:
            return []
        locs = list(locs)
        got = self.read_cached(locs)
        if got is not None:
            return got
        return await self._arun(self._op_read(locs))

    def read_cached(self, locs: list[int]) -> list[bytes] | None:
        """The objects of ``locs`` (a few) when the page cache holds all their bytes: read here
        with RWF_NOWAIT, a copy from memory the kernel refuses rather than wait for the device,
        then checked and counted as every read is. None, with nothing done, as soon as one
        extent is not all in the cache (or the file ends before it): the threads read them."""
        if not self._nowait or len(locs) > CACHED_READ_MAX_OBJECTS:
            return None
        try:
            return self._run(self._op_read(locs, nowait=True))
        except _NotCached as e:
            if e.unsupported:  # not asked again for this store
                self._nowait = False
            return None

    async def free(self, locs: Iterable[int]) -> None:
        """As :meth:`free_sync`; the punches run in a thread, and a segment given back is
        reused only once its punch has returned (cancelled, the objects are freed all the
        same)."""
        await self._arun(self._op_free(locs))

    async def clean(self, max_segments: int = 1, threshold: float = CLEAN_THRESHOLD) -> Cleaning:
        """As :meth:`clean_sync`, the reads and writes in threads (cancelled: the copies made
        are freed again, the victims stay as they were)."""
        return await self._arun(
            self._op_clean(max_segments, threshold),
            undo=lambda done: self._op_free(new for _, new in done.relocations),
        )

    async def aclose(self) -> None:
        """Wait for the I/O in flight, then close."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self.close()

    # --- helpers of the operations ------------------------------------------------------------

    def _free_checked(self, locs: Iterable[int]) -> list[int]:
        """Free ``locs`` after checking them all (a bad one frees nothing)."""
        found = [(loc, *self._find(loc)) for loc in locs]
        if len({loc for loc, _, _ in found}) != len(found):
            raise ValueError("a locator is freed twice")
        return self._kill_found(found)

    def _seeds(self, locs: Sequence[int]) -> list[int]:
        """The CRC seeds of the segments of ``locs``; ValueError for a locator that is not live
        (a freed object is never read back, even while its bytes are still there)."""
        seed, find = self._seed, self._find
        return [seed[find(loc)[0]] for loc in locs]

    def _victims(self, max_segments: int, threshold: float) -> list[int]:
        """Up to ``max_segments`` sealed segments, idle and not pinned, with live bytes under
        ``threshold`` of a segment, the emptiest first (vectorised: no Python loop over the
        segments)."""
        state, live, pending = self._arrays()
        cand = np.flatnonzero(
            (state == SEALED) & (pending == 0) & (live < threshold * self.segment_size)
        )
        skip = self._pinned | self._cleaning
        if skip:
            cand = cand[~np.isin(cand, np.fromiter(skip, dtype=np.int64, count=len(skip)))]
        best = cand[np.argsort(live[cand], kind="stable")[:max_segments]]
        return [int(x) for x in best]

    def _arrays(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint64],
                               npt.NDArray[np.uint32]]:
        """Copies of the state, live-bytes and pending columns as numpy arrays."""
        n = len(self._state)
        return (
            np.frombuffer(self._state, dtype=np.uint8, count=n).copy(),
            np.frombuffer(self._live_bytes, dtype=np.uint64, count=n).copy(),
            np.frombuffer(self._pending, dtype=np.uint32, count=n).copy(),
        )

    def _clean_begin(self, seg: int) -> tuple[int, int, list[int], int]:
        self._cleaning.add(seg)
        arr, dead = self._locs[seg], self._dead[seg]
        assert arr is not None and dead is not None
        live = [loc for loc, d in zip(arr, dead, strict=True) if not d]
        return seg, self._fill[seg], live, self._seed[seg]

    def _clean_select(
        self, seg: int, locs: list[int], payloads: list[bytes | None], result: Cleaning
    ) -> tuple[list[bytes], list[int]]:
        """The objects still live after the read, to move; corrupt ones pin the segment."""
        arr, dead = self._locs[seg], self._dead[seg]
        assert arr is not None and dead is not None
        objs: list[bytes] = []
        olds: list[int] = []
        for loc, payload in zip(locs, payloads, strict=True):
            if dead[bisect_left(arr, loc)]:
                continue
            if payload is None:
                self.counters.corrupt += 1
                result.corrupt.append(loc)
                self._pinned.add(seg)
                continue
            objs.append(payload)
            olds.append(loc)
        return objs, olds

    def _clean_end(self, seg: int, result: Cleaning, done: bool) -> list[int]:
        """A victim done (``done``: its live objects were moved, but corrupt ones): the
        segments to give back (the victim, if the caller freed all its objects meanwhile)."""
        self._cleaning.discard(seg)
        if done:
            result.segments += 1
            self.counters.cleaned_segments += 1
        return [seg] if self._releasable(seg) else []

    def _check_open(self) -> None:
        if self._closed:
            raise BackingIOError(f"{self.path}: the backing store is closed", err=errno.EBADF)

    # --- budget and figures -----------------------------------------------------------------

    def set_write_limit(self, nbytes: int | None) -> None:
        """Allow ``nbytes`` more bytes of writes (zram writeback_limit; set again to reset),
        or None for no limit. Cleaning is charged but never refused."""
        if nbytes is not None and nbytes < 0:
            raise ValueError("write limit must be >= 0")
        self.write_limit = nbytes

    def used_bytes(self) -> int:
        """Bytes of the segments in use (open, sealed or being given back)."""
        return (len(self._state) - len(self._free)) * self.segment_size

    def cleanable_bytes(self) -> int:
        """Dead bytes in sealed segments (what cleaning could win at most)."""
        return self._dead_sealed

    def generations(self, locs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The sequence number of the segment each of the live locators ``locs`` lies in (its
        generation: a segment given back and written again has a new one), vectorised. Whoever
        keeps locators outside the process (a snapshot) checks them against it when it opens the
        store again: the same locator in a new generation is other data."""
        if not len(locs):
            return np.zeros(0, np.uint64)
        off = (locs.astype(np.uint64) >> np.uint64(LEN_BITS)) * np.uint64(ALIGN)
        segs = (off - np.uint64(self._data_offset)) // np.uint64(self.segment_size)
        if len(segs) and int(segs.max()) >= len(self._state):
            raise ValueError(f"a locator lies past the segments in use of {self.path}")
        seq = np.frombuffer(self._seq, dtype=np.uint64, count=len(self._state))
        return seq[segs.astype(np.int64)].copy()

    def stat(self) -> dict[str, int]:
        """Counters and gauges: zram's bd_stat in objects (``bd_count`` live, ``bd_reads``,
        ``bd_writes``; the device converts to pages), the payload bytes live, the segments in use
        (``used_bytes``), the capacity (0: grows), what the file system holds for the file, bytes
        read, written and given back, errors and refusals, cleaning's work, and the write budget
        left (-1: no limit)."""
        c = self.counters
        return {
            "bd_count": self._live_objects,
            "bd_reads": c.bd_reads,
            "bd_writes": c.bd_writes,
            "live_bytes": self._live_payload,
            "used_bytes": self.used_bytes(),
            "capacity_bytes": self.header.capacity,
            "file_allocated_bytes": osio.allocated_bytes(self._fd) if not self._closed else 0,
            "read_bytes": c.read_bytes,
            "write_bytes": c.write_bytes,
            "punched_bytes": c.punched_bytes,
            "punch_unsupported": c.punch_unsupported,
            "io_errors": c.io_errors,
            "full_refusals": c.full_refusals,
            "budget_refusals": c.budget_refusals,
            "corrupt": c.corrupt,
            "cleaned_segments": c.cleaned_segments,
            "moved_objects": c.moved_objects,
            "moved_bytes": c.moved_bytes,
            "write_limit": -1 if self.write_limit is None else self.write_limit,
        }


def _open(path: str, *, create: bool) -> tuple[int, bool]:
    try:
        return osio.open_exclusive(path, create=create)
    except osio.BusyError as e:
        raise BackingOpenError(str(e.strerror)) from None
    except ValueError as e:
        raise BackingOpenError(str(e)) from None


def _write_all(fd: int, data: bytes, offset: int) -> None:
    _writev_all(fd, [data], offset)


def _writev_all(fd: int, iov: list[Buffer], offset: int) -> None:
    """pwritev all of ``iov`` at ``offset`` (IOV_MAX at a time; a short write is retried for
    its rest, and a write of nothing is ENOSPC)."""
    for k in range(0, len(iov), MAX_IOV):
        part = iov[k : k + MAX_IOV]
        total = sum(len(b) for b in part)
        done = os.pwritev(fd, part, offset)
        if done < total:
            rest = memoryview(b"".join(part))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                rest = rest[n:]
                done += n
        offset += total
