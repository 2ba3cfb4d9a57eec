"""The zsmalloc-style pool: opaque byte objects of 1..4096 B in size-classed zspages.

Theory of operation
-------------------
**Owns** the memory that holds compressed pages, and nothing else: it stores opaque bytes and
knows nothing of pages, codecs or the device. It is not thread-safe: every call must come from
one thread (the event loop); ``load`` returns a private ``bytes`` copy, so a caller may hand
that to a worker thread.

**Classes.** ``classes.py`` builds the kernel's merged class table (32..4096 B, 16 B steps,
classes with equal (pages, objects) per zspage merged into the larger). ``_class_of[n]`` maps
an object length straight to its class, so lookup is one list index. A store puts an object in
its own class; compaction may later move it into a slot of a larger class (see below), which
is why ``load`` takes the size from the caller and never from the slot.

**Memory.** Pages come from a few big anonymous *private* mmap arenas (``arena_size``, 64 MiB
by default; private so that ``MADV_DONTNEED`` really frees the pages). An arena is cut into
equal runs of ``k`` pages and only serves zspages of ``k`` pages, so a freed run always fits
the next zspage of that arena and no run-level fragmentation can build up; arenas with a free
run sit on a per-run-size stack, so finding room is O(1). Every page of a freed zspage is
handed back with ``madvise(MADV_DONTNEED)``; an arena with no zspage left is unmapped.
``total_bytes`` = pages of live zspages x 4096 (kernel ``mem_used_total``); the Python-side
bookkeeping is reported apart as ``metadata_bytes``.

**Zspage.** One small ``_Zspage`` object per zspage (never one per stored object). It *is* an
``array('I')`` subclass holding the out-of-line reverse map (slot -> handle), whose free entries
double as an in-place free-slot stack (``SLOT_FREE | next``, like the kernel's in-place free
list), plus a few slots: arena, byte offset, in-use count, free-stack head, group. About 160 B +
4 B per slot per zspage, and ~60 B for its two location ints. Objects may straddle page
boundaries: the pages of a zspage are contiguous in the arena, so an object is one slice. Huge
objects (the 4096 B class: one object per one-page zspage) get no zspage object at all: their
handle-table entry holds ``HUGE_TAG | arena id | page index`` directly, so an incompressible
page costs 8 B of metadata.

**Reverse map choice.** The kernel keeps the handle in an 8-byte header inside the object
(ZS_HANDLE_SIZE) and looks the class up with ``size + 8``. Here it is out of line: 4 B per
*slot* in the reverse map versus 8 B per object in the arena plus the class shift it causes, and
one array store instead of a second slice write. So the arena holds nothing but objects: slot
``i`` of a zspage of class ``size`` is the bytes ``[base + i * size, base + (i + 1) * size)``,
and a zspage full of objects of exactly ``size`` bytes is those objects end to end. An object
of up to 3632 B (the chain-8 watermark) fits a shared class, so ``huge_class_size`` is 3633
here, where the kernel's ``zs_huge_class_size()`` says 3625 (3632 - 7) because of the header.

**Where each zspage is**, by id, is also kept apart from its object, in two flat arrays: its
arena id and first page (``_zs_where``, laid out as a huge object's entry) and its class's
object size (``_zs_size``), 10 B per zspage id, set when the zspage is made. With them the C
batch load (``load_packed``) finds every object from the handle table alone and takes each
arena's buffer once per call, where it looked up four Python attributes per zspage and took
the buffer of a huge object's arena for each one: 1 MiB reads QD4 of real files ran at
1,180-1,280 MB/s before, 1,480-1,650 after with lz4 (pages stored raw among compressed ones
alternate arenas), +6-8% with zstd, +4% over multi-page groups (their blobs are mostly
one-page chunks); fio's own data, few raw pages, gained nothing measurable.

**Handles** are indexes into one flat ``array('Q')``; entry = ``zspage_id << OBJ_BITS | slot``
(or the huge form above).
Compaction rewrites the entry, never the handle. Free entries hold ``FREE_TAG | next`` and form
an in-table free list of recyclable handles (no Python int per free handle); entry 0 is never
handed out, so a handle is always > 0. Zspage ids index ``_zspages`` and are recycled too.
``on_free``, when set, hears every handle just before it is freed (while its object still
loads): a snapshot copies aside the objects it has not read yet.

**Fullness groups** (kernel 6.x): 0% (only transiently, a new zspage before its first object; an
emptied zspage is freed at once), 10%, 20% .. 90%, 99%, 100%. Each class keeps one ``set`` of
zspages per non-full group (full zspages are only counted: nothing searches them);
``grp_of[inuse]`` is precomputed, so a group change is one list index, one compare and, when it
changes, a ``remove``/``add``. A group with no zspage holds the one shared ``_NO_ZSPAGES``
instead of a set of its own (an empty set costs 216 B, 12 x 119 of them ~300 KiB per pool);
adding to it raises, and the adder then gives the group a set. Empty sets go back to the shared
one on ``_shrink_sets`` (every ``AUTO_COMPACT_CHECK_EVERY`` frees, and after compaction).
Allocation takes the fullest non-full zspage; it is cached in ``cls.cur`` and stays valid until
it fills (it only grows while it is the target), drops a group through a free, or compaction
runs.

**Compaction** (kernel 6.3+ ``__zs_compact``): classes largest to smallest; the destination is
the fullest non-full zspage, kept until it is full; the source is the emptiest; objects move
from source to destination (handle entries rewritten) until the source empties, which is then
freed. It stops when ``zs_can_compact`` says no whole zspage can be won, which leaves up to one
zspage's worth of free slots in every class: with ~119 classes of up to 8 pages, some hundreds
of pages, a few percent of a pool of tens of MiB. A second pass, the *spill*, goes after those:
classes largest to smallest, each partly used zspage (emptiest first) whose objects all fit in
the free slots of its own class and the larger ones is emptied into them (smallest class with
room first, its fullest zspage first) and freed. A slot that was already paid for then holds a
smaller object; nothing moves unless a whole zspage is won, and a moved object is afterwards an
object of its new class like any other (compacted, freed and counted there). ``compact()`` runs
both on demand; with ``auto_compact`` a counter on the free path checks every
``AUTO_COMPACT_CHECK_EVERY`` frees whether at least ``AUTO_COMPACT_MIN_FRACTION`` of the pool
(and ``AUTO_COMPACT_MIN_PAGES``) could be won, which keeps it amortised O(1) per free; one
automatic run frees at most ``AUTO_COMPACT_MAX_PAGES`` (a pause of one or two milliseconds), and
a run that stopped there is continued after ``AUTO_COMPACT_CONTINUE_EVERY`` frees.

**Warm cache** (``cache_pages``, default 0 = off, kernel-like). On this machine a page fault
on a page given back with MADV_DONTNEED costs ~10 µs (zeroing + trap, in a VM), which dominates
churn of huge objects (store new + free old = 1 fault + 1 madvise). With ``cache_pages`` > 0,
up to that many pages of freed zspage runs are kept resident (not madvised) and reused by the
next zspage of the same class. They are still *held*, so they count in ``total_bytes``
(reported apart as ``cached_bytes``), against ``limit`` and the budget; a store that would
pass a limit drops the cache first, and ``compact()``/``drop_cache()`` give it back to the OS.

**Batches.** ``store_packed`` (and ``store_many``, a list joined) stores objects laid end to end
in one buffer as ``store`` of each would (same classes, slots, accounting, limits), grouped by
class and a zspage at a time: the handles, reverse-map entries and fullness-group change of the
objects a zspage takes are done once for all of them, and their copies are one call to the C
accelerator's ``copy_objects`` (a loop without it). Objects of a class with no non-full zspage
(and no handle to recycle) go to new zspages all at once (``_fill_fresh``): one charge, the
reverse maps, handle entries and offsets as arrays, one copy per arena. A restore fills an
empty pool this way (541 MiB of objects of real files: 1.11-1.41 s before, 0.92-1.08 s with
it; what is left is mostly the first touch of the pool's fresh pages, and the copies). All or
nothing, like ``store``. A caller may take the copies instead (``copies``) and run them in
another thread (:func:`run_copies`: the C copy of all of them without the GIL) while this
thread books the next batch: a restore does, since first touching fresh pages is its largest
cost. Until they are done, those objects hold garbage: the caller loads, frees and compacts
nothing meanwhile, and a batch that fails frees its own objects without compacting.

**Limits.** ``limit`` (this pool) and an optional shared :class:`MemoryBudget` are checked
only when a store needs a new zspage (a free slot in an existing zspage is always usable,
even above a limit lowered at runtime); a store that would pass either raises ``PoolFull``
before anything is changed (except that the warm cache, if any, has been given back).
"""

