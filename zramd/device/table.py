"""The per-page table: flat numpy arrays, one entry per page (:data:`zramd.geometry.PAGE_SIZE`
bytes of device), no Python object per page.

Theory of operation
-------------------
Entry ``i`` describes device page ``i`` with six parallel arrays (15 bytes per page):

* ``state`` (uint8): EMPTY (never written or discarded: reads as zeros, holds nothing), SAME
  (one repeated 8-byte word, kept in ``handle``), STORED (compressed object in the pool), HUGE
  (raw 4096-byte object in the pool) or GROUPED (one page of a multi-page group object; the
  group owns the pool object, the entry names the group and the page's place in it) or BACKED
  (its object, as it was in the pool, lives in the backing store: :mod:`zramd.device.backed`);
* ``handle`` (uint64): the pool handle for STORED/HUGE, the fill word for SAME, the group id for
  GROUPED, the backing store's locator for BACKED, 0 for EMPTY;
* ``size`` (uint16): the stored object's size in bytes (0 for EMPTY/SAME; for GROUPED, the
  page's index inside its group; for BACKED, the size of the object written back);
* ``codec`` (uint8): index of the codec a STORED or GROUPED page was compressed with (the
  device keeps the list), so the algorithm can change while old pages stay readable;
* ``flags`` (uint8): IDLE (marked idle and not accessed since), RECOMPRESSED (stored by a
  recompression algorithm), INCOMPRESSIBLE (no recompression algorithm shrank it: not tried
  again until it is rewritten), PENDING (picked by a background move that has not switched it
  yet: a write, which replaces the whole entry, clears it, and the move then leaves the page),
  RAW (a BACKED page whose object is the raw page: it was HUGE), WB_PENDING (copied out by the
  writeback batch in flight, which switches it only if the mark is still there: a write clears
  it; a mark of its own, so that recompression and writeback never take each other's marks);
* ``atime`` (uint16): the coarse time of the last read or write, in :data:`ATIME_QUANTUM`
  second units of the device's clock. Before the clock passes :data:`ATIME_REBASE_AT` (about
  11 days) the store moves its epoch forward by :data:`ATIME_REBASE_BY` and every atime back
  (:meth:`PageTable.rebase_atime`, clamped at 0), so ages stay right for any uptime; a page
  last accessed before the new epoch reads as accessed at it (still at least
  ATIME_REBASE_AT - ATIME_REBASE_BY quanta old, about 5 days).

A write replaces the whole entry (flags and atime included); a read refreshes ``atime`` and
clears IDLE (the store does both: :mod:`zramd.device.store`).

The arrays live in anonymous ``mmap`` regions, which the kernel commits lazily, 4 KiB at a time:
an empty 64 GiB table costs no RSS until pages are written. (Not ``np.zeros``: numpy advises
transparent huge pages for big arrays, so one write would commit 2 MiB of table.) Bulk helpers
therefore never write over whole ranges, only over the entries that are not already EMPTY.
Scalar access on the hot path goes through memoryviews of the arrays (``*_mv``), which return
Python ints ~3x faster than numpy scalar indexing.

The table knows nothing about pools or codecs: it stores numbers. Only the device mutates it, on
the event-loop thread.
"""

from __future__ import annotations

import contextlib
import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

EMPTY = 0
SAME = 1
STORED = 2
HUGE = 3
GROUPED = 4
BACKED = 5
STATE_NAMES = ("empty", "same", "stored", "huge", "grouped", "backed")

#: ``flags`` bits
IDLE = 1
RECOMPRESSED = 2
INCOMPRESSIBLE = 4
PENDING = 8
RAW = 16
WB_PENDING = 32
FLAG_NAMES = {IDLE: "idle", RECOMPRESSED: "recompressed", INCOMPRESSIBLE: "incompressible"}
#: seconds per unit of ``atime``
ATIME_QUANTUM = 16
ATIME_MAX = 0xFFFF
#: the clock value (quanta) at which the store rebases, and by how much
ATIME_REBASE_AT = 0xF000
ATIME_REBASE_BY = 0x8000

#: bytes of table per device page (the six arrays)
ENTRY_BYTES = 8 + 2 + 1 + 1 + 1 + 2
#: the codec column is uint8
MAX_CODECS = 256


