"""Per-device counters with zram's names and meanings (mm_stat, io_stat).

Theory of operation
-------------------
:class:`DeviceStats` is a plain mutable record owned by one device. The device updates the page
counters as it installs and frees table entries (on the event-loop thread only); the pool-derived
fields (``mem_used_total``, ``pages_compacted``, ``mem_limit``) are refreshed from the pool by the
device when its ``stats`` property is read. Units follow the kernel: sizes in bytes, the rest in
pages or events. ``mm_stat_line()`` / ``io_stat_line()`` print the fields in the order of
``/sys/block/zramN/mm_stat`` and ``io_stat``; ``as_dict()`` is for JSON. No pool or device logic
lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: bytes per device page (the unit of orig_data_size)
PAGE_SIZE = 4096

MM_STAT_FIELDS = (
    "orig_data_size",
    "compr_data_size",
    "mem_used_total",
    "mem_limit",
    "mem_used_max",
    "same_pages",
    "pages_compacted",
    "huge_pages",
    "huge_pages_since",
)
IO_STAT_FIELDS = ("failed_reads", "failed_writes", "invalid_io", "notify_free")


@dataclass
class DeviceStats:
    # --- mm_stat -------------------------------------------------------------------------------
    #: pages currently holding data (same-filled + compressed + huge), i.e. orig_data_size / 4096.
    #: EMPTY (never written / trimmed) pages are not counted.
    pages_stored: int = 0
    #: sum of the stored object sizes in bytes (huge pages count PAGE_SIZE, same pages 0).
    compr_data_size: int = 0
    #: bytes the pool holds from the OS right now, allocator waste and metadata included.
    mem_used_total: int = 0
    #: the pool's memory limit in bytes (0 = none).
    mem_limit: int = 0
    #: peak of mem_used_total since creation / the last reset_mem_used_max().
    mem_used_max: int = 0
    #: pages currently stored as one repeated 8-byte word (zero pages included); no allocation.
    same_pages: int = 0
    #: pool pages freed by compaction since creation (cumulative).
    pages_compacted: int = 0
    #: pages currently stored raw because they did not compress below the huge threshold.
    huge_pages: int = 0
    #: pages ever stored raw (cumulative, never decremented).
    huge_pages_since: int = 0
    # --- io_stat -------------------------------------------------------------------------------
    #: read requests that failed (a stored page did not decompress intact -> EIO); per request.
    failed_reads: int = 0
    #: write requests that failed (memory limit -> ENOSPC, or the old page of a partial write
    #: was unreadable -> EIO); nothing was changed by them. Per request, as zram counts per bio.
    failed_writes: int = 0
    #: always 0, as in the kernel (the field once counted invalid I/O; the server validates).
    invalid_io: int = 0
    #: whole pages discarded by trim / write_zeroes(punch_hole) (counted per page, as zram).
    notify_free: int = 0

    @property
    def orig_data_size(self) -> int:
        """Uncompressed bytes of the pages stored (same-filled pages included), as zram."""
        return self.pages_stored * PAGE_SIZE

    def mm_stat_line(self) -> str:
        """The nine mm_stat fields, space-separated like the kernel's sysfs file."""
        return " ".join(f"{getattr(self, f):8d}" for f in MM_STAT_FIELDS) + "\n"

    def io_stat_line(self) -> str:
        """The four io_stat fields, space-separated like the kernel's sysfs file."""
        return " ".join(f"{getattr(self, f):8d}" for f in IO_STAT_FIELDS) + "\n"

    def compression_ratio(self) -> float:
        """orig_data_size / mem_used_total (0.0 when nothing is held)."""
        return self.orig_data_size / self.mem_used_total if self.mem_used_total else 0.0

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["orig_data_size"] = self.orig_data_size
        return d

    def copy(self) -> DeviceStats:
        return DeviceStats(**asdict(self))
