"""Test devices: a plain bytearray BlockDevice and one that corrupts its reads.

Theory of operation
-------------------
:class:`PlainDevice` stores the export in one ``bytearray`` (sparse in practice: the kernel maps
untouched zero pages lazily) plus a per-page "allocated" bitmap, so ``block_status`` can answer
HOLE|ZERO for never-written or trimmed pages, like the compressed store does. It is the reference
model tests compare :class:`~zramd.device.blockdev.ZramDevice` against, and the device of server
tests that must not depend on compression. :class:`CorruptReadDevice` flips one byte in every
read of a non-zero page, so a test (the VM test's negative scenario) can prove its checks can
fail. Tests put them behind an export with ``ExportRegistry.add(config, device=...)``, or in a
separate server process with ``python -m tests.support.serve_device``; zramd itself cannot reach
them.

Every method completes without yielding, so requests are atomic with respect to each other.
They know nothing of NBD; ranges are asserted, not checked (``server/dispatch.py`` validates).
"""

from __future__ import annotations

from zramd.device.interface import STATE_HOLE, STATE_ZERO, DeviceBase

PAGE_SIZE = 4096
_ZERO_PAGE = bytes(PAGE_SIZE)


class PlainDevice(DeviceBase):
    """A BlockDevice over a bytearray."""

    def __init__(self, size: int, **_ignored: object) -> None:
        assert size > 0 and size % PAGE_SIZE == 0, size
        self._size = size
        self._data = bytearray(size)
        self._allocated = bytearray(size // PAGE_SIZE)  # 1 = written since last trim
        self.closed = False

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        assert not self.closed, "device closed"
        assert 0 <= offset and 0 <= length and offset + length <= self._size, (offset, length)

    def _pages(self, offset: int, length: int) -> range:
        return range(offset // PAGE_SIZE, (offset + length + PAGE_SIZE - 1) // PAGE_SIZE)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check(offset, length)
        return bytes(self._data[offset : offset + length])

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._check(offset, n)
        self._data[offset : offset + n] = data
        for p in self._pages(offset, n):
            self._allocated[p] = 1

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        first = -(-offset // PAGE_SIZE)
        end = (offset + length) // PAGE_SIZE
        if end > first:
            self._data[first * PAGE_SIZE : end * PAGE_SIZE] = bytes((end - first) * PAGE_SIZE)
            self._allocated[first:end] = bytes(end - first)

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        self._check(offset, length)
        self._data[offset : offset + length] = bytes(length)
        if punch_hole:
            first = -(-offset // PAGE_SIZE)
            end = (offset + length) // PAGE_SIZE
            if end > first:
                self._allocated[first:end] = bytes(end - first)

    async def flush(self) -> None:
        assert not self.closed

    def _page_state(self, p: int) -> int:
        if not self._allocated[p]:
            return STATE_HOLE | STATE_ZERO
        if self._data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == _ZERO_PAGE:
            return STATE_ZERO
        return 0

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        extents: list[tuple[int, int]] = []
        pos = offset
        end = offset + length
        while pos < end:
            p = pos // PAGE_SIZE
            state = self._page_state(p)
            run_end = min((p + 1) * PAGE_SIZE, self._size)
            while run_end < end and self._page_state(run_end // PAGE_SIZE) == state:
                run_end = min(run_end + PAGE_SIZE, self._size)
            extents.append((run_end - pos, state))
            pos = run_end
        return extents

    def close(self) -> None:
        self.closed = True
        self._data = bytearray()
        self._allocated = bytearray()


class CorruptReadDevice(PlainDevice):
    """Every read flips one byte in each non-zero page it returns (negative control)."""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check(offset, length)
        out = bytearray(self._data[offset : offset + length])
        pos = offset
        end = offset + length
        while pos < end:
            page_end = min((pos // PAGE_SIZE + 1) * PAGE_SIZE, end)
            chunk = out[pos - offset : page_end - offset]
            if chunk.count(0) != len(chunk):
                out[pos - offset] ^= 0xFF
            pos = page_end
        return out


#: ``--device`` names of ``tests.support.serve_device``
DEVICES: dict[str, type[PlainDevice]] = {"plain": PlainDevice, "corrupt-read": CorruptReadDevice}
