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
``(codec or native kind, compressed blob)``) to page bytes.

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

from zramd.compress import CodecError, native
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


def decompress_part(start: int, stop: int, snap: list[Any]) -> bytes:
    """Decompress items ``[start, stop)`` of a snapshot (page bytes or ``(codec, blob)``) and
    join them into one buffer, so the pages of one read can be split between workers."""
    parts: list[bytes] = []
    for i in range(start, stop):
        item = snap[i]
        if type(item) is tuple:
            parts.append(item[0].decompress(item[1], PAGE_SIZE))
        else:
            parts.append(item)
    return b"".join(parts)


def native_decode_part(start: int, stop: int, snap: list[Any], kind: int, out: memoryview) -> None:
    """Decode items ``[start, stop)`` of a native snapshot into their pages of ``out``. Items are
    page bytes, a shorter blob of ``kind``, ``(kind, blob)`` for the C loop, or ``(codec, blob)``
    for a codec without a native form (decoded here). Raises CodecError."""
    items = snap[start:stop]
    if not kind:  # the general snapshot (kind 0) may hold (codec, blob) items: decode them here
        for i, item in enumerate(items):
            if type(item) is tuple and type(item[0]) is not int:
                items[i] = item[0].decompress(item[1], PAGE_SIZE)
    view = out[start << PAGE_SHIFT : stop << PAGE_SHIFT]
    bad = native.module().decompress_pages(view, items, kind)
    if bad >= 0:
        raise CodecError(f"page {start + bad} of the request does not decode")
