"""Cold pages: idle marking, the per-page state listing, recompression with secondary
algorithms, and the policy that drives them in the background.

Theory of operation
-------------------
Every read and write stamps the pages it touches with the store's coarse clock and clears their
IDLE mark (:mod:`zramd.device.store`). On top of that, this module does what zram's ``idle``,
``recompress`` and debugfs ``block_state`` do, over page ranges, so that every step is short:

* :func:`mark_idle` marks the pages of a range that hold a pool object (not holes, not
  same-filled pages, as zram) IDLE: all of them, or those not accessed for at least an age. One
  vectorised pass per range.
* :func:`page_rows` lists the live pages of a range: index, age in seconds, state and marks.
* :func:`recompress` walks a range for candidates (STORED or HUGE pages, neither RECOMPRESSED nor
  INCOMPRESSIBLE; only IDLE ones and/or only HUGE ones by ``type``; objects of at least
  ``threshold`` bytes) in batches. Per batch, on the loop thread, it copies each candidate's
  object out of the pool and marks the page PENDING; the codec work (decode, then each
  recompression algorithm in order until one wins) runs in the device's executor
  (:func:`zramd.device.pipeline.recompress_part`, pure); back on the loop thread each page is
  switched with :meth:`zramd.device.store.PageStore.move`: new copy, switch, free the old. A
  page that was written or discarded meanwhile has lost its PENDING mark (a write replaces the
  whole entry) and is left alone. PoolFull while storing a new copy leaves that page as it was
  and ends the run (``nospace``); nothing else changed for it.

Which result is kept: as zram, a recompressed object is kept only when it lands in a smaller
pool size class than the old one. The pool hands out slots by class, so an object that shrinks
within its class frees nothing, while every later read of it pays the slower decoder. A page
that no algorithm moves to a smaller class is marked INCOMPRESSIBLE when every configured
recompression algorithm was tried (not when ``algorithm`` picked one of several), and is not
tried again until it is rewritten. A page is recompressed at most once per write: RECOMPRESSED
pages are skipped.

:class:`TierPolicy` is the background task of an export that asks for it
(``recompress-after``): every ``interval`` it marks the pages not accessed for ``after``
seconds idle, packs runs of idle pages into multi-page groups when it has ``group_pages``
(the device's ``group``, :data:`POLICY_GROUP_PAGES` pages per call, which the device packs a
step at a time), then recompresses the idle pages left one by one when the device has
recompression algorithms, all through the device contract (``mark_idle``, ``group``,
``recompress``). Marking and recompression go in slices of at most :data:`POLICY_SLICE_PAGES`
scanned or :data:`POLICY_BATCH_PAGES` recompressed pages; grouping goes a device step at a time
(copy the members out, compress in a worker, install), and the compaction after it in slices
(``group``'s ``on_hold`` and ``pace``). Measured on 256 MiB of cold text pages (two shared
cores), a slice holds the loop 0.09-0.11 ms at the median and 0.22-0.34 ms at the 99th
percentile; on 256 MiB of real files a group step holds it 0.16 ms (copy-out) and 0.34 ms
(install) at the median, 1.1 ms at most, and a compaction slice 0.6 ms (1.5 at most). The
longest stretch is kept in :attr:`TierPolicy.max_slice_us`; under client load it reads a few
ms, since the loop thread then shares the two cores with the client and the workers (the
host's scheduling, not the length of the work). Between slices, steps and compaction slices it
yields; when the yield came back late (other callbacks were waiting: client requests) or
clients used the export since the last slice, it backs off, doubling the pause up to
:data:`POLICY_MAX_BACKOFF`: under steady client load it does one slice or step per
POLICY_MAX_BACKOFF. It stops when cancelled (server shutdown, export removed); a device reset
makes the running pass end early (``recompress`` notices the store changed) and the next pass
starts on the empty device.

Loop thread only; knows nothing of NBD, sockets or the control protocol.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from zramd.allocator import PoolFull, build_classes
from zramd.compress import Codec
from zramd.device.interface import BlockDevice, PageState, RecompressResult, Unsupported
from zramd.device.pipeline import RECOMPRESS_KEEP, RECOMPRESS_UNREADABLE, recompress_part
from zramd.device.store import PageStore
from zramd.device.table import (
    ATIME_QUANTUM,
    BACKED,
    EMPTY,
    FLAG_NAMES,
    GROUPED,
    HUGE,
    IDLE,
    INCOMPRESSIBLE,
    PENDING,
    RAW,
    RECOMPRESSED,
    SAME,
    STATE_NAMES,
    STORED,
    WB_PENDING,
)
from zramd.geometry import PAGE_SIZE

log = logging.getLogger("zramd.device")

#: recompress ``type`` values (zram's idle / huge / huge_idle; "all" when not given)
RECOMPRESS_TYPES = ("all", "idle", "huge", "huge-idle")
#: pages whose flags are scanned per vectorised step (idle marking, candidate search)
SCAN_PAGES = 1 << 16
#: pages copied out, compressed in the workers and switched per batch (one-shot command)
BATCH_PAGES = 256
#: the policy's smaller steps: pages scanned per idle-marking slice, pages per recompress batch
POLICY_SLICE_PAGES = 1 << 15
POLICY_BATCH_PAGES = 16
#: pages one group() call of the policy covers (the device packs them a step at a time)
POLICY_GROUP_PAGES = 4096
#: a yield that comes back later than this means other callbacks were waiting (an idle loop
#: answers in 1-2 us, one client request takes tens): back off
POLICY_BUSY_LAG = 0.00005
POLICY_MIN_BACKOFF = 0.002
POLICY_MAX_BACKOFF = 0.1


def codec_spec(codec: Codec) -> str:
    """``zstd(level=3)``: a codec as the configuration names it (``lz4`` without a level)."""
    return f"{codec.name}(level={codec.level})" if codec.level else codec.name


@lru_cache(maxsize=8)
def class_sizes(chain_size: int) -> tuple[int, ...]:
    """Per object size 0..PAGE_SIZE, the size of the pool class that holds it (the merged
    classes keep the largest size of each run, so it is the smallest class size >= n)."""
    specs, _index = build_classes(chain_size)
    sizes = sorted(c.size for c in specs)
    return tuple(sizes[bisect.bisect_left(sizes, n)] if n else 0 for n in range(PAGE_SIZE + 1))


def mark_idle(store: PageStore, first: int, stop: int, min_age: float | None) -> int:
    """Mark IDLE the pages of ``[first, stop)`` that hold a pool object (not holes, not
    same-filled pages) and are not already idle: all of them, or (``min_age`` seconds) those
    not read or written for at least that long, to the clock's quantum. Returns how many."""
    t = store.table
    st = t.state[first:stop]
    fl = t.flags[first:stop]
    cand = (st != EMPTY) & (st != SAME) & ((fl & IDLE) == 0)
    if min_age is not None:
        quanta = int(min_age // ATIME_QUANTUM)  # a page may be marked up to a quantum early
        ages = store.now - t.atime[first:stop].astype(np.int32)
        cand &= ages >= quanta
    n = int(np.count_nonzero(cand))
    if n:
        fl[cand] |= np.uint8(IDLE)
        store.stats.idle_pages += n
    return n


def page_rows(store: PageStore, first: int, stop: int, limit: int) -> tuple[list[PageState], int]:
    """The live pages of ``[first, stop)``, at most ``limit`` of them, and where to go on from
    (``stop`` when the range is done)."""
    t = store.table
    idx = t.occupied(first, stop)[:limit]
    nxt = int(idx[-1]) + 1 if len(idx) == limit else stop
    rows: list[PageState] = []
    codecs = store.codecs
    for i in idx.tolist():
        st = t.state_mv[i]
        fl = t.flags_mv[i]
        raw = st == HUGE or (st == BACKED and fl & RAW)
        flags = [STATE_NAMES[st]] if st in (SAME, HUGE, GROUPED, BACKED) else []
        if st == BACKED and raw:
            flags.append("huge")
        flags += [name for bit, name in FLAG_NAMES.items() if fl & bit]
        rows.append(
            PageState(
                index=i,
                age=store.age(i),
                state=STATE_NAMES[st],
                flags=flags,
                size=t.size_mv[i] if st in (STORED, HUGE, BACKED) else 0,
                algorithm=(
                    codecs[t.codec_mv[i]].name if st in (STORED, GROUPED, BACKED) and not raw
                    else ""
                ),
            )
        )
    return rows, nxt


def candidates(
    store: PageStore, first: int, stop: int, kind: str, threshold: int
) -> Any:
    """Absolute indices of the pages of ``[first, stop)`` a recompression of ``kind`` tries."""
    t = store.table
    st = t.state[first:stop]
    fl = t.flags[first:stop]
    ok = (st == HUGE) if kind in ("huge", "huge-idle") else (st == STORED) | (st == HUGE)
    ok &= (fl & (RECOMPRESSED | INCOMPRESSIBLE | PENDING | WB_PENDING)) == 0
    if kind in ("idle", "huge-idle"):
        ok &= (fl & IDLE) != 0
    if threshold:
        ok &= t.size[first:stop] >= threshold
    return np.flatnonzero(ok) + first


Runner = Callable[..., Awaitable[Any]]
#: told how long each stretch the run held the loop took, in seconds
HoldHook = Callable[[float], None]


@contextlib.contextmanager
def held(on_hold: HoldHook | None) -> Iterator[None]:
    """Time the ``with`` block, a stretch on the loop thread, and tell ``on_hold`` how long it
    took (nothing to time without one)."""
    if on_hold is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        on_hold(time.perf_counter() - t0)


async def recompress(
    device_store: Callable[[], PageStore | None],
    run: Runner,
    *,
    algorithms: list[int],
    complete: bool,
    huge_threshold: int,
    kind: str,
    threshold: int,
    first: int,
    stop: int,
    max_pages: int,
    max_scan: int,
    batch_pages: int = BATCH_PAGES,
    on_hold: HoldHook | None = None,
) -> RecompressResult:
    """Recompress the candidates of ``[first, stop)`` (see the module doc): at most
    ``max_pages`` tried, at most ``max_scan`` pages scanned, ``batch_pages`` per batch, with the
    codecs ``algorithms`` (codec ids, in order); ``complete``: they are every configured
    recompression algorithm (a page none shrinks is then marked INCOMPRESSIBLE).
    ``device_store()`` is the device's current store (None once closed): a reset or close ends
    the run after the batch in hand (``aborted``). ``run(fn, *args)`` runs the pure codec work
    (in the device's executor). The result's ``next`` is where a further call goes on."""
    res = RecompressResult(next=first, end=stop)
    store = device_store()
    if store is None:
        res.aborted = True
        return res
    sizes = class_sizes(store.pool.chain_size)
    codecs = [store.codecs[c] for c in algorithms]
    pos = first
    limit = min(stop, first + max_scan)
    while pos < limit and res.tried < max_pages:
        with held(on_hold):
            window = min(limit, pos + SCAN_PAGES)
            idx = candidates(store, pos, window, kind, threshold)
            take = min(batch_pages, max_pages - res.tried)
            if len(idx) > take:
                idx = idx[:take]
                pos = int(idx[-1]) + 1
            else:
                pos = window
            res.next = res.scanned_to = pos
            pages = idx.tolist()
            if pages:
                items = _take(store, pages)
                res.tried += len(pages)
        if not pages:
            continue
        try:
            results = await run(recompress_part, items, codecs, sizes, huge_threshold)
        except BaseException:
            if device_store() is store:
                _unpend(store, pages)
            raise
        if device_store() is not store:
            res.aborted = True
            break
        with held(on_hold):
            ok = _switch(store, pages, results, algorithms, complete, sizes, res)
        if not ok:
            break
    return res


def _take(store: PageStore, pages: list[int]) -> list[tuple[Codec | None, bytes]]:
    """Copy the objects of ``pages`` out of the pool and mark the pages PENDING."""
    t = store.table
    load = store.pool.load
    codecs = store.codecs
    state_mv, handle_mv, size_mv, flags_mv = t.state_mv, t.handle_mv, t.size_mv, t.flags_mv
    items: list[tuple[Codec | None, bytes]] = []
    for i in pages:
        codec = codecs[t.codec_mv[i]] if state_mv[i] == STORED else None
        items.append((codec, load(handle_mv[i], size_mv[i])))
        flags_mv[i] |= PENDING
    return items


def _switch(
    store: PageStore,
    pages: list[int],
    results: list[Any],
    algorithms: list[int],
    complete: bool,
    sizes: tuple[int, ...],
    res: RecompressResult,
) -> bool:
    """Apply the outcomes of one batch; False when PoolFull ended the run."""
    t = store.table
    for n, (i, (outcome, j, blob)) in enumerate(zip(pages, results, strict=True)):
        fl = t.flags_mv[i]
        if not fl & PENDING:
            continue  # written, trimmed or zeroed meanwhile: the page is new, leave it
        st = t.state_mv[i]
        if st not in (STORED, HUGE):
            t.flags_mv[i] = fl & ~PENDING  # moved into a group meanwhile: it is cold already
            continue
        # the page's object now (a group dissolved meanwhile may have stored it anew)
        old = sizes[PAGE_SIZE] if st == HUGE else sizes[t.size_mv[i]]
        if outcome == RECOMPRESS_KEEP and sizes[len(blob)] >= old:
            t.flags_mv[i] = fl & ~PENDING
        elif outcome == RECOMPRESS_KEEP:
            try:
                store.move(i, blob, algorithms[j])
            except PoolFull:
                _unpend(store, pages[n:])
                res.nospace = True
                return False
            saved = old - sizes[len(blob)]
            res.recompressed += 1
            res.saved += saved
            store.stats.recompress_saved_bytes += saved
        elif outcome == RECOMPRESS_UNREADABLE or not complete:
            t.flags_mv[i] &= ~PENDING
        else:
            store.mark_incompressible(i)
            res.incompressible += 1
    s = store.stats
    total = store.pool.total_bytes
    if total > s.mem_used_max:
        s.mem_used_max = total
    return True


def _unpend(store: PageStore, pages: list[int]) -> None:
    flags_mv = store.table.flags_mv
    for i in pages:
        flags_mv[i] &= ~PENDING


class TierPolicy:
    """The background task of one export (see the module doc). ``after`` and ``interval`` are
    seconds; ``kind`` is idle or huge-idle (what recompress takes among the idle pages);
    ``busy()`` says whether clients used the export since it was last asked."""

    def __init__(
        self,
        name: str,
        device: BlockDevice,
        *,
        after: float,
        interval: float,
        kind: str = "idle",
        group_pages: int = 0,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.name = name
        self.device = device
        self.after = after
        self.interval = interval
        self.kind = kind
        self.group_pages = group_pages
        self.busy = busy
        self.task: asyncio.Task[None] | None = None
        #: the longest stretch one slice held the loop, in microseconds
        self.max_slice_us = 0.0
        #: passes completed, pages marked idle and recompressed by them, pauses taken
        self.passes = 0
        self.marked = 0
        self.recompressed = 0
        self.grouped = 0
        self.backoffs = 0
        self._backoff = 0.0

    def start(self) -> None:
        """Start the task on the running loop (no-op while it runs)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name=f"zramd-policy-{self.name}"
            )

    async def stop(self) -> None:
        """Cancel the task and wait until it has stopped."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cancel(self) -> None:
        """Cancel the task; it stops at the await it is in, before touching the device again."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()

    def as_dict(self) -> dict[str, Any]:
        return {
            "recompress_after": self.after,
            "recompress_interval": self.interval,
            "recompress_type": self.kind,
            "group_pages": self.group_pages,
            "running": self.task is not None and not self.task.done(),
            "passes": self.passes,
            "marked_idle": self.marked,
            "recompressed": self.recompressed,
            "grouped": self.grouped,
            "backoffs": self.backoffs,
            "max_slice_us": round(self.max_slice_us, 1),
        }

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_pass()
            except Unsupported as e:
                log.warning("export %s: background recompression stops: %s", self.name, e)
                return
            except Exception:  # noqa: BLE001 - the policy must outlive one bad pass
                log.exception("export %s: background recompression pass failed", self.name)

    async def run_pass(self) -> None:
        """Mark the pages not accessed for ``after`` seconds idle, pack runs of them into
        multi-page groups (with ``group_pages``), then recompress the idle pages left one by
        one (with recompression algorithms), slice by slice."""
        dev = self.device
        npages = dev.size // PAGE_SIZE
        for pos in range(0, npages, POLICY_SLICE_PAGES):
            t0 = time.perf_counter()
            self.marked += dev.mark_idle(self.after, pos, min(npages, pos + POLICY_SLICE_PAGES))
            self._hold(time.perf_counter() - t0)
            await self._yield()
        if self.group_pages:
            for pos in range(0, npages, POLICY_GROUP_PAGES):
                last = min(npages, pos + POLICY_GROUP_PAGES) - 1
                packed = await dev.group(
                    pos, last, group_pages=self.group_pages, on_hold=self._hold, pace=self._yield
                )
                self.grouped += packed.pages
                if packed.no_space:
                    break
                await self._yield()
        if not dev.recompression_algorithms:
            self.passes += 1
            return
        pos = 0
        while pos < npages:
            res = await dev.recompress(
                kind=self.kind,
                first=pos,
                max_pages=POLICY_BATCH_PAGES,
                max_scan=POLICY_SLICE_PAGES,
                batch_pages=POLICY_BATCH_PAGES,
                on_hold=self._hold,
            )
            self.recompressed += res.recompressed
            if res.aborted or res.nospace:
                break
            pos = res.next
            await self._yield()
        self.passes += 1

    def _hold(self, seconds: float) -> None:
        us = seconds * 1e6
        if us > self.max_slice_us:
            self.max_slice_us = us

    async def _yield(self) -> None:
        """Let everything waiting run; back off while clients look busy."""
        t0 = time.perf_counter()
        await asyncio.sleep(0)
        if time.perf_counter() - t0 > POLICY_BUSY_LAG or self.busy():
            self._backoff = min(POLICY_MAX_BACKOFF, max(POLICY_MIN_BACKOFF, self._backoff * 2))
            self.backoffs += 1
            await asyncio.sleep(self._backoff)
        else:
            self._backoff = 0.0