from __future__ import annotations

import mmap
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from zramd.allocator.classes import (
    DEFAULT_CHAIN_SIZE,
    MAX_ALLOC_SIZE,
    PAGE_SIZE,
    SizeClass,
    build_classes,
    huge_watermark,
    raw_class_index,
)
from zramd.system import release_pages

_native_copy: Callable[..., None] | None
_native_load: Callable[..., bytes] | None
try:
    from zramd._native import copy_objects as _native_copy
    from zramd._native import load_packed as _native_load
except ImportError:  # the optional C accelerator is not built
    _native_copy = _native_load = None


#: One batch of object copies: (dst, dst_offsets, src, src_offsets, lengths), see run_copies.
Copy = tuple[
    mmap.mmap, npt.NDArray[np.int64], memoryview, npt.NDArray[np.int64], npt.NDArray[np.int64]
]


def run_copies(copies: Sequence[Copy]) -> None:
    """Do the copies :meth:`Pool.store_packed` handed out: of each (dst, dst_offsets, src,
    src_offsets, lengths), object i, ``src[src_offsets[i] : + lengths[i]]``, to
    ``dst[dst_offsets[i]:]``. Any thread may: the C copy runs without the GIL (all of them in
    one stretch) and writes only the slots those objects were given."""
    if _native_copy is not None:
        _native_copy(copies)
        return
    for dst, doffs, src, soffs, lengths in copies:
        for d, s, n in zip(doffs.tolist(), soffs.tolist(), lengths.tolist(), strict=True):
            dst[d : d + n] = src[s : s + n]


#: Bits of a handle-table entry that hold the slot index (at most 16 * 4096 / 32 = 2048 objects
#: per zspage, so 12 bits are enough).
OBJ_BITS = 12
OBJ_MASK = (1 << OBJ_BITS) - 1
#: Tag of a free handle-table entry; the low bits then hold the next free handle (0 = none).
FREE_TAG = 1 << 63
#: Tag of a handle-table entry for a huge object (alone in one page, no zspage object): the
#: entry is HUGE_TAG | arena id << AID_SHIFT | page index in the arena.
HUGE_TAG = 1 << 62
AID_SHIFT = 36
AID_MASK = (1 << (62 - AID_SHIFT)) - 1
PAGE_INDEX_MASK = (1 << AID_SHIFT) - 1
#: Reverse-map entries (``array('I')``): a handle, or SLOT_FREE | next free slot.
SLOT_FREE = 1 << 31
MAX_HANDLE = SLOT_FREE - 1

#: Fullness groups (kernel ZS_INUSE_RATIO_*): index 0 = 0%, 1..9 = 10%..90%, 10 = 99%, 11 = 100%.
NUM_FULLNESS_GROUPS = 12
GROUP_EMPTY = 0
GROUP_FULL = 11
#: Highest group a non-full zspage can be in.
GROUP_99 = 10
FULLNESS_LABELS = ("0%", "10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "99%",
                   "100%")

DEFAULT_ARENA_SIZE = 64 << 20
#: Auto-compaction: look every this many frees ...
AUTO_COMPACT_CHECK_EVERY = 4096
#: ... and compact when at least this fraction of the pool's pages could be won ...
AUTO_COMPACT_MIN_FRACTION = 0.125
#: ... and at least this many pages.
AUTO_COMPACT_MIN_PAGES = 64
#: One automatic compaction frees at most about this many pages, so a free() holds the event
#: loop one or two milliseconds: runs of 128 pages took 1.0-2.4 ms on a pool of 256 MiB of real
#: files packed into groups (5-9 µs per page freed; the scan of the classes that decides whether
#: to run costs about 0.2 ms by itself) ...
AUTO_COMPACT_MAX_PAGES = 128
#: ... and when a run stopped there, the next check comes after this many frees (not
#: AUTO_COMPACT_CHECK_EVERY), so a backlog is worked off at the same pages per free as runs of
#: 2048 pages every 4096 frees would, in pauses a sixteenth as long, for a scan every 256 frees
#: (under 1 µs per free) while it lasts.
AUTO_COMPACT_CONTINUE_EVERY = 256

#: A group set is rebuilt when its table is this many times bigger than a fresh one would be.
SET_SHRINK_SLACK = 4
EMPTY_SET_BYTES = sys.getsizeof(set())

_MMAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MMAP_PROT = mmap.PROT_READ | mmap.PROT_WRITE


#: why a store failed (``PoolFull.cause``): the pool's own limit, the shared budget, or the
#: system (no memory for a new arena, or no handle left)
CAUSE_LIMIT = "limit"
CAUSE_BUDGET = "budget"
CAUSE_SYSTEM = "system"
POOL_FULL_CAUSES = (CAUSE_LIMIT, CAUSE_BUDGET, CAUSE_SYSTEM)


