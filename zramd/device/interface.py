"""The device interface: what the NBD server calls, and nothing more.

Theory of operation
-------------------
An export is backed by one object satisfying :class:`BlockDevice`. The server
(``server/dispatch.py``) has already validated every request against the export (range,
read-only, flags) before calling, so implementations may *assert* ranges rather than re-check
them. Offsets and lengths are in bytes and need not be page aligned (any alignment is legal;
the kernel client uses 512 or 4096).

The async methods are the ones the server uses. They are safe under concurrency: overlapping
requests in flight never produce a torn page, and a request's effects are complete (every page
installed) when its coroutine returns. State is only mutated on the event-loop thread;
implementations may offload pure computation (compression) to threads.

Errors: :class:`NoSpace` (memory limit reached; ENOSPC, nothing changed) and :class:`DeviceIOError`
(a stored page failed to decompress; EIO, never garbage). Anything else is a bug.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

#: base:allocation flags, as in the NBD spec (nbd.md 1.8).
STATE_HOLE = 1
STATE_ZERO = 2


class DeviceError(Exception):
    """Base of the errors a device may raise for one request."""


class NoSpace(DeviceError):
    """The write would pass the memory limit. Nothing was changed (maps to ENOSPC)."""


class DeviceIOError(DeviceError):
    """Stored data could not be returned intact (maps to EIO)."""


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int:
        """Size in bytes (a multiple of 4096)."""
        ...

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return exactly ``length`` bytes from ``offset``. Raises DeviceIOError."""
        ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
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

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents ``(length, flags)`` covering at least ``[offset, offset+length)``, consecutive
        from ``offset``; flags are STATE_HOLE | STATE_ZERO. Lengths are multiples of 512 except
        possibly where the request itself is unaligned. Used for BLOCK_STATUS and for the
        OFFSET_HOLE chunks of structured READ replies."""
        ...

    def close(self) -> None:
        """Release all memory. The device is unusable afterwards."""
        ...
