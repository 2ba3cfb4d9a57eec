"""Persistence: the snapshot file of a whole export (:mod:`zramd.persist.format`).

Below the device, beside the allocator and the backing store: it stores the page table's
columns, the codec list, the group registry and the objects as opaque arrays and bytes, and
knows nothing of what they mean; the device makes an image of itself and restores from one
(:mod:`zramd.device.image`), the server decides when (:mod:`zramd.server.persistence`).
:mod:`zramd.persist.lock` keeps two exports or daemons from using one file at once.
"""

from zramd.persist.format import (
    GROUP_COLUMNS,
    TABLE_COLUMNS,
    CodecSpec,
    ImageMeta,
    SnapshotError,
    SnapshotReader,
    SnapshotWriter,
    pack,
    set_aside,
)
from zramd.persist.lock import SnapshotBusy, SnapshotLock

__all__ = [
    "GROUP_COLUMNS",
    "TABLE_COLUMNS",
    "CodecSpec",
    "ImageMeta",
    "SnapshotBusy",
    "SnapshotError",
    "SnapshotLock",
    "SnapshotReader",
    "SnapshotWriter",
    "pack",
    "set_aside",
]
