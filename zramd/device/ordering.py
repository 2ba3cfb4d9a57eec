"""Request ordering: the page ranges of the mutating requests in flight, and waiting for them.

Theory of operation
-------------------
A mutating request that must wait (it is offloaded to a worker thread, or it overlaps a request
that is) registers its page range with :meth:`InflightRanges.acquire`, which waits for every
overlapping range registered before it; when done it calls :meth:`InflightRanges.release`.
Later overlapping requests therefore run in arrival order and never see a torn page. Requests
that complete without yielding do not register: on the one event-loop thread they are atomic
with respect to everything else, they only ask :meth:`InflightRanges.overlaps` whether they may
run at once.

Invariants: a request waits only for ranges registered before its own (no cycle, so no
deadlock); every registered range is released exactly once (``acquire`` releases its own range
if its wait is cancelled). Loop thread only.

Knows page numbers only: nothing of bytes, the table, the pool or codecs.
"""

from __future__ import annotations

import asyncio


class _Range:
    """A registered in-flight mutating request over pages ``[first, last]``."""

    __slots__ = ("first", "last", "done")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.done = asyncio.Event()


class InflightRanges:
    """The registered ranges of one device, in arrival order (empty: nothing in flight)."""

    __slots__ = ("_ranges",)

    def __init__(self) -> None:
        self._ranges: list[_Range] = []

    def __len__(self) -> int:
        return len(self._ranges)

    def _overlapping(self, first: int, last: int) -> list[_Range]:
        return [r for r in self._ranges if r.first <= last and first <= r.last]

    def overlaps(self, first: int, last: int) -> bool:
        """Whether a registered range overlaps pages ``[first, last]``."""
        return any(r.first <= last and first <= r.last for r in self._ranges)

    async def acquire(self, first: int, last: int) -> _Range:
        """Register ``[first, last]`` and wait for earlier overlapping requests (arrival order)."""
        before = self._overlapping(first, last)
        r = _Range(first, last)
        self._ranges.append(r)
        try:
            for other in before:
                await other.done.wait()
        except BaseException:
            self.release(r)
            raise
        return r

    def describe(self) -> str:
        """The registered ranges, oldest first (for a report of a request that takes long)."""
        return ", ".join(f"{r.first}-{r.last}" for r in self._ranges) or "none"

    def release(self, r: _Range) -> None:
        """Unregister ``r`` and wake the requests waiting for it."""
        self._ranges.remove(r)
        r.done.set()
