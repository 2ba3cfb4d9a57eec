"""ZramDevice: zram block semantics on byte ranges, over a page table, a pool and a codec.

Theory of operation
-------------------
The device is an array of 4 KiB pages (:mod:`zramd.device.table`). A write splits its range into
pages; partial pages are read, patched and rewritten (read-modify-write). Each page is checked for
a same-fill word first (stored in the table, nothing allocated), else compressed; a page whose
compressed size reaches the huge threshold (``pool.huge_class_size`` by default, as zram) is
stored raw. Reads walk back: EMPTY -> zeros, SAME -> the word repeated, STORED -> decompress the
pool object, HUGE -> the raw object. A decompression failure or a wrong length is DeviceIOError.

Invariants
~~~~~~~~~~
* Failure atomicity: a write stores *every* new object in the pool before any table slot is
  switched; on PoolFull the objects already stored are freed and NoSpace is raised, so nothing
  changed and the old data stays readable (``failed_writes``++).
* A slot switches to its new entry only after the new bytes are stored; then the old object is
  freed. Trim frees only whole pages (partial pages are left as they are, as zram);
  write_zeroes frees whole pages and zeroes partial ones by read-modify-write.
* All table/pool/stats mutation happens on the calling thread; for the async API that is the
  event-loop thread. Worker threads only run pure functions (same-fill + compress, decompress)
  on bytes copied out on the loop thread, so pool compaction can never race with them.
* Ordering of overlapping requests: a mutating request that must wait (because it is offloaded
  to a thread, or overlaps one that is) registers its page range; later mutating requests
  overlapping a registered range wait for it in arrival order. Requests that run inline (small,
  no overlap) complete without yielding, so they are atomic with respect to everything else.
  Reads never wait: they take a snapshot of the table and pool bytes on the loop thread in one
  go, so they see every page either before or after any write, never torn.
* Native batches (:mod:`zramd.compress.native`, when built): requests of at least
  ``native_min_pages`` pages whose codec has a native form run their codec loop as one C call
  instead of a Python loop per page; reads of at least ``native_offload_min_pages`` run it in
  the two workers with the GIL released, on bytes copied out on the loop thread. The table and
  pool are still touched only on the calling thread, and the pages are the same as the Python
  loops produce.
* ``close()``/``reset()`` must not be called while requests are in flight (the server drains
  first).

Knows nothing of NBD, sockets or pool internals; uses only the Pool API (store/load/free/...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from zramd.allocator import MemoryBudget, Pool, PoolFull
from zramd.compress import Codec, CodecError, get_codec, native
from zramd.device.interface import Buffer, DeviceIOError, NoSpace, ReadResult, ZeroExtents
from zramd.device.samefill import WORD_SIZE, ZERO_PAGE, fill_page, zeros
from zramd.device.table import (
    EMPTY,
    HUGE,
    MAX_CODECS,
    PAGE_SHIFT,
    PAGE_SIZE,
    SAME,
    STORED,
    PageTable,
)
from zramd.stats import DeviceStats

PAGE_MASK = PAGE_SIZE - 1
#: requests of at least this many pages do their compression / decompression in a worker thread
#: (a thread hop costs tens of microseconds: not worth it for a few pages)
OFFLOAD_MIN_PAGES = 16
#: what the server's devices use instead (``offload_min_pages``): measured on the 2-core machine
#: (docs/performance.md), a worker thread *loses* to the loop thread on 1 MiB requests, because
#: the workers need the GIL for their per-page Python (slicing, same-fill test, appends) and
#: contend with the loop thread for it: in-process 1 MiB reads 1.0-1.5 GB/s offloaded (split or
#: not) vs 1.5-3.2 GB/s inline. So requests up to 4 MiB run inline (a loop stall of at most a few
#: ms); only larger ones go to the workers.
SERVER_OFFLOAD_MIN_PAGES = 1024
#: block_status returns at most this many extents (2^20 pages = 4 GiB, the largest NBD length)
MAX_EXTENTS = 1 << 20
#: block_status ranges up to this many pages are classified in plain Python (numpy's fixed cost
#: dominates below it)
SMALL_STATUS_PAGES = 16
#: freed pool pages kept warm for reuse (counted in mem_used_total, dropped first when a store
#: would pass the limit). Without it every huge-page overwrite costs an madvise + a page fault
#: (about 15 us); with it about 2 us. 1 MiB, so that a stream of 1 MiB overwrites reuses the
#: zspages the previous request emptied instead of faulting in fresh ones (seq overwrite +10-20%).
POOL_CACHE_PAGES = 256
#: trim/discard ranges up to this many pages are freed entry by entry rather than vectorised
SMALL_DISCARD_PAGES = 8
#: with the native extension, requests of at least this many pages run their codec loop as one C
#: batch (on the calling thread below ``native_offload_min_pages``, else in the workers)
NATIVE_MIN_PAGES = 8
#: reads of at least this many pages run their C batch in the workers, split in two, whatever
#: ``offload_min_pages`` says. Measured with fio 1 MiB reads QD4 (docs/performance.md): inline C
#: 1040 MiB/s, in the workers 1500 MiB/s (the loop thread serves the socket meanwhile). Writes
#: stay inline below ``offload_min_pages``: their commit (pool stores) needs the loop thread
#: anyway, they gained nothing in the workers, and inline their short-lived buffers stay out of
#: the workers' malloc arenas (in the workers: +25% RSS in an nbdcopy copy-in).
NATIVE_OFFLOAD_MIN_PAGES = 256
#: writes of at least this many pages switch their table entries with vectorised operations
BATCH_COMMIT_PAGES = 16
#: offloaded requests of at least this many pages are split into this many parts, one per codec
#: worker, so one large request keeps both cores busy (the device's executor has 2 workers).
#: Not 1 MiB requests: with several in flight the workers are busy anyway, and the second hop
#: cost 6% of seq 1M read QD4 (1,550 vs 1,650 MiB/s)
SPLIT_PARTS = 2
SPLIT_MIN_PAGES = 512

_from_bytes = int.from_bytes

#: a prepared page: (state, fill word or object size, payload to store or None)
Prepared = tuple[int, int, "bytes | None"]


def prepare_page(page: bytes, compress: Callable[[bytes], bytes], threshold: int) -> Prepared:
    """Pure: classify one full page (bytes) as SAME / STORED / HUGE and produce its payload."""
    # first byte vs the last word's first byte: a cheap necessary condition (as zram's
    # first-vs-last word check) that rejects most pages before the full memcmp
    if page[0] == page[-WORD_SIZE] and page[WORD_SIZE:] == page[:-WORD_SIZE]:
        return (SAME, _from_bytes(page[:WORD_SIZE], "little"), None)
    comp = compress(page)
    n = len(comp)
    if n >= threshold:
        return (HUGE, PAGE_SIZE, page)
    return (STORED, n, comp)


#: prepares the whole pages of a buffer (a multiple of PAGE_SIZE bytes), in order
PrepareMany = Callable[["bytes | memoryview"], list[Prepared]]


def python_preparer(compress: Callable[[bytes], bytes], threshold: int) -> PrepareMany:
    """:func:`prepare_page` over every page of a buffer (the per-page Python loop)."""

    def prepare_many(buf: bytes | memoryview) -> list[Prepared]:
        return [
            prepare_page(bytes(buf[pos : pos + PAGE_SIZE]), compress, threshold)
            for pos in range(0, len(buf), PAGE_SIZE)
        ]

    return prepare_many


def native_preparer(kind: int, level: int, threshold: int) -> PrepareMany:
    """The same with the C batch (``zramd._native.prepare_pages``, GIL released)."""
    prepare_pages = native.module().prepare_pages

    def prepare_many(buf: bytes | memoryview) -> list[Prepared]:
        return prepare_pages(buf, kind, level, threshold, SAME, STORED, HUGE)

    return prepare_many


def _prepare_part(
    start: int,
    stop: int,
    head: bytes | None,
    mv: memoryview,
    mid_start: int,
    tail: bytes | None,
    npages: int,
    prepare_many: PrepareMany,
) -> list[Prepared]:
    """Pure (may run in a worker thread): prepare pages ``[start, stop)`` of a write of
    ``npages`` pages (page 0 is ``head`` if given, the last is ``tail`` if given, the rest full
    pages of ``mv`` from ``mid_start``), so the pages of one request can be split between
    workers. The full pages in between go to ``prepare_many`` in one call."""
    out: list[Prepared] = []
    lo, hi = start, stop
    if lo == 0 and head is not None:
        out += prepare_many(head)
        lo = 1
    tail_here = tail is not None and hi == npages
    if tail_here:
        hi -= 1
    if hi > lo:
        skew = mid_start - (PAGE_SIZE if head is not None else 0)
        out += prepare_many(mv[skew + (lo << PAGE_SHIFT) : skew + (hi << PAGE_SHIFT)])
    if tail_here:
        assert tail is not None
        out += prepare_many(tail)
    return out


def _decompress_part(start: int, stop: int, snap: list[Any]) -> bytes:
    """Pure (runs in a worker thread): decompress items ``[start, stop)`` of ``snap`` and join
    them into one buffer, so the pages of one read can be split between workers."""
    parts: list[bytes] = []
    for i in range(start, stop):
        item = snap[i]
        if type(item) is tuple:
            parts.append(item[0].decompress(item[1], PAGE_SIZE))
        else:
            parts.append(item)
    return b"".join(parts)


def _native_decode_part(start: int, stop: int, snap: list[Any], kind: int, out: memoryview) -> None:
    """Pure (runs in a worker thread): decode items ``[start, stop)`` of a native snapshot into
    their pages of ``out``. Items are page bytes, a shorter blob of ``kind``, ``(kind, blob)``
    for the C loop, or ``(codec, blob)`` for a codec without a native form (decoded here)."""
    items = snap[start:stop]
    if not kind:  # the general snapshot (kind 0) may hold (codec, blob) items: decode them here
        for i, item in enumerate(items):
            if type(item) is tuple and type(item[0]) is not int:
                items[i] = item[0].decompress(item[1], PAGE_SIZE)
    view = out[start << PAGE_SHIFT : stop << PAGE_SHIFT]
    bad = native.module().decompress_pages(view, items, kind)
    if bad >= 0:
        raise CodecError(f"page {start + bad} of the request does not decode")


def _is_zero(mv: memoryview) -> bool:
    """Whether ``mv`` (a multiple of 8 bytes) is all zero: first/last word first, then one
    vectorised pass (memoryview ``==`` compares item by item; numpy does not)."""
    words = np.frombuffer(mv, dtype=np.uint64)
    return bool(words[0] == 0 and words[-1] == 0 and not words.max())  # max: 3x any() here


def _zero_extents(zero: list[int], offset: int, length: int) -> ZeroExtents:
    """The zero pages (ascending indices) of a read of ``[offset, offset+length)`` as runs
    ``(offset relative to the request, length)``, merged and clipped to the request."""
    out: ZeroExtents = []
    if not zero:
        return out
    end = offset + length
    run_start = prev = zero[0]
    for idx in zero[1:]:
        if idx != prev + 1:
            a = max(run_start << PAGE_SHIFT, offset)
            out.append((a - offset, min((prev + 1) << PAGE_SHIFT, end) - a))
            run_start = idx
        prev = idx
    a = max(run_start << PAGE_SHIFT, offset)
    out.append((a - offset, min((prev + 1) << PAGE_SHIFT, end) - a))
    return out


class _Range:
    """A registered in-flight mutating request over pages ``[first, last]``."""

    __slots__ = ("first", "last", "done")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.done = asyncio.Event()


class ZramDevice:
    """A zram-like compressed RAM block device (implements ``BlockDevice``).

    ``size`` is rounded up to 4096. ``algorithm``/``level``/``dictionary`` pick the codec for
    new pages (see :func:`zramd.compress.get_codec`; ``set_algorithm`` changes it later, old
    pages keep theirs). ``mem_limit`` caps the pool in bytes (0 = none; settable), ``budget``
    is a :class:`MemoryBudget` shared with other devices. ``huge_threshold`` (default: the
    pool's ``huge_class_size``) is the compressed size from which pages are stored raw.
    ``executor`` runs the compression/decompression of requests of ``offload_min_pages``
    (default OFFLOAD_MIN_PAGES; the server uses SERVER_OFFLOAD_MIN_PAGES) or more
    (None: the loop's default executor). ``pool`` injects a ready pool (tests);
    ``pool_cache_pages`` is the pool's warm cache of freed pages.
    """

    def __init__(
        self,
        size: int,
        *,
        algorithm: str = "lz4",
        level: int | None = None,
        dictionary: bytes | None = None,
        mem_limit: int = 0,
        budget: MemoryBudget | None = None,
        huge_threshold: int | None = None,
        chain_size: int = 8,
        executor: Executor | None = None,
        pool: Pool | None = None,
        pool_cache_pages: int = POOL_CACHE_PAGES,
        offload_min_pages: int = OFFLOAD_MIN_PAGES,
        native_min_pages: int = NATIVE_MIN_PAGES,
        native_offload_min_pages: int = NATIVE_OFFLOAD_MIN_PAGES,
    ) -> None:
        if size < 0:
            raise ValueError("device size must be >= 0")
        if huge_threshold is not None and not 1 <= huge_threshold <= PAGE_SIZE:
            raise ValueError(f"huge_threshold must be in 1..{PAGE_SIZE}")
        if mem_limit < 0:
            raise ValueError("mem_limit must be >= 0")
        if offload_min_pages < 1:
            raise ValueError("offload_min_pages must be >= 1")
        self._offload_pages = offload_min_pages
        self._offload_bytes = offload_min_pages * PAGE_SIZE
        self._native_pages = max(1, native_min_pages)
        self._native_offload_pages = max(1, native_offload_min_pages)
        self._size = (size + PAGE_MASK) & ~PAGE_MASK
        self._npages = self._size >> PAGE_SHIFT
        self._chain_size = chain_size
        self._budget = budget
        self._pool_cache_pages = pool_cache_pages
        self._pool = pool if pool is not None else self._new_pool(mem_limit)
        if pool is not None and mem_limit:
            self._pool.limit = mem_limit
        self._table = PageTable(self._npages)
        self._codecs: list[Codec] = [get_codec(algorithm, level=level, dictionary=dictionary)]
        self._codec_id = 0
        self._huge_threshold_cfg = huge_threshold
        self._threshold = (
            huge_threshold if huge_threshold is not None else self._pool.huge_class_size
        )
        self._stats = DeviceStats(mem_limit=mem_limit)
        self._executor = executor
        self._inflight: list[_Range] = []
        self._closed = False

    def _new_pool(self, mem_limit: int) -> Pool:
        return Pool(
            chain_size=self._chain_size,
            limit=mem_limit,
            budget=self._budget,
            cache_pages=self._pool_cache_pages,
        )

    # --- properties ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def pool(self) -> Pool:
        return self._pool

    @property
    def table(self) -> PageTable:
        return self._table

    @property
    def codec(self) -> Codec:
        """The codec new pages are compressed with."""
        return self._codecs[self._codec_id]

    @property
    def algorithm(self) -> str:
        return self._codecs[self._codec_id].name

    @algorithm.setter
    def algorithm(self, name: str) -> None:
        self.set_algorithm(name)

    def set_algorithm(
        self, name: str, *, level: int | None = None, dictionary: bytes | None = None
    ) -> None:
        """Compress new pages with ``name``; pages already stored keep their codec (per page)."""
        codec = get_codec(name, level=level, dictionary=dictionary)
        for i, c in enumerate(self._codecs):
            if c.name == codec.name and c.params == codec.params:
                self._codec_id = i
                return
        if len(self._codecs) >= MAX_CODECS:
            raise ValueError(f"at most {MAX_CODECS} distinct codec settings per device")
        self._codecs.append(codec)
        self._codec_id = len(self._codecs) - 1

    @property
    def huge_threshold(self) -> int:
        """Compressed sizes >= this are stored raw (HUGE)."""
        return self._threshold

    @property
    def mem_limit(self) -> int:
        return int(self._pool.limit)

    @mem_limit.setter
    def mem_limit(self, value: int) -> None:
        self.set_mem_limit(value)

    def set_mem_limit(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("mem_limit must be >= 0")
        self._pool.limit = limit

    @property
    def stats(self) -> DeviceStats:
        """The live counters, with the pool-derived fields refreshed."""
        s = self._stats
        pool = self._pool
        s.mem_used_total = total = int(pool.total_bytes)
        if total > s.mem_used_max:
            s.mem_used_max = total
        s.pages_compacted = int(pool.pages_compacted)
        s.mem_limit = int(pool.limit)
        return s

    def reset_mem_used_max(self) -> None:
        """Like writing 0 to zram's mem_used_max: restart the peak from the current usage."""
        self._stats.mem_used_max = int(self._pool.total_bytes)

    # --- entry bookkeeping (loop thread) ------------------------------------------------------

    def _drop(self, idx: int) -> None:
        """Free the object of entry ``idx`` (if any) and update counters; leaves the entry stale."""
        t = self._table
        st = t.state_mv[idx]
        if st == EMPTY:
            return
        s = self._stats
        s.pages_stored -= 1
        if st == SAME:
            s.same_pages -= 1
            return
        self._pool.free(t.handle_mv[idx])
        s.compr_data_size -= t.size_mv[idx]
        if st == HUGE:
            s.huge_pages -= 1

    def _store_all(self, prepared: Sequence[Prepared]) -> list[int]:
        """Store every payload (0 for SAME); on PoolFull free what was stored and raise NoSpace."""
        pool = self._pool
        store = pool.store
        handles: list[int] = []
        try:
            for _st, _v, payload in prepared:
                handles.append(store(payload) if payload is not None else 0)
        except PoolFull:
            for (_st, _v, payload), h in zip(prepared, handles, strict=False):
                if payload is not None:
                    pool.free(h)
            self._stats.failed_writes += 1
            raise NoSpace("memory limit reached") from None
        return handles

    def _commit(self, indices: Sequence[int], prepared: Sequence[Prepared], codec_id: int) -> None:
        """Store every payload, then switch the slots and free the old objects. All or nothing."""
        if type(indices) is range and len(prepared) >= BATCH_COMMIT_PAGES:
            self._commit_range(indices.start, prepared, codec_id)
            return
        handles = self._store_all(prepared)
        pool = self._pool
        t = self._table
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        s = self._stats
        drop = self._drop
        for idx, (st, v, _payload), h in zip(indices, prepared, handles, strict=True):
            drop(idx)
            state_mv[idx] = st
            s.pages_stored += 1
            if st == SAME:
                handle_mv[idx] = v
                size_mv[idx] = 0
                codec_mv[idx] = 0
                s.same_pages += 1
            else:
                handle_mv[idx] = h
                size_mv[idx] = v
                codec_mv[idx] = codec_id
                s.compr_data_size += v
                if st == HUGE:
                    s.huge_pages += 1
                    s.huge_pages_since += 1
        if handles:
            total = pool.total_bytes
            if total > s.mem_used_max:
                s.mem_used_max = total

    def _commit_range(self, first: int, prepared: Sequence[Prepared], codec_id: int) -> None:
        """``_commit`` of the pages ``[first, first + len(prepared))``: the old entries are freed
        and the new ones set with vectorised table operations (every new entry is live, so the
        whole range of the table is written)."""
        handles = self._store_all(prepared)
        stop = first + len(prepared)
        self._discard(first, stop)
        t = self._table
        states = np.frombuffer(bytes([p[0] for p in prepared]), dtype=np.uint8)
        values = np.array([p[1] for p in prepared], dtype=np.uint64)
        same = states == SAME
        pooled = ~same
        t.state[first:stop] = states
        t.handle[first:stop] = np.where(same, values, np.array(handles, dtype=np.uint64))
        t.size[first:stop] = np.where(same, 0, values)
        t.codec[first:stop] = np.where(same, 0, codec_id)
        nsame = int(np.count_nonzero(same))
        nhuge = int(np.count_nonzero(states == HUGE))
        s = self._stats
        s.pages_stored += len(prepared)
        s.same_pages += nsame
        s.huge_pages += nhuge
        s.huge_pages_since += nhuge
        if nsame < len(prepared):
            s.compr_data_size += int(values[pooled].sum())
            total = self._pool.total_bytes
            if total > s.mem_used_max:
                s.mem_used_max = total

    def _commit_one(self, idx: int, prep: Prepared, codec_id: int) -> None:
        """``_commit`` for one page, without the list bookkeeping (the 4 KiB hot path)."""
        st, v, payload = prep
        s = self._stats
        t = self._table
        if payload is not None:
            pool = self._pool
            try:
                h = pool.store(payload)
            except PoolFull:
                s.failed_writes += 1
                raise NoSpace("memory limit reached") from None
            if t.state_mv[idx] != EMPTY:
                self._drop(idx)
            t.state_mv[idx] = st
            t.handle_mv[idx] = h
            t.size_mv[idx] = v
            t.codec_mv[idx] = codec_id
            s.pages_stored += 1
            s.compr_data_size += v
            if st == HUGE:
                s.huge_pages += 1
                s.huge_pages_since += 1
            total = pool.total_bytes
            if total > s.mem_used_max:
                s.mem_used_max = total
            return
        if t.state_mv[idx] != EMPTY:
            self._drop(idx)
        t.state_mv[idx] = SAME
        t.handle_mv[idx] = v
        t.size_mv[idx] = 0
        t.codec_mv[idx] = 0
        s.pages_stored += 1
        s.same_pages += 1

    def _discard(self, p0: int, p1: int) -> int:
        """Free whole pages ``[p0, p1)`` to EMPTY; returns how many held something."""
        t = self._table
        if p1 - p0 <= SMALL_DISCARD_PAGES:
            n = 0
            state_mv = t.state_mv
            for idx in range(p0, p1):
                if state_mv[idx] != EMPTY:
                    self._drop(idx)
                    state_mv[idx] = EMPTY
                    t.handle_mv[idx] = 0
                    t.size_mv[idx] = 0
                    t.codec_mv[idx] = 0
                    n += 1
            return n
        idx_arr = t.occupied(p0, p1)
        n = len(idx_arr)
        if not n:
            return 0
        same, huge, sizes, _pooled = t.counts(idx_arr)
        free = self._pool.free
        for h in t.pooled_handles(idx_arr):
            free(h)
        t.clear(idx_arr)
        s = self._stats
        s.pages_stored -= n
        s.same_pages -= same
        s.huge_pages -= huge
        s.compr_data_size -= sizes
        return n

    # --- page reads (loop thread) -------------------------------------------------------------

    def _read_page(self, idx: int) -> bytes:
        t = self._table
        st = t.state_mv[idx]
        if st == EMPTY:
            return ZERO_PAGE
        if st == SAME:
            return fill_page(t.handle_mv[idx])
        if st == STORED:
            data = self._pool.load(t.handle_mv[idx], t.size_mv[idx])
            try:
                return self._codecs[t.codec_mv[idx]].decompress(data, PAGE_SIZE)
            except CodecError as exc:
                raise DeviceIOError(f"page {idx}: {exc}") from None
        data = self._pool.load(t.handle_mv[idx], PAGE_SIZE)
        if len(data) != PAGE_SIZE:
            raise DeviceIOError(f"page {idx}: huge object has {len(data)} bytes")
        return data

    def _snapshot(
        self, first: int, last: int, tags: Sequence[Any] | None = None
    ) -> tuple[list[Any], list[int]]:
        """One walk over pages ``[first, last]``: ``(items, zero pages)``. Per page, finished
        bytes, or ``(tag, compressed copy)`` to decode later (maybe off-thread), where the tag
        is the page's codec (or ``tags[codec id]``, e.g. its native kind); and the indices of
        the pages that read as zero (EMPTY or SAME with word 0), ascending."""
        t = self._table
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        load = self._pool.load
        if tags is None:
            tags = self._codecs
        read_page = self._read_page
        out: list[Any] = []
        append = out.append
        zero: list[int] = []
        for idx in range(first, last + 1):
            st = state_mv[idx]
            if st == STORED:
                append((tags[codec_mv[idx]], load(handle_mv[idx], size_mv[idx])))
            elif st == EMPTY or (st == SAME and not handle_mv[idx]):
                append(ZERO_PAGE)
                zero.append(idx)
            else:
                append(read_page(idx))
        return out, zero

    def _snapshot_native(self, first: int, last: int) -> tuple[list[Any], int, list[int]]:
        """``(items, kind, zero pages)``; per page: finished bytes, a blob of ``kind``,
        ``(kind, blob)`` or ``(codec, blob)`` (see :func:`_native_decode_part`)."""
        t = self._table
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        codecs = self._codecs
        tags: list[Any] = []
        for c in codecs:
            k = native.decode_kind(c)
            tags.append(c if k is None else k)
        n = last - first + 1
        cids = bytes(codec_mv[first : last + 1])  # bytes: == is a memcmp (memoryview: per item)
        tag = tags[cids[0]]
        if (
            type(tag) is int
            and bytes(state_mv[first : last + 1]) == bytes((STORED,)) * n
            and cids == bytes((cids[0],)) * n
        ):
            # the common case, every page compressed with one native codec: bare blobs of ``tag``
            load, stop = self._pool.load, last + 1
            handles, sizes = handle_mv[first:stop].tolist(), size_mv[first:stop].tolist()
            return [load(h, size) for h, size in zip(handles, sizes, strict=True)], tag, []
        snap, zero = self._snapshot(first, last, tags)
        return snap, 0, zero

    def _preparer(self, codec_id: int, *, native_ok: bool) -> PrepareMany:
        """How pages are prepared for codec ``codec_id``: the C batch when allowed and the codec
        has a native form, else the Python loop."""
        codec = self._codecs[codec_id]
        kind = native.encode_kind(codec) if native_ok else None
        if kind is not None:
            return native_preparer(kind, codec.level, self._threshold)
        return python_preparer(codec.compress, self._threshold)

    def _native_read_offload(self, npages: int) -> bool:
        """Whether a read of ``npages`` pages runs its C batch in the workers."""
        return npages >= self._native_offload_pages and native.enabled

    def _read_inline(self, npages: int) -> bool:
        """Whether a read of ``npages`` pages is done on the calling thread."""
        return npages < self._offload_pages and not self._native_read_offload(npages)

    def _write_inline(self, first: int, last: int) -> bool:
        """Whether a write of pages ``[first, last]`` is done at once: fewer than
        ``offload_min_pages`` pages, and no overlapping request in flight to wait for."""
        return last - first + 1 < self._offload_pages and (
            not self._inflight or not self._overlapping(first, last)
        )

    # --- sync API (tests, and the async methods' inline path) ---------------------------------

    def _check(self, offset: int, length: int) -> None:
        assert not self._closed, "device closed"
        assert 0 <= offset and 0 <= length and offset + length <= self._size, (offset, length)

    def read_sync(self, offset: int, length: int) -> Buffer:
        """Return ``length`` bytes at ``offset``. Raises DeviceIOError."""
        if length == 0:
            self._check(offset, length)
            return b""
        return self._read_here(offset, length)[0]

    def _read_here(self, offset: int, length: int) -> ReadResult:
        """A READ (``length`` > 0) in one walk of the table, decoded on this thread."""
        self._check(offset, length)
        skip = offset & PAGE_MASK
        first = offset >> PAGE_SHIFT
        try:
            if length == PAGE_SIZE and not skip:
                t = self._table
                st = t.state_mv[first]
                if st == EMPTY or (st == SAME and t.handle_mv[first] == 0):
                    return ZERO_PAGE, [(0, PAGE_SIZE)]
                return self._read_page(first), []
            last = (offset + length - 1) >> PAGE_SHIFT
            n = last - first + 1
            buf: Buffer
            if n >= self._native_pages and native.enabled:
                snap, kind, zero = self._snapshot_native(first, last)
                if len(zero) == n:
                    return zeros(length), [(0, length)]
                buf = native.module().new_buffer(n << PAGE_SHIFT)  # not zeroed: all overwritten
                _native_decode_part(0, n, snap, kind, memoryview(buf))
            else:
                snap, zero = self._snapshot(first, last)
                if len(zero) == n:
                    return zeros(length), [(0, length)]
                buf = _decompress_part(0, n, snap)
        except DeviceIOError:
            self._stats.failed_reads += 1  # per request, as zram counts per bio
            raise
        except CodecError as exc:
            self._stats.failed_reads += 1
            raise DeviceIOError(str(exc)) from None
        if skip or len(buf) != length:
            buf = buf[skip : skip + length]
        return buf, _zero_extents(zero, offset, length)

    def _edges(self, offset: int, mv: memoryview) -> tuple[bytes | None, int, int, bytes | None]:
        """Loop thread: patched head/tail pages (RMW) and the byte span of full middle pages."""
        n = len(mv)
        skip = offset & PAGE_MASK
        first = offset >> PAGE_SHIFT
        head: bytes | None = None
        pos = 0
        if skip or n < PAGE_SIZE:
            take = min(PAGE_SIZE - skip, n)
            page = bytearray(self._read_page(first))
            page[skip : skip + take] = mv[:take]
            head = bytes(page)
            pos = take
        mid_end = pos + ((n - pos) & ~PAGE_MASK)
        tail: bytes | None = None
        if mid_end < n:
            page = bytearray(self._read_page((offset + mid_end) >> PAGE_SHIFT))
            page[: n - mid_end] = mv[mid_end:]
            tail = bytes(page)
        return head, pos, mid_end, tail

    def _edges_for_write(
        self, offset: int, mv: memoryview
    ) -> tuple[bytes | None, int, int, bytes | None]:
        """``_edges``; an unreadable old page fails the write (failed_writes, as zram)."""
        try:
            return self._edges(offset, mv)
        except DeviceIOError:
            self._stats.failed_writes += 1
            raise

    @staticmethod
    def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return mv

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``. Raises NoSpace (nothing changed) or DeviceIOError."""
        if len(data) == PAGE_SIZE and not offset & PAGE_MASK:
            # hot path: one aligned page (bytes for the fast same-fill memcmp)
            page = data if type(data) is bytes else bytes(data)
            if len(page) == PAGE_SIZE:
                self._check(offset, PAGE_SIZE)
                cid = self._codec_id
                prep = prepare_page(page, self._codecs[cid].compress, self._threshold)
                self._commit_one(offset >> PAGE_SHIFT, prep, cid)
                return
        mv = self._as_bytes_view(data)
        n = len(mv)
        self._check(offset, n)
        if not n:
            return
        if n > PAGE_SIZE and not (offset | n) & PAGE_MASK and _is_zero(mv):
            # all-zero whole pages: same-fill them in one vectorised step, nothing compressed
            self._fill_zero(offset >> PAGE_SHIFT, (offset + n) >> PAGE_SHIFT)
            return
        cid = self._codec_id
        head, mid_start, _mid_end, tail = self._edges_for_write(offset, mv)
        npages = ((offset + n - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1
        prepare_many = self._preparer(cid, native_ok=npages >= self._native_pages)
        prepared = _prepare_part(0, npages, head, mv, mid_start, tail, npages, prepare_many)
        first = offset >> PAGE_SHIFT
        self._commit(range(first, first + len(prepared)), prepared, cid)

    def trim_sync(self, offset: int, length: int) -> None:
        """Free the whole pages inside the range; partial pages are left as they are (zram)."""
        self._check(offset, length)
        p0 = (offset + PAGE_MASK) >> PAGE_SHIFT
        p1 = (offset + length) >> PAGE_SHIFT
        if p1 > p0:
            if self._discard(p0, p1) and p1 - p0 > SMALL_DISCARD_PAGES:
                # a discard is the user giving memory back (fstrim, swap discard): the warm
                # cache goes too, so RSS falls by what was freed
                self._pool.drop_cache()
            self._stats.notify_free += p1 - p0

    def write_zeroes_sync(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        """Zero the range: whole pages become EMPTY (or SAME-zero), partial pages are patched."""
        self._check(offset, length)
        if not length:
            return
        end = offset + length
        p0 = (offset + PAGE_MASK) >> PAGE_SHIFT
        p1 = end >> PAGE_SHIFT
        # partial pages first (they may need storage: NoSpace must leave everything unchanged)
        parts: list[tuple[int, int]] = []  # (offset, length) within one page each
        pos = offset
        if offset & PAGE_MASK:
            head_end = min(end, (offset & ~PAGE_MASK) + PAGE_SIZE)
            parts.append((offset, head_end - offset))
            pos = head_end
        if end & PAGE_MASK and pos < end:
            tail_start = max(pos, end & ~PAGE_MASK)
            parts.append((tail_start, end - tail_start))
        if parts:
            cid = self._codec_id
            compress, threshold = self._codecs[cid].compress, self._threshold
            indices: list[int] = []
            prepared: list[Prepared] = []
            for off, n in parts:
                idx = off >> PAGE_SHIFT
                if self._table.state_mv[idx] == EMPTY:
                    continue  # already reads as zeros
                try:
                    page = bytearray(self._read_page(idx))
                except DeviceIOError:
                    self._stats.failed_writes += 1
                    raise
                skip = off & PAGE_MASK
                assert skip + n <= PAGE_SIZE
                page[skip : skip + n] = bytes(n)
                indices.append(idx)
                prepared.append(prepare_page(bytes(page), compress, threshold))
            if indices:
                self._commit(indices, prepared, cid)
        if p1 > p0:
            if punch_hole:
                self._discard(p0, p1)
                self._stats.notify_free += p1 - p0
            else:
                self._fill_zero(p0, p1)

    def _fill_zero(self, p0: int, p1: int) -> None:
        """Whole pages ``[p0, p1)`` become SAME with fill word 0 (vectorised)."""
        t = self._table
        if p1 - p0 > SMALL_DISCARD_PAGES and not (t.state[p0:p1] != SAME).any():
            if not t.handle[p0:p1].max():
                return  # already zero-filled (a zero overwrite): nothing changes
        self._discard(p0, p1)
        self._table.state[p0:p1] = SAME  # handle (the fill word) is already 0 after _discard
        self._stats.pages_stored += p1 - p0
        self._stats.same_pages += p1 - p0

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents (length, STATE_HOLE|STATE_ZERO flags) from ``offset``, adjacent equal merged.

        EMPTY pages are hole|zero, SAME-zero pages are zero, everything else 0. The extents
        cover exactly ``[offset, offset+length)`` unless MAX_EXTENTS cuts the list short.
        """
        self._check(offset, length)
        if not length:
            return []
        end = offset + length
        p0 = offset >> PAGE_SHIFT
        p1 = (end + PAGE_MASK) >> PAGE_SHIFT
        t = self._table
        if p1 - p0 <= SMALL_STATUS_PAGES:
            state_mv, handle_mv = t.state_mv, t.handle_mv
            ext: list[list[int]] = []
            pos = offset
            for idx in range(p0, p1):
                st = state_mv[idx]
                fl = 3 if st == EMPTY else (2 if st == SAME and handle_mv[idx] == 0 else 0)
                stop = min((idx + 1) << PAGE_SHIFT, end)
                if ext and ext[-1][1] == fl:
                    ext[-1][0] += stop - pos
                else:
                    ext.append([stop - pos, fl])
                pos = stop
            return [(n, fl) for n, fl in ext]
        cls = t.classify(p0, p1)
        starts = np.flatnonzero(cls[1:] != cls[:-1]) + 1  # first page of each later run
        stop_page = p1 - p0
        if len(starts) >= MAX_EXTENTS:  # keep MAX_EXTENTS runs
            stop_page = int(starts[MAX_EXTENTS - 1])
            starts = starts[: MAX_EXTENTS - 1]
        run_start = np.concatenate(([0], starts)).astype(np.int64)
        run_end = np.concatenate((starts, [stop_page])).astype(np.int64)
        byte_start = np.maximum((run_start + p0) << PAGE_SHIFT, offset)
        byte_end = np.minimum((run_end + p0) << PAGE_SHIFT, end)
        lengths = (byte_end - byte_start).tolist()
        flags = cls[run_start].tolist()
        return list(zip(lengths, flags, strict=True))

    # --- synchronous fast path (the server's inline requests) -----------------------------------

    def read_with_zeros_now(self, offset: int, length: int) -> ReadResult | None:
        if not self._read_inline((length + (offset & PAGE_MASK) + PAGE_MASK) >> PAGE_SHIFT):
            return None
        return self._read_here(offset, length)

    def read_now(self, offset: int, length: int) -> tuple[Buffer, bool] | None:
        """``read_with_zeros_now`` as ``(data, whether the whole range reads as zero)``."""
        got = self.read_with_zeros_now(offset, length)
        if got is None:
            return None
        return got[0], got[1] == [(0, length)]

    def write_now(self, offset: int, data: Buffer) -> bool:
        n = len(data) if type(data) is bytes else self._as_bytes_view(data).nbytes
        if n and not self._write_inline(offset >> PAGE_SHIFT, (offset + n - 1) >> PAGE_SHIFT):
            return False
        self.write_sync(offset, data)
        return True

    # --- async API (what the server calls) ----------------------------------------------------

    def _overlapping(self, first: int, last: int) -> list[_Range]:
        return [r for r in self._inflight if r.first <= last and first <= r.last]

    async def _acquire(self, first: int, last: int) -> _Range:
        """Register ``[first, last]`` and wait for earlier overlapping requests (arrival order)."""
        before = self._overlapping(first, last)
        r = _Range(first, last)
        self._inflight.append(r)
        try:
            for other in before:
                await other.done.wait()
        except BaseException:
            self._release(r)
            raise
        return r

    def _release(self, r: _Range) -> None:
        self._inflight.remove(r)
        r.done.set()

    def _run_in_executor(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, offset: int, length: int) -> Buffer:
        """Return ``length`` bytes at ``offset``. Raises DeviceIOError."""
        if not length:
            return self.read_sync(offset, length)
        return (await self.read_with_zeros(offset, length))[0]

    async def read_with_zeros(self, offset: int, length: int) -> ReadResult:
        got = self.read_with_zeros_now(offset, length)
        if got is not None:
            return got
        self._check(offset, length)
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        n = last - first + 1
        try:
            if self._native_read_offload(n):
                snap, kind, zero = self._snapshot_native(first, last)  # no await in between
            else:
                (snap, zero), kind = self._snapshot(first, last), -1
        except DeviceIOError:
            self._stats.failed_reads += 1
            raise
        if len(zero) == n:
            return zeros(length), [(0, length)]
        buf: Buffer
        try:
            if kind >= 0:
                buf = native.module().new_buffer(n << PAGE_SHIFT)  # not zeroed: all overwritten
                await self._in_parts(_native_decode_part, n, snap, kind, memoryview(buf))
            else:
                parts: list[bytes] = await self._in_parts(_decompress_part, n, snap)
                # joining >= 1 MiB releases the GIL for the copy
                buf = parts[0] if len(parts) == 1 else b"".join(parts)
        except CodecError as exc:
            self._stats.failed_reads += 1
            raise DeviceIOError(str(exc)) from None
        skip = offset & PAGE_MASK
        if skip or len(buf) != length:
            buf = buf[skip : skip + length]
        return buf, _zero_extents(zero, offset, length)

    async def _in_parts(self, fn: Callable[..., Any], npages: int, *args: Any) -> list[Any]:
        """Run ``fn(start, stop, *args)`` over the pages ``[0, npages)`` in the executor: one call
        below SPLIT_MIN_PAGES, else SPLIT_PARTS calls at once (both cores busy on one large
        request). Waits for every part even if one fails, then raises the first failure. Returns
        the parts' results in page order."""
        if npages < SPLIT_MIN_PAGES:
            return [await self._run_in_executor(fn, 0, npages, *args)]
        cuts = [npages * k // SPLIT_PARTS for k in range(SPLIT_PARTS + 1)]
        results = await asyncio.gather(
            *[self._run_in_executor(fn, a, b, *args) for a, b in zip(cuts, cuts[1:], strict=False)],
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def write(self, offset: int, data: Buffer) -> None:
        if self.write_now(offset, data):
            return
        n = len(data) if type(data) is bytes else self._as_bytes_view(data).nbytes
        first = offset >> PAGE_SHIFT
        last = (offset + n - 1) >> PAGE_SHIFT
        if last - first + 1 < self._offload_pages:  # small, behind an overlapping request
            r = await self._acquire(first, last)
            try:
                self.write_sync(offset, data)
            finally:
                self._release(r)
            return
        mv = self._as_bytes_view(data)
        self._check(offset, n)
        if not (offset | n) & PAGE_MASK and _is_zero(mv):
            # all-zero whole pages (e.g. a zero-filled 1 MiB write): same-fill in one vectorised
            # step on the loop thread, no compression and no thread hop
            await self._locked(offset, n, lambda: self._fill_zero(first, last + 1))
            return
        r = await self._acquire(first, last)
        try:
            cid = self._codec_id  # after the wait: the algorithm may have changed meanwhile
            head, mid_start, _mid_end, tail = self._edges_for_write(offset, mv)
            npages = last - first + 1
            parts = await self._in_parts(
                _prepare_part,
                npages,
                head,
                mv,
                mid_start,
                tail,
                npages,
                self._preparer(cid, native_ok=True),
            )
            prepared: list[Prepared] = parts[0] if len(parts) == 1 else sum(parts, [])
            self._commit(range(first, first + npages), prepared, cid)
        finally:
            self._release(r)

    async def _locked(self, offset: int, length: int, fn: Callable[[], None]) -> None:
        if not length:
            return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        if not self._inflight or not self._overlapping(first, last):
            fn()
            return
        r = await self._acquire(first, last)
        try:
            fn()
        finally:
            self._release(r)

    async def trim(self, offset: int, length: int) -> None:
        await self._locked(offset, length, lambda: self.trim_sync(offset, length))

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        await self._locked(
            offset,
            length,
            lambda: self.write_zeroes_sync(offset, length, punch_hole=punch_hole),
        )

    async def flush(self) -> None:
        """RAM: every completed write is already visible."""
        return None

    # --- management ---------------------------------------------------------------------------

    def compact(self) -> int:
        """Run pool compaction; returns the pool pages freed."""
        return int(self._pool.compact())

    def reset(self) -> None:
        """Free everything (all pages read as zeros again); counters restart, limit kept."""
        assert not self._inflight, "reset with requests in flight"
        limit = self.mem_limit
        self._pool.close()
        self._pool = self._new_pool(limit)
        self._table.release()
        self._table = PageTable(self._npages)
        if self._huge_threshold_cfg is None:
            self._threshold = self._pool.huge_class_size
        self._stats = DeviceStats(mem_limit=limit)

    def close(self) -> None:
        """Release all memory; the device is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        self._table.release()
