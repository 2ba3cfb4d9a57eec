"""Per-device counters with zram's names and meanings (mm_stat, io_stat), and per-export
request counters with the block layer's (``/sys/block/zramN/stat``).

Theory of operation
-------------------
:class:`DeviceStats` is a plain mutable record owned by one device. The device updates the page
counters as it installs and frees table entries (on the event-loop thread only); the pool-derived
fields (``mem_used_total``, ``pages_compacted``, ``mem_limit``) are refreshed from the pool by the
device when its ``stats`` property is read. Units follow the kernel: sizes in bytes, the rest in
pages or events. ``mm_stat_line()`` / ``io_stat_line()`` print the fields in the order of
``/sys/block/zramN/mm_stat`` and ``io_stat``; ``as_dict()`` is for JSON. Beside them, zramd's
tier counters (:data:`TIER_FIELDS`: idle, recompressed and incompressible pages, grouped pages
and groups, and the bytes recompression and grouping saved) are kept by the same device, exact
at every step like the page counters, and its writeback counters (:data:`BACKING_FIELDS`:
zram's bd_stat in pages, plus bytes, time waited, promotions, failures and waits for room). No
pool or device logic lives here.

:class:`IoStats` belongs to an export and is counted by the server's dispatch, the one place
requests meet exports (the export holds it; every connection to the export shares it): per NBD
command the requests that reached the device, their bytes and time (failed ones included, as
the block layer counts completions), a latency histogram, the requests in flight and the time
any was (``io_ticks``), and ``invalid_io``, requests refused for their range.
:meth:`IoStats.block_stat` folds the commands into Documentation/block/stat.rst's seventeen fields:
WRITE_ZEROES counts as a write (as the kernel accounts REQ_OP_WRITE_ZEROES), TRIM as a discard,
and CACHE and BLOCK_STATUS, which move no data, only under their own names.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from zramd.allocator import POOL_FULL_CAUSES
from zramd.geometry import PAGE_SIZE
from zramd.protocol import wire

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
#: the tier counters (idle tracking, recompression, multi-page groups), shown beside mm_stat
TIER_FIELDS = (
    "idle_pages",
    "recompressed_pages",
    "incompressible_pages",
    "recompress_saved_bytes",
    "grouped_pages",
    "groups",
    "group_saved_bytes",
)
#: the writeback counters (pages in the backing store; zram's bd_stat and more), beside mm_stat
BACKING_FIELDS = (
    "bd_count",
    "bd_reads",
    "bd_writes",
    "bd_read_bytes",
    "bd_write_bytes",
    "bd_read_us",
    "bd_write_us",
    "bd_promoted",
    "bd_errors",
    "bd_waits",
    "bd_wait_timeouts",
)


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
    # --- tiers: idle tracking and recompression (zramd's, beside mm_stat) ----------------------
    #: pages marked idle and not read or written since.
    idle_pages: int = 0
    #: pages stored by a recompression algorithm (a rewrite or discard uncounts them).
    recompressed_pages: int = 0
    #: pages no recompression algorithm shrank: not tried again until rewritten.
    incompressible_pages: int = 0
    #: pool bytes released by recompression (old size class minus new), cumulative.
    recompress_saved_bytes: int = 0
    #: pages held in multi-page groups (counted in pages_stored too; a rewrite or discard takes
    #: a page out of its group).
    grouped_pages: int = 0
    #: multi-page groups held (each one object of compr_data_size).
    groups: int = 0
    #: compressed bytes packing saved (the members' objects minus the group's), cumulative.
    group_saved_bytes: int = 0
    # --- writeback (zram's bd_stat, in pages, and zramd's) ---------------------------------------
    #: pages whose object lives in the backing store (counted in pages_stored, not in
    #: compr_data_size).
    bd_count: int = 0
    #: pages read from the backing store, cumulative.
    bd_reads: int = 0
    #: pages written to the backing store, cumulative.
    bd_writes: int = 0
    #: object bytes read from / written to the backing store, cumulative.
    bd_read_bytes: int = 0
    bd_write_bytes: int = 0
    #: microseconds spent waiting for backing reads / writes (from the loop's view), cumulative.
    bd_read_us: int = 0
    bd_write_us: int = 0
    #: pages read back and returned to RAM (promoted), cumulative.
    bd_promoted: int = 0
    #: backing operations that failed (I/O error, corrupt object, full store, budget spent).
    bd_errors: int = 0
    #: writes that found no room and waited for writeback, and those the wait did not save.
    bd_waits: int = 0
    bd_wait_timeouts: int = 0
    # --- io_stat -------------------------------------------------------------------------------
    #: read requests that failed (a stored page did not decompress intact -> EIO); per request.
    failed_reads: int = 0
    #: write requests that failed (memory limit -> ENOSPC, or the old page of a partial write
    #: was unreadable -> EIO); nothing was changed by them. Per request, as zram counts per bio.
    failed_writes: int = 0
    #: always 0 here: requests with a bad range never reach the device; the server counts them
    #: in the export's :attr:`IoStats.invalid_io`, which ``zramd stat`` reports in this place.
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


#: the NBD commands counted per export, by number, with the names used in stats and metrics
IO_COMMANDS: dict[int, str] = {
    wire.CMD_READ: "read",
    wire.CMD_WRITE: "write",
    wire.CMD_FLUSH: "flush",
    wire.CMD_TRIM: "trim",
    wire.CMD_CACHE: "cache",
    wire.CMD_WRITE_ZEROES: "write_zeroes",
    wire.CMD_BLOCK_STATUS: "block_status",
}
#: the fields of /sys/block/<dev>/stat, in order (Documentation/block/stat.rst); ticks in ms
BLOCK_STAT_FIELDS = (
    "read_ios",
    "read_merges",
    "read_sectors",
    "read_ticks",
    "write_ios",
    "write_merges",
    "write_sectors",
    "write_ticks",
    "in_flight",
    "io_ticks",
    "time_in_queue",
    "discard_ios",
    "discard_merges",
    "discard_sectors",
    "discard_ticks",
    "flush_ios",
    "flush_ticks",
)
#: stat.rst's groups -> the NBD commands each one sums
_GROUPS: dict[str, tuple[int, ...]] = {
    "read": (wire.CMD_READ,),
    "write": (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES),
    "discard": (wire.CMD_TRIM,),
    "flush": (wire.CMD_FLUSH,),
}
#: the request-latency histogram: bucket ``i`` counts requests faster than ``1024 << i`` ns
#: (``(ns >> HIST_SHIFT).bit_length()``: no search on the fast path); a command's row is
#: ``HIST_SLOTS`` long, which holds any int64 time
HIST_SHIFT = 10
HIST_CMD_SHIFT = 6
HIST_SLOTS = 1 << HIST_CMD_SHIFT
#: buckets shown in metrics (up to 2**32 ns, 4.3 s); slower requests count in +Inf only
HIST_SHOWN = 23
_NCMD = max(IO_COMMANDS) + 1
_NS_PER_MS = 1_000_000
SECTOR = 512


def bucket_bound_seconds(i: int) -> float:
    """The upper bound of histogram bucket ``i``, in seconds."""
    return (1 << (HIST_SHIFT + i)) / 1e9


class IoStats:
    """The request counters of one export. Lists are indexed by NBD command number (the
    histogram by ``command << HIST_CMD_SHIFT | bucket``); times are nanoseconds of
    ``time.perf_counter_ns``. Mutated on the event-loop thread only."""

    __slots__ = (
        "bytes",
        "ns",
        "histogram",
        "in_flight",
        "busy_ns",
        "busy_since",
        "invalid_io",
        "nospace",
        "nospace_logged",
    )

    def __init__(self) -> None:
        self.bytes = [0] * _NCMD
        self.ns = [0] * _NCMD
        #: per command, requests per latency bucket; their sum is the command's request count
        self.histogram = [0] * (_NCMD * HIST_SLOTS)
        #: requests started on the device and not finished (awaited ones; inline ones take none)
        self.in_flight = 0
        #: time with at least one request in flight, up to ``busy_since`` while some are
        self.busy_ns = 0
        self.busy_since = 0
        #: requests refused for their range: zero length, past the end, FLUSH with a range
        self.invalid_io = 0
        #: writes refused with ENOSPC, by cause: the export's own limit, the server's budget,
        #: the system (``zramd.allocator.POOL_FULL_CAUSES``)
        self.nospace = dict.fromkeys(POOL_FULL_CAUSES, 0)
        #: per cause, when the last warning about it was logged and ``nospace`` at that time
        self.nospace_logged: dict[str, tuple[int, int]] = {}

    def done(self, cmd: int, nbytes: int, elapsed_ns: int) -> None:
        """Count one finished request of ``cmd`` moving ``nbytes`` in ``elapsed_ns``."""
        self.bytes[cmd] += nbytes
        self.ns[cmd] += elapsed_ns
        self.histogram[cmd << HIST_CMD_SHIFT | (elapsed_ns >> HIST_SHIFT).bit_length()] += 1

    def requests(self, cmd: int) -> int:
        """Requests of ``cmd`` counted."""
        return sum(self.histogram[cmd * HIST_SLOTS : (cmd + 1) * HIST_SLOTS])

    def buckets(self, cmd: int) -> list[int]:
        """Cumulative counts of ``cmd``'s requests at or under each of the first
        :data:`HIST_SHOWN` bucket bounds, then the total (Prometheus ``le`` ... ``+Inf``)."""
        row = self.histogram[cmd * HIST_SLOTS : (cmd + 1) * HIST_SLOTS]
        out: list[int] = []
        total = 0
        for n in row[:HIST_SHOWN]:
            total += n
            out.append(total)
        out.append(sum(row))
        return out

    def io_ticks_ns(self) -> int:
        """Time with at least one request in flight, the current busy stretch included."""
        if self.in_flight:
            return self.busy_ns + time.perf_counter_ns() - self.busy_since
        return self.busy_ns

    def commands(self) -> dict[str, dict[str, int]]:
        """Per command name: ``requests``, ``bytes`` and ``time_us`` (total time spent)."""
        return {
            name: {
                "requests": self.requests(cmd),
                "bytes": self.bytes[cmd],
                "time_us": self.ns[cmd] // 1000,
            }
            for cmd, name in IO_COMMANDS.items()
        }

    def block_stat(self) -> dict[str, int]:
        """The seventeen fields of ``/sys/block/<dev>/stat`` (merges are always 0: NBD requests
        are served as they come; sectors are 512 bytes; ticks are milliseconds)."""
        out: dict[str, int] = {}
        for group, cmds in _GROUPS.items():
            out[f"{group}_ios"] = sum(self.requests(c) for c in cmds)
            if group != "flush":
                out[f"{group}_merges"] = 0
                out[f"{group}_sectors"] = sum(self.bytes[c] for c in cmds) // SECTOR
            out[f"{group}_ticks"] = sum(self.ns[c] for c in cmds) // _NS_PER_MS
        out["in_flight"] = self.in_flight
        out["io_ticks"] = self.io_ticks_ns() // _NS_PER_MS
        out["time_in_queue"] = sum(self.ns) // _NS_PER_MS
        return {f: out[f] for f in BLOCK_STAT_FIELDS}

    def block_stat_line(self) -> str:
        """The seventeen fields, space-separated like the kernel's sysfs file."""
        return " ".join(f"{v:8d}" for v in self.block_stat().values()) + "\n"
