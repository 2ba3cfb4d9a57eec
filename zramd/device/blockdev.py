"""ZramDevice: zram block semantics on byte ranges, over a page store, a codec and an executor.

Theory of operation
-------------------
The device is an array of 4 KiB pages kept by a :class:`~zramd.device.store.PageStore`. A write
splits its byte range into pages; partial pages are read, patched and rewritten
(read-modify-write); the pages are prepared by :mod:`zramd.device.pipeline` (same-fill check,
else compression, HUGE past the threshold: ``pool.huge_class_size`` by default, as zram) and
committed to the store all or nothing. A read snapshots its pages from the store and decodes
them; a decompression failure or a wrong length is DeviceIOError. Trim frees only whole pages
(partial pages are left as they are, as zram); write_zeroes frees whole pages and zeroes partial
ones by read-modify-write.

Cold pages may live in multi-page groups (:mod:`zramd.device.groups`): :meth:`ZramDevice.group`
packs a range, the store reads, kills and re-packs them; to the request paths a GROUPED page is
one more kind of stored page.

Snapshots: :meth:`ZramDevice.snapshot_image` and :meth:`ZramDevice.restore_image` take the
pages out as stored and put them back (:mod:`zramd.device.image`); pages written back are
referenced by locator, and the backing store is pinned (no locator freed) while the image is
taken, or until the device closes for the last snapshot (``final``).

With a backing store (:mod:`zramd.device.backed`), pages may be BACKED: their objects were
written back to it, on demand (:meth:`ZramDevice.writeback`) or under memory pressure. A request
that touches a BACKED page is never done inline (``*_now`` give way): a read awaits the objects
from the store's threads, decodes them with the rest and may promote them to RAM; a partial
write or zeroing reads its BACKED edge pages first. A write that finds no room waits, bounded,
for pressure writeback to make some before it answers NoSpace.

Every request stamps the pages it reads or writes with the store's coarse clock (access
tracking: a read also clears their IDLE mark); served by a loop, the device reads the clock
from a timer every CLOCK_REFRESH seconds (:meth:`ZramDevice.start_clock`) instead of once per
request. Idle marking, the page listing and recompression with secondary algorithms are
:mod:`zramd.device.tiers`' over the store: ``mark_idle``, ``page_states``, ``recompress``.

Each request is done either inline, on the calling thread without yielding, or awaited, its
codec loop in the executor's workers; the choice is made here only (``read_with_zeros_now``,
``write_now``): inline below ``offload_min_pages`` pages when no overlapping request is in
flight, and, with the native extension, reads of ``native_offload_min_pages`` or more always in
the workers (their C batch runs with the GIL released), writes of that size too when their
codec compresses slowly (zstd, lz4hc: ``_write_offload``). Requests of ``native_min_pages`` or more
whose codec has a native form run their codec loop as one C call instead of a Python loop.

Invariants
~~~~~~~~~~
* Failure atomicity: a failed write (NoSpace, DeviceIOError) changes nothing; see the store.
* All table/pool/stats mutation happens on the calling thread; for the async API that is the
  event-loop thread. Workers only run the pipeline's pure functions on bytes copied out on the
  loop thread, so pool compaction can never race with them.
* Ordering of overlapping requests (:mod:`zramd.device.ordering`): a mutating request that must
  wait registers its page range, later overlapping mutating requests wait for it in arrival
  order; inline requests complete without yielding, so they are atomic with respect to
  everything else. Reads never wait: they snapshot the store on the loop thread in one go, so
  they see every page either before or after any write, never torn.
* ``close()``/``reset()`` must not be called while requests are in flight (the server drains
  first).

Knows nothing of NBD, sockets or pool internals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from zramd.allocator import MemoryBudget, Pool
from zramd.backing import CACHED_READ_MAX_OBJECTS, BackingStore
from zramd.compress import Codec, CodecError, get_codec, native
from zramd.device import image, tiers
from zramd.device.backed import HIGH_WATERMARK, LOW_WATERMARK, ROOM_WAIT, Backed, WritebackResult
from zramd.device.groups import MAX_GROUP_PAGES, MIN_MEMBERS, Window
from zramd.device.interface import (
    MAX_EXTENTS,
    Buffer,
    DeviceIOError,
    GroupResult,
    ImageSink,
    ImageSource,
    NoSpace,
    PageState,
    ReadResult,
    RecompressResult,
    Unsupported,
    ZeroExtents,
)
from zramd.device.ordering import InflightRanges
from zramd.device.pipeline import (
    Prepared,
    PrepareMany,
    decompress_part,
    native_decode_part,
    native_preparer,
    pack_groups,
    prepare_page,
    prepare_part,
    python_preparer,
)
from zramd.device.samefill import ZERO_PAGE, all_zero, zeros
from zramd.device.store import SMALL_DISCARD_PAGES, BackedItem, InBacking, PageStore
from zramd.device.table import BACKED, EMPTY, RAW, SAME, PageTable
from zramd.device.tiers import codec_spec, held
from zramd.geometry import PAGE_SHIFT, PAGE_SIZE
from zramd.persist import ImageMeta
from zramd.stats import DeviceStats
from zramd.system import frees_trimmed, trim_heap

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
#: block_status ranges up to this many pages are classified in plain Python (numpy's fixed cost
#: dominates below it)
SMALL_STATUS_PAGES = 16
#: freed pool pages kept warm for reuse (counted in mem_used_total, dropped first when a store
#: would pass the limit). Without it every huge-page overwrite costs an madvise + a page fault
#: (about 15 us); with it about 2 us. 1 MiB, so that a stream of 1 MiB overwrites reuses the
#: zspages the previous request emptied instead of faulting in fresh ones (seq overwrite +10-20%).
POOL_CACHE_PAGES = 256
#: with the native extension, requests of at least this many pages run their codec loop as one C
#: batch (on the calling thread below ``native_offload_min_pages``, else in the workers)
NATIVE_MIN_PAGES = 8
#: reads of at least this many pages run their C batch in the workers, split in two, whatever
#: ``offload_min_pages`` says. Measured with fio 1 MiB reads QD4 (docs/performance.md): inline C
#: 1040 MiB/s, in the workers 1500 MiB/s (the loop thread serves the socket meanwhile). lz4
#: writes stay inline below ``offload_min_pages``: their commit (pool stores) needs the loop
#: thread anyway, they gained nothing in the workers, and inline their short-lived buffers stay
#: out of the workers' malloc arenas (in the workers: +25% RSS in an nbdcopy copy-in). zstd and
#: lz4hc writes of this size compress in the workers (``ZramDevice._write_offload``).
NATIVE_OFFLOAD_MIN_PAGES = 256
#: offloaded requests of at least this many pages are split into this many parts, one per codec
#: worker, so one large request keeps both cores busy (the device's executor has 2 workers).
#: Not 1 MiB requests: with several in flight the workers are busy anyway, and the second hop
#: cost 6% of seq 1M read QD4 (1,550 vs 1,650 MiB/s). Nor 1 MiB reads of zstd groups, since a
#: part's whole groups decode in one C call (fio seq 1M reads QD4 of real files in zstd groups,
#: fresh servers alternating: 899-1,094 MB/s in one part, 879-1,022 in two)
SPLIT_PARTS = 2
SPLIT_MIN_PAGES = 512
#: ... but writes whose codec compresses slowly (zstd, lz4hc) split from 1 MiB: there the
#: compression is most of a request's time (fio seq 1M writes to zstd QD4: 364-420 MB/s in one
#: part, 415-454 in two)
SLOW_WRITE_SPLIT_MIN_PAGES = 256
#: seconds between two readings of the clock while a loop serves the device (start_clock): the
#: access times are 16 s quanta, so requests stamp the last reading instead of each reading the
#: clock (about 0.12 us less per 4 KiB request)
CLOCK_REFRESH = 1.0
#: the codec of multi-page groups, unless the export says otherwise: zstd finds the repetitions
#: across a 64 KiB window that per-page frames cannot. Level 9: a cold page is packed once, in
#: a worker, and reads back as fast whatever the level; on the density benchmark's images
#: level 9 stores 64 KiB windows 1.5-2.5% smaller than level 3 at about 2.5x its CPU (50
#: against 130 MB/s per core on the dev machine)
GROUP_ALGORITHM = "zstd"
GROUP_LEVEL = 9
#: group() packs this many pages per step: their range waits for writes for one step (about a
#: millisecond of compression in a worker), the loop thread only copies blobs out and switches
#: entries. Measured on 256 MiB of real files: copying out 0.16 ms at the median (0.4 at most),
#: installing 0.34 ms (1.1 at most); steps of 256 pages held the loop 0.6 and 1.4 ms at the
#: median (5.6 and 3.4 at most) for the same total time.
GROUP_STEP_PAGES = 64
#: after packing, group() compacts the pool this many pages at a time, with a yield between
#: (0.6 ms at the median on the same data, 1.5 at most; slices of 256 pages: 2.2 and 4.9 ms)
COMPACT_SLICE_PAGES = 64


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
    ``pool_cache_pages`` is the pool's warm cache of freed pages. ``group_pages``,
    ``group_algorithm`` and ``group_level`` are what :meth:`group` packs cold pages with.
    ``backing`` is the store below RAM that pages are written back to (None: none); the device
    uses it but does not close it.
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
        group_pages: int = MAX_GROUP_PAGES,
        group_algorithm: str = GROUP_ALGORITHM,
        group_level: int | None = GROUP_LEVEL,
        recompression: Sequence[tuple[str, int | None]] = (),
        clock: Callable[[], float] = time.monotonic,
        clock_refresh: float = CLOCK_REFRESH,
        backing: BackingStore | None = None,
        writeback_high: float = HIGH_WATERMARK,
        writeback_low: float = LOW_WATERMARK,
        writeback_wait: float = ROOM_WAIT,
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
        self._native_pages = max(1, native_min_pages)
        self._native_offload_pages = max(1, native_offload_min_pages)
        self._size = (size + PAGE_MASK) & ~PAGE_MASK
        self._npages = self._size >> PAGE_SHIFT
        self._chain_size = chain_size
        self._budget = budget
        self._pool_cache_pages = pool_cache_pages
        if pool is None:
            pool = self._new_pool(mem_limit)
        elif mem_limit:
            pool.limit = mem_limit
        codec = get_codec(algorithm, level=level, dictionary=dictionary)
        self._clock = clock
        self._clock_refresh = clock_refresh
        self._clock_timer: asyncio.TimerHandle | None = None
        self._store = PageStore(self._npages, pool, [codec], clock)
        self._codec_id = 0
        #: codec ids of the recompression algorithms, in the order they are tried
        self._recomp_ids: list[int] = []
        self.set_recompression(recompression)
        self._huge_threshold_cfg = huge_threshold
        self._threshold = huge_threshold if huge_threshold is not None else pool.huge_class_size
        self._executor = executor
        self._inflight = InflightRanges()
        self._closed = False
        self._group_pages = self._check_group_pages(group_pages)
        self._group_codec = get_codec(group_algorithm, level=group_level)
        self._backed = (
            Backed(
                self._store,
                backing,
                self._limit_in_force,
                self._run_in_executor,
                high=writeback_high,
                low=writeback_low,
                wait=writeback_wait,
            )
            if backing is not None
            else None
        )
        #: the image being taken (snapshot_image), cancelled by reset and close
        self._capture: image.Capture | None = None

    @staticmethod
    def _check_group_pages(n: int) -> int:
        if not MIN_MEMBERS <= n <= MAX_GROUP_PAGES:
            raise ValueError(f"group pages must be in {MIN_MEMBERS}..{MAX_GROUP_PAGES}, got {n}")
        return n

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
        return self._store.pool

    @property
    def table(self) -> PageTable:
        return self._store.table

    @property
    def codec(self) -> Codec:
        """The codec new pages are compressed with."""
        return self._store.codecs[self._codec_id]

    @property
    def algorithm(self) -> str:
        return self._store.codecs[self._codec_id].name

    @algorithm.setter
    def algorithm(self, name: str) -> None:
        self.set_algorithm(name)

    def set_algorithm(
        self, name: str, *, level: int | None = None, dictionary: bytes | None = None
    ) -> None:
        """Compress new pages with ``name``; pages already stored keep their codec (per page)."""
        codec = get_codec(name, level=level, dictionary=dictionary)
        self._codec_id = self._store.codec_id(codec)

    @property
    def huge_threshold(self) -> int:
        """Compressed sizes >= this are stored raw (HUGE)."""
        return self._threshold

    @property
    def mem_limit(self) -> int:
        return int(self._store.pool.limit)

    @mem_limit.setter
    def mem_limit(self, value: int) -> None:
        self.set_mem_limit(value)

    def _limit_in_force(self) -> int:
        """The pool's own limit, or what the shared budget leaves it when that is less."""
        pool = self._store.pool
        own = int(pool.limit)
        budget = pool.budget
        if budget is not None and budget.limit:
            room = int(pool.total_bytes) + max(0, budget.limit - budget.used)
            if not own or room < own:
                return room
        return own

    def set_mem_limit(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("mem_limit must be >= 0")
        self._store.pool.limit = limit

    @property
    def stats(self) -> DeviceStats:
        """The live counters, with the pool-derived fields refreshed."""
        return self._store.current_stats()

    def reset_mem_used_max(self) -> None:
        """Like writing 0 to zram's mem_used_max: restart the peak from the current usage."""
        self._store.reset_mem_used_max()

    def _preparer(self, codec_id: int, *, native_ok: bool) -> PrepareMany:
        """How pages are prepared for codec ``codec_id``: the C batch when allowed and the codec
        has a native form, else the Python loop."""
        codec = self._store.codecs[codec_id]
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

    def _write_offload(self, npages: int) -> bool:
        """Whether a write of ``npages`` pages compresses in the workers: from
        ``offload_min_pages`` pages, or from ``native_offload_min_pages`` with a codec whose
        C batch is slow (zstd, lz4hc: there the compression, not the commit, bounds the loop
        thread; fio 1 MiB sequential writes to a zstd export 171-238 MB/s inline, 259-290 in
        a worker; lz4's stay inline, where they were no faster in a worker)."""
        return npages >= self._offload_pages or (
            npages >= self._native_offload_pages and native.slow_encode(self.codec)
        )

    def _write_inline(self, first: int, last: int) -> bool:
        """Whether a write of pages ``[first, last]`` is done at once: not one for the workers
        (``_write_offload``), and no overlapping request in flight to wait for."""
        return not self._write_offload(last - first + 1) and (
            not self._inflight or not self._inflight.overlaps(first, last)
        )

    # --- sync API (tests, and the async methods' inline path) ---------------------------------

    def _check(self, offset: int, length: int) -> None:
        assert not self._closed, "device closed"
        assert 0 <= offset and 0 <= length and offset + length <= self._size, (offset, length)

    def read_sync(self, offset: int, length: int) -> Buffer:
        """Return ``length`` bytes at ``offset``. Raises DeviceIOError (InBacking where
        :meth:`_read_here` gives way: only the async read waits for the backing store)."""
        if length == 0:
            self._check(offset, length)
            return b""
        got = self._read_here(offset, length)
        if got is None:
            raise InBacking(f"bytes {offset}+{length} touch the backing store")
        return got[0]

    def _read_here(self, offset: int, length: int) -> ReadResult | None:
        """A READ (``length`` > 0) in one walk of the table, decoded on this thread; None when
        it needs a page of the backing store that the page cache does not hold, or touches one
        in a read of more than CACHED_READ_MAX_OBJECTS pages (the awaited path reads those)."""
        self._check(offset, length)
        skip = offset & PAGE_MASK
        first = offset >> PAGE_SHIFT
        try:
            if length == PAGE_SIZE and not skip:
                store = self._store
                t = store.table
                st = t.state_mv[first]
                if st == EMPTY:
                    return ZERO_PAGE, [(0, PAGE_SIZE)]
                store.touch(first)
                if st == SAME and t.handle_mv[first] == 0:
                    return ZERO_PAGE, [(0, PAGE_SIZE)]
                if st == BACKED:
                    return self._read_backed_now(store, first)
                return store.read_page(first), []
            last = (offset + length - 1) >> PAGE_SHIFT
            n = last - first + 1
            buf: Buffer
            store = self._store
            store.touch_range(first, last)
            # pages in the backing store: read here if the page cache holds them all, for a
            # read of few pages (a larger one gives way to the awaited path at the first)
            backed: list[BackedItem] | None = (
                [] if self._backed is not None and n <= CACHED_READ_MAX_OBJECTS else None
            )
            if n >= self._native_pages and native.enabled:
                snap, kind, zero = store.snapshot_native(first, last, backed)
                if backed and not self._fill_backed_now(store, snap, backed):
                    return None
                if len(zero) == n:
                    return zeros(length), [(0, length)]
                buf = native.module().new_buffer(n << PAGE_SHIFT)  # not zeroed: all overwritten
                native_decode_part(0, n, snap, kind, memoryview(buf))
            else:
                snap, zero = store.snapshot(first, last, None, backed)
                if backed and not self._fill_backed_now(store, snap, backed):
                    return None
                if len(zero) == n:
                    return zeros(length), [(0, length)]
                buf = decompress_part(0, n, snap)
        except InBacking:
            return None
        except DeviceIOError:
            self._store.stats.failed_reads += 1  # per request, as zram counts per bio
            raise
        except CodecError as exc:
            self._store.stats.failed_reads += 1
            raise DeviceIOError(str(exc)) from None
        if skip or len(buf) != length:
            buf = buf[skip : skip + length]
        return buf, _zero_extents(zero, offset, length)

    def _read_backed_now(self, store: PageStore, idx: int) -> ReadResult | None:
        """A READ of BACKED page ``idx`` alone, on this thread when the page cache holds its
        record (:meth:`Backed.read_now`), decoded and promoted as the awaited path does; None
        when it must wait for the device (the awaited path then reads it in the store's
        threads). A 4 KiB read from the page cache this way skips the awaited path's
        coroutines, snapshot and exception. Raises DeviceIOError."""
        backed = self._backed
        assert backed is not None  # a BACKED page
        t = store.table
        loc = t.handle_mv[idx]
        objs = backed.read_now([loc])
        if objs is None:
            return None
        tag = None if t.flags_mv[idx] & RAW else store.codecs[t.codec_mv[idx]]
        page = store.decode_backed(tag, objs[0], idx)
        backed.promote(store, [(idx, loc, objs[0])])
        return page, []

    def _fill_backed_now(self, store: PageStore, snap: list[Any], backed: list[BackedItem]) -> bool:
        """:meth:`_fill_backed` on this thread when the page cache holds every record; False
        (nothing changed) when one must wait for the device. Raises DeviceIOError."""
        assert self._backed is not None
        objs = self._backed.read_now([loc for _, _, loc, _ in backed])
        if objs is None:
            return False
        self._place_backed(store, snap, backed, objs)
        return True

    def _place_backed(
        self, store: PageStore, snap: list[Any], backed: list[BackedItem], objs: list[bytes]
    ) -> None:
        """Put the objects read back for a snapshot's BACKED pages in their places (the
        compressed object with its tag, or the raw page), then promote them (see
        :mod:`zramd.device.backed`). Raises DeviceIOError."""
        assert self._backed is not None
        promote: list[tuple[int, int, bytes]] = []
        for (pos, idx, loc, tag), obj in zip(backed, objs, strict=True):
            snap[pos] = store.decode_backed(None, obj, idx) if tag is None else (tag, obj)
            promote.append((idx, loc, obj))
        self._backed.promote(store, promote)

    def _edges(
        self, offset: int, mv: memoryview, fetched: dict[int, bytes] | None = None
    ) -> tuple[bytes | None, int, int, bytes | None]:
        """Loop thread: patched head/tail pages (RMW) and the byte span of full middle pages
        (``fetched``: the edge pages read from the backing store)."""
        n = len(mv)
        skip = offset & PAGE_MASK
        first = offset >> PAGE_SHIFT
        head: bytes | None = None
        pos = 0
        if skip or n < PAGE_SIZE:
            take = min(PAGE_SIZE - skip, n)
            page = bytearray(self._old_page(first, fetched))
            page[skip : skip + take] = mv[:take]
            head = bytes(page)
            pos = take
        mid_end = pos + ((n - pos) & ~PAGE_MASK)
        tail: bytes | None = None
        if mid_end < n:
            page = bytearray(self._old_page((offset + mid_end) >> PAGE_SHIFT, fetched))
            page[: n - mid_end] = mv[mid_end:]
            tail = bytes(page)
        return head, pos, mid_end, tail

    def _old_page(self, idx: int, fetched: dict[int, bytes] | None) -> bytes:
        if fetched and idx in fetched:
            return fetched[idx]
        return self._store.read_page(idx)

    def _edge_pages(self, offset: int, length: int) -> list[int]:
        """The partly covered pages of ``[offset, offset+length)`` (``length`` > 0)."""
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        out = []
        if offset & PAGE_MASK or length < PAGE_SIZE:
            out.append(first)
        if (offset + length) & PAGE_MASK and last not in out:
            out.append(last)
        return out

    def _backed_edges(self, offset: int, length: int) -> bool:
        state_mv = self._store.table.state_mv
        return any(state_mv[i] == BACKED for i in self._edge_pages(offset, length))

    async def _fetch_edges(self, offset: int, length: int) -> dict[int, bytes] | None:
        """The BACKED edge pages of a partial write or zeroing, read from the backing store
        (None when there are none). Raises DeviceIOError (counted as a failed write). The
        caller holds the range, so no write changes them; but pressure writeback may move
        the other edge out while one is read: it is looked at again until none is left."""
        if self._backed is None or not length:
            return None
        store = self._store
        t = store.table
        edges = self._edge_pages(offset, length)
        fetched: dict[int, bytes] = {}
        while True:
            pages = [i for i in edges if t.state_mv[i] == BACKED and i not in fetched]
            if not pages:
                return fetched or None
            items: list[BackedItem] = []
            for i in pages:
                store.snapshot(i, i, backed=items)
            try:
                objs = await self._backed.read([loc for _, _, loc, _ in items])
                for (_, idx, _, tag), obj in zip(items, objs, strict=True):
                    fetched[idx] = store.decode_backed(tag, obj, idx)
            except DeviceIOError:
                store.stats.failed_writes += 1
                raise

    def _edges_for_write(
        self, offset: int, mv: memoryview, fetched: dict[int, bytes] | None = None
    ) -> tuple[bytes | None, int, int, bytes | None]:
        """``_edges``; an unreadable old page fails the write (failed_writes, as zram)."""
        try:
            return self._edges(offset, mv, fetched)
        except DeviceIOError:
            self._store.stats.failed_writes += 1
            raise

    @staticmethod
    def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return mv

    def write_sync(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        fetched: dict[int, bytes] | None = None,
    ) -> None:
        """Store ``data`` at ``offset``. Raises NoSpace (nothing changed) or DeviceIOError
        (``fetched``: its partly covered pages that are in the backing store, read by the
        caller)."""
        if len(data) == PAGE_SIZE and not offset & PAGE_MASK:
            # hot path: one aligned page (bytes for the fast same-fill memcmp)
            page = data if type(data) is bytes else bytes(data)
            if len(page) == PAGE_SIZE:
                self._check(offset, PAGE_SIZE)
                cid = self._codec_id
                store = self._store
                prep = prepare_page(page, store.codecs[cid].compress, self._threshold)
                store.tick()
                store.commit((offset >> PAGE_SHIFT,), (prep,), cid)
                return
        job = self._prepare_write(offset, data, fetched)
        if job is not None:
            self._store.commit(*job)

    def _prepare_write(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        fetched: dict[int, bytes] | None = None,
    ) -> tuple[range, list[Prepared], int] | None:
        """:meth:`write_sync` up to its commit, on this thread: the pages compressed, as
        ``(pages, prepared, codec id)`` for :meth:`PageStore.commit`; None when nothing is left
        to commit (no bytes, or whole zero pages, same-filled here). Raises DeviceIOError."""
        mv = self._as_bytes_view(data)
        n = len(mv)
        self._check(offset, n)
        if not n:
            return None
        self._store.tick()
        if n > PAGE_SIZE and not (offset | n) & PAGE_MASK and all_zero(mv):
            # all-zero whole pages: same-fill them in one vectorised step, nothing compressed
            self._store.fill_zero(offset >> PAGE_SHIFT, (offset + n) >> PAGE_SHIFT)
            return None
        cid = self._codec_id
        head, mid_start, _mid_end, tail = self._edges_for_write(offset, mv, fetched)
        npages = ((offset + n - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1
        prepare_many = self._preparer(cid, native_ok=npages >= self._native_pages)
        prepared = prepare_part(0, npages, head, mv, mid_start, tail, npages, prepare_many)
        first = offset >> PAGE_SHIFT
        return range(first, first + len(prepared)), prepared, cid

    def trim_sync(self, offset: int, length: int) -> None:
        """Free the whole pages inside the range; partial pages are left as they are (zram)."""
        self._check(offset, length)
        p0 = (offset + PAGE_MASK) >> PAGE_SHIFT
        p1 = (offset + length) >> PAGE_SHIFT
        if p1 > p0:
            store = self._store
            if store.discard(p0, p1) and p1 - p0 > SMALL_DISCARD_PAGES:
                # a discard is the user giving memory back (fstrim, swap discard): the warm
                # cache goes too, so RSS falls by what was freed
                store.pool.drop_cache()
            store.stats.notify_free += p1 - p0

    def write_zeroes_sync(
        self,
        offset: int,
        length: int,
        *,
        punch_hole: bool = True,
        fetched: dict[int, bytes] | None = None,
    ) -> None:
        """Zero the range: whole pages become EMPTY (or SAME-zero), partial pages are patched
        (``fetched``: those in the backing store, read by the caller)."""
        self._check(offset, length)
        if not length:
            return
        self._store.tick()
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
        store = self._store
        if parts:
            cid = self._codec_id
            compress, threshold = store.codecs[cid].compress, self._threshold
            indices: list[int] = []
            prepared: list[Prepared] = []
            for off, n in parts:
                idx = off >> PAGE_SHIFT
                if store.is_empty(idx):
                    continue  # already reads as zeros
                try:
                    page = bytearray(self._old_page(idx, fetched))
                except DeviceIOError:
                    store.stats.failed_writes += 1
                    raise
                skip = off & PAGE_MASK
                assert skip + n <= PAGE_SIZE
                page[skip : skip + n] = bytes(n)
                indices.append(idx)
                prepared.append(prepare_page(bytes(page), compress, threshold))
            if indices:
                store.commit(indices, prepared, cid)
        if p1 > p0:
            if punch_hole:
                store.discard(p0, p1)
                store.stats.notify_free += p1 - p0
            else:
                store.fill_zero(p0, p1)

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
        t = self._store.table
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
        backed = self._backed
        if backed is None:
            self.write_sync(offset, data)
            return True
        if backed.waiting or (n and (offset | n) & PAGE_MASK and self._backed_edges(offset, n)):
            return False  # writes wait for room (so would this one, compressed for nothing)
        try:
            self.write_sync(offset, data)
        except NoSpace:
            self._store.stats.failed_writes -= 1  # not failed yet: ``write`` waits for room
            return False
        backed.check()
        return True

    # --- async API (what the server calls) ----------------------------------------------------

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
        store = self._store
        store.touch_range(first, last)
        backed: list[BackedItem] | None = [] if self._backed is not None else None
        try:
            if self._native_read_offload(n):
                snap, kind, zero = store.snapshot_native(first, last, backed)  # no await between
            else:
                (snap, zero), kind = store.snapshot(first, last, None, backed), -1
        except DeviceIOError:
            store.stats.failed_reads += 1
            raise
        if backed:
            await self._fill_backed(store, snap, backed)
        if len(zero) == n:
            return zeros(length), [(0, length)]
        buf: Buffer
        try:
            if kind < 0 and self._read_inline(n):  # small: here for its pages in the backing store
                buf = decompress_part(0, n, snap)
            else:
                if kind >= 0:
                    buf = native.module().new_buffer(n << PAGE_SHIFT)  # not zeroed: overwritten
                    view = memoryview(buf)
                    await self._in_parts(native_decode_part, n, snap, kind, view)
                else:
                    parts: list[bytes] = await self._in_parts(decompress_part, n, snap)
                    # joining >= 1 MiB releases the GIL for the copy
                    buf = parts[0] if len(parts) == 1 else b"".join(parts)
        except CodecError as exc:
            self._store.stats.failed_reads += 1
            raise DeviceIOError(str(exc)) from None
        skip = offset & PAGE_MASK
        if skip or len(buf) != length:
            buf = buf[skip : skip + length]
        return buf, _zero_extents(zero, offset, length)

    async def _fill_backed(
        self, store: PageStore, snap: list[Any], backed: list[BackedItem]
    ) -> None:
        """Read the BACKED pages of a snapshot from the backing store into their places (the
        compressed object with its tag, or the raw page), then promote them (see
        :mod:`zramd.device.backed`). Raises DeviceIOError (a failed read)."""
        assert self._backed is not None
        try:
            objs = await self._backed.read([loc for _, _, loc, _ in backed])
            self._place_backed(store, snap, backed, objs)
        except DeviceIOError:
            store.stats.failed_reads += 1
            raise

    async def _with_room(
        self, attempt: Callable[[dict[int, bytes] | None], None], offset: int, length: int
    ) -> None:
        """Run a write's ``attempt`` (given the partly covered pages of ``[offset,
        offset+length)`` that are in the backing store, read first); on NoSpace with a backing
        store, wait for writeback to make room and try again, for up to the backing's wait."""
        deadline: float | None = None
        while True:
            fetched = await self._fetch_edges(offset, length)
            try:
                attempt(fetched)
            except NoSpace:
                backed = self._backed
                if backed is None:
                    raise
                loop = asyncio.get_running_loop()
                if deadline is None:
                    deadline = loop.time() + backed.wait
                if not await backed.wait_room(deadline):
                    raise
                self._store.stats.failed_writes -= 1  # not failed: tried again
                continue
            if self._backed is not None:
                self._backed.check()
            return

    async def _write_here(self, offset: int, data: Buffer, n: int) -> None:
        """A write on this thread (the caller holds its range) that may wait for room: its pages
        are compressed once, and only their commit is tried again after each wait (a write
        under pressure writeback used to compress its pages again for every try)."""
        if self._backed is None:
            self.write_sync(offset, data)
            return
        job = self._prepare_write(offset, data, await self._fetch_edges(offset, n))
        if job is not None:
            await self._with_room(lambda _f: self._store.commit(*job), 0, 0)

    async def _in_parts(
        self, fn: Callable[..., Any], npages: int, *args: Any, split: int = SPLIT_MIN_PAGES
    ) -> list[Any]:
        """Run ``fn(start, stop, *args)`` over the pages ``[0, npages)`` in the executor: one call
        below ``split`` pages, else SPLIT_PARTS calls at once (both cores busy on one large
        request). Waits for every part even if one fails, then raises the first failure. Returns
        the parts' results in page order."""
        if npages < split:
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
        if not self._write_offload(last - first + 1):  # behind an overlapping request, or
            r = await self._inflight.acquire(first, last)  # waiting for room or backed pages
            try:
                await self._write_here(offset, data, n)
            finally:
                self._inflight.release(r)
            return
        mv = self._as_bytes_view(data)
        self._check(offset, n)
        if not (offset | n) & PAGE_MASK and all_zero(mv):
            # all-zero whole pages (e.g. a zero-filled 1 MiB write): same-fill in one vectorised
            # step on the loop thread, no compression and no thread hop
            await self._locked(offset, n, lambda: self._fill_zero(first, last + 1))
            return
        r = await self._inflight.acquire(first, last)
        try:
            cid = self._codec_id  # after the wait: the algorithm may have changed meanwhile
            fetched = await self._fetch_edges(offset, n)
            head, mid_start, _mid_end, tail = self._edges_for_write(offset, mv, fetched)
            npages = last - first + 1
            parts = await self._in_parts(
                prepare_part,
                npages,
                head,
                mv,
                mid_start,
                tail,
                npages,
                self._preparer(cid, native_ok=True),
                split=(
                    SLOW_WRITE_SPLIT_MIN_PAGES
                    if native.slow_encode(self._store.codecs[cid])
                    else SPLIT_MIN_PAGES
                ),
            )
            prepared: list[Prepared] = parts[0] if len(parts) == 1 else sum(parts, [])
            self._store.tick()
            await self._with_room(
                lambda _f: self._store.commit(range(first, first + npages), prepared, cid), 0, 0
            )
        finally:
            self._inflight.release(r)

    def _fill_zero(self, p0: int, p1: int) -> None:
        self._store.tick()
        self._store.fill_zero(p0, p1)

    async def _locked(self, offset: int, length: int, fn: Callable[[], None]) -> None:
        if not length:
            return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        if not self._inflight or not self._inflight.overlaps(first, last):
            fn()
            return
        r = await self._inflight.acquire(first, last)
        try:
            fn()
        finally:
            self._inflight.release(r)

    async def trim(self, offset: int, length: int) -> None:
        await self._locked(offset, length, lambda: self.trim_sync(offset, length))

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        if self._backed is not None and length:
            # its partial pages may be in the backing store or find no room: await both
            first = offset >> PAGE_SHIFT
            r = await self._inflight.acquire(first, (offset + length - 1) >> PAGE_SHIFT)
            try:
                await self._with_room(
                    lambda f: self.write_zeroes_sync(
                        offset, length, punch_hole=punch_hole, fetched=f
                    ),
                    offset,
                    length,
                )
            finally:
                self._inflight.release(r)
            return
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
        """Settle stalled groups, run pool compaction; returns the pool pages freed."""
        self._store.groups.settle(retry=True)
        return int(self._store.pool.compact())

    # --- multi-page groups (zramd.device.groups) ------------------------------------------------

    def _group_settings(
        self, first: int, last: int, group_pages: int, algorithm: str, level: int | None
    ) -> tuple[int, Codec]:
        assert not self._closed, "device closed"
        assert 0 <= first <= last < self._npages, (first, last)
        gp = self._check_group_pages(group_pages) if group_pages else self._group_pages
        if algorithm or level is not None:
            codec = get_codec(algorithm or self._group_codec.name, level=level)
        else:
            codec = self._group_codec
        return gp, codec

    def _install_groups(
        self, windows: list[Window], blobs: list[bytes | None], codec: Codec, done: GroupResult
    ) -> GroupResult:
        """Install the packed windows that save memory; stops at the first without room."""
        store = self._store
        cid = store.codec_id(codec)
        pages, groups, saved = done.pages, done.groups, done.saved
        for w, blob in zip(windows, blobs, strict=True):
            if blob is None or len(blob) >= w.old_bytes:
                continue  # a member does not decode, or the group would not save anything
            try:
                store.groups.install(w, blob, cid)
            except NoSpace:
                return GroupResult(pages, groups, saved, True)
            pages += len(w.items)
            groups += 1
            saved += w.old_bytes - len(blob)
            store.stats.group_saved_bytes += w.old_bytes - len(blob)
        return GroupResult(pages, groups, saved, False)

    def group_sync(
        self,
        first: int,
        last: int,
        *,
        group_pages: int = 0,
        algorithm: str = "",
        level: int | None = None,
    ) -> GroupResult:
        """:meth:`group` on the calling thread, compression included (tests, small ranges)."""
        gp, codec = self._group_settings(first, last, group_pages, algorithm, level)
        groups = self._store.groups
        groups.settle(retry=True)
        windows = groups.plan(first, last, gp)
        done = self._install_groups(
            windows, pack_groups([w.items for w in windows], codec), codec, GroupResult()
        )
        if done.groups:
            self._store.pool.compact()
        return done

    async def group(
        self,
        first: int,
        last: int,
        *,
        group_pages: int = 0,
        algorithm: str = "",
        level: int | None = None,
        on_hold: Callable[[float], None] | None = None,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> GroupResult:
        """Pack the IDLE STORED/HUGE pages of ``[first, last]`` into groups (see the contract
        and :mod:`zramd.device.groups`), GROUP_STEP_PAGES at a time: each step registers its
        range as a mutating request (writes to it wait, reads do not), copies the members out,
        compresses in the executor and installs on the loop thread. The members' old objects
        were scattered over many zspages: a call that made groups ends with a pool compaction,
        so that the memory they held goes back, COMPACT_SLICE_PAGES at a time with a yield
        between (a slice holds the loop about a millisecond; the whole compaction of a large
        device takes a hundred milliseconds and more). The workers compress with a codec
        object of this call only: its compression contexts (megabytes for zstd at the higher
        levels) go when it returns, and the heap is trimmed (in a worker: giving back tens of
        megabytes takes milliseconds), so a pass leaves no memory behind in the worker threads.
        ``on_hold`` hears how long each stretch on the loop thread took; ``pace`` is awaited
        after each step and each compaction slice (the background policy backs off there while
        clients are busy). Not with a reset or close to come before it returns (cancel it
        first: a cancelled step changes nothing)."""
        gp, codec = self._group_settings(first, last, group_pages, algorithm, level)
        packer = get_codec(codec.name, level=codec.level)
        store = self._store
        with held(on_hold):
            store.groups.settle(retry=True)
        done = GroupResult()
        step = max(gp, GROUP_STEP_PAGES - GROUP_STEP_PAGES % gp)
        a = first
        while a <= last:
            b = min(last, a - a % gp + step - 1)
            r = await self._inflight.acquire(a, b)
            try:
                with held(on_hold):
                    windows = store.groups.plan(a, b, gp)
                if windows:
                    blobs = await self._run_in_executor(
                        pack_groups, [w.items for w in windows], packer
                    )
                    with held(on_hold):
                        done = self._install_groups(windows, blobs, codec, done)
            finally:
                self._inflight.release(r)
            if done.no_space:
                break
            a = b + 1
            if pace is not None and a <= last:
                await pace()
        with frees_trimmed():  # its contexts were allocated in the workers' malloc arenas
            del packer
        if done.groups:
            while True:
                with held(on_hold):
                    freed = store.pool.compact(max_pages=COMPACT_SLICE_PAGES)
                if freed < COMPACT_SLICE_PAGES:
                    break
                await (asyncio.sleep(0) if pace is None else pace())
                if self._closed or self._store is not store:  # closed or reset meanwhile
                    return done
            await self._run_in_executor(trim_heap)
        return done

    # --- snapshots (zramd.device.image) ---------------------------------------------------------

    def snapshot_image(self, final: bool = False) -> tuple[ImageMeta, ImageSource]:
        assert not self._closed, "device closed"
        backed = self._backed
        pinned = backed is not None and not final

        def done() -> None:
            self._capture = None
            if pinned:
                assert backed is not None
                backed.unpin()

        meta, cap = image.capture(
            self._store, self._size, done, backed.backing if backed is not None else None
        )
        if backed is not None:
            backed.pin()  # no await since the table was copied: its locators are all live
        self._capture = cap
        return meta, cap

    def waits(self) -> str:
        out = f"page ranges in flight: {self._inflight.describe()}"
        if self._backed is not None:
            out += f"; {self._backed.waits()}"
        return out

    def hold_image(self, meta: ImageMeta) -> None:
        if self._backed is not None:
            state, handle = meta.table[0], meta.table[1]
            self._backed.hold(handle[state == BACKED].tolist())

    def restore_image(self, meta: ImageMeta) -> ImageSink:
        assert not self._closed, "device closed"
        backing = self._backed.backing if self._backed is not None else None
        return image.Restore(self._store, self._size, meta, backing)

    def _cancel_capture(self) -> None:
        if self._capture is not None:
            self._capture.cancel()

    def reset(self) -> None:
        """Free everything (all pages read as zeros again); counters restart, limit kept."""
        assert not self._inflight, "reset with requests in flight"
        self._cancel_capture()
        limit = self.mem_limit
        codecs = self._store.codecs
        if self._backed is not None:
            self._backed.drop_all()
        self._store.close()
        self._store = PageStore(self._npages, self._new_pool(limit), codecs, self._clock)
        if self._backed is not None:
            self._backed.bind(self._store)
        if self._clock_timer is not None:
            self._store.refresh()
            self._store.coarse = True
        if self._huge_threshold_cfg is None:
            self._threshold = self._store.pool.huge_class_size

    # --- cold pages: idle marking, the page listing, recompression (zramd.device.tiers) --------

    def start_clock(self) -> None:
        """From now on the running loop reads the clock every ``clock_refresh`` seconds and
        requests stamp that reading (see CLOCK_REFRESH); ``close`` stops it. Only from the loop
        that serves the device."""
        if self._clock_timer is None and not self._closed:
            self._tick_clock(asyncio.get_running_loop())

    def _tick_clock(self, loop: asyncio.AbstractEventLoop) -> None:
        store = self._store
        store.refresh()
        store.coarse = True
        if self._backed is not None:
            self._backed.check()
        self._clock_timer = loop.call_later(self._clock_refresh, self._tick_clock, loop)

    def mark_idle(self, age: float | None = None, first: int = 0, stop: int | None = None) -> int:
        assert not self._closed, "device closed"
        stop = self._npages if stop is None else stop
        assert 0 <= first <= stop <= self._npages, (first, stop)
        if age is not None:
            self._store.tick()
        return tiers.mark_idle(self._store, first, stop, age)

    def page_states(self, first: int, stop: int, limit: int) -> tuple[list[PageState], int]:
        assert not self._closed, "device closed"
        assert 0 <= first <= stop <= self._npages and limit > 0, (first, stop, limit)
        self._store.tick()
        return tiers.page_rows(self._store, first, stop, limit)

    @property
    def recompression_algorithms(self) -> list[str]:
        return [codec_spec(self._store.codecs[c]) for c in self._recomp_ids]

    def set_recompression(self, algorithms: Sequence[tuple[str, int | None]]) -> None:
        codecs = [get_codec(name, level=level) for name, level in algorithms]
        self._recomp_ids = [self._store.codec_id(c) for c in codecs]

    async def recompress(
        self,
        *,
        kind: str = "all",
        threshold: int = 0,
        algorithm: str = "",
        level: int | None = None,
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
        batch_pages: int | None = None,
        on_hold: Callable[[float], None] | None = None,
    ) -> RecompressResult:
        assert not self._closed, "device closed"
        if kind not in tiers.RECOMPRESS_TYPES:
            raise ValueError(
                f"recompress type {kind!r}: expected one of {', '.join(tiers.RECOMPRESS_TYPES)}"
            )
        if threshold < 0 or threshold > PAGE_SIZE:
            raise ValueError(f"recompress threshold must be in 0..{PAGE_SIZE}, got {threshold}")
        stop = self._npages if stop is None else stop
        assert 0 <= first <= stop <= self._npages, (first, stop)
        if algorithm:
            ids = [self._store.codec_id(get_codec(algorithm, level=level))]
            complete = ids == self._recomp_ids
        elif self._recomp_ids:
            ids, complete = list(self._recomp_ids), True
        else:
            raise ValueError(
                "no recompression algorithm: list them after the first in the export's "
                "compression algorithm (e.g. \"lz4 zstd(level=3)\") or give one"
            )
        return await tiers.recompress(
            lambda: None if self._closed else self._store,
            self._run_in_executor,
            algorithms=ids,
            complete=complete,
            huge_threshold=self._threshold,
            kind=kind,
            threshold=threshold,
            first=first,
            stop=stop,
            max_pages=self._npages if max_pages is None else max_pages,
            max_scan=self._npages if max_scan is None else max_scan,
            batch_pages=batch_pages or tiers.BATCH_PAGES,
            on_hold=on_hold,
        )

    # --- writeback (zramd.device.backed) ------------------------------------------------------

    def _backing(self) -> Backed:
        if self._backed is None:
            raise Unsupported("the export has no backing store")
        return self._backed

    async def writeback(
        self,
        *,
        kind: str = "idle",
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
    ) -> WritebackResult:
        assert not self._closed, "device closed"
        backed = self._backing()
        stop = self._npages if stop is None else stop
        assert 0 <= first <= stop <= self._npages, (first, stop)
        return await backed.writeback(
            kind,
            first,
            stop,
            self._npages if max_pages is None else max_pages,
            self._npages if max_scan is None else max_scan,
        )

    @property
    def writeback_limit(self) -> int | None:
        return None if self._backed is None else self._backed.backing.write_limit

    def set_writeback_limit(self, nbytes: int | None) -> None:
        self._backing().backing.set_write_limit(nbytes)

    @property
    def writeback_settings(self) -> dict[str, float]:
        b = self._backed
        return {} if b is None else {"high": b.high, "low": b.low, "wait": b.wait}

    def set_writeback_settings(self, high: float, low: float, wait: float) -> None:
        self._backing().configure(high, low, wait)
        self._backing().check()

    def backing_stat(self) -> dict[str, Any]:
        if self._backed is None:
            return {}
        return {"path": self._backed.backing.path, **self._backed.backing.stat()}

    def close(self) -> None:
        """Release all memory; the device is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._backed is not None:
            self._backed.close()
        self._cancel_capture()
        if self._clock_timer is not None:
            self._clock_timer.cancel()
            self._clock_timer = None
        self._store.close()