class PoolFull(Exception):
    """The store would need memory beyond the pool's limit or the shared budget, or the system
    has none. Nothing was changed. ``cause`` says which (:data:`POOL_FULL_CAUSES`); ``budget``
    is the budget that refused, for CAUSE_BUDGET."""

    def __init__(self, message: str, *, cause: str, budget: MemoryBudget | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.budget = budget


class MemoryBudget:
    """A byte budget that several pools share (server-wide limit). ``limit`` 0 = unlimited;
    ``used`` is the sum of the pools' ``total_bytes``; ``refusals`` counts the stores it
    refused."""

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.used = 0
        self.refusals = 0

    def __repr__(self) -> str:
        return f"MemoryBudget(limit={self.limit}, used={self.used}, refusals={self.refusals})"


class _Arena:
    """One anonymous mapping cut into equal runs of ``pages`` pages."""

    __slots__ = ("mm", "pages", "run_bytes", "nruns", "bump", "free_runs", "used", "in_room",
                 "aid")

    def __init__(self, pages: int, arena_size: int, aid: int) -> None:
        self.aid = aid  # index in Pool._arena_by_id
        self.pages = pages
        self.run_bytes = pages * PAGE_SIZE
        self.nruns = max(1, arena_size // self.run_bytes)
        self.mm = mmap.mmap(-1, self.nruns * self.run_bytes, flags=_MMAP_FLAGS, prot=_MMAP_PROT)
        self.bump = 0  # runs never handed out start here
        self.free_runs = array("Q")  # byte offsets of runs given back (no Python int each)
        self.in_room = False  # on the pool's stack of arenas with room
        self.used = 0  # live zspages

    def has_room(self) -> bool:
        return bool(self.free_runs) or self.bump < self.nruns

    def take(self) -> int:
        if self.free_runs:
            off = self.free_runs.pop()
        else:
            off = self.bump * self.run_bytes
            self.bump += 1
        self.used += 1
        return off

    def give_back(self, off: int) -> None:
        # release_pages falls back to MADV_DONTNEED_LOCKED under mlockall (serve --swap).
        release_pages(self.mm, off, self.run_bytes)
        self.free_runs.append(off)
        self.used -= 1


class _Class:
    """Per merged size class state."""

    __slots__ = ("size", "pages", "objs", "groups", "grp_of", "cur", "used", "nzspages",
                 "spec", "fresh_revmap", "warm")

    def __init__(self, spec: SizeClass) -> None:
        self.spec = spec
        self.size = spec.size
        self.pages = spec.pages_per_zspage
        self.objs = spec.objs_per_zspage
        self.groups: list[set[_Zspage]] = [_NO_ZSPAGES] * NUM_FULLNESS_GROUPS
        objs = self.objs
        grp = [GROUP_EMPTY]
        for inuse in range(1, objs):
            grp.append(100 * inuse // objs // 10 + 1)
        grp.append(GROUP_FULL)
        self.grp_of = grp
        #: a new zspage's reverse map: every slot free, chained 0 -> 1 -> .. -> objs
        self.fresh_revmap = array("I", [SLOT_FREE | (i + 1) for i in range(objs)]).tobytes()
        self.cur: _Zspage | None = None  # allocation target (fullest non-full zspage)
        self.used = 0  # live objects
        self.nzspages = 0
        self.warm: list[_Zspage] = []  # freed zspages kept resident (Pool cache_pages)

    def compactable_pages(self) -> int:
        """Kernel ``zs_can_compact()``: whole zspages' worth of free slots, in pages."""
        wasted = self.nzspages * self.objs - self.used
        return wasted // self.objs * self.pages


class _Zspage(array):  # type: ignore[type-arg,unused-ignore]
    """One zspage. The object *is* its reverse map: an ``array('I')`` with one entry per slot,
    the handle of a used slot or ``SLOT_FREE | next free slot`` (an in-place free stack whose
    head is ``fhead``; ``objs`` ends it). Hash and equality are by identity (sets of zspages
    must never compare contents)."""

    __slots__ = ("loc", "cls", "arena", "mm", "base", "inuse", "fhead", "grp")
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__

    loc: int
    cls: _Class
    arena: _Arena
    mm: mmap.mmap
    base: int
    inuse: int
    fhead: int
    grp: int


class _Unset(Exception):
    """Raised by adding to :data:`_NO_ZSPAGES`: the group needs a set of its own."""


class _EmptyGroup(set[_Zspage]):
    """The type of :data:`_NO_ZSPAGES`: a set that refuses to hold anything."""

    __slots__ = ()

    def add(self, zs: _Zspage) -> None:
        raise _Unset


#: Every fullness group that holds no zspage, in every class: one shared set that always stays
#: empty (an empty ``set`` costs 216 B, and most of a pool's 12 x 119 groups are empty). Adding
#: to it raises _Unset, and the adder gives the group a set of its own; the common path, an
#: add to a group that has one, is the plain ``set.add``.
_NO_ZSPAGES = _EmptyGroup()


class Pool:
    """A zsmalloc-style pool. See the module docstring."""

    PAGE_SIZE = PAGE_SIZE

    def __init__(
        self,
        *,
        chain_size: int = DEFAULT_CHAIN_SIZE,
        limit: int = 0,
        budget: MemoryBudget | None = None,
        arena_size: int = DEFAULT_ARENA_SIZE,
        auto_compact: bool = True,
        cache_pages: int = 0,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if arena_size < PAGE_SIZE:
            raise ValueError("arena_size must be at least one page")
        specs, raw_index = build_classes(chain_size)
        self.chain_size = chain_size
        self.limit = limit
        self.budget = budget
        self.auto_compact = auto_compact
        self._arena_size = arena_size
        self._classes = [_Class(s) for s in specs]
        self._class_of: list[_Class | None] = [None] + [
            self._classes[raw_index[raw_class_index(n)]] for n in range(1, MAX_ALLOC_SIZE + 1)
        ]
        #: object length -> index in ``_classes`` (``store_many`` classifies with it)
        index = {id(c): i for i, c in enumerate(self._classes)}
        self._class_ids = np.array(
            [0] + [index[id(c)] for c in self._class_of[1:]], dtype=np.int64
        )
        self._watermark = huge_watermark(specs)
        self._tbl = array("Q", [FREE_TAG])  # entry 0: never a live handle
        self._free_head = 0
        self._zspages: list[_Zspage | None] = [None]  # id 0 unused: live entries are > 0
        self._zs_where = array("Q", [0])  # per zspage id: arena id << AID_SHIFT | first page
        self._zs_size = array("H", [0])  # per zspage id: its class's object size
        self._free_zids = array("Q")  # recyclable zspage ids
        self._arenas: dict[int, list[_Arena]] = {}  # pages per run -> its arenas
        self._room: dict[int, list[_Arena]] = {}  # pages per run -> stack of arenas with room
        self._arena_by_id: list[_Arena | None] = []  # ids are not reused (few arenas ever)
        self._huge = self._classes[-1]  # 4096 B: one object per one page
        assert self._huge.spec.huge
        self._huge_warm: list[tuple[_Arena, int]] = []  # warm cache of huge pages
        self._pages = 0  # pages of live zspages
        self._pages_compacted = 0
        if cache_pages < 0:
            raise ValueError("cache_pages must be >= 0")
        self._cache_max = cache_pages
        self._cached_pages = 0  # pages of freed zspages kept resident (the warm cache)
        self._frees_to_check = AUTO_COMPACT_CHECK_EVERY
        self._closed = False
        #: called with a handle before it is freed, while its object can still be loaded (a
        #: snapshot in progress copies the objects it still needs; None: nobody listens)
        self.on_free: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def huge_class_size(self) -> int:
        """Objects of this size or more end up alone in a page (the huge class): zram stores
        such a page raw. Watermark + 1, as there is no in-object handle header here (the
        kernel, with its 8 B header, reports watermark - 7: 3625 at chain 8)."""
        return self._watermark + 1

    @property
    def huge_watermark(self) -> int:
        """Size of the largest class that shares zspages between objects (3632 at chain 8)."""
        return self._watermark

    @property
    def total_bytes(self) -> int:
        """Every byte held from the OS: live zspages plus the warm cache (if enabled)."""
        return (self._pages + self._cached_pages) * PAGE_SIZE

    @property
    def cached_bytes(self) -> int:
        """Part of ``total_bytes`` that is warm cache (freed runs kept resident)."""
        return self._cached_pages * PAGE_SIZE

    @property
    def pages_compacted(self) -> int:
        return self._pages_compacted

    @property
    def metadata_bytes(self) -> int:
        """Python-side bookkeeping: the handle table, the per-zspage objects with their
        reverse maps, free stacks and location ints, the zspage table and its places and
        sizes, the arenas' lists of free runs, the class tables and their non-empty group
        sets."""
        getsize = sys.getsizeof
        total = getsize(self._tbl) + getsize(self._zspages) + getsize(self._class_of)
        total += getsize(self._zs_where) + getsize(self._zs_size)
        total += getsize(self._free_zids) + getsize(self._huge_warm)
        for zs in self._zspages:
            if zs is not None:
                total += getsize(zs) + getsize(zs.loc) + getsize(zs.base)
        for cls in self._classes:
            total += getsize(cls) + getsize(cls.grp_of) + getsize(cls.fresh_revmap)
            total += sum(getsize(s) for s in cls.groups if s is not _NO_ZSPAGES)
            total += sum(getsize(zs) for zs in cls.warm)
        for arenas in self._arenas.values():
            total += sum(getsize(ar) + getsize(ar.free_runs) for ar in arenas)
        return total

    @property
    def obj_count(self) -> int:
        return sum(c.used for c in self._classes)

    # ------------------------------------------------------------------ hot path

    def store(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        try:  # _class_of[0] is None, _class_of[4097] does not exist: no range test needed
            cls = self._class_of[n]
            zs = cls.cur  # type: ignore[union-attr]
        except (IndexError, AttributeError):
            raise ValueError(f"object size {n} not in 1..{MAX_ALLOC_SIZE}") from None
        assert cls is not None
        if zs is None:
            if cls is self._huge:
                return self._store_huge(data, n)
            zs = self._select(cls)  # may raise PoolFull; nothing changed yet
        slot = zs.fhead
        zs.fhead = zs[slot] ^ SLOT_FREE
        tbl = self._tbl
        h = self._free_head
        if h:
            self._free_head = tbl[h] ^ FREE_TAG
            tbl[h] = zs.loc | slot
        else:
            h = len(tbl)
            if h > MAX_HANDLE:
                self._undo_slot(zs, slot)
                raise PoolFull("handle space exhausted", cause=CAUSE_SYSTEM)
            tbl.append(zs.loc | slot)
        zs[slot] = h
        a = zs.base + slot * cls.size
        zs.mm[a : a + n] = data
        inuse = zs.inuse + 1
        zs.inuse = inuse
        cls.used += 1
        g = cls.grp_of[inuse]
        if g != zs.grp:
            groups = cls.groups
            groups[zs.grp].remove(zs)
            if g == GROUP_FULL:  # full zspages are only counted, not kept in a set
                cls.cur = None
            else:
                try:
                    groups[g].add(zs)
                except _Unset:
                    groups[g] = {zs}
            zs.grp = g
        return h

    def store_many(self, objects: Sequence[bytes | bytearray | memoryview]) -> list[int]:
        """Store ``objects`` and return their handles, in order (:meth:`store_packed` of them
        joined)."""
        if not objects:
            return []
        lengths = np.fromiter(map(len, objects), dtype=np.int64, count=len(objects))
        return self.store_packed(b"".join(objects), lengths)

    def store_packed(
        self,
        data: bytes | bytearray | memoryview,
        lengths: npt.NDArray[Any],
        copies: list[Copy] | None = None,
    ) -> list[int]:
        """Store the objects laid end to end in ``data``, of ``lengths`` bytes each, and return
        their handles, in order: what ``store`` of each would do (the same classes, slots,
        limits and accounting), grouped by class and a zspage at a time (the one ``store``
        would pick, as many objects as it has free slots): handles, reverse map and fullness
        group once per zspage, the copies in one call (``zramd._native.copy_objects``, or a
        loop without it). All or nothing: on PoolFull the objects stored so far are freed and
        it is raised; ValueError for a size out of range, before anything is stored.

        With ``copies``, the copies of this call's objects into the slots they were given
        (those not stored one by one) are appended there instead of done, for
        :func:`run_copies` in any thread: ``data`` must stay unchanged, none of these objects
        be loaded or freed and the pool not be closed until they are done."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(lengths)
        if not n:
            return []
        if int(lengths.min()) < 1 or int(lengths.max()) > MAX_ALLOC_SIZE:
            raise ValueError(f"object size not in 1..{MAX_ALLOC_SIZE}")
        if int(lengths.sum()) > len(data):
            raise ValueError("objects past the end of their data")
        mv = memoryview(data).cast("B")
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        cids = self._class_ids[lengths]
        order = np.argsort(cids, kind="stable")
        ordered = cids[order]
        cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), n]
        handles = np.zeros(n, dtype=np.int64)
        todo: list[Copy] = []
        try:
            for a, b in zip(cuts, cuts[1:], strict=False):
                idxs = order[a:b]
                cls = self._classes[int(ordered[a])]
                if cls is self._huge:
                    self._fill_huge(mv, starts, lengths, idxs, handles, todo)
                else:
                    self._fill(cls, mv, starts, lengths, idxs, handles, todo)
        except PoolFull:
            # no compaction meanwhile: it would move objects whose copies may still be pending
            auto, self.auto_compact = self.auto_compact, False
            try:
                for h in handles.tolist():
                    if h:
                        self.free(h)
            finally:
                self.auto_compact = auto
            raise
        if copies is None:
            run_copies(todo)
        else:
            copies += todo
        out: list[int] = handles.tolist()
        return out

    def _fill_huge(
        self,
        mv: memoryview,
        starts: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        idxs: npt.NDArray[Any],
        handles: npt.NDArray[np.int64],
        todo: list[Copy],
    ) -> None:
        """``store_packed``'s huge objects ``idxs``: their pages charged at once, taken from
        the arenas in a row, their handles in a row, copied an arena at a time (one by one
        through ``store`` when handles or warm pages are to be recycled)."""
        k = len(idxs)
        tbl = self._tbl
        h0 = len(tbl)
        if self._free_head or self._huge_warm or h0 + k - 1 > MAX_HANDLE:
            for i in idxs.tolist():
                s0 = int(starts[i])
                handles[i] = self.store(mv[s0 : s0 + int(lengths[i])])
            return
        if self._closed:
            raise ValueError("pool is closed")
        self._charge(k)
        taken = self._take_runs(1, k)
        tbl.extend([HUGE_TAG | ar.aid << AID_SHIFT | off // PAGE_SIZE for ar, off in taken])
        handles[idxs] = np.arange(h0, h0 + k, dtype=np.int64)
        offs = np.fromiter((off for _, off in taken), dtype=np.int64, count=k)
        _copy_into_runs(taken, 1, offs, mv, starts, lengths, idxs, todo)
        cls = self._huge
        cls.used += k
        cls.nzspages += k

    def _take_runs(self, pages: int, count: int) -> list[tuple[_Arena, int]]:
        """``count`` runs of ``pages`` pages (already charged), taken from the arenas as one
        ``_new_zspage`` after another would take them. Raises PoolFull, with the runs given
        back and the charge undone, when no new arena can be mapped."""
        taken: list[tuple[_Arena, int]] = []
        try:
            arena = self._arena_with_room(pages)
            for _ in range(count):
                if not arena.has_room():
                    arena = self._arena_with_room(pages)
                taken.append((arena, arena.take()))
        except OSError as exc:
            for ar, off in taken:
                self._give_back(ar, off)
            self._uncharge(count * pages)
            raise PoolFull(f"cannot map a new arena: {exc}", cause=CAUSE_SYSTEM) from exc
        return taken

    def _fill(
        self,
        cls: _Class,
        mv: memoryview,
        starts: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        idxs: npt.NDArray[Any],
        handles: npt.NDArray[np.int64],
        todo: list[Copy],
    ) -> None:
        """``store_packed``'s objects ``idxs`` of one shared class ``cls``."""
        groups = cls.groups
        size = cls.size
        pos, end = 0, len(idxs)
        tbl = self._tbl
        while pos < end:
            zs = cls.cur
            if zs is None:
                if self._fresh_only(cls):
                    self._fill_fresh(cls, mv, starts, lengths, idxs[pos:], handles, todo)
                    return
                zs = self._select(cls)  # may raise PoolFull; nothing changed for this zspage
            k = min(cls.objs - zs.inuse, end - pos)
            h0 = len(tbl)
            if self._free_head or h0 + k - 1 > MAX_HANDLE:  # recycled handles: one by one
                i = int(idxs[pos])
                s0 = int(starts[i])
                handles[i] = self.store(mv[s0 : s0 + int(lengths[i])])
                pos += 1
                continue
            loc, fh = zs.loc, zs.fhead
            if zs.inuse == 0:  # a fresh zspage: slots 0..k-1 in order
                slots = np.arange(k, dtype=np.int64)
                zs[0:k] = array("I", range(h0, h0 + k))
                tbl.extend(range(loc, loc + k))
                fh = k
            else:
                taken = []
                for h in range(h0, h0 + k):
                    taken.append(fh)
                    nxt = zs[fh] ^ SLOT_FREE
                    zs[fh] = h
                    fh = nxt
                tbl.extend([loc | slot for slot in taken])
                slots = np.array(taken, dtype=np.int64)
            zs.fhead = fh
            sel = idxs[pos : pos + k]
            todo.append((zs.mm, zs.base + slots * size, mv, starts[sel], lengths[sel]))
            handles[sel] = np.arange(h0, h0 + k, dtype=np.int64)
            inuse = zs.inuse + k
            zs.inuse = inuse
            cls.used += k
            g = cls.grp_of[inuse]
            if g != zs.grp:
                groups[zs.grp].remove(zs)
                if g == GROUP_FULL:
                    cls.cur = None
                else:
                    _add(groups, g, zs)
                zs.grp = g
            pos += k

    def _fresh_only(self, cls: _Class) -> bool:
        """Whether the next objects of ``cls`` go to new zspages only (no non-full zspage, no
        warm one) with new handles in a row (none to recycle)."""
        if cls.warm or self._free_head or self._closed:
            return False
        groups = cls.groups
        return not any(groups[g] for g in range(GROUP_EMPTY, GROUP_FULL))

    def _fill_fresh(
        self,
        cls: _Class,
        mv: memoryview,
        starts: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        idxs: npt.NDArray[Any],
        handles: npt.NDArray[np.int64],
        todo: list[Copy],
    ) -> None:
        """``_fill`` of the objects ``idxs`` into new zspages of ``cls`` all at once (what
        ``_new_zspage`` and ``_fill`` would do zspage after zspage: the same runs, ids, slots,
        handles and groups), with one charge for all of them and their reverse maps, handle
        entries and copy offsets computed as arrays. Raises PoolFull, with nothing changed
        for this class, where those zspages or handles are not there (where ``_fill`` would
        have failed part way)."""
        k = len(idxs)
        objs, npg, size = cls.objs, cls.pages, cls.size
        m = -(-k // objs)  # zspages, the last one possibly part full
        h0 = len(self._tbl)
        if h0 + k - 1 > MAX_HANDLE:
            raise PoolFull("handle space exhausted", cause=CAUSE_SYSTEM)
        self._charge(m * npg)
        taken = self._take_runs(npg, m)
        zids = array("Q")
        free_zids = self._free_zids
        while free_zids and len(zids) < m:
            zids.append(free_zids.pop())
        zlist = self._zspages
        n0, fresh = len(zlist), m - len(zids)
        zids.extend(range(n0, n0 + fresh))
        zlist.extend([None] * fresh)
        where, zsize = self._zs_where, self._zs_size
        where.frombytes(bytes(8 * fresh))
        zsize.frombytes(bytes(2 * fresh))
        # reverse maps: zspage j holds handles h0 + j * objs .., the last one's free tail chained
        revmap = np.arange(h0, h0 + m * objs, dtype=np.uint32)
        last = k - (m - 1) * objs
        if last < objs:
            revmap[k:] = np.arange(last + 1, objs + 1, dtype=np.uint32) | SLOT_FREE
        rows = revmap.reshape(m, objs)
        zid_arr = np.frombuffer(zids, dtype=np.uint64)
        slots = np.tile(np.arange(objs, dtype=np.uint64), m)[:k]
        entries = np.repeat(zid_arr << np.uint64(OBJ_BITS), objs)[:k] | slots
        self._tbl.frombytes(entries.tobytes())
        bases = np.fromiter((off for _, off in taken), dtype=np.int64, count=m)
        dst = np.repeat(bases, objs)[:k] + slots.astype(np.int64) * size
        handles[idxs] = np.arange(h0, h0 + k, dtype=np.int64)
        _copy_into_runs(taken, objs, dst, mv, starts, lengths, idxs, todo)
        for j, (ar, base) in enumerate(taken):
            zs = _Zspage("I", rows[j].tobytes())
            zid = int(zids[j])
            zs.loc = zid << OBJ_BITS
            zs.cls = cls
            zs.arena = ar
            zs.mm = ar.mm
            zs.base = base
            zs.inuse = objs
            zs.fhead = objs
            zs.grp = GROUP_FULL
            zlist[zid] = zs
            where[zid] = ar.aid << AID_SHIFT | base // PAGE_SIZE
            zsize[zid] = size
        cls.nzspages += m
        cls.used += k
        if last < objs:  # the last zspage is part full: the allocation target, as _fill leaves it
            zs.inuse = last
            zs.fhead = last
            zs.grp = cls.grp_of[last]
            _add(cls.groups, zs.grp, zs)
            cls.cur = zs

    def load(self, handle: int, size: int) -> bytes:
        e = self._tbl[handle]
        if e >= HUGE_TAG or handle <= 0:
            if e >= FREE_TAG or handle <= 0:
                raise KeyError(f"handle {handle} is not live")
            ar = self._arena_by_id[(e >> AID_SHIFT) & AID_MASK]
            assert ar is not None
            a = (e & PAGE_INDEX_MASK) * PAGE_SIZE
            return ar.mm[a : a + size]
        zs = self._zspages[e >> OBJ_BITS]
        assert zs is not None
        a = zs.base + (e & OBJ_MASK) * zs.cls.size
        return zs.mm[a : a + size]

    def load_packed(
        self, handles: npt.NDArray[np.uint64 | np.uint32], sizes: npt.NDArray[np.uint16]
    ) -> bytes:
        """The objects of ``handles`` (of ``sizes`` bytes each) copied out end to end into one
        bytes object, each as :meth:`load` gives it: in one C call when the accelerator is built
        (``zramd._native.load_packed``: no bytes object per object), else joined. Raises
        KeyError for a handle that is not live."""
        if _native_load is not None:
            return _native_load(
                self._tbl, self._zs_where, self._zs_size, self._arena_by_id,
                np.ascontiguousarray(handles, dtype=np.uint64),
                np.ascontiguousarray(sizes, dtype=np.uint16), OBJ_BITS, AID_SHIFT,
            )  # fmt: skip
        load = self.load
        return b"".join(
            load(h, size) for h, size in zip(handles.tolist(), sizes.tolist(), strict=True)
        )

    def free(self, handle: int) -> None:
        if self.on_free is not None:
            self.on_free(handle)
        tbl = self._tbl
        e = tbl[handle]
        if e >= HUGE_TAG or handle <= 0:
            if e >= FREE_TAG or handle <= 0:
                raise KeyError(f"handle {handle} is not live")
            self._free_huge(handle, e)
            return
        zs = self._zspages[e >> OBJ_BITS]
        assert zs is not None
        slot = e & OBJ_MASK
        tbl[handle] = self._free_head | FREE_TAG
        self._free_head = handle
        zs[slot] = zs.fhead | SLOT_FREE
        zs.fhead = slot
        inuse = zs.inuse - 1
        zs.inuse = inuse
        cls = zs.cls
        cls.used -= 1
        g = cls.grp_of[inuse]
        if g != zs.grp:
            if cls.cur is zs:
                cls.cur = None
            groups = cls.groups
            if zs.grp != GROUP_FULL:
                groups[zs.grp].remove(zs)
            if inuse:
                try:
                    groups[g].add(zs)
                except _Unset:
                    groups[g] = {zs}
                zs.grp = g
            else:
                self._release(zs)
        self._frees_to_check -= 1
        if self._frees_to_check <= 0:
            self._frees_to_check = AUTO_COMPACT_CHECK_EVERY
            if not self.auto_compact:
                self._shrink_sets()
            elif self.maybe_compact() >= AUTO_COMPACT_MAX_PAGES:
                self._frees_to_check = AUTO_COMPACT_CONTINUE_EVERY

    # ------------------------------------------------------------------ slow paths

    def _store_huge(self, data: bytes | bytearray | memoryview, n: int) -> int:
        """A huge object gets a page of its own and no zspage object: its handle-table entry
        holds the arena id and page index directly (HUGE_TAG)."""
        if self._closed:
            raise ValueError("pool is closed")
        if self._huge_warm:
            arena, off = self._huge_warm.pop()
            self._cached_pages -= 1
            self._pages += 1
        else:
            self._charge(1)
            try:
                arena = self._arena_with_room(1)
            except OSError as exc:
                self._uncharge(1)
                raise PoolFull(f"cannot map a new arena: {exc}", cause=CAUSE_SYSTEM) from exc
            off = arena.take()
        entry = HUGE_TAG | arena.aid << AID_SHIFT | off // PAGE_SIZE
        tbl = self._tbl
        h = self._free_head
        if h:
            self._free_head = tbl[h] ^ FREE_TAG
            tbl[h] = entry
        else:
            h = len(tbl)
            if h > MAX_HANDLE:
                self._drop_huge_page(arena, off)
                raise PoolFull("handle space exhausted", cause=CAUSE_SYSTEM)
            tbl.append(entry)
        arena.mm[off : off + n] = data
        cls = self._huge
        cls.used += 1
        cls.nzspages += 1
        return h

    def _free_huge(self, handle: int, e: int) -> None:
        self._tbl[handle] = self._free_head | FREE_TAG
        self._free_head = handle
        arena = self._arena_by_id[(e >> AID_SHIFT) & AID_MASK]
        assert arena is not None
        cls = self._huge
        cls.used -= 1
        cls.nzspages -= 1
        self._drop_huge_page(arena, (e & PAGE_INDEX_MASK) * PAGE_SIZE)

    def _drop_huge_page(self, arena: _Arena, off: int) -> None:
        if self._cached_pages < self._cache_max:
            self._huge_warm.append((arena, off))
            self._cached_pages += 1
            self._pages -= 1
            return
        self._give_back(arena, off)
        self._uncharge(1)

    def _select(self, cls: _Class) -> _Zspage:
        """The fullest non-full zspage of ``cls``, or a new one. Sets ``cls.cur``."""
        groups = cls.groups
        for g in range(GROUP_99, GROUP_EMPTY, -1):
            s = groups[g]
            if s:
                zs = next(iter(s))
                cls.cur = zs
                return zs
        zs = self._new_zspage(cls)
        cls.cur = zs
        return zs

    def _charge(self, pages: int) -> None:
        """Account ``pages`` new pages or raise PoolFull (after dropping the warm cache, whose
        pages count against the limits too)."""
        nbytes = pages * PAGE_SIZE
        if self.limit and (self._pages + self._cached_pages + pages) * PAGE_SIZE > self.limit:
            if self._cached_pages:
                self.drop_cache()
            if (self._pages + pages) * PAGE_SIZE > self.limit:
                raise PoolFull(f"pool limit {self.limit} B reached", cause=CAUSE_LIMIT)
        budget = self.budget
        if budget is not None:
            if budget.limit and budget.used + nbytes > budget.limit:
                if self._cached_pages:
                    self.drop_cache()
                if budget.used + nbytes > budget.limit:
                    budget.refusals += 1
                    raise PoolFull(
                        f"memory budget {budget.limit} B reached",
                        cause=CAUSE_BUDGET,
                        budget=budget,
                    )
            budget.used += nbytes
        self._pages += pages

    def _uncharge(self, pages: int) -> None:
        self._pages -= pages
        if self.budget is not None:
            self.budget.used -= pages * PAGE_SIZE

    def _new_zspage(self, cls: _Class) -> _Zspage:
        if self._closed:
            raise ValueError("pool is closed")
        k = cls.pages
        if cls.warm:  # a zspage freed recently, still resident: no page faults, no new pages
            zs = cls.warm.pop()
            self._cached_pages -= k
            self._pages += k
            zs.grp = GROUP_EMPTY  # its free chain already covers every slot
            self._zspages[zs.loc >> OBJ_BITS] = zs
            _add(cls.groups, GROUP_EMPTY, zs)
            cls.nzspages += 1
            return zs
        self._charge(k)
        try:
            arena = self._arena_with_room(k)
        except OSError as exc:  # mmap failed: treat like the limit
            self._uncharge(k)
            raise PoolFull(f"cannot map a new arena: {exc}", cause=CAUSE_SYSTEM) from exc
        base = arena.take()
        if self._free_zids:
            zid = self._free_zids.pop()
        else:
            zid = len(self._zspages)
            self._zspages.append(None)
            self._zs_where.append(0)
            self._zs_size.append(0)
        self._zs_where[zid] = arena.aid << AID_SHIFT | base // PAGE_SIZE
        self._zs_size[zid] = cls.size
        zs = _Zspage("I", cls.fresh_revmap)
        zs.loc = zid << OBJ_BITS
        zs.cls = cls
        zs.arena = arena
        zs.mm = arena.mm
        zs.base = base
        zs.inuse = 0
        zs.fhead = 0
        zs.grp = GROUP_EMPTY
        self._zspages[zid] = zs
        _add(cls.groups, GROUP_EMPTY, zs)
        cls.nzspages += 1
        return zs

    def _arena_with_room(self, pages: int) -> _Arena:
        """O(1): the top of the stack of arenas that had room (full ones are dropped lazily)."""
        room = self._room.setdefault(pages, [])
        while room:
            ar = room[-1]
            if ar.has_room():
                return ar
            room.pop()
            ar.in_room = False
        if len(self._arena_by_id) > AID_MASK:
            raise OSError("too many arenas")
        ar = _Arena(pages, self._arena_size, len(self._arena_by_id))
        self._arena_by_id.append(ar)
        self._arenas.setdefault(pages, []).append(ar)
        room.append(ar)
        ar.in_room = True
        return ar

    def _release(self, zs: _Zspage) -> None:
        """Free an empty zspage (already out of its group set): pages back to the OS."""
        cls = zs.cls
        cls.nzspages -= 1
        k = cls.pages
        zid = zs.loc >> OBJ_BITS
        self._zspages[zid] = None
        if self._cached_pages + k <= self._cache_max:  # keep it warm (still counted as held)
            cls.warm.append(zs)  # keeps its id, run and (all-free) slot chain
            self._cached_pages += k
            self._pages -= k
            return
        self._free_zids.append(zid)
        self._give_back(zs.arena, zs.base)
        self._uncharge(k)

    def _give_back(self, arena: _Arena, base: int) -> None:
        arena.give_back(base)
        if arena.used == 0:  # entirely empty: unmap it (rare, so the O(arenas) removes are fine)
            self._arenas[arena.pages].remove(arena)
            if arena.in_room:
                self._room[arena.pages].remove(arena)
            self._arena_by_id[arena.aid] = None
            arena.mm.close()
        elif not arena.in_room:
            self._room[arena.pages].append(arena)
            arena.in_room = True

    def drop_cache(self) -> int:
        """Give every warm cached run back to the OS; returns the number of pages."""
        n = self._cached_pages
        for cls in self._classes:
            for zs in cls.warm:
                self._free_zids.append(zs.loc >> OBJ_BITS)
                self._give_back(zs.arena, zs.base)
            cls.warm.clear()
        for arena, off in self._huge_warm:
            self._give_back(arena, off)
        self._huge_warm.clear()
        self._cached_pages = 0
        if self.budget is not None:
            self.budget.used -= n * PAGE_SIZE
        return n

    def _undo_slot(self, zs: _Zspage, slot: int) -> None:
        zs[slot] = zs.fhead | SLOT_FREE
        zs.fhead = slot

    # ------------------------------------------------------------------ compaction

    def compactable_pages(self) -> int:
        """Pages compaction could win now (kernel shrinker count)."""
        return sum(c.compactable_pages() for c in self._classes)

    def maybe_compact(self) -> int:
        """Compact if enough pages could be won (the auto-compaction policy). Also shrinks
        group sets left oversized by a burst (Python sets never shrink on removal)."""
        self._shrink_sets()
        can = self.compactable_pages()
        if can >= AUTO_COMPACT_MIN_PAGES and can >= AUTO_COMPACT_MIN_FRACTION * self._pages:
            return self.compact(max_pages=AUTO_COMPACT_MAX_PAGES)
        return 0

    def _shrink_sets(self) -> None:
        """Give empty group sets back (the shared empty one stands in) and rebuild oversized
        ones."""
        getsize = sys.getsizeof
        for c in self._classes:
            groups = c.groups
            for g, s in enumerate(groups):
                if not s:
                    groups[g] = _NO_ZSPAGES
                elif getsize(s) > SET_SHRINK_SLACK * (EMPTY_SET_BYTES + 32 * len(s)):
                    groups[g] = set(s)

    def compact(self, *, max_pages: int = 0) -> int:
        """Kernel ``zs_compact()``, then the spill pass (module doc): returns the number of
        pages freed by this call. With ``max_pages`` > 0 it stops once about that many pages
        are freed (bounded pause)."""
        freed = 0
        for cls in reversed(self._classes):
            if max_pages and freed >= max_pages:
                break
            if cls.objs > 1 and cls.compactable_pages() > 0:
                freed += self._compact_class(cls, max_pages - freed if max_pages else 0)
        if not (max_pages and freed >= max_pages):
            freed += self._spill(max_pages - freed if max_pages else 0)
        self._pages_compacted += freed
        self.drop_cache()
        self._shrink_sets()
        return freed

    def _compact_class(self, cls: _Class, max_pages: int) -> int:
        groups = cls.groups
        cls.cur = None
        freed = 0
        dst: _Zspage | None = None
        tbl = self._tbl
        size = cls.size
        while cls.compactable_pages() > 0 and not (max_pages and freed >= max_pages):
            if dst is None:
                dst = _pick(groups, range(GROUP_99, GROUP_EMPTY, -1))
                if dst is None:
                    break
                groups[dst.grp].remove(dst)
            src = _pick(groups, range(GROUP_EMPTY + 1, GROUP_99 + 1))
            if src is None:
                break
            groups[src.grp].remove(src)
            # migrate_zspage(): move src's objects until src is empty or dst is full
            smm, dmm = src.mm, dst.mm
            sbase, dbase = src.base, dst.base
            dloc = dst.loc
            room = cls.objs - dst.inuse
            moved = 0
            for sslot in range(cls.objs):
                if moved == room:
                    break
                h = src[sslot]
                if h & SLOT_FREE:
                    continue
                dslot = dst.fhead
                dst.fhead = dst[dslot] ^ SLOT_FREE
                sa = sbase + sslot * size
                da = dbase + dslot * size
                dmm[da : da + size] = smm[sa : sa + size]
                dst[dslot] = h
                src[sslot] = src.fhead | SLOT_FREE
                src.fhead = sslot
                tbl[h] = dloc | dslot
                moved += 1
            dst.inuse += moved
            src.inuse -= moved
            if src.inuse == 0:
                self._release(src)
                freed += cls.pages
            else:
                src.grp = cls.grp_of[src.inuse]
                _add(groups, src.grp, src)
            if dst.inuse == cls.objs:
                dst.grp = GROUP_FULL
                dst = None
        if dst is not None:
            dst.grp = cls.grp_of[dst.inuse]
            _add(groups, dst.grp, dst)
        return freed

    def _spill(self, max_pages: int) -> int:
        """Empty the partly used zspages that per-class compaction leaves (less than one
        zspage's worth of free slots per class) into free slots of their own class or of
        larger ones: a larger slot holds a smaller object, whose size the caller gives to
        ``load``. Classes largest to smallest, each one's emptiest zspage first, and only a
        zspage that empties completely; destinations are the smallest class with room, its
        fullest zspage first. Returns the pages freed."""
        shared = [c for c in self._classes if c.objs > 1]
        freed = 0
        for i in range(len(shared) - 1, -1, -1):
            cls = shared[i]
            targets = shared[i:]
            groups = cls.groups
            while not (max_pages and freed >= max_pages):
                src = _pick(groups, range(GROUP_EMPTY + 1, GROUP_99 + 1))
                if src is None:
                    break
                room = sum(c.nzspages * c.objs - c.used for c in targets)
                if room - (cls.objs - src.inuse) < src.inuse:
                    break
                groups[src.grp].remove(src)
                self._empty_into(src, targets)
                self._release(src)
                freed += cls.pages
        return freed

    def _empty_into(self, src: _Zspage, targets: list[_Class]) -> None:
        """Move every object of ``src`` (out of its group set) into the non-full zspages of
        ``targets`` (classes at least as large, smallest first), which have room for them."""
        tbl = self._tbl
        scls = src.cls
        size = scls.size
        smm, sbase = src.mm, src.base
        classes = iter(targets)
        dcls = next(classes)
        dst: _Zspage | None = None
        for sslot in range(scls.objs):
            h = src[sslot]
            if h & SLOT_FREE:
                continue
            while dst is None:
                dcls.cur = None
                dst = _pick(dcls.groups, range(GROUP_99, GROUP_EMPTY - 1, -1))
                if dst is None:
                    dcls = next(classes)
                else:
                    dcls.groups[dst.grp].remove(dst)
            dslot = dst.fhead
            dst.fhead = dst[dslot] ^ SLOT_FREE
            sa = sbase + sslot * size
            da = dst.base + dslot * dcls.size
            dst.mm[da : da + size] = smm[sa : sa + size]
            dst[dslot] = h
            src[sslot] = src.fhead | SLOT_FREE
            src.fhead = sslot
            tbl[h] = dst.loc | dslot
            dst.inuse += 1
            dcls.used += 1
            scls.used -= 1
            if dst.inuse == dcls.objs:
                dst.grp = GROUP_FULL
                dst = None
        src.inuse = 0
        src.grp = GROUP_EMPTY
        if dst is not None:
            dst.grp = dcls.grp_of[dst.inuse]
            _add(dcls.groups, dst.grp, dst)

    # ------------------------------------------------------------------ stats

    def fragmentation(self) -> float:
        """Fraction of the live zspages' bytes not covered by live objects' class slots
        (tail waste of zspages plus free slots; the warm cache is not counted). 0 when
        empty."""
        if not self._pages:
            return 0.0
        used = sum(c.used * c.size for c in self._classes)
        return 1.0 - used / (self._pages * PAGE_SIZE)

    def class_stats(self) -> list[dict[str, object]]:
        """Per merged class, smallest first (like debugfs ``zsmalloc/<pool>/classes``).
        ``obj_used`` counts the class's used slots, including smaller objects that compaction
        moved into them."""
        out: list[dict[str, object]] = []
        for c in self._classes:
            fullness = [len(s) for s in c.groups]
            fullness[GROUP_FULL] = c.nzspages - sum(fullness)
            out.append({
                "size": c.size,
                "pages_per_zspage": c.pages,
                "objs_per_zspage": c.objs,
                "zspages": c.nzspages,
                "obj_allocated": c.nzspages * c.objs,
                "obj_used": c.used,
                "pages_used": c.nzspages * c.pages,
                "freeable": c.compactable_pages(),
                "fullness": dict(zip(FULLNESS_LABELS, fullness, strict=True)),
            })
        return out

    def close(self) -> None:
        """Unmap every arena. The pool is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        for arenas in self._arenas.values():
            for ar in arenas:
                ar.mm.close()
        self._arenas.clear()
        self._room.clear()
        self._arena_by_id = []
        self._huge_warm = []
        if self.budget is not None:
            self.budget.used -= (self._pages + self._cached_pages) * PAGE_SIZE
        self._pages = 0
        self._cached_pages = 0
        self._zspages = [None]
        self._zs_where = array("Q", [0])
        self._zs_size = array("H", [0])
        self._free_zids = array("Q")
        self._tbl = array("Q", [FREE_TAG])
        self._free_head = 0
        for c in self._classes:
            c.groups = [_NO_ZSPAGES] * NUM_FULLNESS_GROUPS
            c.cur = None
            c.used = 0
            c.nzspages = 0
            c.warm = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ debugging

    def check(self, sizes: Mapping[int, int] | None = None) -> None:
        """Verify every internal invariant (slow; for tests). With ``sizes`` (handle -> object
        size for every live handle), also that these are exactly the live handles and that each
        object lies inside one slot of its own class or of a larger one."""
        assert not _NO_ZSPAGES, "the shared empty group set holds a zspage"
        live = 0
        assert len(self._zs_where) == len(self._zs_size) == len(self._zspages)
        for zid, zs in enumerate(self._zspages):
            if zs is None:
                continue
            assert zs.loc == zid << OBJ_BITS
            cls = zs.cls
            assert self._zs_where[zid] == zs.arena.aid << AID_SHIFT | zs.base // PAGE_SIZE
            assert self._zs_size[zid] == cls.size
            assert len(zs) == cls.objs
            if zs.grp == GROUP_FULL:
                assert all(zs not in g for g in cls.groups)
            else:
                assert zs in cls.groups[zs.grp], "zspage not in its group"
            assert zs.grp == cls.grp_of[zs.inuse]
            used = [s for s in range(cls.objs) if not zs[s] & SLOT_FREE]
            assert len(used) == zs.inuse > 0
            for slot in used:
                assert self._tbl[zs[slot]] == zs.loc | slot
                if sizes is not None:
                    own = self._class_of[sizes[zs[slot]]]
                    assert own is not None and own.size <= cls.size, "object in a smaller slot"
            assert cls.objs * cls.size <= cls.pages * PAGE_SIZE
            chain, slot = [], zs.fhead
            while slot != cls.objs:
                chain.append(slot)
                slot = zs[slot] ^ SLOT_FREE
                assert len(chain) <= cls.objs
            assert sorted(chain) == [s for s in range(cls.objs) if zs[s] & SLOT_FREE]
            live += zs.inuse
        huge = 0
        for h in range(1, len(self._tbl)):
            e = self._tbl[h]
            if HUGE_TAG <= e < FREE_TAG:
                ar = self._arena_by_id[(e >> AID_SHIFT) & AID_MASK]
                assert ar is not None and ar.pages == 1
                assert (e & PAGE_INDEX_MASK) < ar.nruns
                huge += 1
        assert huge == self._huge.used == self._huge.nzspages
        assert live + huge == self.obj_count
        if sizes is not None:
            assert len(sizes) == self.obj_count
            assert all(self._tbl[h] < FREE_TAG for h in sizes)
        for c in self._classes:
            nfull = sum(1 for z in self._zspages if z is not None and z.cls is c
                        and z.grp == GROUP_FULL)
            assert not c.groups[GROUP_FULL]
            if c is self._huge:
                nfull = huge
            assert sum(len(s) for s in c.groups) + nfull == c.nzspages
            assert not c.groups[GROUP_EMPTY] or c.cur in c.groups[GROUP_EMPTY]
            if c.cur is not None:
                assert self._zspages[c.cur.loc >> OBJ_BITS] is c.cur and c.cur.grp != GROUP_FULL
        assert self._pages == sum(c.nzspages * c.pages for c in self._classes)
        arena_used = sum(a.used * a.pages for ars in self._arenas.values() for a in ars)
        for k, room in self._room.items():
            assert all(a.in_room for a in room) and len(set(map(id, room))) == len(room)
            assert all(a in room for a in self._arenas.get(k, []) if a.has_room())
        assert arena_used == self._pages + self._cached_pages
        assert self._cached_pages == sum(c.pages * len(c.warm) for c in self._classes) + len(
            self._huge_warm
        )
        assert self._cached_pages <= self._cache_max


def _copy_into_runs(
    taken: list[tuple[_Arena, int]],
    per_run: int,
    dst: npt.NDArray[np.int64],
    mv: memoryview,
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    idxs: npt.NDArray[Any],
    todo: list[Copy],
) -> None:
    """The copies of objects ``idxs`` (``per_run`` to each run of ``taken``, the last run maybe
    fewer) to their offsets ``dst``, appended to ``todo``: one per arena the runs came from."""
    a, m, k = 0, len(taken), len(idxs)
    while a < m:
        ar = taken[a][0]
        b = a + 1
        while b < m and taken[b][0] is ar:
            b += 1
        lo, hi = a * per_run, min(b * per_run, k)
        sel = idxs[lo:hi]
        todo.append((ar.mm, dst[lo:hi], mv, starts[sel], lengths[sel]))
        a = b


def _add(groups: list[set[_Zspage]], g: int, zs: _Zspage) -> None:
    """Put ``zs`` in fullness group ``g`` (giving the group a set of its own if it has none)."""
    try:
        groups[g].add(zs)
    except _Unset:
        groups[g] = {zs}


def _pick(groups: list[set[_Zspage]], order: Iterable[int]) -> _Zspage | None:
    for g in order:
        s = groups[g]
        if s:
            return next(iter(s))
    return None
