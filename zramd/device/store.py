"""The page store: the page table, the pool holding the pages' objects, and their counters.

Theory of operation
-------------------
:class:`PageStore` owns one device's pages: the :class:`~zramd.device.table.PageTable` (what
each page is and where it lives), the :class:`~zramd.allocator.Pool` (the objects of STORED and
HUGE pages), the codec list the table's codec column indexes, and the
:class:`~zramd.stats.DeviceStats` page counters, which it keeps equal to what the table holds.
Pages enter through :meth:`PageStore.commit` (prepared by :mod:`zramd.device.pipeline`), leave
through :meth:`PageStore.discard` and become zero-filled through :meth:`PageStore.fill_zero`;
reads take one page (:meth:`PageStore.read_page`) or a snapshot of a range, whose compressed
items are decoded later, maybe in a worker. Multi-page groups of cold pages
(:class:`~zramd.device.groups.Groups`, ``groups``) own the objects of GROUPED pages: freeing a
GROUPED page kills it in its group, and groups past their dead bound are settled (re-packed or
dissolved) at the end of the commit, discard or fill that killed their pages. With a backing
store (``backed``, :mod:`zramd.device.backed`), a page may be BACKED: its object was moved, as it
was, to the backing store (:meth:`PageStore.back`; a GROUPED page with an object of its own made
from its group, :meth:`PageStore.back_grouped`) and may come back (:meth:`PageStore.unback`);
freeing a BACKED page hands its locator to ``backed`` to free. The store does no backing I/O:
reads that meet a BACKED page raise :class:`InBacking` (the inline paths then give way to the
awaited ones) or, given a list, leave a place for the caller to fill from the backing store.

Access tracking: the device calls :meth:`PageStore.tick` once per request, which reads the
clock and keeps the current quantum in ``now`` (:data:`~zramd.device.table.ATIME_QUANTUM`
seconds since the store's epoch, rebased before it outgrows the uint16 column); while the
store is ``coarse`` a timer of the serving loop refreshes ``now`` every second instead
(:meth:`PageStore.refresh`) and requests read no clock at all. Every entry a
write installs gets ``atime = now`` and no flags (a write replaces the whole entry); a read
refreshes the atime of the live pages it reads and clears their IDLE mark
(:meth:`PageStore.touch`, :meth:`PageStore.touch_range`). Background moves (recompression)
switch one object for another with :meth:`PageStore.move`, which keeps the page's atime and
marks.

Invariants
~~~~~~~~~~
* All or nothing: :meth:`PageStore.commit` stores every new object before any slot switches; on
  PoolFull it frees what it stored and raises NoSpace, so the old pages, the counters (but
  ``failed_writes``) and the pool are as they were.
* A slot switches to its new entry only after the new object is stored; then the old object is
  freed. No object is referenced by two entries, and every object is referenced by one.
* ``pages_stored``, ``same_pages``, ``huge_pages`` and ``compr_data_size`` always equal the
  table's counts, and so do ``idle_pages``, ``recompressed_pages`` and ``incompressible_pages``
  for the flags; ``mem_used_max`` is at least the pool's size after every commit.
* Loop thread only: snapshots copy the compressed bytes out, so compaction can move objects
  while workers decode.

Knows nothing of byte ranges, requests, their ordering or threads; uses only the Pool API
(store/load/free/...), not its internals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from zramd.allocator import Pool, PoolFull
from zramd.compress import Codec, CodecError, native
from zramd.device.groups import Groups
from zramd.device.interface import DeviceIOError, NoSpace
from zramd.device.pipeline import GroupRun, PackedSnap, Prepared
from zramd.device.samefill import ZERO_PAGE, fill_page
from zramd.device.table import (
    ATIME_QUANTUM,
    ATIME_REBASE_AT,
    ATIME_REBASE_BY,
    BACKED,
    EMPTY,
    GROUPED,
    HUGE,
    IDLE,
    INCOMPRESSIBLE,
    MAX_CODECS,
    PENDING,
    RAW,
    RECOMPRESSED,
    SAME,
    STORED,
    WB_PENDING,
    PageTable,
)
from zramd.geometry import PAGE_SIZE
from zramd.stats import DeviceStats

#: ATIME_QUANTUM as a shift: the clock's whole seconds >> ATIME_SHIFT is the quantum (cheaper
#: than a float division on the 4 KiB path)
ATIME_SHIFT = ATIME_QUANTUM.bit_length() - 1
assert 1 << ATIME_SHIFT == ATIME_QUANTUM
#: commits of at least this many consecutive pages switch their slots with vectorised operations
BATCH_COMMIT_PAGES = 16
#: discards of up to this many pages are freed entry by entry rather than vectorised
SMALL_DISCARD_PAGES = 8


class InBacking(DeviceIOError):
    """A page of the read lives in the backing store: the read must be awaited (a caller that
    cannot await sees it as the EIO it derives from)."""


class BackedSink(Protocol):
    """Where the locators of BACKED pages go when their pages are freed or rewritten."""

    def drop(self, loc: int) -> None: ...


#: one BACKED page of a read, to fetch: (its place in the read's items, the page, its locator,
#: the item's tag or None for a raw page)
BackedItem = tuple[int, int, int, Any]


class PageStore:
    """The pages of one device: table, pool, codec list and counters (see the module doc)."""

    __slots__ = (
        "table", "pool", "codecs", "stats", "groups", "now", "clock", "epoch", "coarse", "backed"
    )

    def __init__(
        self,
        npages: int,
        pool: Pool,
        codecs: list[Codec],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = PageTable(npages)
        self.pool = pool
        #: codec id (the table's codec column) -> codec; ids are never reused
        self.codecs = codecs
        self.stats = DeviceStats(mem_limit=int(pool.limit))
        self.groups = Groups(self)
        #: seconds, monotonic; the atime column counts ATIME_QUANTUM units since ``epoch``
        self.clock = clock
        self.epoch = clock()
        #: the current quantum, as of the last :meth:`tick`
        self.now = 0
        #: where the locators of freed BACKED pages go (None: the device has no backing store)
        self.backed: BackedSink | None = None
        #: True while a loop timer keeps ``now`` current (``ZramDevice.start_clock``): requests
        #: then stamp ``now`` without reading the clock
        self.coarse = False

    # --- the coarse clock ---------------------------------------------------------------------

    def tick(self) -> int:
        """The current quantum, kept in ``now`` for the entries installed next: ``now`` itself
        while ``coarse`` (a loop timer keeps it current), else read from the clock."""
        if self.coarse:
            return self.now
        q = int(self.clock() - self.epoch) >> ATIME_SHIFT
        if q >= ATIME_REBASE_AT:
            q = self._rebase(q)
        self.now = q
        return q

    def refresh(self) -> None:
        """Read the clock into ``now`` (the loop timer of a ``coarse`` store)."""
        coarse, self.coarse = self.coarse, False
        self.tick()
        self.coarse = coarse

    def _rebase(self, q: int) -> int:
        """Move the epoch forward so the clock fits the atime column again (every few days)."""
        self.table.rebase_atime(ATIME_REBASE_BY)
        self.epoch += ATIME_REBASE_BY * ATIME_QUANTUM
        return q - ATIME_REBASE_BY

    def age(self, idx: int) -> int:
        """Seconds since page ``idx`` was last read or written, as of the last tick (a multiple
        of ATIME_QUANTUM: the clock is that coarse)."""
        return (self.now - self.table.atime_mv[idx]) * ATIME_QUANTUM

    def touch(self, idx: int) -> None:
        """A read of live page ``idx``: tick, refresh its atime, clear its IDLE mark (one call
        on the 4 KiB read path)."""
        q = self.now if self.coarse else self.tick()
        t = self.table
        t.atime_mv[idx] = q
        flags_mv = t.flags_mv
        fl = flags_mv[idx]
        if fl & IDLE:
            flags_mv[idx] = fl & ~IDLE
            self.stats.idle_pages -= 1

    def touch_range(self, first: int, last: int) -> None:
        """A read of pages ``[first, last]``: tick, then refresh the live ones as :meth:`touch`
        does (vectorised over BATCH_COMMIT_PAGES or more; holes stay untouched, so their part of
        the table stays uncommitted)."""
        self.tick()
        t = self.table
        if last - first < BATCH_COMMIT_PAGES:
            state_mv, atime_mv, flags_mv = t.state_mv, t.atime_mv, t.flags_mv
            now = self.now
            for idx in range(first, last + 1):
                if state_mv[idx] != EMPTY:
                    atime_mv[idx] = now
                    fl = flags_mv[idx]
                    if fl & IDLE:
                        flags_mv[idx] = fl & ~IDLE
                        self.stats.idle_pages -= 1
            return
        stop = last + 1
        live = t.state[first:stop] != EMPTY
        t.atime[first:stop][live] = self.now
        flags = t.flags[first:stop]
        idle = (flags & IDLE) != 0
        n = int(np.count_nonzero(idle))
        if n:
            flags[idle] &= np.uint8(~IDLE & 0xFF)
            self.stats.idle_pages -= n

    def _unflag(self, fl: int) -> None:
        """Uncount the marks ``fl`` of an entry being replaced or freed."""
        s = self.stats
        if fl & IDLE:
            s.idle_pages -= 1
        if fl & RECOMPRESSED:
            s.recompressed_pages -= 1
        if fl & INCOMPRESSIBLE:
            s.incompressible_pages -= 1

    def _unflag_many(self, fl: Any) -> None:
        """Uncount the marks of the entries whose flags are the array ``fl``."""
        s = self.stats
        s.idle_pages -= int(np.count_nonzero(fl & IDLE))
        s.recompressed_pages -= int(np.count_nonzero(fl & RECOMPRESSED))
        s.incompressible_pages -= int(np.count_nonzero(fl & INCOMPRESSIBLE))

    def codec_id(self, codec: Codec) -> int:
        """The id of ``codec`` (of an equal one if listed, else added). Raises ValueError."""
        for i, c in enumerate(self.codecs):
            if c.name == codec.name and c.params == codec.params:
                return i
        if len(self.codecs) >= MAX_CODECS:
            raise ValueError(f"at most {MAX_CODECS} distinct codec settings per device")
        self.codecs.append(codec)
        return len(self.codecs) - 1

    def close(self) -> None:
        """Release the pool and the table (the store is unusable afterwards)."""
        self.groups.close()
        self.pool.close()
        self.table.release()

    # --- counters -----------------------------------------------------------------------------

    def current_stats(self) -> DeviceStats:
        """The live counters, with the pool-derived fields refreshed."""
        s = self.stats
        pool = self.pool
        s.mem_used_total = total = int(pool.total_bytes)
        if total > s.mem_used_max:
            s.mem_used_max = total
        s.pages_compacted = int(pool.pages_compacted)
        s.mem_limit = int(pool.limit)
        return s

    def reset_mem_used_max(self) -> None:
        """Restart the mem_used_max peak from the current usage."""
        self.stats.mem_used_max = int(self.pool.total_bytes)

    # --- commit: the one way pages enter -------------------------------------------------------

    def commit(self, indices: Sequence[int], prepared: Sequence[Prepared], codec_id: int) -> None:
        """Make page ``indices[i]`` hold ``prepared[i]`` (compressed with ``codec_id``), all or
        nothing. Raises NoSpace (nothing changed but ``failed_writes``).

        Two phases, one semantics: first every payload is stored in the pool (on PoolFull the
        objects stored so far are freed), then every slot switches to its new entry and its old
        object is freed. One page goes straight through (the 4 KiB hot path, no lists); a range
        of BATCH_COMMIT_PAGES or more switches its slots with vectorised operations; the same
        table, counters and pool either way."""
        pool = self.pool
        if len(prepared) == 1:
            st, v, payload = prepared[0]
            if payload is None:
                self._switch(indices[0], st, v, 0, codec_id)
                if self.groups.pending:
                    self.groups.settle()
                return
            try:
                h = pool.store(payload)
            except PoolFull:
                self.stats.failed_writes += 1
                raise NoSpace("memory limit reached") from None
            self._switch(indices[0], st, v, h, codec_id)
        else:
            store = pool.store
            handles: list[int] = []
            try:
                for _st, _v, payload in prepared:
                    handles.append(store(payload) if payload is not None else 0)
            except PoolFull:
                for (_st, _v, payload), h in zip(prepared, handles, strict=False):
                    if payload is not None:
                        pool.free(h)
                self.stats.failed_writes += 1
                raise NoSpace("memory limit reached") from None
            if type(indices) is range and len(prepared) >= BATCH_COMMIT_PAGES:
                self._switch_range(indices.start, prepared, handles, codec_id)
            else:
                switch = self._switch
                for idx, (st, v, _payload), h in zip(indices, prepared, handles, strict=True):
                    switch(idx, st, v, h, codec_id)
        s = self.stats
        total = pool.total_bytes
        if total > s.mem_used_max:
            s.mem_used_max = total
        if self.groups.pending:
            self.groups.settle()

    def _switch(self, idx: int, st: int, v: int, h: int, codec_id: int) -> None:
        """Set entry ``idx`` to ``(st, v)`` with pool handle ``h``; free its old object."""
        t = self.table
        s = self.stats
        state_mv = t.state_mv
        old = state_mv[idx]
        if old == EMPTY:
            s.pages_stored += 1
        elif old == SAME:
            s.same_pages -= 1
        else:
            self._free_object(idx, old)
        fl = t.flags_mv[idx]
        if fl:
            self._unflag(fl)
            t.flags_mv[idx] = 0
        t.atime_mv[idx] = self.now
        state_mv[idx] = st
        if st == SAME:
            t.handle_mv[idx] = v
            t.size_mv[idx] = 0
            t.codec_mv[idx] = 0
            s.same_pages += 1
            return
        t.handle_mv[idx] = h
        t.size_mv[idx] = v
        t.codec_mv[idx] = codec_id
        s.compr_data_size += v
        if st == HUGE:
            s.huge_pages += 1
            s.huge_pages_since += 1

    def _switch_range(
        self, first: int, prepared: Sequence[Prepared], handles: list[int], codec_id: int
    ) -> None:
        """:meth:`_switch` over the pages ``[first, first + len(prepared))`` with vectorised
        table operations (every new entry is live, so the whole range of the table is written)."""
        stop = first + len(prepared)
        self.discard(first, stop)
        t = self.table
        states = np.frombuffer(bytes([p[0] for p in prepared]), dtype=np.uint8)
        values = np.array([p[1] for p in prepared], dtype=np.uint64)
        same = states == SAME
        t.state[first:stop] = states
        t.handle[first:stop] = np.where(same, values, np.array(handles, dtype=np.uint64))
        t.size[first:stop] = np.where(same, 0, values)
        t.codec[first:stop] = np.where(same, 0, codec_id)
        t.atime[first:stop] = self.now  # flags: 0 since the discard
        nsame = int(np.count_nonzero(same))
        nhuge = int(np.count_nonzero(states == HUGE))
        s = self.stats
        s.pages_stored += len(prepared)
        s.same_pages += nsame
        s.huge_pages += nhuge
        s.huge_pages_since += nhuge
        if nsame < len(prepared):
            s.compr_data_size += int(values[~same].sum())

    # --- freeing -------------------------------------------------------------------------------

    def _free_object(self, idx: int, st: int) -> None:
        """Free the pool object of entry ``idx`` (state ``st``: STORED or HUGE) and uncount it,
        or take a GROUPED page out of its group; leaves the entry stale."""
        t = self.table
        if st == GROUPED:
            self.groups.kill(t.handle_mv[idx], idx)
            return
        s = self.stats
        if st == BACKED:
            assert self.backed is not None
            self.backed.drop(t.handle_mv[idx])
            t.flags_mv[idx] &= ~RAW  # a caller that keeps the marks (a group) must not keep it
            s.bd_count -= 1
            return
        self.pool.free(t.handle_mv[idx])
        s.compr_data_size -= t.size_mv[idx]
        if st == HUGE:
            s.huge_pages -= 1

    def discard(self, p0: int, p1: int) -> int:
        """Free whole pages ``[p0, p1)`` to EMPTY; returns how many held something."""
        t = self.table
        if p1 - p0 <= SMALL_DISCARD_PAGES:
            n = 0
            state_mv = t.state_mv
            s = self.stats
            for idx in range(p0, p1):
                st = state_mv[idx]
                if st != EMPTY:
                    s.pages_stored -= 1
                    if st == SAME:
                        s.same_pages -= 1
                    else:
                        self._free_object(idx, st)
                    fl = t.flags_mv[idx]
                    if fl:
                        self._unflag(fl)
                        t.flags_mv[idx] = 0
                    state_mv[idx] = EMPTY
                    t.handle_mv[idx] = 0
                    t.size_mv[idx] = 0
                    t.codec_mv[idx] = 0
                    t.atime_mv[idx] = 0
                    n += 1
            self._settle_groups()
            return n
        idx_arr = t.occupied(p0, p1)
        n = len(idx_arr)
        if not n:
            return 0
        same, huge, sizes, _pooled = t.counts(idx_arr)
        self._unflag_many(t.flags[idx_arr])
        free = self.pool.free
        for h in t.pooled_handles(idx_arr):
            free(h)
        grouped = idx_arr[t.state[idx_arr] == GROUPED]
        if len(grouped):
            self.groups.kill_many(grouped)
        backed = t.backed_locators(idx_arr)
        if backed:
            assert self.backed is not None
            for loc in backed:
                self.backed.drop(loc)
            self.stats.bd_count -= len(backed)
        t.clear(idx_arr)
        s = self.stats
        s.pages_stored -= n
        s.same_pages -= same
        s.huge_pages -= huge
        s.compr_data_size -= sizes
        self._settle_groups()
        return n

    def _settle_groups(self) -> None:
        """After pages were freed: settle the groups past their dead bound, stalled ones too."""
        g = self.groups
        if g.pending or g.stalled:
            g.settle(retry=True)

    def fill_zero(self, p0: int, p1: int) -> None:
        """Whole pages ``[p0, p1)`` become SAME with fill word 0 (vectorised)."""
        t = self.table
        if p1 - p0 > SMALL_DISCARD_PAGES and not (t.state[p0:p1] != SAME).any():
            if not t.handle[p0:p1].max():
                # already zero-filled (a zero overwrite): only the access time and marks change
                fl = t.flags[p0:p1]
                if fl.any():
                    self._unflag_many(fl)
                    fl[:] = 0
                t.atime[p0:p1] = self.now
                return
        self.discard(p0, p1)
        t.state[p0:p1] = SAME  # handle (the fill word) is already 0 after discard
        t.atime[p0:p1] = self.now
        self.stats.pages_stored += p1 - p0
        self.stats.same_pages += p1 - p0

    # --- background moves (recompression) ------------------------------------------------------

    def move(self, idx: int, payload: bytes, codec_id: int) -> None:
        """Switch STORED or HUGE page ``idx`` to the compressed object ``payload`` (codec
        ``codec_id``) and mark it RECOMPRESSED: make the new copy, switch the entry, free the
        old. Its atime and IDLE mark stay. Raises PoolFull with nothing changed."""
        t = self.table
        h = self.pool.store(payload)
        old = t.state_mv[idx]
        old_handle, old_size = t.handle_mv[idx], t.size_mv[idx]
        n = len(payload)
        t.state_mv[idx] = STORED
        t.handle_mv[idx] = h
        t.size_mv[idx] = n
        t.codec_mv[idx] = codec_id
        fl = t.flags_mv[idx]
        t.flags_mv[idx] = (fl & ~PENDING) | RECOMPRESSED
        self.pool.free(old_handle)
        s = self.stats
        s.compr_data_size += n - old_size
        if old == HUGE:
            s.huge_pages -= 1
        if not fl & RECOMPRESSED:
            s.recompressed_pages += 1

    def back(self, idx: int, handle: int, loc: int) -> bool:
        """Writeback's switch: STORED or HUGE page ``idx``, still WB_PENDING with the pool object
        ``handle`` that was copied out, becomes BACKED at ``loc`` (its size, codec, atime and
        marks kept; RAW when it was HUGE) and its pool object is freed. False, nothing changed,
        when the page was rewritten, discarded or moved meanwhile (the caller frees ``loc``)."""
        t = self.table
        st = t.state_mv[idx]
        fl = t.flags_mv[idx]
        if not fl & WB_PENDING or (st != STORED and st != HUGE) or t.handle_mv[idx] != handle:
            return False
        t.state_mv[idx] = BACKED
        t.handle_mv[idx] = loc
        t.flags_mv[idx] = (fl & ~WB_PENDING) | (RAW if st == HUGE else 0)
        self.pool.free(handle)
        s = self.stats
        s.compr_data_size -= t.size_mv[idx]
        if st == HUGE:
            s.huge_pages -= 1
        s.bd_count += 1
        return True

    def back_grouped(self, idx: int, loc: int, size: int, raw: bool, codec_id: int) -> bool:
        """Writeback's switch for a group member: GROUPED page ``idx``, still WB_PENDING (so its
        data is what the batch encoded, whichever group holds it now), becomes BACKED at
        ``loc``, an object of ``size`` bytes compressed with codec ``codec_id``, or the raw page
        when ``raw``; it leaves its group (:meth:`Groups.kill`: the group is freed with its last
        live page; the caller settles the groups). Its atime and marks are kept, but for
        RECOMPRESSED when the codec is the primary one. False, nothing changed, when the page
        was rewritten or discarded meanwhile."""
        t = self.table
        fl = t.flags_mv[idx]
        if t.state_mv[idx] != GROUPED or not fl & WB_PENDING:
            return False
        self.groups.kill(t.handle_mv[idx], idx)
        if codec_id == 0 and fl & RECOMPRESSED:
            fl &= ~RECOMPRESSED
            self.stats.recompressed_pages -= 1
        t.state_mv[idx] = BACKED
        t.handle_mv[idx] = loc
        t.size_mv[idx] = size
        t.codec_mv[idx] = codec_id
        t.flags_mv[idx] = (fl & ~WB_PENDING) | (RAW if raw else 0)
        self.stats.bd_count += 1
        return True

    def unback(self, idx: int, loc: int, obj: bytes) -> bool:
        """Promotion: BACKED page ``idx``, still at ``loc``, gets its object ``obj`` (read back)
        stored in the pool again, STORED, or HUGE when RAW; its atime and marks kept. False when
        the page is no longer at ``loc`` (nothing changed). The caller frees ``loc`` after a
        True. Raises PoolFull, nothing changed."""
        t = self.table
        if t.state_mv[idx] != BACKED or t.handle_mv[idx] != loc:
            return False
        h = self.pool.store(obj)
        fl = t.flags_mv[idx]
        raw = fl & RAW
        t.state_mv[idx] = HUGE if raw else STORED
        t.handle_mv[idx] = h
        t.flags_mv[idx] = fl & ~RAW
        s = self.stats
        s.compr_data_size += t.size_mv[idx]
        if raw:
            s.huge_pages += 1
        s.bd_count -= 1
        return True

    def decode_backed(self, item: Any, obj: bytes, idx: int) -> bytes:
        """The page ``idx`` from its object ``obj`` read back (``item`` its snapshot tag: a
        codec, or None for a raw page). Raises DeviceIOError."""
        if item is None:
            if len(obj) != PAGE_SIZE:
                raise DeviceIOError(f"page {idx}: raw object has {len(obj)} bytes")
            return obj
        try:
            return item.decompress(obj, PAGE_SIZE)
        except CodecError as exc:
            raise DeviceIOError(f"page {idx}: {exc}") from None

    def mark_incompressible(self, idx: int) -> None:
        """No recompression algorithm shrank page ``idx``: mark it so it is not tried again."""
        t = self.table
        fl = t.flags_mv[idx]
        t.flags_mv[idx] = (fl & ~PENDING) | INCOMPRESSIBLE
        if not fl & INCOMPRESSIBLE:
            self.stats.incompressible_pages += 1

    # --- reads ---------------------------------------------------------------------------------

    def is_empty(self, idx: int) -> bool:
        """Whether page ``idx`` is a hole (never written, or discarded)."""
        return self.table.state_mv[idx] == EMPTY

    def read_page(self, idx: int) -> bytes:
        """The bytes of page ``idx``. Raises DeviceIOError."""
        t = self.table
        st = t.state_mv[idx]
        if st == EMPTY:
            return ZERO_PAGE
        if st == SAME:
            return fill_page(t.handle_mv[idx])
        if st == STORED:
            data = self.pool.load(t.handle_mv[idx], t.size_mv[idx])
            try:
                return self.codecs[t.codec_mv[idx]].decompress(data, PAGE_SIZE)
            except CodecError as exc:
                raise DeviceIOError(f"page {idx}: {exc}") from None
        if st == GROUPED:
            return self.groups.read(t.handle_mv[idx], t.size_mv[idx], idx)
        if st == BACKED:
            raise InBacking(f"page {idx} is in the backing store")
        data = self.pool.load(t.handle_mv[idx], PAGE_SIZE)
        if len(data) != PAGE_SIZE:
            raise DeviceIOError(f"page {idx}: huge object has {len(data)} bytes")
        return data

    def snapshot(
        self,
        first: int,
        last: int,
        tags: Sequence[Any] | None = None,
        backed: list[BackedItem] | None = None,
    ) -> tuple[list[Any], list[int]]:
        """One walk over pages ``[first, last]``: ``(items, zero pages)``. Per page, finished
        bytes, or ``(tag, compressed copy)`` to decode later (maybe off-thread), where the tag
        is the page's codec (or ``tags[codec id]``, e.g. its native kind); and the indices of
        the pages that read as zero (EMPTY or SAME with word 0), ascending. A BACKED page raises
        InBacking, or with ``backed`` gets a None item and a :data:`BackedItem` there: the
        caller fetches it and puts ``(tag, object)`` (or the raw page) in its place."""
        t = self.table
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        load = self.pool.load
        if tags is None:
            tags = self.codecs
        read_page = self.read_page
        groups = self.groups
        out: list[Any] = []
        append = out.append
        zero: list[int] = []
        idx = first
        while idx <= last:
            st = state_mv[idx]
            if st == STORED:
                append((tags[codec_mv[idx]], load(handle_mv[idx], size_mv[idx])))
            elif st == EMPTY or (st == SAME and not handle_mv[idx]):
                append(ZERO_PAGE)
                zero.append(idx)
            elif st == GROUPED:  # the whole run of consecutive members: one item, repeated
                gid = handle_mv[idx]
                run = groups.run_length(gid, idx, last - idx + 1)
                out += [GroupRun(groups.image(gid), size_mv[idx], len(out), run)] * run
                idx += run
                continue
            elif st == BACKED and backed is not None:
                raw = t.flags_mv[idx] & RAW
                backed.append((len(out), idx, handle_mv[idx], None if raw else tags[codec_mv[idx]]))
                append(None)
            else:
                append(read_page(idx))
            idx += 1
        return out, zero

    def snapshot_native(
        self, first: int, last: int, backed: list[BackedItem] | None = None
    ) -> tuple[Any, int, list[int]]:
        """``(items, kind, zero pages)`` for :func:`zramd.device.pipeline.native_decode_part`:
        a :class:`~zramd.device.pipeline.PackedSnap` of blobs of ``kind`` when every page is
        compressed with one native codec, huge (its raw page a blob of PAGE_SIZE bytes) or
        reads as zero (an empty blob), else per page finished bytes, ``(kind, blob)`` or
        ``(codec, blob)`` (BACKED pages as :meth:`snapshot` does them) with kind 0."""
        t = self.table
        state_mv, codec_mv = t.state_mv, t.codec_mv
        tags: list[Any] = []
        for c in self.codecs:
            k = native.decode_kind(c)
            tags.append(c if k is None else k)
        n = last - first + 1
        cids = bytes(codec_mv[first : last + 1])  # bytes: == is a memcmp (memoryview: per item)
        states = bytes(state_mv[first : last + 1])
        tag = tags[cids[0]]
        if type(tag) is int and states == bytes((STORED,)) * n and cids == bytes((cids[0],)) * n:
            # the common case, every page compressed with one native codec: their blobs of
            # ``tag`` end to end in one buffer (one copy, no object per page)
            stop = last + 1
            sizes = t.size[first:stop]
            data = self.pool.load_packed(t.handle[first:stop], sizes)
            return PackedSnap(data, np.cumsum(sizes, dtype=np.int64)), tag, []
        if bytes((GROUPED,)) not in states and bytes((BACKED,)) not in states:
            packed = self._packed_mixed(first, last + 1, tags)
            if packed is not None:
                return packed
        snap, zero = self.snapshot(first, last, tags, backed)
        return snap, 0, zero

    def _packed_mixed(
        self, first: int, stop: int, tags: list[Any]
    ) -> tuple[PackedSnap, int, list[int]] | None:
        """:meth:`snapshot_native`'s packed form of pages ``[first, stop)`` that mix compressed
        pages of one native codec with huge pages and pages that read as zero (a file
        system's holes, a process's untouched memory): huge objects load as their raw page,
        zero pages as empty blobs. None when another kind of page is among them, or when
        every page reads as zero."""
        t = self.table
        states = t.state[first:stop]
        stored = states == STORED
        huge = states == HUGE
        zero = (states == EMPTY) | ((states == SAME) & (t.handle[first:stop] == 0))
        live = stored | huge
        if not bool((live | zero).all()) or not bool(live.any()):
            return None
        cids = t.codec[first:stop][stored]
        if len(cids):
            tag = tags[int(cids[0])]
            if type(tag) is not int or not bool((cids == cids[0]).all()):
                return None
        else:  # raw pages and zeros only: nothing decodes, any native kind will do
            tag = next((k for k in tags if type(k) is int), None)
            if tag is None:
                return None
        sizes = np.where(stored, t.size[first:stop], np.where(huge, PAGE_SIZE, 0))
        data = self.pool.load_packed(t.handle[first:stop][live], sizes[live])
        ends = np.cumsum(sizes, dtype=np.int64)
        return PackedSnap(data, ends), tag, (np.flatnonzero(zero) + first).tolist()
