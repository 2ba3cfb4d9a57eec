"""A device's image: its pages as stored, taken out for a snapshot and put back by a restore.

Theory of operation
-------------------
**Capture** (:func:`capture`, on the loop thread). The image is the page table's columns, the
codec list, the live groups' registry and the objects, all as stored: compressed objects as they
are, huge pages raw, a group's blob once, same-fill pages as their word in the handle column,
holes as nothing. :func:`capture` copies the table's columns and the registry at once (a few
milliseconds for a 4 GiB export: 15 bytes a page, memcpy speed) and returns the
:class:`~zramd.persist.ImageMeta` with a :class:`Capture` that hands the objects out in slices
(:meth:`Capture.take`), in image order: the STORED and HUGE pages ascending, then the groups.

*Point in time.* Between slices clients keep writing, and a write frees the object it replaces.
The capture keeps, per pool handle it still has to read, that object's size (``want``) and
listens to the pool's frees (``Pool.on_free``): an object freed before its slice is copied aside
first (copy on free), and its handle forgotten, so a handle reused meanwhile is never read for
it. Compaction moves objects but keeps their handles. So every object of the image is the one
the table named at capture time, whatever the clients, recompression, grouping or compaction do
after it; the extra memory is the objects overwritten during the snapshot.

In the image's table, a STORED or HUGE entry's handle is 0 (its object is the next one in image
order), a GROUPED entry's handle is its group's index in the image, PENDING is cleared.

*Pages written back* (BACKED) are referenced, not copied: their entry keeps its locator in the
backing store, and the image names the store (its UUID) and, per such page, the generation of
the segment its locator lies in (:meth:`~zramd.backing.BackingStore.generations`). The device
pins its backing store while the capture runs (:meth:`~zramd.device.backed.Backed.pin`: no
locator is freed), and for the snapshot taken as the device closes, until it is closed, so the
file refers to records that are still there when the store is next opened.

**Restore** (:class:`Restore`, into an empty store, loop thread). The meta is checked against
the device (geometry, states, codec ids, group references) before any object is stored; the
objects are booked in the pool as they arrive (:meth:`Restore.put`, each length checked against
the table), which returns the copy of their bytes into their slots for the caller to run in a
thread while the next ones are booked; then :meth:`Restore.finish` writes the table's live
entries, registers the groups and sets the counters from the table. The codec list is matched
to the device's own by (name, level, dictionary): ids are remapped, codecs the device lacks are
added. Access times restart at the restore (the clock's epoch is the device's); marks are kept.
BACKED entries go back as they are, into a device whose backing store was opened with their
locators live (:meth:`~zramd.backing.BackingStore.open`): the restore refuses an image whose
pages are in another store (its UUID), or whose locators' segments have another generation now
(given back and written again since the snapshot: the same locator would be other data), or a
device without a backing store.

Knows nothing of files: :mod:`zramd.persist` writes and reads the image.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from zramd.allocator import Copy, PoolFull, run_copies
from zramd.backing import BackingStore
from zramd.backing.format import LEN_MASK
from zramd.compress import Codec, get_codec
from zramd.device.interface import Buffer, DeviceError, NoSpace
from zramd.device.store import PageStore
from zramd.device.table import (
    BACKED,
    EMPTY,
    GROUPED,
    HUGE,
    IDLE,
    INCOMPRESSIBLE,
    PENDING,
    RAW,
    RECOMPRESSED,
    SAME,
    STORED,
    WB_PENDING,
)
from zramd.geometry import PAGE_SHIFT, PAGE_SIZE
from zramd.persist import CodecSpec, ImageMeta

#: objects copied per vectorised step of a slice
TAKE_BATCH = 256


def codec_spec(codec: Codec) -> CodecSpec:
    """How the image names ``codec``: its name, effective level and dictionary."""
    dictionary = getattr(codec, "dictionary", None)
    return CodecSpec(codec.name, int(codec.level), bytes(dictionary) if dictionary else b"")


def _chunk_sizes(csize: int) -> list[int]:
    """The sizes of the pool chunks a group blob of ``csize`` bytes is stored as."""
    return [min(PAGE_SIZE, csize - off) for off in range(0, csize, PAGE_SIZE)]


class Capture:
    """The objects of one captured image, handed out in slices (see the module doc)."""

    def __init__(
        self,
        store: PageStore,
        handles: npt.NDArray[np.uint64],
        sizes: npt.NDArray[np.int64],
        group_chunks: list[list[int]],
        group_sizes: list[int],
        on_close: Callable[[], None],
    ) -> None:
        self._pool = store.pool
        self._handles = handles
        self._sizes = sizes
        self._group_chunks = group_chunks
        self._group_sizes = group_sizes
        self._on_close = on_close
        top = max(
            int(handles.max()) if len(handles) else 0,
            max((max(c) for c in group_chunks), default=0),
        )
        #: per pool handle: the bytes still to read from it (0: not wanted)
        self._want = np.zeros(top + 1, np.uint16)
        self._want[handles.astype(np.int64)] = sizes
        for chunks, csize in zip(group_chunks, group_sizes, strict=True):
            self._want[chunks] = _chunk_sizes(csize)
        #: objects freed before their slice: handle -> bytes
        self._saved: dict[int, bytes] = {}
        self._next = 0
        self._next_group = 0
        self._cancelled = False
        self._closed = False
        assert self._pool.on_free is None, "one capture at a time"
        self._pool.on_free = self._on_free
        #: the bytes saved by copy on free so far (extra memory the snapshot cost)
        self.saved_bytes = 0

    def _on_free(self, handle: int) -> None:
        want = self._want
        if handle < len(want):
            n = int(want[handle])
            if n:
                self._saved[handle] = self._pool.load(handle, n)
                self.saved_bytes += n
                want[handle] = 0

    def _get(self, handle: int, size: int) -> bytes:
        saved = self._saved.pop(handle, None) if self._saved else None
        return saved if saved is not None else self._pool.load(handle, size)

    def take(self, max_bytes: int) -> list[bytes]:
        """The next objects, about ``max_bytes`` of them (at least one); [] once all are out.
        Raises DeviceError when the device was reset or closed meanwhile."""
        if self._cancelled:
            raise DeviceError("snapshot aborted: the device was reset or closed")
        out: list[bytes] = []
        n = 0
        get = self._get
        want = self._want
        handles, sizes = self._handles, self._sizes
        while self._next < len(handles) and n < max_bytes:
            a = self._next
            b = min(a + TAKE_BATCH, len(handles))
            hs = handles[a:b].tolist()
            ss = sizes[a:b].tolist()
            for h, s in zip(hs, ss, strict=True):
                out.append(get(h, s))
            want[handles[a:b].astype(np.int64)] = 0
            n += int(sizes[a:b].sum())
            self._next = b
        while self._next_group < len(self._group_sizes) and n < max_bytes:
            g = self._next_group
            csize = self._group_sizes[g]
            chunks = self._group_chunks[g]
            out.append(b"".join(map(get, chunks, _chunk_sizes(csize))))
            want[chunks] = 0
            n += csize
            self._next_group = g + 1
        return out

    def cancel(self) -> None:
        """The device is being reset or closed: stop listening; :meth:`take` raises."""
        self._cancelled = True
        self.close()

    def close(self) -> None:
        """Stop listening to frees and drop what was saved (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._pool.on_free == self._on_free:
            self._pool.on_free = None
        self._saved.clear()
        self._on_close()


def capture(
    store: PageStore,
    size: int,
    on_close: Callable[[], None],
    backing: BackingStore | None = None,
) -> tuple[ImageMeta, Capture]:
    """The image of ``store`` (a device of ``size`` bytes, its pages written back to
    ``backing``) as of now: its meta, and the :class:`Capture` that hands out its objects.
    ``on_close`` runs when the capture closes; the caller pins ``backing`` meanwhile."""
    if store.pool.on_free is not None:
        raise DeviceError("a snapshot of this device is already running")
    t = store.table
    state = t.state.copy()
    handle = t.handle.copy()
    sizes_col = t.size.copy()
    codec = t.codec.copy()
    flags = t.flags & np.uint8(~(PENDING | WB_PENDING) & 0xFF)
    atime = t.atime.copy()
    pooled = np.flatnonzero((state == STORED) | (state == HUGE))
    obj_handles = handle[pooled]
    obj_sizes = np.where(state[pooled] == HUGE, PAGE_SIZE, sizes_col[pooled]).astype(np.int64)
    handle[pooled] = 0
    g = store.groups
    gids = np.flatnonzero(g.members)
    remap = np.zeros(len(g.members), np.uint64)
    remap[gids] = np.arange(len(gids), dtype=np.uint64)
    grouped = np.flatnonzero(state == GROUPED)
    handle[grouped] = remap[handle[grouped].astype(np.int64)]
    csizes = g.csize[gids].astype(np.int64)
    group_sizes = csizes.tolist()
    group_chunks = [
        g.chunks[gid, : (n + PAGE_SIZE - 1) >> PAGE_SHIFT].tolist()
        for gid, n in zip(gids.tolist(), group_sizes, strict=True)
    ]
    backed = np.flatnonzero(state == BACKED)
    uuid = b""
    generations = np.zeros(0, np.uint64)
    if len(backed):
        assert backing is not None, "BACKED pages without a backing store"
        uuid = backing.header.uuid
        generations = backing.generations(handle[backed])
    meta = ImageMeta(
        size=size,
        page_size=PAGE_SIZE,
        codecs=[codec_spec(c) for c in store.codecs],
        table=[state, handle, sizes_col, codec, flags, atime],
        groups=[
            g.first[gids].copy(),
            g.csize[gids].copy(),
            g.members[gids].copy(),
            g.live[gids].copy(),
            g.codec[gids].copy(),
        ],
        objects=len(pooled) + len(gids),
        object_bytes=int(obj_sizes.sum()) + int(csizes.sum()),
        backing=uuid,
        generations=generations,
    )
    cap = Capture(store, obj_handles, obj_sizes, group_chunks, group_sizes, on_close)
    return meta, cap


def _popcount16(a: npt.NDArray[np.uint16]) -> npt.NDArray[np.int64]:
    bits = np.unpackbits(a.astype("<u2").view(np.uint8).reshape(-1, 2), axis=1)
    return bits.sum(axis=1, dtype=np.int64)


def _check_backed(meta: ImageMeta, backing: BackingStore | None) -> int:
    """The number of BACKED pages of ``meta``, once checked against ``backing`` (the device's
    store, opened with their locators live). Raises ValueError."""
    state, handle, sizes, _codec, _flags, _atime = meta.table
    backed = np.flatnonzero(state == BACKED)
    n = len(backed)
    if not n:
        return 0
    if backing is None:
        raise ValueError(f"{n} pages are in a backing store and the export has none")
    if meta.backing != backing.header.uuid:
        theirs = uuidlib.UUID(bytes=meta.backing) if meta.backing else "unnamed"
        raise ValueError(
            f"{n} pages are in the backing store {theirs}, {backing.path} is the backing store "
            f"{backing.header.uuid_text}"
        )
    if len(meta.generations) != n:
        raise ValueError(f"{len(meta.generations)} generations for {n} pages written back")
    sz = sizes[backed].astype(np.uint64)
    if (sz == 0).any() or (sz > PAGE_SIZE).any():
        raise ValueError("a page written back has an object size out of 1..4096")
    locs = handle[backed]
    if ((locs & np.uint64(LEN_MASK)) != sz).any():
        raise ValueError("a page written back has a locator of another length than its object")
    stale = int(np.count_nonzero(backing.generations(locs) != meta.generations))
    if stale:
        raise ValueError(
            f"{stale} of {n} pages written back are no longer in {backing.path} (their segments "
            "were given back and written again since the snapshot)"
        )
    return n


class Restore:
    """Puts an image back into an empty store (see the module doc). Raises ValueError for an
    image that does not fit the device or is inconsistent, NoSpace when the pool has no room."""

    def __init__(
        self, store: PageStore, size: int, meta: ImageMeta, backing: BackingStore | None = None
    ) -> None:
        assert store.stats.pages_stored == 0, "restore into an empty device only"
        if meta.size != size:
            raise ValueError(f"it holds an export of {meta.size} bytes, the export has {size}")
        if meta.page_size != PAGE_SIZE or meta.npages != store.table.npages:
            raise ValueError(
                f"page size {meta.page_size} x {meta.npages} pages, the device has "
                f"{PAGE_SIZE} x {store.table.npages}"
            )
        self._store = store
        self._meta = meta
        state, handle, sizes, codec, _flags, _atime = meta.table
        first, csize, members, live, gcodec = meta.groups
        if len(state) and int(state.max()) > BACKED:
            raise ValueError(f"unknown page state {int(state.max())}")
        self._nbacked = _check_backed(meta, backing)
        ncodecs = len(meta.codecs)
        coded = (state == STORED) | (state == GROUPED)
        coded |= (state == BACKED) & ((meta.table[4] & RAW) == 0)
        if coded.any() and int(codec[coded].max()) >= ncodecs:
            raise ValueError("a page names a codec the image does not list")
        if len(gcodec) and int(gcodec.max()) >= ncodecs:
            raise ValueError("a group names a codec the image does not list")
        self._pooled = np.flatnonzero((state == STORED) | (state == HUGE))
        huge = state[self._pooled] == HUGE
        self._sizes = np.where(huge, PAGE_SIZE, sizes[self._pooled]).astype(np.int64)
        if (self._sizes <= 0).any() or (self._sizes > PAGE_SIZE).any():
            raise ValueError("a stored page has an object size out of 1..4096")
        ng = meta.ngroups
        grouped = np.flatnonzero(state == GROUPED)
        gref = handle[grouped].astype(np.int64)
        if len(grouped):
            if int(gref.max()) >= ng:
                raise ValueError("a page names a group the image does not hold")
            pos = grouped - first[gref]
            if (pos < 0).any() or (pos >= 16).any():
                raise ValueError("a grouped page lies outside its group's window")
            if not ((live[gref].astype(np.int64) >> pos) & 1).all():
                raise ValueError("a grouped page is not live in its group")
            below = (members[gref].astype(np.int64) & ((1 << pos) - 1)).astype(np.uint16)
            if (_popcount16(below) != sizes[grouped]).any():
                raise ValueError("a grouped page's place in its group's blob is wrong")
        if ng:
            if (members == 0).any() or (live & ~members).any() or (csize == 0).any():
                raise ValueError("a group has no members, or live pages that are not members")
            if int(first.min()) < 0 or int(first.max()) >= max(1, meta.npages):
                raise ValueError("a group lies outside the device")
        if int(_popcount16(live).sum()) != len(grouped):
            raise ValueError("the groups' live pages and the grouped pages differ")
        expected = len(self._pooled) + ng
        if meta.objects != expected:
            raise ValueError(f"{meta.objects} objects, the table needs {expected}")
        if meta.object_bytes != int(self._sizes.sum()) + int(csize.sum(dtype=np.int64)):
            raise ValueError("the objects' bytes do not match the table")
        # codec ids of the image -> ids of the device's list
        lut = [
            store.codec_id(
                get_codec(c.name, level=c.level or None, dictionary=c.dictionary or None)
            )
            for c in meta.codecs
        ]
        self._lut = np.array(lut or [0], dtype=np.uint8)
        self._npooled = len(self._pooled)
        self._handle_list: list[int] = []
        self._group_handles: list[list[int]] = []
        self._received = 0

    def put(self, lengths: npt.NDArray[Any], data: Buffer) -> Callable[[], None]:
        """Store the next objects of the image in the pool (``data`` holds them end to end, of
        ``lengths`` bytes each) and return the copy of their bytes into it, which the caller
        runs once, in any thread (it runs without the GIL), before :meth:`finish` and before
        anything else uses the pool; the next ``put`` may run meanwhile. Raises ValueError (a
        length the table does not give) or NoSpace."""
        pool = self._store.pool
        copies: list[Copy] = []
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(data):
            raise ValueError("the objects' lengths do not add up to their data")
        i = self._received
        k = min(len(lengths), max(0, self._npooled - i))
        mv = memoryview(data).cast("B")
        try:
            if k:
                bad = np.flatnonzero(lengths[:k] != self._sizes[i : i + k])
                if len(bad):
                    j = int(bad[0])
                    raise ValueError(
                        f"object {i + j} has {int(lengths[j])} bytes, the table says "
                        f"{int(self._sizes[i + j])}"
                    )
                self._handle_list += pool.store_packed(mv, lengths[:k], copies)
                self._received = i = i + k
            csize = self._meta.groups[1]
            pos = int(lengths[:k].sum())
            for n in lengths[k:].tolist():
                g = i - self._npooled
                if g >= len(csize) or n != int(csize[g]):
                    raise ValueError(f"object {i} has {n} bytes, not its group's size")
                pieces = _chunk_sizes(n)
                self._group_handles.append(
                    pool.store_packed(mv[pos : pos + n], np.array(pieces, dtype=np.int64), copies)
                )
                pos += n
                self._received = i = i + 1
        except PoolFull:
            raise NoSpace("memory limit reached while restoring") from None
        return partial(run_copies, copies)

    def finish(self) -> None:
        """Install the table and the groups once every object is stored."""
        meta = self._meta
        if self._received != meta.objects:
            raise ValueError(f"{self._received} of {meta.objects} objects")
        store = self._store
        t = store.table
        state, handle, sizes, codec, flags, _atime = meta.table
        live = np.flatnonzero(state)
        handle = handle.copy()
        handle[self._pooled] = np.array(self._handle_list, dtype=np.uint64)
        first, csize, members, glive, gcodec = meta.groups
        lut = self._lut
        gids = np.zeros(max(1, meta.ngroups), np.uint64)
        for j, hs in enumerate(self._group_handles):
            gids[j] = store.groups.restore(
                int(first[j]),
                int(csize[j]),
                int(members[j]),
                int(glive[j]),
                int(lut[gcodec[j]]),
                hs,
            )
        grouped = np.flatnonzero(state == GROUPED)
        handle[grouped] = gids[handle[grouped].astype(np.int64)]
        st = state[live]
        coded = (st == STORED) | (st == GROUPED) | ((st == BACKED) & ((flags[live] & RAW) == 0))
        codec_new = np.where(coded, lut[np.where(coded, codec[live], 0)], 0)
        fl = flags[live] & np.uint8(~(PENDING | WB_PENDING) & 0xFF)
        t.state[live] = st
        t.handle[live] = handle[live]
        t.size[live] = sizes[live]
        t.codec[live] = codec_new
        t.flags[live] = fl
        t.atime[live] = store.now
        s = store.stats
        s.pages_stored += len(live)
        s.same_pages += int(np.count_nonzero(st == SAME))
        nhuge = int(np.count_nonzero(st == HUGE))
        s.huge_pages += nhuge
        s.huge_pages_since += nhuge
        s.compr_data_size += int(self._sizes.sum())
        s.bd_count += self._nbacked
        s.idle_pages += int(np.count_nonzero(fl & IDLE))
        s.recompressed_pages += int(np.count_nonzero(fl & RECOMPRESSED))
        s.incompressible_pages += int(np.count_nonzero(fl & INCOMPRESSIBLE))
        store.current_stats()
        assert not (state[live] == EMPTY).any()
