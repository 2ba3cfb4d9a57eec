"""The device contract: every call the NBD server and the control socket make on a device.

Theory of operation
-------------------
An export is backed by one object satisfying :class:`BlockDevice`, declared here the way
nbdkit's plugin struct or zram's ``zcomp_ops`` declare theirs: the server
(``server/dispatch.py``) and the control socket (``control/``) call these methods and nothing
else, and never probe a device for optional features. A device that cannot do a management
operation says so by raising :class:`Unsupported`; :class:`DeviceBase` gives that answer (and a
two-pass ``read_with_zeros``) to simple devices, which then only implement the I/O methods.

I/O. The server has validated every request against the export (range, read-only, flags)
before calling, so implementations *assert* ranges. Offsets and lengths are in bytes and need
not be page aligned. The async methods are safe under concurrency: overlapping requests never
produce a torn page, and a request's effects are complete when its coroutine returns. State is
mutated on the event-loop thread only; pure computation (compression) may run in threads.

The fast path has one door per command, ``read_with_zeros_now`` and ``write_now``: the device
alone decides whether a request completes inline (small, nothing overlapping in flight) or must
be awaited; the server only validates and calls.

A READ answers ``(data, zero_extents)`` in one pass over the device's table: ``data`` is exactly
the requested bytes; ``zero_extents`` are the runs that read as zero, as ``(offset relative to
the request, length)``, sorted, merged and inside the request: the shape the structured-reply
encoder takes as is. When the whole range reads as zero, ``data`` is a read-only view of shared
zero bytes (:func:`zramd.device.samefill.zeros`), so nothing is allocated for it.

Errors: :class:`NoSpace` (memory limit reached, and no backing store took pages in time; ENOSPC,
nothing changed), :class:`DeviceIOError` (a stored page failed to decompress, or the backing store
failed it; EIO, never garbage), :class:`Unsupported` (a management
operation the device does not have). Anything else is a bug.

Knows nothing of NBD framing, sockets, pools or codecs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy.typing as npt

from zramd.persist import ImageMeta
from zramd.stats import DeviceStats

#: base:allocation flags, as in the NBD spec (nbd.md 1.8).
STATE_HOLE = 1
STATE_ZERO = 2
#: ``block_status`` answers at most this many extents, so an answer over any range stays bounded
#: (2^20 pages = 4 GiB, the largest NBD length). The number is NBD's cap on one BLOCK_STATUS
#: reply (nbd.md 1.8), declared here, in the contract, rather than in ``protocol/wire.py``: the
#: device must not know NBD, the server needs it to clip the extents it sends, and the protocol
#: package itself never counts extents. With one number on both sides of the contract, the
#: server never has to cut short an answer the device gave in full.
MAX_EXTENTS = 1 << 20

Buffer = bytes | bytearray | memoryview
#: runs reading as zero: (offset relative to the request, length), sorted, merged, clipped
ZeroExtents = list[tuple[int, int]]
#: what a READ answers: the bytes and their zero runs
ReadResult = tuple[Buffer, ZeroExtents]
#: BLOCK_STATUS extents: (length, STATE_HOLE | STATE_ZERO), consecutive from the offset
Extents = list[tuple[int, int]]


class GroupResult(NamedTuple):
    """What packing a range into multi-page groups did: pages moved into groups, groups made,
    compressed bytes saved, and whether it stopped early because the pool had no room."""

    pages: int = 0
    groups: int = 0
    saved: int = 0
    no_space: bool = False


@dataclass
class PageState:
    """One line of the per-page listing (zram's debugfs ``block_state``): the page's index, the
    seconds since it was last read or written (to the device clock's quantum), where it lives
    (``STATE_NAMES`` of the table), its marks (same, backed, huge, grouped, idle,
    recompressed, incompressible), its object's size in bytes (0 when it has none of its own)
    and the algorithm it was compressed with ("" when it is not compressed)."""

    index: int
    age: int
    state: str
    flags: list[str]
    size: int
    algorithm: str


@dataclass
class RecompressResult:
    """What one ``recompress`` call did: pages tried, recompressed (kept in a smaller size
    class), newly marked incompressible, pool bytes released; where to go on from (``next``,
    ``end`` when the range is done) and whether it stopped early because a new copy found no
    room (``nospace``: that page left as it was) or the device was reset or closed
    (``aborted``)."""

    next: int
    end: int
    tried: int = 0
    recompressed: int = 0
    incompressible: int = 0
    saved: int = 0
    scanned_to: int = 0
    nospace: bool = False
    aborted: bool = False


class ImageSource(Protocol):
    """The objects of a device image being taken (``snapshot_image``), in image order."""

    def take(self, max_bytes: int) -> list[bytes]:
        """The next objects, about ``max_bytes`` (a short stretch of loop time); [] when done.
        Raises DeviceError when the device was reset or closed meanwhile."""
        ...

    def close(self) -> None:
        """Done (or given up): the device stops keeping objects for the image."""
        ...


class ImageSink(Protocol):
    """A restore in progress (``restore_image``): objects in image order, then ``finish``."""

    def put(self, lengths: npt.NDArray[Any], data: Buffer) -> Callable[[], None]:
        """Store the next objects: ``data`` holds them end to end, of ``lengths`` bytes each.
        Returns the copy of their bytes into the device's memory, to be called once (in any
        thread) before ``finish`` and before anything else uses the device; the next ``put``
        may run meanwhile, and ``data`` must stay unchanged until the copy is done. Raises
        ValueError (inconsistent image) or NoSpace."""
        ...

    def finish(self) -> None:
        """Install the table once every object is in. Raises ValueError."""
        ...


@dataclass
class WritebackResult:
    """What one ``writeback`` call did: pages tried and written back to the backing store,
    their object bytes, where to go on from (``next``; ``end`` when the range is done), and
    why it stopped early: ``error`` ("" when it did not; "full": the store has no room,
    "budget": the writeback limit is spent, "io": an I/O error), those pages left in RAM."""

    next: int
    end: int
    tried: int = 0
    written: int = 0
    bytes: int = 0
    error: str = ""


class DeviceError(Exception):
    """Base of the errors a device may raise for one request."""


class NoSpace(DeviceError):
    """The write would pass the memory limit. Nothing was changed (maps to ENOSPC)."""


class DeviceIOError(DeviceError):
    """Stored data could not be returned intact (maps to EIO)."""


class Unsupported(DeviceError):
    """The device has no such management operation (e.g. no memory limit to set)."""


@runtime_checkable
class BlockDevice(Protocol):
    # --- I/O -----------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size in bytes (a multiple of 4096)."""
        ...

    def read_with_zeros_now(self, offset: int, length: int) -> ReadResult | None:
        """The synchronous attempt of a READ: its result if the device completes it without
        waiting, else None (await ``read_with_zeros``). Raises DeviceIOError."""
        ...

    async def read_with_zeros(self, offset: int, length: int) -> ReadResult:
        """``(data, zero_extents)`` of ``[offset, offset+length)`` (see the module docstring)."""
        ...

    def write_now(self, offset: int, data: Buffer) -> bool:
        """The synchronous attempt of a WRITE: True if done, False if nothing was done and
        ``write`` must be awaited. Raises NoSpace (nothing changed) or DeviceIOError."""
        ...

    async def write(self, offset: int, data: Buffer) -> None:
        """Store ``data`` at ``offset``. Raises NoSpace (nothing changed) or DeviceIOError."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """Discard: whole pages inside the range are freed; partial pages may be left as is."""
        ...

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        """The range reads back as zero afterwards; whole pages are freed (stored as holes when
        ``punch_hole``, else as same-filled zero pages); partial pages are zeroed."""
        ...

    async def flush(self) -> None:
        """Returns once every write that completed before the call is visible (RAM: immediate)."""
        ...

    def block_status(self, offset: int, length: int) -> Extents:
        """Extents covering ``[offset, offset+length)`` exactly (at most ``MAX_EXTENTS``, which
        may cut the list short), adjacent equal flags merged."""
        ...

    def close(self) -> None:
        """Release all memory. The device is unusable afterwards."""
        ...

    # --- management (control socket, reload, metrics) -----------------------------------------

    @property
    def stats(self) -> DeviceStats:
        """The zram counters (mm_stat, io_stat), current."""
        ...

    def reset_mem_used_max(self) -> None:
        """Restart the mem_used_max peak from the current usage."""
        ...

    def compact(self) -> int:
        """Compact the store; returns the pages freed."""
        ...

    def reset(self) -> None:
        """Free every page (all read as zero again); counters restart, settings kept. Raises
        Unsupported. Not with requests in flight (the caller refuses while clients are on)."""
        ...

    @property
    def mem_limit(self) -> int:
        """The memory limit in bytes (0: none)."""
        ...

    def set_mem_limit(self, limit: int) -> None:
        """Change the memory limit (0: none). Raises Unsupported or ValueError."""
        ...

    @property
    def algorithm(self) -> str:
        """The compression algorithm of new pages ("" for a device that does not compress)."""
        ...

    def set_algorithm(self, name: str, *, level: int | None = None) -> None:
        """Compress new pages with ``name``; stored pages keep theirs. Raises Unsupported or
        ValueError (unknown name, bad level)."""
        ...

    def start_clock(self) -> None:
        """Keep the clock of access tracking current from the running loop (a timer) rather
        than reading it per request; ``close`` stops it. A no-op for a device without access
        tracking."""
        ...

    def mark_idle(self, age: float | None = None, first: int = 0, stop: int | None = None) -> int:
        """Mark the pages of ``[first, stop)`` (default: all) that hold a compressed object IDLE:
        every one, or those not read or written for ``age`` seconds. Returns how many were
        marked. Raises Unsupported."""
        ...

    def page_states(self, first: int, stop: int, limit: int) -> tuple[list[PageState], int]:
        """The live pages of ``[first, stop)``, at most ``limit``, and the index to go on from
        (``stop`` when done). Raises Unsupported."""
        ...

    @property
    def recompression_algorithms(self) -> list[str]:
        """The recompression algorithms, in the order they are tried (``zstd(level=3)``)."""
        ...

    def set_recompression(self, algorithms: Sequence[tuple[str, int | None]]) -> None:
        """Recompress with ``algorithms`` (name, level) from now on, in that order; pages
        already recompressed keep their codec. Raises Unsupported or ValueError."""
        ...

    async def recompress(
        self,
        *,
        kind: str = "all",
        threshold: int = 0,
        algorithm: str = "",
        level: int | None = None,
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
        batch_pages: int | None = None,
        on_hold: Callable[[float], None] | None = None,
    ) -> RecompressResult:
        """Recompress the compressed pages of ``[first, stop)`` with the recompression
        algorithms (or ``algorithm``/``level`` alone): ``kind`` all, idle, huge or huge-idle;
        objects of ``threshold`` bytes or more; at most ``max_pages`` tried and ``max_scan``
        scanned. A page is switched to a new object only when it lands in a smaller pool size
        class, each page a complete move; on PoolFull that page stays as it was and the call
        ends with ``nospace``. ``on_hold`` hears how long each stretch held the event loop.
        Raises Unsupported or ValueError."""
        ...

    def snapshot_image(self, final: bool = False) -> tuple[ImageMeta, ImageSource]:
        """A point-in-time image of every page as stored: the meta now (the table copied in
        one step), the objects through the source, as they were at this call whatever is
        written meanwhile; pages written back to a backing store are referenced by locator,
        none of which is freed until the source closes or, ``final`` (the device is closed
        after it), until the device closes. One at a time. Raises Unsupported or
        DeviceError."""
        ...

    def restore_image(self, meta: ImageMeta) -> ImageSink:
        """Begin restoring an image into this device, which must be empty and unused until
        ``finish``; on any error the caller closes the device. Pages written back are restored
        as references into the device's backing store, which must have been opened with their
        locators live. Raises Unsupported or ValueError (another geometry, an inconsistent
        image, pages written back to another store or overwritten since; the message says
        which)."""
        ...

    async def writeback(
        self,
        *,
        kind: str = "idle",
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
    ) -> WritebackResult:
        """Write the compressed objects of pages of ``[first, stop)`` to the backing store as
        they are (zram's writeback): ``kind`` idle, huge, huge-idle or incompressible; at most
        ``max_pages`` tried and ``max_scan`` scanned. Each page is a complete move; a failure
        of the store (full, budget spent, I/O error) leaves the pages in RAM and ends the call
        with ``error``. Raises Unsupported (no backing store) or ValueError."""
        ...

    @property
    def writeback_limit(self) -> int | None:
        """Bytes the backing store may still be written (zram's writeback_limit); None: no
        limit (or no backing store)."""
        ...

    def set_writeback_limit(self, nbytes: int | None) -> None:
        """Allow ``nbytes`` more bytes of writeback (set again to reset), None: no limit.
        Raises Unsupported (no backing store) or ValueError."""
        ...

    @property
    def writeback_settings(self) -> dict[str, float]:
        """The pressure writeback's ``high`` and ``low`` watermarks (fractions of the memory
        limit in force) and the longest ``wait`` of a write for room (seconds); {} without a
        backing store."""
        ...

    def set_writeback_settings(self, high: float, low: float, wait: float) -> None:
        """Set what :attr:`writeback_settings` shows. Raises Unsupported (no backing store) or
        ValueError (``0 < low < high <= 1`` and ``wait >= 0`` do not hold; the message names
        the setting)."""
        ...

    def backing_stat(self) -> dict[str, Any]:
        """The backing store's path and counters ({} without one)."""
        ...

    def hold_image(self, meta: ImageMeta) -> None:
        """A checkpoint of this device's image ``meta`` is committed (durable mode): the pages
        it references in the backing store stay there until the next one (nothing without a
        backing store)."""
        ...

    def waits(self) -> str:
        """One line on what requests may be waiting for inside the device now (the page ranges
        of the mutating requests in flight, background work), for the report of a request that
        takes long."""
        ...

    async def group(
        self,
        first: int,
        last: int,
        *,
        group_pages: int = 0,
        algorithm: str = "",
        level: int | None = None,
        on_hold: Callable[[float], None] | None = None,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> GroupResult:
        """Pack the idle compressed pages of pages ``[first, last]`` into multi-page groups of
        up to ``group_pages`` logically contiguous pages, compressed together with
        ``algorithm``/``level`` (0 / "" / None: the device's settings). Each group is a complete
        move (new copy, switch, free old); a group that finds no room stops the call with
        ``no_space`` set, that group unchanged. ``on_hold`` hears how long each stretch held the
        event loop; ``pace``, when given, is awaited between the steps of the work. Raises
        Unsupported or ValueError."""
        ...


def zero_runs(extents: Extents, length: int) -> ZeroExtents:
    """The STATE_ZERO runs of BLOCK_STATUS ``extents`` as zero extents within ``[0, length)``."""
    runs: ZeroExtents = []
    pos = 0
    for ext_len, flags in extents:
        if pos >= length:
            break
        end = min(pos + ext_len, length)
        if flags & STATE_ZERO:
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((pos, end - pos))
        pos = end
    return runs


class DeviceBase:
    """The management part for a device that has none, and a READ in two passes
    (``block_status`` then ``read``, always both) for a device without a table walk of its own.
    Subclasses implement ``size``, ``read``, ``write``, ``trim``, ``write_zeroes``, ``flush``,
    ``block_status`` and ``close``."""

    @property
    def size(self) -> int:
        raise NotImplementedError

    async def read(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError

    def block_status(self, offset: int, length: int) -> Extents:
        raise NotImplementedError

    def read_with_zeros_now(self, offset: int, length: int) -> ReadResult | None:
        return None

    async def read_with_zeros(self, offset: int, length: int) -> ReadResult:
        runs = zero_runs(self.block_status(offset, length), length)
        return await self.read(offset, length), runs

    def write_now(self, offset: int, data: Buffer) -> bool:
        return False

    @property
    def stats(self) -> DeviceStats:
        return DeviceStats()

    def reset_mem_used_max(self) -> None:
        return None

    def compact(self) -> int:
        return 0

    def reset(self) -> None:
        raise Unsupported("the device cannot be reset")

    @property
    def mem_limit(self) -> int:
        return 0

    def set_mem_limit(self, limit: int) -> None:
        raise Unsupported("the device has no memory limit")

    @property
    def algorithm(self) -> str:
        return ""

    def set_algorithm(self, name: str, *, level: int | None = None) -> None:
        raise Unsupported("the device does not compress")

    async def group(
        self,
        first: int,
        last: int,
        *,
        group_pages: int = 0,
        algorithm: str = "",
        level: int | None = None,
        on_hold: Callable[[float], None] | None = None,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> GroupResult:
        raise Unsupported("the device has no multi-page groups")

    def start_clock(self) -> None:
        return None

    async def writeback(
        self,
        *,
        kind: str = "idle",
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
    ) -> WritebackResult:
        raise Unsupported("the device has no backing store")

    @property
    def writeback_limit(self) -> int | None:
        return None

    def set_writeback_limit(self, nbytes: int | None) -> None:
        raise Unsupported("the device has no backing store")

    @property
    def writeback_settings(self) -> dict[str, float]:
        return {}

    def set_writeback_settings(self, high: float, low: float, wait: float) -> None:
        raise Unsupported("the device has no backing store")

    def backing_stat(self) -> dict[str, Any]:
        return {}

    def hold_image(self, meta: ImageMeta) -> None:
        return None

    def waits(self) -> str:
        return ""

    def snapshot_image(self, final: bool = False) -> tuple[ImageMeta, ImageSource]:
        raise Unsupported("the device cannot be snapshotted")

    def restore_image(self, meta: ImageMeta) -> ImageSink:
        raise Unsupported("the device cannot be restored from a snapshot")

    def mark_idle(self, age: float | None = None, first: int = 0, stop: int | None = None) -> int:
        raise Unsupported("the device does not track page access")

    def page_states(self, first: int, stop: int, limit: int) -> tuple[list[PageState], int]:
        raise Unsupported("the device has no page table to list")

    @property
    def recompression_algorithms(self) -> list[str]:
        return []

    def set_recompression(self, algorithms: Sequence[tuple[str, int | None]]) -> None:
        raise Unsupported("the device does not compress")

    async def recompress(
        self,
        *,
        kind: str = "all",
        threshold: int = 0,
        algorithm: str = "",
        level: int | None = None,
        first: int = 0,
        stop: int | None = None,
        max_pages: int | None = None,
        max_scan: int | None = None,
        batch_pages: int | None = None,
        on_hold: Callable[[float], None] | None = None,
    ) -> RecompressResult:
        raise Unsupported("the device does not compress")
