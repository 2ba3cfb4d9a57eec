"""Multi-page groups: runs of cold pages compressed together as one blob, and their registry.

Theory of operation
-------------------
A group holds up to :data:`MAX_GROUP_PAGES` pages of one *window* (logically contiguous pages
``[first, first + span)``, span <= the group size, windows aligned to the group size) compressed
together as one blob with the group's codec (zstd by default: one 64 KiB frame finds the
repetitions that sixteen 4 KiB frames cannot). Members are the window's pages that were STORED
or HUGE and flagged IDLE when the group was packed; same-filled and empty pages cost nothing and
never join. A window is packed only when it has at least :data:`MIN_MEMBERS` members and the
blob is smaller than the members' objects together.

**The blob in the pool.** The pool's largest object is one page, so a blob of ``n`` bytes is
stored as ``n // PAGE_SIZE`` full-page chunks (the pool's huge class: one page each, no waste,
8 bytes of metadata) and one tail chunk in its size class. Chunk handles are kept here.

**The registry** is flat numpy arrays indexed by group id, no Python object per group or page:
first page (int64), blob size (uint32), member mask and live mask over the window (uint16
each), codec id (uint8) and the chunk handles (16 x uint32): :data:`GROUP_BYTES` = 81 bytes
per group, about 5 bytes per page of a full group. Ids of freed groups are reused.

**The table** is still the one source of truth for where a page is: a member's entry is
GROUPED with handle = group id, size = the page's index in the blob (its rank among the
members), codec = the group's codec. Flags and atime stay as they were.

**Reads.** A read of a member decodes the whole blob: :class:`~zramd.device.pipeline.GroupImage`
holds a copy of the blob (its chunks joined by one batch load of the pool on the loop thread)
and decodes it on first use, on the loop thread or in a worker (in C straight from that copy
when the codec has a native form: 10-25 us for a 64 KiB group of real files, lz4hc to zstd
level 9, so a 4 KiB read of a group not cached is done inline). The last :data:`GROUP_CACHE`
images are kept (at most 8 x 64 KiB decoded plus their blobs, outside the pool), so a
sequential read decodes each group once; an image is dropped whenever its group changes or
goes. A blob that does not decode is DeviceIOError for the pages of that group and nothing
else.

**Dead pages.** A write, trim or write_zeroes of a member takes it out (``kill``: the live mask
loses its bit, the entry gets its new state; the blob stays as it is). A group with no live page
is freed. When more than half of a group's members are dead (2 x live < members), the group is
*settled* right after the operation that killed them: with two or more live pages it is
re-packed (its live pages compressed as a new, smaller group of the same window), with one it
is dissolved (that page stored on its own, compressed with the group's codec). Bound: dead
pages <= live pages in every group, so at most half of the pages a group object holds are dead,
for every group except a *stalled* one: its re-pack found no room in the pool, or its blob no
longer decodes (its pages are EIO anyway). Stalled groups are retried at the next trim, compact
or group call, which free memory or ask for it.

Invariants
~~~~~~~~~~
* Every move is "make the new copy, switch the entries, free the old", on the loop thread: the
  new blob's chunks are all stored before any entry switches; on PoolFull they are freed and
  NoSpace raised, so nothing changed.
* ``compr_data_size`` counts each live group's blob once; ``pages_stored`` counts its live
  pages (dead ones now count under their new state); ``mem_used`` is the pool's, as always;
  the counters ``groups`` and ``grouped_pages`` are the live groups and their live pages.
* Every live bit names exactly one GROUPED table entry pointing back at the group, and every
  GROUPED entry is a live bit (:meth:`Groups.check`).

Knows nothing of byte ranges, requests, their ordering or threads: it works on the store's
table, pool, codec list and counters, on the loop thread; the pure packing runs in
:mod:`zramd.device.pipeline`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from zramd.allocator import Pool, PoolFull
from zramd.compress import Codec, CodecError
from zramd.device.interface import DeviceIOError, NoSpace
from zramd.device.pipeline import GroupImage, prepare_page
from zramd.device.table import GROUPED, HUGE, IDLE, STORED, PageTable
from zramd.geometry import PAGE_SHIFT, PAGE_SIZE
from zramd.stats import DeviceStats

#: most pages in one group (the masks are uint16)
MAX_GROUP_PAGES = 16
#: fewest members worth a group
MIN_MEMBERS = 2
#: decoded group images kept per device
GROUP_CACHE = 8
#: registry bytes per group: first (8), blob size (4), member and live masks (2 + 2), codec (1),
#: chunk handles (16 x 4)
GROUP_BYTES = 8 + 4 + 2 + 2 + 1 + 4 * MAX_GROUP_PAGES
#: the size of every chunk of a blob but its tail, for the pool's batch load
_CHUNK_SIZES = np.full(MAX_GROUP_PAGES, PAGE_SIZE, np.uint16)
INITIAL_GROUPS = 64


def _bits(mask: int) -> list[int]:
    """Positions of the set bits of ``mask``, ascending."""
    out = []
    pos = 0
    while mask:
        if mask & 1:
            out.append(pos)
        mask >>= 1
        pos += 1
    return out


class Window(NamedTuple):
    """A window to pack: its first page, the member positions (bit i = page first + i), the
    members' snapshot items (page bytes or ``(codec, blob)``, in order) and the bytes their
    objects hold now."""

    first: int
    mask: int
    items: list[Any]
    old_bytes: int


class PageStoreLike(Protocol):
    """What groups use of :class:`zramd.device.store.PageStore` (which owns them)."""

    table: PageTable
    pool: Pool
    codecs: list[Codec]
    stats: DeviceStats

    def _free_object(self, idx: int, st: int) -> None: ...

    def _switch(self, idx: int, st: int, v: int, h: int, codec_id: int) -> None: ...


class Groups:
    """The groups of one page store (see the module doc)."""

    def __init__(self, store: PageStoreLike) -> None:
        self._store = store
        cap = INITIAL_GROUPS
        self.first: npt.NDArray[np.int64] = np.zeros(cap, np.int64)
        self.csize: npt.NDArray[np.uint32] = np.zeros(cap, np.uint32)
        self.members: npt.NDArray[np.uint16] = np.zeros(cap, np.uint16)
        self.live: npt.NDArray[np.uint16] = np.zeros(cap, np.uint16)
        self.codec: npt.NDArray[np.uint8] = np.zeros(cap, np.uint8)
        self.chunks: npt.NDArray[np.uint32] = np.zeros((cap, MAX_GROUP_PAGES), np.uint32)
        self._used = 0  # ids below this have been handed out
        self._free: list[int] = []
        #: live groups, their live and dead member pages, and their blobs' bytes
        self.count = 0
        self.live_pages = 0
        self.dead_pages = 0
        self.compr_bytes = 0
        self._cache: OrderedDict[int, GroupImage] = OrderedDict()
        #: groups past the dead bound, settled after the current operation
        self.pending: set[int] = set()
        #: groups whose settling found no room, retried by :meth:`settle` with ``retry``
        self.stalled: set[int] = set()
        #: groups whose blob was found not to decode (writeback leaves them; forgotten when freed)
        self.undecodable: set[int] = set()
        self._settling = False

    # --- registry --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the registry arrays (capacity included)."""
        return len(self.first) * GROUP_BYTES

    def counts(self) -> dict[str, int]:
        """groups, grouped (live member) pages, dead member pages, blob bytes, registry bytes."""
        return {
            "groups": self.count,
            "grouped_pages": self.live_pages,
            "dead_pages": self.dead_pages,
            "group_bytes": self.compr_bytes,
            "registry_bytes": self.nbytes,
        }

    def _alloc(self) -> int:
        if self._free:
            return self._free.pop()
        gid = self._used
        if gid == len(self.first):
            cap = 2 * gid
            for name in ("first", "csize", "members", "live", "codec"):
                old = getattr(self, name)
                new = np.zeros(cap, old.dtype)
                new[:gid] = old
                setattr(self, name, new)
            chunks = np.zeros((cap, MAX_GROUP_PAGES), np.uint32)
            chunks[:gid] = self.chunks
            self.chunks = chunks
        self._used = gid + 1
        return gid

    def _free_group(self, gid: int) -> None:
        """Free group ``gid``'s chunks and uncount it (its pages are all dead)."""
        store = self._store
        n = int(self.csize[gid])
        free = store.pool.free
        for h in self.chunks[gid, : (n + PAGE_SIZE - 1) >> PAGE_SHIFT].tolist():
            free(h)
        store.stats.compr_data_size -= n
        self.compr_bytes -= n
        members = int(self.members[gid]).bit_count()
        live = int(self.live[gid]).bit_count()
        self.dead_pages -= members - live
        self.live_pages -= live
        self.count -= 1
        store.stats.groups -= 1
        store.stats.grouped_pages -= live
        self.csize[gid] = self.members[gid] = self.live[gid] = 0
        self._cache.pop(gid, None)
        self.pending.discard(gid)
        self.stalled.discard(gid)
        self.undecodable.discard(gid)
        self._free.append(gid)

    def live_members(self, gid: int) -> list[int]:
        """The pages of group ``gid``'s live members, ascending."""
        first = int(self.first[gid])
        return [first + p for p in _bits(int(self.live[gid]))]

    def kill(self, gid: int, idx: int) -> None:
        """Page ``idx`` leaves group ``gid`` (the caller switches its entry): the group is freed
        when it has no live page left, marked pending past the dead bound."""
        bit = 1 << (idx - int(self.first[gid]))
        live = int(self.live[gid])
        assert live & bit, (gid, idx)
        live ^= bit
        self.live[gid] = live
        self.live_pages -= 1
        self.dead_pages += 1
        self._store.stats.grouped_pages -= 1
        if not live:
            self._free_group(gid)
        elif 2 * live.bit_count() < int(self.members[gid]).bit_count():
            self.pending.add(gid)

    def kill_many(self, idx: npt.NDArray[np.intp]) -> None:
        """:meth:`kill` for the GROUPED entries ``idx`` (ascending page indices)."""
        handles = self._store.table.handle[idx].tolist()
        for gid, i in zip(handles, idx.tolist(), strict=True):
            self.kill(gid, i)

    def restore(
        self, first: int, csize: int, members: int, live: int, codec_id: int, handles: list[int]
    ) -> int:
        """Register a group read back from a snapshot, its blob already stored in the pool as
        ``handles``; counted as :meth:`install` counts (the caller points the live pages'
        entries at the returned id). A group past the dead bound is left stalled (retried at
        the next trim, compact or group call)."""
        gid = self._alloc()
        self.first[gid] = first
        self.csize[gid] = csize
        self.members[gid] = members
        self.live[gid] = live
        self.codec[gid] = codec_id
        self.chunks[gid, : len(handles)] = handles
        nlive = live.bit_count()
        s = self._store.stats
        s.compr_data_size += csize
        s.groups += 1
        s.grouped_pages += nlive
        self.compr_bytes += csize
        self.count += 1
        self.live_pages += nlive
        self.dead_pages += members.bit_count() - nlive
        if 2 * nlive < members.bit_count():
            self.stalled.add(gid)
        return gid

    # --- reads -----------------------------------------------------------------------------

    def image(self, gid: int, *, remember: bool = True) -> GroupImage:
        """Group ``gid``'s image: cached, else its blob copied out of the pool (not decoded) and
        cached unless ``remember`` is false (a group about to go: writeback)."""
        cache = self._cache
        img = cache.get(gid)
        if img is not None:
            if remember:
                cache.move_to_end(gid)
            return img
        store = self._store
        n = int(self.csize[gid])
        k = (n + PAGE_SIZE - 1) >> PAGE_SHIFT
        sizes = _CHUNK_SIZES[:k].copy()
        sizes[-1] = n - ((k - 1) << PAGE_SHIFT)
        blob = store.pool.load_packed(self.chunks[gid, :k], sizes)
        size = int(self.members[gid]).bit_count() << PAGE_SHIFT
        img = GroupImage(store.codecs[int(self.codec[gid])], blob, size)
        if remember:
            self._remember(gid, img)
        return img

    def run_length(self, gid: int, idx: int, limit: int) -> int:
        """How many pages from ``idx`` (a live member of group ``gid``) on are live members of
        it, at most ``limit``: consecutive pages that are consecutive members (one slice of
        the group's image). At least 1 (``idx`` itself), so a walk always moves on."""
        rest = int(self.live[gid]) >> (idx - int(self.first[gid]))
        return max(1, min(((rest ^ (rest + 1)).bit_length() - 1), limit))

    def _remember(self, gid: int, img: GroupImage) -> None:
        cache = self._cache
        cache[gid] = img
        cache.move_to_end(gid)
        while len(cache) > GROUP_CACHE:
            cache.popitem(last=False)

    def read(self, gid: int, k: int, idx: int) -> bytes:
        """Member ``k`` (page ``idx``) of group ``gid``, decoded here. Raises DeviceIOError."""
        try:
            data = self.image(gid).pages()
        except CodecError as exc:
            raise DeviceIOError(f"page {idx}: group {gid}: {exc}") from None
        off = k << PAGE_SHIFT
        return data[off : off + PAGE_SIZE]

    # --- packing ---------------------------------------------------------------------------

    def plan(self, first: int, last: int, group_pages: int) -> list[Window]:
        """The windows of pages ``[first, last]`` worth packing, their members' compressed
        bytes copied out (loop thread; the caller keeps the range from changing until
        :meth:`install`)."""
        store = self._store
        t = store.table
        stop = last + 1
        st = t.state[first:stop]
        ok = ((st == STORED) | (st == HUGE)) & ((t.flags[first:stop] & IDLE) != 0)
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        codecs = store.codecs
        load = store.pool.load
        out: list[Window] = []
        w0 = first - first % group_pages
        while w0 <= last:
            a = max(w0, first)
            b = min(w0 + group_pages, stop)
            pos = np.flatnonzero(ok[a - first : b - first])
            w0 += group_pages
            if len(pos) < MIN_MEMBERS:
                continue
            items: list[Any] = []
            old = mask = 0
            for p in pos.tolist():
                idx = a + p
                mask |= 1 << p
                if state_mv[idx] == STORED:
                    size = size_mv[idx]
                    items.append((codecs[codec_mv[idx]], load(handle_mv[idx], size)))
                    old += size
                else:
                    items.append(load(handle_mv[idx], PAGE_SIZE))
                    old += PAGE_SIZE
            out.append(Window(a, mask, items, old))
        return out

    def install(self, w: Window, blob: bytes, codec_id: int, data: bytes | None = None) -> int:
        """Make ``blob`` (the members of ``w`` compressed with codec ``codec_id``) a group and
        switch the members to it, freeing their old objects. ``data``, the decoded members, goes
        to the cache. Returns the group id. Raises NoSpace (nothing changed)."""
        store = self._store
        pool = store.pool
        n = len(blob)
        handles: list[int] = []
        try:
            for off in range(0, n, PAGE_SIZE):
                handles.append(pool.store(blob[off : off + PAGE_SIZE]))
        except PoolFull:
            for h in handles:
                pool.free(h)
            raise NoSpace("memory limit reached") from None
        s = store.stats
        total = pool.total_bytes
        if total > s.mem_used_max:
            s.mem_used_max = total
        gid = self._alloc()
        self.first[gid] = w.first
        self.csize[gid] = n
        self.members[gid] = self.live[gid] = w.mask
        self.codec[gid] = codec_id
        self.chunks[gid, : len(handles)] = handles
        t = store.table
        state_mv, handle_mv, size_mv, codec_mv = t.state_mv, t.handle_mv, t.size_mv, t.codec_mv
        free_object = store._free_object
        k = 0
        for pos in _bits(w.mask):
            idx = w.first + pos
            free_object(idx, state_mv[idx])
            state_mv[idx] = GROUPED
            handle_mv[idx] = gid
            size_mv[idx] = k
            codec_mv[idx] = codec_id
            k += 1
        s.compr_data_size += n
        s.groups += 1
        s.grouped_pages += k
        self.compr_bytes += n
        self.count += 1
        self.live_pages += k
        if data is not None:
            self._remember(gid, GroupImage(store.codecs[codec_id], None, len(data), data))
        return gid

    # --- settling: re-pack or dissolve groups past the dead bound ----------------------------

    def settle(self, *, retry: bool = False) -> None:
        """Re-pack or dissolve the pending groups (and, with ``retry``, the stalled ones); a
        group that finds no room is stalled. Re-entrant calls (from the moves it makes) return
        at once."""
        if self._settling:
            return
        todo = self.pending | self.stalled if retry else set(self.pending)
        self.pending.clear()
        if retry:
            self.stalled.clear()
        self._settling = True
        try:
            for gid in sorted(todo):
                live = int(self.live[gid]).bit_count()
                if not live or 2 * live >= int(self.members[gid]).bit_count():
                    continue  # freed (maybe reused) meanwhile
                try:
                    self._repack(gid)
                except (NoSpace, DeviceIOError):
                    self.stalled.add(gid)
        finally:
            self._settling = False

    def _repack(self, gid: int) -> None:
        """Move the live pages of ``gid`` to a new group (two or more) or to a page of their
        own (one); the old group is freed when its last live page switches."""
        store = self._store
        t = store.table
        first = int(self.first[gid])
        live = int(self.live[gid])
        positions = _bits(live)
        try:
            img = self.image(gid).pages()
        except CodecError as exc:
            raise DeviceIOError(f"group {gid}: {exc}") from None
        offsets = [t.size_mv[first + p] << PAGE_SHIFT for p in positions]
        pages = [img[off : off + PAGE_SIZE] for off in offsets]
        codec_id = int(self.codec[gid])
        codec = store.codecs[codec_id]
        if len(positions) == 1:
            st, v, payload = prepare_page(pages[0], codec.compress, store.pool.huge_class_size)
            h = 0
            if payload is not None:
                try:
                    h = store.pool.store(payload)
                except PoolFull:
                    raise NoSpace("memory limit reached") from None
            store._switch(first + positions[0], st, v, h, codec_id)
            return
        joined = b"".join(pages)
        self.install(Window(first, live, [], 0), codec.compress(joined), codec_id, joined)

    # --- lifecycle and checks --------------------------------------------------------------

    def close(self) -> None:
        """Drop the cached images (the pool holding the chunks is closed by the store)."""
        self._cache.clear()

    def check(self) -> None:
        """Verify the registry against the table and the pool (slow; for tests)."""
        store = self._store
        t = store.table
        grouped = np.flatnonzero(t.state == GROUPED)
        live_total = dead_total = nbytes = count = 0
        seen = 0
        for gid in range(self._used):
            members = int(self.members[gid])
            live = int(self.live[gid])
            if not members:
                assert gid in self._free and not live and gid not in self._cache
                continue
            count += 1
            assert live and live & ~members == 0
            first = int(self.first[gid])
            n = int(self.csize[gid])
            nbytes += n
            nch = (n + PAGE_SIZE - 1) >> PAGE_SHIFT
            assert 0 < nch <= MAX_GROUP_PAGES
            for k, h in enumerate(self.chunks[gid, :nch].tolist()):
                assert len(store.pool.load(h, min(PAGE_SIZE, n - (k << PAGE_SHIFT)))) > 0
            ranks = {p: r for r, p in enumerate(_bits(members))}
            for p in _bits(live):
                idx = first + p
                assert t.state_mv[idx] == GROUPED, (gid, idx)
                assert t.handle_mv[idx] == gid and t.codec_mv[idx] == self.codec[gid]
                assert t.size_mv[idx] == ranks[p]
                seen += 1
            nlive = live.bit_count()
            live_total += nlive
            dead_total += members.bit_count() - nlive
            if gid not in self.stalled:
                assert 2 * nlive >= members.bit_count() or gid in self.pending, gid
        assert seen == len(grouped) == live_total == self.live_pages
        assert dead_total == self.dead_pages
        assert nbytes == self.compr_bytes
        assert count == self.count
        assert len(self._cache) <= GROUP_CACHE
