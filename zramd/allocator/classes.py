"""zsmalloc size classes: the pure arithmetic of the pool, no memory.

Theory of operation
-------------------
Objects of 1..PAGE_SIZE bytes are rounded up to a *size class*: 32 B to 4096 B in 16 B steps
(255 classes on 4 KiB pages, as kernel zsmalloc's ``ZS_MIN_ALLOC_SIZE``/``ZS_SIZE_CLASS_DELTA``).
Each class keeps its objects in *zspages*: chains of 1..``chain_size`` contiguous 4 KiB pages.
The chain length is the one that wastes the fewest tail bytes (kernel
``calculate_zspage_chain_size()``; a power-of-two size always takes one page). Walking from
the largest class down, a class with the same ``(pages_per_zspage, objs_per_zspage)`` as the
previous distinct class is merged into it (the larger size serves both), exactly like
``zs_create_pool()``. This gives 69 distinct classes at chain 4, 119 at chain 8, 192 at 16
(see :func:`build_classes` on the often-quoted 123 and 191).

The *huge watermark* is the size of the largest class whose zspage holds more than one object
(3264 B at chain 4, 3632 B at chain 8, 3840 B at chain 16); every larger size lands in a class
with one object per one page, i.e. the object is stored as a whole page of its own.

This module knows nothing of arenas, handles or the device; it is a table built once per pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from zramd.geometry import PAGE_SIZE

#: Smallest class (kernel ZS_MIN_ALLOC_SIZE on 64-bit).
MIN_ALLOC_SIZE = 32
#: Largest object (kernel ZS_MAX_ALLOC_SIZE).
MAX_ALLOC_SIZE = PAGE_SIZE
#: Class step (kernel ZS_SIZE_CLASS_DELTA = PAGE_SIZE >> CLASS_BITS, CLASS_BITS = 8).
CLASS_DELTA = PAGE_SIZE >> 8
#: Number of size classes before merging (255 on 4 KiB pages).
NUM_SIZE_CLASSES = (MAX_ALLOC_SIZE - MIN_ALLOC_SIZE + CLASS_DELTA - 1) // CLASS_DELTA + 1
#: Accepted zspage chain lengths (the kernel allows 4..16, default 8; 1..3 are allowed here
#: for experiments and tests).
MIN_CHAIN_SIZE = 1
MAX_CHAIN_SIZE = 16
DEFAULT_CHAIN_SIZE = 8


@dataclass(frozen=True, slots=True)
class SizeClass:
    """One distinct (merged) class."""

    size: int
    pages_per_zspage: int
    objs_per_zspage: int

    @property
    def huge(self) -> bool:
        return self.objs_per_zspage == 1 and self.pages_per_zspage == 1


#: Chain rules: "min_waste" is the kernel's rule since 6.3 (``calculate_zspage_chain_size``,
#: commit "zsmalloc: rework zspage chain size selection"); "used_pct" is the older rule
#: (``get_pages_per_zspage``: the first chain length with the best integer used-percentage).
CHAIN_RULES = ("min_waste", "used_pct")


def chain_size_for(class_size: int, max_chain: int, rule: str = "min_waste") -> int:
    """Pages per zspage for ``class_size``: kernel ``calculate_zspage_chain_size()``
    (or, with ``rule="used_pct"``, the pre-6.3 used-percentage rule)."""
    if rule == "used_pct":
        best, max_used = 1, -1
        for pages in range(1, max_chain + 1):
            span = pages * PAGE_SIZE
            used = (span - span % class_size) * 100 // span
            if used > max_used:
                max_used, best = used, pages
        return best
    if class_size & (class_size - 1) == 0:
        return 1
    best, min_waste = 1, PAGE_SIZE * max_chain + 1
    for pages in range(1, max_chain + 1):
        waste = (pages * PAGE_SIZE) % class_size
        if waste < min_waste:
            min_waste, best = waste, pages
    return best


def build_classes(
    chain_size: int = DEFAULT_CHAIN_SIZE, rule: str = "min_waste"
) -> tuple[list[SizeClass], list[int]]:
    """Return ``(classes, index)``: the distinct classes, smallest first, and for each of the
    255 raw class indices the position of the (merged) class serving it in ``classes``.

    With the kernel's current rule this gives 69 / 119 / 192 classes at chain 4 / 8 / 16; the
    often-quoted 69 / 123 / 191 are what the older used-percentage rule gives (``rule=
    "used_pct"``). The huge watermarks (3264 / 3632 / 3840) are the same under both."""
    if not MIN_CHAIN_SIZE <= chain_size <= MAX_CHAIN_SIZE:
        raise ValueError(f"chain_size must be {MIN_CHAIN_SIZE}..{MAX_CHAIN_SIZE}")
    if rule not in CHAIN_RULES:
        raise ValueError(f"rule must be one of {CHAIN_RULES}")
    top_down: list[SizeClass] = []
    raw_to_top_down = [0] * NUM_SIZE_CLASSES
    for i in range(NUM_SIZE_CLASSES - 1, -1, -1):
        size = min(MIN_ALLOC_SIZE + i * CLASS_DELTA, MAX_ALLOC_SIZE)
        pages = chain_size_for(size, chain_size, rule)
        objs = pages * PAGE_SIZE // size
        if top_down:
            prev = top_down[-1]
            if prev.pages_per_zspage == pages and prev.objs_per_zspage == objs:
                raw_to_top_down[i] = len(top_down) - 1
                continue
        top_down.append(SizeClass(size, pages, objs))
        raw_to_top_down[i] = len(top_down) - 1
    n = len(top_down)
    classes = top_down[::-1]
    index = [n - 1 - t for t in raw_to_top_down]
    return classes, index


def raw_class_index(size: int) -> int:
    """Kernel ``get_size_class_index()``: raw class index for an object of ``size`` bytes."""
    if size <= MIN_ALLOC_SIZE:
        return 0
    return min((size - MIN_ALLOC_SIZE + CLASS_DELTA - 1) // CLASS_DELTA, NUM_SIZE_CLASSES - 1)


def huge_watermark(classes: list[SizeClass]) -> int:
    """Size of the largest class holding more than one object per zspage (kernel: the size
    ``zs_create_pool()`` finds as the first class, from the top, with ``pages != 1 and
    objs != 1``)."""
    for c in reversed(classes):
        if c.pages_per_zspage != 1 and c.objs_per_zspage != 1:
            return c.size
    return MAX_ALLOC_SIZE
