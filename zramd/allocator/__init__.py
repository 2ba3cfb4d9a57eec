"""The pool: a zsmalloc-style allocator of opaque byte objects (see ``pool.py``).

Theory of operation
-------------------
Stores opaque bytes of 1..4096 B and gives back an integer handle that stays valid while
compaction moves the object (maybe into a slot of a larger class: the caller keeps each
object's size and passes it to ``load``). Knows nothing of pages' meaning, codecs or the
device; the device layer only uses the names re-exported here.
"""

from zramd.allocator.classes import PAGE_SIZE, SizeClass, build_classes, huge_watermark
from zramd.allocator.pool import (
    CAUSE_BUDGET,
    CAUSE_LIMIT,
    CAUSE_SYSTEM,
    FULLNESS_LABELS,
    POOL_FULL_CAUSES,
    Copy,
    MemoryBudget,
    Pool,
    PoolFull,
    run_copies,
)

__all__ = [
    "CAUSE_BUDGET",
    "CAUSE_LIMIT",
    "CAUSE_SYSTEM",
    "Copy",
    "FULLNESS_LABELS",
    "POOL_FULL_CAUSES",
    "PAGE_SIZE",
    "MemoryBudget",
    "Pool",
    "PoolFull",
    "SizeClass",
    "build_classes",
    "huge_watermark",
    "run_copies",
]
