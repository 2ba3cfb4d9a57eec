"""``tests.support.serve_device`` with one more device, ``corrupt-data``: the md negative check.

Theory of operation
-------------------
md reads a member's superblock and write-intent bitmap back when the member is added; the
``corrupt-read`` device damages those too, so ``mdadm --add`` refuses the member and the data
checks never run. :class:`CorruptDataDevice` leaves the first :data:`DATA_FROM` bytes of the
device alone (md's metadata lives in the first MiB of a small member) and flips the first byte
of every non-zero page it returns beyond them: md takes the member, resyncs onto it, and then the
file system's data read back from it is wrong. Registered in ``DEVICES``, then the same command
line as ``python -m tests.support.serve_device`` (run with the repository on PYTHONPATH).
"""

from __future__ import annotations

import sys

from tests.support import serve_device
from tests.support.devices import DEVICES, PAGE_SIZE, PlainDevice

DATA_FROM = 4 << 20


class CorruptDataDevice(PlainDevice):
    """Reads past DATA_FROM flip one byte in each non-zero page (page-aligned requests)."""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        out = bytearray(await super().read(offset, length))
        start = max(offset, -(-DATA_FROM // PAGE_SIZE) * PAGE_SIZE)
        for pos in range(start, offset + length, PAGE_SIZE):
            rel = pos - offset
            if any(out[rel : rel + PAGE_SIZE]):
                out[rel] ^= 0xFF
        return out


DEVICES["corrupt-data"] = CorruptDataDevice

if __name__ == "__main__":
    sys.exit(serve_device.main())
