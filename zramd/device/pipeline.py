"""The page pipeline: pure functions from page bytes to what the store keeps, and back.

Theory of operation
-------------------
A write turns each full page into a :data:`Prepared` triple ``(state, value, payload)``: a
same-filled page (:func:`zramd.device.samefill.same_fill_word`) becomes ``(SAME, word, None)``
and allocates nothing; any other page is compressed, and a result of at least the huge threshold
becomes ``(HUGE, PAGE_SIZE, page)`` (stored raw, as zram), a smaller one ``(STORED, size,
compressed bytes)``. A preparer (:data:`PrepareMany`) does that for every page of a buffer, as a
Python loop over :func:`prepare_page` or as one C batch (``zramd._native.prepare_pages``, the
GIL released) that gives the same triples. A read goes back from snapshot items (page bytes, or
``(codec or native kind, compressed blob)``, or a :class:`GroupRun` of a multi-page group) to
page bytes. A group (:mod:`zramd.device.groups`) is packed here too: :func:`pack_groups` decodes
the member pages of each window and compresses them as one blob; a :class:`GroupImage` holds a
group's blob copied out of the pool and decodes it once, on first use, in whichever thread
(:func:`decode_group`: in C, the GIL released, when the codec has a native form).

Invariants: every function here is pure and may run in a worker thread. It reads only bytes
handed to it (copied out of the pool on the loop thread) and writes only buffers it created or
was given for its own pages, so the pages of one request can be split between workers
(``[start, stop)`` arguments).

Knows nothing of the page table, the pool, the counters or request ordering: the store commits
what is prepared here, on the loop thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zramd.compress import Codec, CodecError, native
from zramd.device.samefill import same_fill_word
from zramd.device.table import HUGE, SAME, STORED
from zramd.geometry import PAGE_SHIFT, PAGE_SIZE

#: a prepared page: (state, fill word or object size, payload to store or None)
Prepared = tuple[int, int, "bytes | None"]

#: prepares the whole pages of a buffer (a multiple of PAGE_SIZE bytes), in order
PrepareMany = Callable[["bytes | memoryview"], list[Prepared]]


def prepare_page(page: bytes, compress: Callable[[bytes], bytes], threshold: int) -> Prepared:
    """Classify one full page (bytes) as SAME / STORED / HUGE and produce its payload."""
    word = same_fill_word(page)
    if word is not None:
        return (SAME, word, None)
    comp = compress(page)
    n = len(comp)
    if n >= threshold:
        return (HUGE, PAGE_SIZE, page)
    return (STORED, n, comp)


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


def prepare_part(
    start: int,
    stop: int,
    head: bytes | None,
    mv: memoryview,
    mid_start: int,
    tail: bytes | None,
    npages: int,
    prepare_many: PrepareMany,
) -> list[Prepared]:
    """Prepare pages ``[start, stop)`` of a write of ``npages`` pages (page 0 is ``head`` if
    given, the last is ``tail`` if given, the rest full pages of ``mv`` from ``mid_start``), so
    the pages of one request can be split between workers. The full pages in between go to
    ``prepare_many`` in one call."""
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


def decode_group(codec: Codec, blob: bytes, size: int) -> bytes:
    """A group's blob decoded into its ``size`` bytes of pages: in C
    (``zramd._native.decode_group``, GIL released) when the codec has a native form, else by
    the codec. Raises CodecError."""
    kind = native.decode_kind(codec)
    if kind is None:
        return codec.decompress(blob, size)
    data = native.module().decode_group(blob, kind, size)
    if data is None:
        raise CodecError(f"{codec.name}: the group's blob does not decode to {size} bytes")
    return data


def decode_group_into(codec: Codec, blob: bytes, out: memoryview) -> None:
    """:func:`decode_group` straight into ``out`` (all of it: the group's size). Raises
    CodecError."""
    kind = native.decode_kind(codec)
    if kind is None:
        data = codec.decompress(blob, len(out))
        ok = len(data) == len(out)
        if ok:
            out[:] = data
    else:
        ok = native.module().decode_groups_into(out, [(0, len(out), kind, blob)]) < 0
    if not ok:
        raise CodecError(f"{codec.name}: the group's blob does not decode to {len(out)} bytes")


class GroupImage:
    """A group's compressed blob (copied out of the pool on the loop thread) and, once decoded,
    its member pages back to back (the blob is dropped then). Two threads may decode at once:
    both get the same bytes, and one that finds the blob dropped finds the pages set (they are
    set before the blob is dropped). A blob that does not decode raises CodecError every
    time."""

    __slots__ = ("codec", "blob", "size", "data")

    def __init__(
        self, codec: Codec, blob: bytes | None, size: int, data: bytes | None = None
    ) -> None:
        self.codec = codec
        self.blob = blob
        #: bytes the blob decodes to (members x PAGE_SIZE)
        self.size = size
        self.data = data

    def decode_into(self, out: memoryview) -> None:
        """All the member pages into ``out`` (``size`` bytes), not kept: decoded straight into
        it while the image is not decoded, else copied. Raises CodecError."""
        blob = self.blob  # before data: the blob is dropped only after data is set
        if self.data is None and blob is not None:
            decode_group_into(self.codec, blob, out)
        else:
            out[:] = self.pages()

    def pages(self) -> bytes:
        """The member pages, decoded on first use. Raises CodecError."""
        data = self.data
        if data is None:
            blob = self.blob
            data = self.data
            if data is None:
                assert blob is not None
                data = decode_group(self.codec, blob, self.size)
                self.data = data
                self.blob = None
        return data


class PackedSnap:
    """A native snapshot of pages that are all blobs of one kind: the blobs end to end in
    ``data``, blob i ending at ``ends[i]`` (int64), so that a part ``[start, stop)`` of the
    read is one C call over a slice of ``ends``."""

    __slots__ = ("data", "ends")

    def __init__(self, data: Any, ends: Any) -> None:
        self.data = data
        self.ends = ends


class GroupRun:
    """Snapshot item for a run of consecutive members of one group image: every page of the run
    holds this one object (a list repeat, no object per page), and the page at snapshot
    position ``p`` is member ``index + p - pos`` of ``image``, so a part of the snapshot that
    starts inside the run still finds its pages."""

    __slots__ = ("image", "index", "pos", "count")

    def __init__(self, image: GroupImage, index: int, pos: int, count: int) -> None:
        self.image = image
        #: the member index of the run's first page
        self.index = index
        #: the snapshot position of the run's first page
        self.pos = pos
        self.count = count

    def slice(self, i: int, stop: int) -> tuple[int, memoryview]:
        """``(j, pages)``: the run's pages from snapshot position ``i`` (inside the run) to
        ``j = min(its end, stop)``, as one slice of the decoded image. Raises CodecError."""
        j = min(self.pos + self.count, stop)
        off = (self.index + i - self.pos) << PAGE_SHIFT
        pages = memoryview(self.image.pages())
        return j, pages[off : off + ((j - i) << PAGE_SHIFT)]


def pack_groups(windows: list[list[Any]], codec: Codec) -> list[bytes | None]:
    """Per window, its member items (page bytes or ``(codec, blob)``) decoded and compressed
    together with ``codec`` as one blob; None for a window whose members do not all decode."""
    out: list[bytes | None] = []
    for items in windows:
        try:
            pages = decompress_part(0, len(items), items)
        except CodecError:
            out.append(None)
            continue
        out.append(codec.compress(pages))
    return out


def decompress_part(start: int, stop: int, snap: list[Any]) -> bytes:
    """Decompress items ``[start, stop)`` of a snapshot (page bytes, ``(codec, blob)`` or a
    :class:`GroupRun`) and join them into one buffer, so the pages of one read can be split
    between workers. A run of consecutive members of one group is one slice of its pages."""
    parts: list[Any] = []
    i = start
    while i < stop:
        item = snap[i]
        if type(item) is tuple:
            parts.append(item[0].decompress(item[1], PAGE_SIZE))
        elif type(item) is GroupRun:
            i, pages = item.slice(i, stop)
            parts.append(pages)
            continue
        else:
            parts.append(item)
        i += 1
    return b"".join(parts)


def native_decode_part(start: int, stop: int, snap: Any, kind: int, out: memoryview) -> None:
    """Decode items ``[start, stop)`` of a native snapshot into their pages of ``out``: a
    :class:`PackedSnap` (blobs of ``kind``), or a list whose items are
    page bytes, a shorter blob of ``kind``, ``(kind, blob)`` for the C loop, or ``(codec, blob)``
    for a codec without a native form and :class:`GroupRun` items (both decoded here: a run of
    consecutive members of one group is copied into ``out`` as one slice of its pages, the
    items around it go to the C loop). Raises CodecError."""
    decompress_pages = native.module().decompress_pages
    if type(snap) is PackedSnap:  # blobs end to end: one C batch over its offsets
        view = out[start << PAGE_SHIFT : stop << PAGE_SHIFT]
        begin = int(snap.ends[start - 1]) if start else 0
        bad = native.module().decompress_packed(view, snap.data, snap.ends[start:stop], begin, kind)
        if bad >= 0:
            raise CodecError(f"page {start + bad} of the request does not decode")
        return
    if kind:  # only blobs and pages: one C batch
        view = out[start << PAGE_SHIFT : stop << PAGE_SHIFT]
        bad = decompress_pages(view, snap[start:stop], kind)
        if bad >= 0:
            raise CodecError(f"page {start + bad} of the request does not decode")
        return
    items = snap[start:stop]  # this part's own copy: the C loop gets slices of it
    n = stop - start
    view = out[start << PAGE_SHIFT : stop << PAGE_SHIFT]
    jobs: list[tuple[int, int, int, bytes]] = []  # whole groups still encoded, and their images
    whole: list[GroupImage] = []
    a = i = 0  # items [a, i) wait for the C loop
    while i <= n:
        item = items[i] if i < n else None
        if i < n and type(item) is not GroupRun:
            if type(item) is tuple and type(item[0]) is not int:
                items[i] = item[0].decompress(item[1], PAGE_SIZE)
            i += 1
            continue
        if i > a:
            bad = decompress_pages(view[a << PAGE_SHIFT : i << PAGE_SHIFT], items[a:i], 0)
            if bad >= 0:
                raise CodecError(f"page {start + a + bad} of the request does not decode")
        if item is None:
            break
        img = item.image
        if item.pos == start + i and item.count << PAGE_SHIFT == img.size and not item.index:
            # the whole group in this part (a sequential read): decoded straight into place, in
            # one C call with the part's other whole groups (one hand-off of the GIL, not one
            # per group)
            j = i + item.count
            if j <= n:
                blob = img.blob  # before data: the blob is dropped only after data is set
                gkind = native.decode_kind(img.codec)
                if img.data is None and blob is not None and gkind is not None:
                    jobs.append((i << PAGE_SHIFT, img.size, gkind, blob))
                    whole.append(img)
                else:
                    img.decode_into(view[i << PAGE_SHIFT : j << PAGE_SHIFT])
                a = i = j
                continue
        j, pages = item.slice(start + i, stop)
        j -= start
        view[i << PAGE_SHIFT : j << PAGE_SHIFT] = pages
        a = i = j
    if jobs:
        bad = native.module().decode_groups_into(view, jobs)
        if bad >= 0:
            img = whole[bad]
            raise CodecError(
                f"{img.codec.name}: the group's blob does not decode to {img.size} bytes"
            )


#: :func:`recompress_part` outcomes per page
RECOMPRESS_KEEP = 0
RECOMPRESS_NO_GAIN = 1
RECOMPRESS_UNREADABLE = 2
#: an outcome: (RECOMPRESS_*, index of the winning codec, its compressed bytes)
Recompressed = tuple[int, int, "bytes | None"]


def recompress_part(
    items: list[tuple[Any, bytes]], codecs: list[Any], class_sizes: tuple[int, ...], threshold: int
) -> list[Recompressed]:
    """Try to store each item (``(codec, object)``, codec None for a raw HUGE page) smaller: decode
    it, then compress it with ``codecs`` in order; the first result below the huge ``threshold``
    whose pool class (``class_sizes[n]``) is smaller than the old object's wins (KEEP, its index,
    its bytes). NO_GAIN when none wins, UNREADABLE when the old object does not decode."""
    out: list[Recompressed] = []
    for codec, blob in items:
        if codec is None:
            page, old = blob, class_sizes[PAGE_SIZE]
        else:
            old = class_sizes[len(blob)]
            try:
                page = codec.decompress(blob, PAGE_SIZE)
            except CodecError:
                out.append((RECOMPRESS_UNREADABLE, -1, None))
                continue
        for j, c in enumerate(codecs):
            comp = c.compress(page)
            n = len(comp)
            if n < threshold and class_sizes[n] < old:
                out.append((RECOMPRESS_KEEP, j, comp))
                break
        else:
            out.append((RECOMPRESS_NO_GAIN, -1, None))
    return out