class PageTable:
    """Flat arrays describing every page of one device."""

    __slots__ = (
        "npages",
        "state",
        "handle",
        "size",
        "codec",
        "flags",
        "atime",
        "state_mv",
        "handle_mv",
        "size_mv",
        "codec_mv",
        "flags_mv",
        "atime_mv",
        "_maps",
    )

    def __init__(self, npages: int) -> None:
        assert npages >= 0
        self.npages = npages
        self._maps: list[mmap.mmap] = []
        self.state: npt.NDArray[np.uint8] = self._zeros(npages, np.uint8)
        self.handle: npt.NDArray[np.uint64] = self._zeros(npages, np.uint64)
        self.size: npt.NDArray[np.uint16] = self._zeros(npages, np.uint16)
        self.codec: npt.NDArray[np.uint8] = self._zeros(npages, np.uint8)
        self.flags: npt.NDArray[np.uint8] = self._zeros(npages, np.uint8)
        self.atime: npt.NDArray[np.uint16] = self._zeros(npages, np.uint16)
        # memoryviews for fast scalar get/set (Python ints in and out)
        self.state_mv = self.state.data.cast("B")
        self.handle_mv = self.handle.data.cast("B").cast("Q")
        self.size_mv = self.size.data.cast("B").cast("H")
        self.codec_mv = self.codec.data.cast("B")
        self.flags_mv = self.flags.data.cast("B")
        self.atime_mv = self.atime.data.cast("B").cast("H")

    def _zeros(self, n: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
        """A zero-filled array in its own lazily committed anonymous mapping (no huge pages)."""
        itemsize = np.dtype(dtype).itemsize
        m = mmap.mmap(-1, max(n * itemsize, mmap.PAGESIZE))
        nohuge = getattr(mmap, "MADV_NOHUGEPAGE", None)
        if nohuge is not None:
            with contextlib.suppress(OSError):
                m.madvise(nohuge)
        self._maps.append(m)
        return np.frombuffer(m, dtype=dtype, count=n)

    @property
    def nbytes(self) -> int:
        """Bytes of address space the table spans (committed lazily)."""
        return self.npages * ENTRY_BYTES

    def release(self) -> None:
        """Drop the views and unmap the arrays (the table is unusable afterwards)."""
        for mv in (
            self.state_mv,
            self.handle_mv,
            self.size_mv,
            self.codec_mv,
            self.flags_mv,
            self.atime_mv,
        ):
            mv.release()
        empty = np.zeros(0, dtype=np.uint8)
        self.state = self.codec = self.flags = empty
        self.handle = empty.view(np.uint64)
        self.size = self.atime = empty.view(np.uint16)
        for m in self._maps:
            with contextlib.suppress(BufferError):  # someone still holds a view: GC unmaps it
                m.close()
        self._maps = []

    # --- bulk helpers (vectorised) ------------------------------------------------------------

    def occupied(self, start: int, end: int) -> npt.NDArray[np.intp]:
        """Absolute indices of the non-EMPTY pages in ``[start, end)``."""
        return np.flatnonzero(self.state[start:end]) + start

    def clear(self, idx: npt.NDArray[np.intp]) -> None:
        """Set the entries ``idx`` to EMPTY (only those: untouched zeros stay uncommitted)."""
        self.state[idx] = EMPTY
        self.handle[idx] = 0
        self.size[idx] = 0
        self.codec[idx] = 0
        self.flags[idx] = 0
        self.atime[idx] = 0

    def counts(self, idx: npt.NDArray[np.intp]) -> tuple[int, int, int, int]:
        """For entries ``idx``: (#SAME, #HUGE, total size of STORED+HUGE, handles-bearing count)."""
        st = self.state[idx]
        same = int(np.count_nonzero(st == SAME))
        huge = int(np.count_nonzero(st == HUGE))
        pooled = (st == STORED) | (st == HUGE)
        return same, huge, int(self.size[idx][pooled].sum(dtype=np.int64)), int(pooled.sum())

    def pooled_handles(self, idx: npt.NDArray[np.intp]) -> list[int]:
        """Pool handles (Python ints) of the STORED/HUGE entries among ``idx``."""
        st = self.state[idx]
        return self.handle[idx][(st == STORED) | (st == HUGE)].tolist()

    def backed_locators(self, idx: npt.NDArray[np.intp]) -> list[int]:
        """Backing locators (Python ints) of the BACKED entries among ``idx``."""
        return self.handle[idx][self.state[idx] == BACKED].tolist()

    def classify(self, start: int, end: int) -> npt.NDArray[np.uint8]:
        """Per page in ``[start, end)``: 3 (hole|zero) for EMPTY, 2 (zero) for SAME-zero, else 0.

        The values are exactly the NBD base:allocation flags (STATE_HOLE=1 | STATE_ZERO=2).
        """
        st = self.state[start:end]
        out = np.zeros(end - start, dtype=np.uint8)
        out[st == EMPTY] = 3
        out[(st == SAME) & (self.handle[start:end] == 0)] = 2
        return out

    def rebase_atime(self, shift: int) -> None:
        """Move every live entry's ``atime`` back by ``shift`` quanta, clamped at 0 (entries
        already at 0 are not written, so untouched parts of the table stay uncommitted)."""
        at = self.atime
        old = at >= shift
        young = (at != 0) & ~old
        np.subtract(at, np.uint16(shift), out=at, where=old)
        at[young] = 0

    def state_counts(self) -> dict[str, int]:
        """Number of pages in each state (a full scan; for stats/debugging)."""
        bc = np.bincount(self.state, minlength=len(STATE_NAMES))
        return {name: int(bc[i]) for i, name in enumerate(STATE_NAMES)}
