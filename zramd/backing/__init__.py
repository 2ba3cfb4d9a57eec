"""The backing store: a file or block device below RAM (see :mod:`zramd.backing.store`).

Stores opaque byte objects densely in checksummed segments and hands back locators; like the
allocator it knows nothing of pages, codecs or the device, and imports nothing above it.
"""

from zramd.backing.format import FormatError
from zramd.backing.store import (
    CACHED_READ_MAX_OBJECTS,
    BackingCorrupt,
    BackingError,
    BackingFull,
    BackingIOError,
    BackingOpenError,
    BackingStore,
    BudgetSpent,
    Cleaning,
)

__all__ = [
    "CACHED_READ_MAX_OBJECTS",
    "BackingCorrupt",
    "BackingError",
    "BackingFull",
    "BackingIOError",
    "BackingOpenError",
    "BackingStore",
    "BudgetSpent",
    "Cleaning",
    "FormatError",
]
