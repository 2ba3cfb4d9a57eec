"""Same-filled page detection: a page that is one 8-byte word repeated (zero pages included).

Theory of operation
-------------------
zram stores such a page as the word itself, allocating nothing. The test compares the page with
its first word repeated: one memcmp on ``bytes`` (and a cheaper copy than the two slices of
``page[8:] == page[:-8]``); on a ``memoryview`` ``==`` compares item by item and is ~10x slower,
so callers pass ``bytes``. The C batch (``zramd._native.prepare_pages``) has the one other
detector, ``memcmp(page, page + 8, PAGE - 8)``; a test checks that the two agree. The word is
read little-endian, and
:func:`fill_page` rebuilds the page from it; :func:`zeros` lends zero bytes of any length
without allocating them (a read-only view of one shared anonymous mapping that is never written,
so every page of it is the kernel's zero page). Knows nothing about tables or pools.
"""

from __future__ import annotations

import mmap

import numpy as np

from zramd.geometry import PAGE_SIZE

#: bytes in a fill word (zram: one unsigned long)
WORD_SIZE = 8
ZERO_PAGE = bytes(PAGE_SIZE)

_from_bytes = int.from_bytes


def same_fill_word(page: bytes) -> int | None:
    """The repeated little-endian 8-byte word of ``page``, or None if it is not same-filled.

    ``page`` must be ``bytes`` (fast memcmp) of a multiple of 8 bytes, at least one word,
    normally one page. The first byte is compared with the last word's first byte before the
    full compare: a cheap necessary condition (as zram's first-vs-last word check) that rejects
    most pages without the memcmp.
    """
    if page[0] == page[-WORD_SIZE]:
        word = page[:WORD_SIZE]
        if page == word * (len(page) // WORD_SIZE):
            return _from_bytes(word, "little")
    return None


def all_zero(buf: memoryview) -> bool:
    """Whether ``buf`` (a multiple of 8 bytes, typically many pages) is all zero: first/last
    word first, then one vectorised pass (memoryview ``==`` compares item by item; numpy does
    not)."""
    words = np.frombuffer(buf, dtype=np.uint64)
    return bool(words[0] == 0 and words[-1] == 0 and not words.max())  # max: 3x any() here


def fill_page(word: int, size: int = PAGE_SIZE) -> bytes:
    """A ``size``-byte page made of ``word`` repeated (little-endian)."""
    if word == 0:
        return ZERO_PAGE if size == PAGE_SIZE else bytes(size)
    return word.to_bytes(WORD_SIZE, "little") * (size // WORD_SIZE)


_zeros = memoryview(b"")


def zeros(n: int) -> memoryview:
    """A read-only view of ``n`` zero bytes, shared: costs address space, not memory."""
    global _zeros
    if n > len(_zeros):
        size = max(n, 2 * len(_zeros), 1 << 20)
        _zeros = memoryview(mmap.mmap(-1, size, prot=mmap.PROT_READ))
    return _zeros[:n]
