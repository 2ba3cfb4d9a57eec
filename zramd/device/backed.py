"""Writeback: the pages of a device that live in its backing store, and the moves to and from it.

Theory of operation
-------------------
:class:`Backed` links one device's :class:`~zramd.device.store.PageStore` to a
:class:`~zramd.backing.BackingStore` (a file or block device below RAM). The table stays the one
source of truth: a BACKED entry's handle is the object's locator, its size the object's size,
its codec the codec it was compressed with, and RAW says the object is the raw page (it was
HUGE). A single page's object goes out as it is in the pool (no recompression); the backing
store packs them.

**Groups** go out whole and dissolved: a multi-page group is written back as one object per live
member (its page decoded from the blob and compressed on its own, in a worker, with the group's
codec, zstd at no more than :data:`MEMBER_ZSTD_LEVEL`), never as one record for the group, and
the group is freed when its members switch. Why: a BACKED page is read, promoted, freed on trim
or overwrite, relocated by cleaning and saved in a snapshot by its own locator; a record shared
by a group's pages would need a reference count per record, a group read path in every read
door (inline, the Python loop, the native batch) and another kind of snapshot entry, where one
record per page keeps every one of those as it is, so reads stay right by construction. The
cost is the decode and per-page compression on the way out, off the loop and needing no room in
the pool (zstd level 3: about 30 us per page on a loaded 2-core machine; level 9, the default
group codec, took 150-230 us), and more bytes in the store than the blob held (against zstd
level 9 blobs: 1.20x for binaries, 1.37x for Python sources). In-process, 16 MiB of 1 MiB writes
over a full pool of grouped pages ran at 31-36 MB/s (10-11 MB/s with level 9 members; 96-108
MB/s over a pool of single pages), no write timing out. A group goes only whole (its live
members all in the range asked and within ``max_pages``), so writeback frees its whole blob and
never leaves it partly dead. A group whose blob does not decode stays (its pages are EIO where
they are) and is no candidate again (:attr:`~zramd.device.groups.Groups.undecodable`).

**Moves**, each "make the new copy, switch the entry, free the old", on the loop thread:

* *writeback* (:meth:`Backed.write_back`): the objects are copied out of the pool (a group's
  blob is copied, then decoded and its members compressed one by one in a worker) and their
  pages marked WB_PENDING; the store writes them in its threads (awaited); back on the loop,
  each page still WB_PENDING with the same pool handle becomes BACKED and its pool object is
  freed (:meth:`~zramd.device.store.PageStore.back`), and each group member still GROUPED and
  WB_PENDING becomes BACKED and leaves its group
  (:meth:`~zramd.device.store.PageStore.back_grouped`; a member keeps its mark only while its
  data is unchanged, even if a re-pack moved it to another group meanwhile). A page written,
  trimmed or moved meanwhile lost its mark (a write replaces the whole entry) or its handle
  (recompression, a group): its new copy in the store is freed. Batches run one at a time (a
  lock), so a mark found at switch time is the batch's own; recompression has a mark of its
  own (PENDING) and skips marked pages. A failed write (I/O error, store full, budget spent)
  leaves every page as it was.
* *promotion* (:meth:`Backed.promote`): a page read back returns to RAM when the pool, with its
  object, stays under the low watermark of the limit in force (always, with no limit), so that
  a page read again is served from RAM, while promotion never pushes the pool toward writeback
  again. The page must still be BACKED at the same locator at switch time.
* a BACKED page rewritten, trimmed or zeroed hands its locator to :meth:`Backed.drop`.

**Freeing and reads.** Locators to free are collected and freed in batches (the store's free
punches holes in its threads), each once every backing read that started before it was
dropped has ended: such a read may hold the locator (taken from the table before the page
moved), and its bytes must stay there until it has been read, so a locator is never reused while
anything may still read it. Reads are numbered as they start, so a steady stream of reads does
not hold frees back: only the reads older than the drop do. Reads (:meth:`Backed.read`) run in
the store's threads, concurrently with everything else; a read of a few objects whose records
the page cache holds is done at once on the loop thread instead (:meth:`Backed.read_now`, the
device's inline door), which holds no locator across an await and so needs no number. While a
snapshot of the device is taken it *pins* the store (:meth:`Backed.pin`): no locator is freed
(dropped ones wait, cleaning's old locators too), so every locator its image references stays
where it is until it is done. In durable mode a committed checkpoint *holds* the locators it
references (:meth:`Backed.hold`) until the next one is committed: dropped ones among them wait
for that (the store then holds at most the pages written back at the last checkpoint twice),
so that a restart from it after a crash finds them where it says.

**Memory pressure.** With a memory limit in force (the export's own, or what the server's
budget leaves it), when the pool passes the high watermark of it (:attr:`Backed.high`, a
fraction, per export: ``writeback-high``, default :data:`HIGH_WATERMARK`), a background task
writes back the coldest pages (the oldest atime first, then the largest objects; a group member
brings its whole group) until the pool is under the low watermark (:attr:`Backed.low`,
``writeback-low``, default :data:`LOW_WATERMARK`), in batches of :data:`BATCH_PAGES` pages (at
most :data:`BATCH_BYTES`), or of :data:`BURST_PAGES` (at most :data:`BURST_BYTES`) while a write
waits for room, so that the room comes in few store writes; each batch is followed by a pool
compaction bounded by :data:`COMPACT_PAGES` or the pages it freed (the freed objects are
scattered: compaction turns them into free pages), the waiters' wake-up, and a yield. A write
that finds no room (NoSpace) waits (:meth:`Backed.wait_room`) up to :attr:`Backed.wait`
seconds (``writeback-wait``, default :data:`ROOM_WAIT`; 0: it fails at once) for a batch to
make room, then tries again; it gets ENOSPC only when the backing store is full, its budget is
spent, it fails, there is nothing left to write back (a group whose blob does not decode is not
a candidate once found), or the wait times out.

**Cleaning.** Freed objects leave dead space in the store's segments. When a writeback finds
the store full while it holds at least a segment of dead space, the store cleans up to
:data:`CLEAN_SEGMENTS` of its emptiest segments (their live objects copied to a fresh one) and
the move is tried once more; each relocated page still at its old locator switches to the new
one (a page freed or rewritten meanwhile: the new copy is freed), and the old locators are freed,
which gives the victims back.

**Memory.** A BACKED page costs its table entry (15 B, as every page holding data) and the
store's record (an 8 B locator and a dead flag in its segment's arrays, about 330 B per
segment): 24-30 B per page by the structures. Measured (``python -m zramd.bench writeback
--rss``: VmRSS of a server with 131,072 and 262,144 pages all written back, against the same
server empty; medians): +8.8 to +10.5 MB and +12.5 to +14.3 MB, the rest being the store's
threads and malloc's heap. The stated bound is 48 B per page in the store plus 8 MiB; a batch in
flight adds its copy of the objects (at most :data:`BURST_BYTES`).

**Faults** cost the request or batch that met them: a failed read is DeviceIOError (EIO) for
that read, a failed writeback leaves its pages in RAM. The log names the store, the error and
where, once per kind of fault and then at most every :data:`FAULT_LOG_INTERVAL` seconds with
the number of repeats (never once per page).

Loop thread only; knows nothing of NBD, sockets or the control protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from zramd.allocator import PoolFull
from zramd.backing import BackingError, BackingFull, BackingStore, BudgetSpent
from zramd.compress import Codec, CodecError, get_codec
from zramd.device.interface import DeviceIOError, WritebackResult
from zramd.device.pipeline import GroupImage
from zramd.device.store import PageStore
from zramd.device.table import (
    BACKED,
    GROUPED,
    HUGE,
    IDLE,
    INCOMPRESSIBLE,
    PENDING,
    STORED,
    WB_PENDING,
)
from zramd.geometry import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger("zramd.device")

#: writeback ``type`` values (zram's idle / huge / huge_idle / incompressible)
WRITEBACK_TYPES = ("idle", "huge", "huge-idle", "incompressible")
#: fractions of the memory limit in force: pressure writeback starts above HIGH, stops under LOW
#: (the defaults of an export's ``writeback-high`` and ``writeback-low``)
HIGH_WATERMARK = 0.90
LOW_WATERMARK = 0.80
#: pages, and object bytes, per writeback batch (one write of the store)
BATCH_PAGES = 64
BATCH_BYTES = 256 << 10
#: pages, and object bytes, per pressure batch while writes wait for room
BURST_PAGES = 1024
BURST_BYTES = 4 << 20
#: pages whose flags are scanned per vectorised step
SCAN_PAGES = 1 << 16
#: the coldest pages pressure writeback picks per round (then written in batches)
PRESSURE_ROUND_PAGES = 4096
#: pool pages one compaction after a pressure batch may free at most (or the pages the batch
#: freed, when more)
COMPACT_PAGES = 256
#: the longest a write without room waits for writeback, in seconds (the default of an export's
#: ``writeback-wait``)
ROOM_WAIT = 2.0
#: a zstd group's members go to the backing store compressed at most at this level (per 4 KiB
#: page, level 3 is about 5x faster than level 9 for about 5% more bytes)
MEMBER_ZSTD_LEVEL = 3
#: segments one cleaning of a full store empties at most
CLEAN_SEGMENTS = 8
#: a repeated fault of the same kind is logged at most this often, in seconds
FAULT_LOG_INTERVAL = 60.0


def check_writeback(high: float, low: float, wait: float) -> None:
    """Refuse watermarks outside ``0 < low < high <= 1`` or a negative wait: ValueError naming
    the setting (``writeback-high``, ``writeback-low``, ``writeback-wait``)."""
    if not 0 < high <= 1:
        raise ValueError(f"writeback-high {high:g} must be in (0, 1]")
    if not 0 < low <= 1:
        raise ValueError(f"writeback-low {low:g} must be in (0, 1]")
    if low >= high:
        raise ValueError(f"writeback-low {low:g} must be below writeback-high {high:g}")
    if not wait >= 0:  # NaN too
        raise ValueError(f"writeback-wait {wait:g}s must not be negative")


def _fault_kind(exc: BaseException) -> str:
    if isinstance(exc, BudgetSpent):
        return "budget"
    if isinstance(exc, BackingFull):
        return "full"
    return "io"


class Backed:
    """The backing store of one device (see the module doc). ``limit()`` is the memory limit in
    force for the device's pool (0: none); ``run(fn, *args)`` runs ``fn`` in a worker (the
    device's executor); ``high``, ``low`` and ``wait`` as in :meth:`configure`."""

    def __init__(
        self,
        store: PageStore,
        backing: BackingStore,
        limit: Callable[[], int],
        run: Callable[..., Awaitable[Any]],
        *,
        high: float = HIGH_WATERMARK,
        low: float = LOW_WATERMARK,
        wait: float = ROOM_WAIT,
    ) -> None:
        self.high = self.low = self.wait = 0.0
        self.configure(high, low, wait)
        self.backing = backing
        self.store = store
        store.backed = self
        self._limit = limit
        self._run = run
        #: locators to free, with the number of reads started when each was dropped
        self._garbage: list[tuple[int, int]] = []
        #: the locators the last committed checkpoint references (durable mode: :meth:`hold`),
        #: and those of them the device dropped since (freed by the next hold)
        self._held: set[int] = set()
        self._deferred: list[int] = []
        #: reads started so far, and the start numbers of those in flight
        self._reads_started = 0
        self._reading: dict[int, None] = {}
        self._freeing = False
        #: snapshots being taken (no locator is freed meanwhile)
        self._pins = 0
        #: one writeback batch at a time (pressure and on demand)
        self._batch = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pressure: asyncio.Task[None] | None = None
        #: a write is waiting: run a pressure round even under the high watermark
        self._wanted = False
        #: writes waiting for room now (pressure batches are bursts meanwhile)
        self._waiters = 0
        #: why the last pressure round stopped without making room ("" when it did)
        self.stuck = ""
        self._progress = asyncio.Event()
        self._faults: dict[str, tuple[float, int]] = {}
        self._closed = False

    def configure(self, high: float, low: float, wait: float) -> None:
        """Set the watermarks (fractions of the limit in force, ``0 < low < high <= 1``) and the
        longest wait of a write for room, in seconds (>= 0). Raises ValueError. A pool already
        over the new high watermark is written back at the next write."""
        check_writeback(high, low, wait)
        self.high, self.low, self.wait = float(high), float(low), float(wait)

    def drop_all(self) -> None:
        """The device is being reset: free every locator its store holds."""
        t = self.store.table
        for loc in t.handle[t.state == BACKED].tolist():
            self.drop(loc)

    def bind(self, store: PageStore) -> None:
        """Serve the device's new store (after a reset)."""
        self.store = store
        store.backed = self

    def close(self) -> None:
        """The device closes: stop the background work (the export closes the store)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._pressure is not None:
            self._pressure.cancel()

    # --- faults -----------------------------------------------------------------------------

    def fault(self, what: str, exc: BaseException) -> None:
        """Count a failed backing operation and log it (once per kind, then rarely); not once
        the device is closed (what its background work meets then, a closed store, is no
        fault)."""
        if self._closed:
            return
        self.store.stats.bd_errors += 1
        kind = f"{what}:{_fault_kind(exc)}"
        now = time.monotonic()
        last, repeats = self._faults.get(kind, (-FAULT_LOG_INTERVAL, 0))
        if now - last < FAULT_LOG_INTERVAL:
            self._faults[kind] = (last, repeats + 1)
            return
        more = f" ({repeats} more since the last report)" if repeats else ""
        log.warning("backing store %s: %s failed: %s%s", self.backing.path, what, exc, more)
        self._faults[kind] = (now, 0)

    # --- freeing ------------------------------------------------------------------------------

    def waits(self) -> str:
        """What writes may be waiting for here (``Device.waits``)."""
        running = self._pressure is not None and not self._pressure.done()
        return (
            f"writes waiting for room: {self._waiters}, pressure writeback "
            f"{'running' if running else 'idle'}"
            + (f" (stuck: {self.stuck})" if self.stuck else "")
            + f", reads in flight from the backing store: {len(self._reading)}"
        )

    def drop(self, loc: int) -> None:
        """``loc`` is no longer referenced: free it once the reads started before have ended
        (and, if the last checkpoint references it, once a newer one is committed)."""
        if loc in self._held:
            self._deferred.append(loc)
            return
        self._garbage.append((self._reads_started, loc))
        self._flush()

    def hold(self, locs: list[int]) -> None:
        """A checkpoint that references ``locs`` is committed (durable mode): keep them where
        they are until the next one, so that a restart from it finds them (their segments keep
        their generation); the locators the previous checkpoint held and the device dropped
        since are freed now."""
        held = set(locs)
        free = [loc for loc in self._deferred if loc not in held]
        self._deferred = [loc for loc in self._deferred if loc in held]
        # dropped while the checkpoint was written (the capture pins, so they wait here)
        self._deferred += [loc for _, loc in self._garbage if loc in held]
        self._garbage = [(seq, loc) for seq, loc in self._garbage if loc not in held]
        self._held = held
        for loc in free:
            self._garbage.append((self._reads_started, loc))
        self._flush()

    def pin(self) -> None:
        """A snapshot begins: free no locator until :meth:`unpin` (see the module doc)."""
        self._pins += 1

    def unpin(self) -> None:
        """A snapshot is done: the locators dropped meanwhile are freed."""
        assert self._pins > 0
        self._pins -= 1
        self._flush()

    def _freeable(self) -> list[int]:
        """Take the locators no read in flight nor snapshot can hold out of the garbage."""
        if self._pins:
            return []
        if not self._reading:
            out = [loc for _, loc in self._garbage]
            self._garbage = []
            return out
        oldest = next(iter(self._reading))  # the dict keeps the order the reads started in
        out = [loc for seq, loc in self._garbage if seq <= oldest]
        if out:
            self._garbage = [(seq, loc) for seq, loc in self._garbage if seq > oldest]
        return out

    def _flush(self) -> None:
        if self._freeing or not self._garbage or self._closed or self._pins:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the sync API): no async operation can be in flight
            self._free_now(self._freeable())
            return
        self._freeing = True
        task = loop.create_task(self._free_loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _free_now(self, locs: list[int]) -> None:
        try:
            self.backing.free_sync(locs)
        except (BackingError, ValueError) as e:
            self.fault("free", e)

    async def _free_loop(self) -> None:
        try:
            while self._garbage and not self._closed:
                locs = self._freeable()
                if not locs:
                    return  # the end of an older read flushes again
                try:
                    await self.backing.free(locs)
                except (BackingError, ValueError) as e:
                    self.fault("free", e)
        finally:
            self._freeing = False

    # --- reads and promotion ------------------------------------------------------------------

    async def read(self, locs: list[int]) -> list[bytes]:
        """The objects at ``locs`` (in the store's threads). Raises DeviceIOError."""
        s = self.store.stats
        seq = self._reads_started
        self._reads_started += 1
        self._reading[seq] = None
        t0 = time.perf_counter()
        try:
            objs = await self.backing.read_many(locs)
        except BackingError as e:
            self.fault("read", e)
            raise DeviceIOError(f"backing store {self.backing.path}: {e}") from None
        finally:
            del self._reading[seq]
            if self._garbage:
                self._flush()
        s.bd_read_us += int((time.perf_counter() - t0) * 1e6)
        s.bd_reads += len(locs)
        s.bd_read_bytes += sum(len(o) for o in objs)
        return objs

    def read_now(self, locs: list[int]) -> list[bytes] | None:
        """The objects at ``locs`` (at most :data:`~zramd.backing.CACHED_READ_MAX_OBJECTS`)
        when the page cache holds all of them, read on this thread (no wait for the device, no
        thread hop) and counted as :meth:`read` counts; None when only the store's threads can
        read them (nothing read, nothing counted). Raises DeviceIOError."""
        t0 = time.perf_counter()
        try:
            objs = self.backing.read_cached(locs)
        except BackingError as e:
            self.fault("read", e)
            raise DeviceIOError(f"backing store {self.backing.path}: {e}") from None
        if objs is None:
            return None
        s = self.store.stats
        s.bd_read_us += int((time.perf_counter() - t0) * 1e6)
        s.bd_reads += len(locs)
        s.bd_read_bytes += sum(len(o) for o in objs)
        return objs

    def promote(self, store: PageStore, pages: list[tuple[int, int, bytes]]) -> None:
        """Pages ``(index, locator, object)`` just read back return to RAM while the pool
        stays under the low watermark (see the module doc)."""
        if store is not self.store or self._closed:
            return
        limit = self._limit()
        low = int(limit * self.low)
        pool = store.pool
        for idx, loc, obj in pages:
            if limit and pool.total_bytes + len(obj) > low:
                return
            try:
                moved = store.unback(idx, loc, obj)
            except PoolFull:
                return
            if moved:
                store.stats.bd_promoted += 1
                self.drop(loc)

    # --- writeback ----------------------------------------------------------------------------

    async def write_back(self, pages: list[int]) -> tuple[int, int, int, str]:
        """Write the pages of ``pages`` still eligible (STORED, HUGE or GROUPED, not marked)
        back as one batch, each group with all its live members: ``(pages tried, pages switched
        to BACKED, their object bytes, error)``, error "" or the kind of the fault that left
        them all in RAM."""
        async with self._batch:
            if self._closed:
                return 0, 0, 0, ""
            return await self._write_back([i for i in pages if self._eligible(i)])

    async def _write_back(self, pages: list[int]) -> tuple[int, int, int, str]:
        if not pages:
            return 0, 0, 0, ""
        store = self.store
        t = store.table
        state_mv, handle_mv, size_mv, flags_mv = t.state_mv, t.handle_mv, t.size_mv, t.flags_mv
        load = store.pool.load
        objs: list[bytes] = []
        handles: list[int] = []
        singles: list[int] = []
        gids: dict[int, None] = {}
        for i in pages:
            h = handle_mv[i]
            if state_mv[i] == GROUPED:
                gids[h] = None
                continue
            objs.append(load(h, PAGE_SIZE if state_mv[i] == HUGE else size_mv[i]))
            handles.append(h)
            singles.append(i)
            flags_mv[i] |= WB_PENDING
        marked = list(singles)
        #: group members: (page, object size, raw, codec id)
        members: list[tuple[int, int, bool, int]] = []
        if gids:
            groups = store.groups
            jobs: list[tuple[GroupImage, list[int], Codec]] = []
            pages_of: list[list[int]] = []
            codec_ids: list[int] = []
            for gid in gids:
                idx = groups.live_members(gid)
                for i in idx:
                    flags_mv[i] |= WB_PENDING
                cid = _member_codec(store, int(groups.codec[gid]))
                img = groups.image(gid, remember=False)  # the read cache keeps its groups
                jobs.append((img, [size_mv[i] for i in idx], store.codecs[cid]))
                codec_ids.append(cid)
                pages_of.append(idx)
                marked += idx
            try:
                encoded = await self._run(_encode_members, jobs, store.pool.huge_class_size)
            except BaseException:
                self._unmark(store, marked)
                raise
            if self.store is not store or self._closed:
                return 0, 0, 0, ""
            for gid, idx, cid, enc in zip(gids, pages_of, codec_ids, encoded, strict=True):
                if enc is None:  # the blob does not decode: its pages are EIO where they are
                    groups.undecodable.add(gid)
                    for i in idx:
                        flags_mv[i] &= ~WB_PENDING
                    continue
                for i, (obj, raw) in zip(idx, enc, strict=True):
                    objs.append(obj)
                    members.append((i, len(obj), raw, cid))
        if not objs:
            return len(marked), 0, 0, ""
        t0 = time.perf_counter()
        try:
            locs = await self._write(objs)
        except BaseException as e:
            self._unmark(store, marked)
            if isinstance(e, BackingError):
                self.fault("writeback", e)
                return len(marked), 0, 0, _fault_kind(e)
            raise
        s = store.stats
        s.bd_write_us += int((time.perf_counter() - t0) * 1e6)
        s.bd_writes += len(objs)
        s.bd_write_bytes += sum(len(o) for o in objs)
        if self.store is not store or self._closed:  # reset or closed meanwhile
            for loc in locs:
                self.drop(loc)
            return len(marked), 0, 0, ""
        done = nbytes = 0
        back = store.back
        n = len(singles)
        for i, h, loc, obj in zip(singles, handles, locs[:n], objs[:n], strict=True):
            if back(i, h, loc):
                done += 1
                nbytes += len(obj)
                continue
            self.drop(loc)  # written, trimmed or moved (recompressed, grouped) meanwhile
            flags_mv[i] &= ~WB_PENDING
        back_grouped = store.back_grouped
        for (i, size, raw, cid), loc in zip(members, locs[n:], strict=True):
            if back_grouped(i, loc, size, raw, cid):
                done += 1
                nbytes += size
                continue
            self.drop(loc)  # written or trimmed meanwhile
            flags_mv[i] &= ~WB_PENDING
        if store.groups.pending:
            store.groups.settle()
        return len(marked), done, nbytes, ""

    def _unmark(self, store: PageStore, pages: list[int]) -> None:
        """A batch failed: the marks still there are its own (none once the table is gone)."""
        if self.store is store and not self._closed:
            flags_mv = store.table.flags_mv
            for i in pages:
                flags_mv[i] &= ~WB_PENDING

    def _whole_groups(self, pages: list[int], first: int, stop: int, limit: int) -> list[int]:
        """``pages`` with each GROUPED page replaced by all the live members of its group, in
        order, at most ``limit`` pages; a group goes only whole: one with a member outside
        ``[first, stop)``, not eligible, or past ``limit`` is left out, and so is one whose blob
        was found not to decode."""
        t = self.store.table
        groups = self.store.groups
        out: list[int] = []
        seen: set[int] = set()
        for i in pages:
            if len(out) >= limit:
                break
            if t.state_mv[i] != GROUPED:
                out.append(i)
                continue
            gid = t.handle_mv[i]
            if gid in seen:
                continue
            seen.add(gid)
            if gid in groups.undecodable:
                continue
            idx = groups.live_members(gid)
            if idx[0] < first or idx[-1] >= stop or len(out) + len(idx) > limit:
                continue
            if all(self._eligible(m) for m in idx):
                out += idx
        return out

    async def _write(self, objs: list[bytes]) -> list[int]:
        """Write ``objs`` to the store; a full store with dead space is cleaned and the write
        tried once more."""
        try:
            return await self.backing.write_many(objs)
        except BudgetSpent:
            raise
        except BackingFull:
            if not await self._clean():
                raise
        return await self.backing.write_many(objs)

    async def _clean(self) -> bool:
        """Clean the store (see the module doc): whether segments were won."""
        b = self.backing
        if b.cleanable_bytes() < b.segment_size:
            return False
        store = self.store
        try:
            res = await b.clean(CLEAN_SEGMENTS)
        except BackingError as e:
            self.fault("cleaning", e)
            return False
        if self.store is not store or self._closed:
            for _, new in res.relocations:
                self.drop(new)
            return False
        t = store.table
        backed = np.flatnonzero(t.state == BACKED)
        handles = t.handle[backed]
        olds = np.fromiter((o for o, _ in res.relocations), dtype=np.uint64)
        hit = np.isin(handles, olds)
        where = dict(zip(handles[hit].tolist(), backed[hit].tolist(), strict=True))
        freed: list[int] = []
        for old, new in res.relocations:
            i = where.get(old)
            if i is None:
                self.drop(new)  # freed or rewritten meanwhile
                continue
            t.handle_mv[i] = new
            freed.append(old)
        if self._reading or self._pins or self._held:
            # a read in flight, a snapshot or the last checkpoint may hold an old one
            for loc in freed:
                self.drop(loc)
            return False
        try:
            await b.free(freed)
        except (BackingError, ValueError) as e:
            self.fault("free", e)
            return False
        return res.segments > 0

    async def writeback(
        self, kind: str, first: int, stop: int, max_pages: int, max_scan: int
    ) -> WritebackResult:
        """Write back the pages of ``[first, stop)`` of ``kind`` (:data:`WRITEBACK_TYPES`), at
        most ``max_pages`` tried and ``max_scan`` scanned, in batches; the largest objects of
        each scanned window first, as zram. Ends with a compaction of the pool when it wrote."""
        if kind not in WRITEBACK_TYPES:
            expected = ", ".join(WRITEBACK_TYPES)
            raise ValueError(f"writeback type {kind!r}: expected one of {expected}")
        res = WritebackResult(next=first, end=stop)
        store = self.store
        limit = min(stop, first + max_scan)
        pos = first
        while pos < limit and res.tried < max_pages and not res.error:
            window = min(limit, pos + SCAN_PAGES)
            idx = self._candidates(pos, window, kind)
            pos = res.next = window
            take = max_pages - res.tried
            if len(idx) > take:
                idx = idx[:take]
            if not len(idx):
                await asyncio.sleep(0)
                continue
            t = store.table
            sizes = t.size[idx]
            order = np.argsort(-sizes.astype(np.int32), kind="stable")
            pages = self._whole_groups(idx[order].tolist(), first, stop, take)
            for batch in _batches(pages, t.size_mv):
                if self.store is not store or self._closed:
                    return res
                batch = [i for i in batch if self._eligible(i)]
                if not batch:
                    continue
                tried, done, nbytes, err = await self.write_back(batch)
                res.tried += tried
                res.written += done
                res.bytes += nbytes
                if err:
                    res.error = err
                    break
        if res.written and self.store is store:
            store.pool.compact()
        return res

    def _eligible(self, i: int) -> bool:
        t = self.store.table
        st = t.state_mv[i]
        return (st == STORED or st == HUGE or st == GROUPED) and not t.flags_mv[i] & (
            PENDING | WB_PENDING
        )

    def _candidates(self, first: int, stop: int, kind: str) -> Any:
        t = self.store.table
        st = t.state[first:stop]
        fl = t.flags[first:stop]
        if kind in ("huge", "huge-idle"):
            ok = st == HUGE
        elif kind == "idle":
            ok = (st == STORED) | (st == HUGE) | (st == GROUPED)
        else:
            ok = (st == STORED) | (st == HUGE)
        ok &= (fl & (PENDING | WB_PENDING)) == 0
        if kind in ("idle", "huge-idle"):
            ok &= (fl & IDLE) != 0
        elif kind == "incompressible":
            ok &= (fl & INCOMPRESSIBLE) != 0
        return np.flatnonzero(ok) + first

    # --- memory pressure ----------------------------------------------------------------------

    def _over(self, fraction: float) -> bool:
        limit = self._limit()
        return bool(limit) and self.store.pool.total_bytes > limit * fraction

    def check(self) -> None:
        """Start pressure writeback when the pool is over the high watermark (cheap enough for
        every write: one comparison when it is not)."""
        if self._pressure is None and self._over(self.high):
            self._start()

    def _start(self) -> None:
        if self._pressure is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # the sync API: no background work
        self._pressure = loop.create_task(self._pressure_loop())

    @property
    def waiting(self) -> bool:
        """Whether writes are waiting for room."""
        return self._waiters > 0

    async def wait_room(self, deadline: float) -> bool:
        """A write found no room: wait (until ``deadline``, loop time) for a pressure batch to
        make some. False when none can be made in time (the write fails with ENOSPC)."""
        if self._closed:
            return False
        s = self.store.stats
        s.bd_waits += 1
        loop = asyncio.get_running_loop()
        self._wanted = True
        self._start()
        ev = self._progress
        self._waiters += 1
        try:
            await asyncio.wait_for(ev.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            s.bd_wait_timeouts += 1
            return False
        finally:
            self._waiters -= 1
        if self.stuck:
            s.bd_wait_timeouts += 1
            return False
        return True

    def _signal(self) -> None:
        ev, self._progress = self._progress, asyncio.Event()
        ev.set()

    async def _pressure_loop(self) -> None:
        try:
            while not self._closed and (self._wanted or self._over(self.low)):
                self._wanted = False
                store = self.store
                pages = self._whole_groups(
                    await self._coldest(PRESSURE_ROUND_PAGES), 0, store.table.npages, 2**62
                )
                if not pages or self.store is not store:
                    self.stuck = "nothing left to write back"
                    break
                pos = 0
                while pos < len(pages):
                    burst = self._wanted or self._waiters > 0
                    batch, pos = _next_batch(
                        pages,
                        pos,
                        store.table.size_mv,
                        BURST_PAGES if burst else BATCH_PAGES,
                        BURST_BYTES if burst else BATCH_BYTES,
                    )
                    batch = [i for i in batch if self._eligible(i)]
                    if not batch:
                        continue
                    _, done, nbytes, err = await self.write_back(batch)
                    if self.store is not store or self._closed:
                        return
                    if err:
                        self.stuck = f"writeback failed ({err})"
                        return
                    self.stuck = ""
                    if done:
                        store.pool.compact(max_pages=max(COMPACT_PAGES, nbytes // PAGE_SIZE))
                    self._signal()
                    if not self._wanted and not self._over(self.low):
                        break
                    await asyncio.sleep(0)
        finally:
            self._pressure = None
            self._signal()

    async def _coldest(self, n: int) -> list[int]:
        """Up to ``n`` writeback candidates, the oldest atime first, then the largest object (a
        group member's size is its rank: members come after single pages of the same age):
        one vectorised step per SCAN_PAGES pages (about a millisecond), a yield between them
        (the batches check each page again before they take it)."""
        store = self.store
        best_idx = np.zeros(0, dtype=np.int64)
        best_key = np.zeros(0, dtype=np.int64)
        for a in range(0, store.table.npages, SCAN_PAGES):
            if a:
                await asyncio.sleep(0)
                if self.store is not store or self._closed:
                    return []
            t = store.table
            b = min(t.npages, a + SCAN_PAGES)
            st = t.state[a:b]
            ok = ((st == STORED) | (st == HUGE) | (st == GROUPED)) & (
                (t.flags[a:b] & (PENDING | WB_PENDING)) == 0
            )
            idx = np.flatnonzero(ok)
            if not len(idx):
                continue
            key = (t.atime[a:b][idx].astype(np.int64) << 16) | (
                0xFFFF - t.size[a:b][idx].astype(np.int64)
            )
            best_idx = np.concatenate((best_idx, idx + a))
            best_key = np.concatenate((best_key, key))
            if len(best_idx) > n:
                keep = np.argpartition(best_key, n)[:n]
                best_idx, best_key = best_idx[keep], best_key[keep]
        order = np.argsort(best_key, kind="stable")
        return [int(i) for i in best_idx[order]]


def _member_codec(store: PageStore, codec_id: int) -> int:
    """The codec a group's members are compressed with on the way out: the group's, but zstd
    at no more than :data:`MEMBER_ZSTD_LEVEL` (listed in the store's codecs if need be; the
    group's when the list is full)."""
    codec = store.codecs[codec_id]
    if codec.name != "zstd" or codec.level <= MEMBER_ZSTD_LEVEL or set(codec.params) != {"level"}:
        return codec_id
    try:
        return store.codec_id(get_codec("zstd", level=MEMBER_ZSTD_LEVEL))
    except ValueError:
        return codec_id


def _encode_members(
    jobs: list[tuple[GroupImage, list[int], Codec]], threshold: int
) -> list[list[tuple[bytes, bool]] | None]:
    """Per group (its image, the ranks of its live members, the codec for them): each member
    page compressed on its own, ``(object, raw)``, raw (the page itself) when
    the object would be ``threshold`` bytes or more; None for a blob that does not decode. Runs in
    a worker."""
    out: list[list[tuple[bytes, bool]] | None] = []
    for img, ranks, codec in jobs:
        try:
            data = img.pages()
        except CodecError:
            out.append(None)
            continue
        objs: list[tuple[bytes, bool]] = []
        for k in ranks:
            page = data[k << PAGE_SHIFT : (k + 1) << PAGE_SHIFT]
            comp = codec.compress(page)
            objs.append((page, True) if len(comp) >= threshold else (comp, False))
        out.append(objs)
    return out


def _batches(pages: list[int], size_mv: Any) -> list[list[int]]:
    """``pages`` cut into writeback batches of at most BATCH_PAGES pages and BATCH_BYTES."""
    out: list[list[int]] = []
    pos = 0
    while pos < len(pages):
        batch, pos = _next_batch(pages, pos, size_mv, BATCH_PAGES, BATCH_BYTES)
        out.append(batch)
    return out


def _next_batch(
    pages: list[int], pos: int, size_mv: Any, max_pages: int, max_bytes: int
) -> tuple[list[int], int]:
    """The batch of ``pages`` from ``pos`` (at least one page, at most ``max_pages`` and
    ``max_bytes`` of objects), and the position after it."""
    end = min(len(pages), pos + max_pages)
    nbytes = 0
    stop = pos
    while stop < end:
        nbytes += size_mv[pages[stop]]
        if stop > pos and nbytes > max_bytes:
            break
        stop += 1
    return pages[pos:stop], stop
