"""Block semantics: the device contract (interface) and the zram-style device: byte ranges
(blockdev), request ordering (ordering), the pure page pipeline (pipeline), the page store with
its one commit path (store), the page table (table) and same-fill detection (samefill).
``ZramDevice`` is imported lazily so that importing the contract never pulls in the allocator or
the codecs."""

from __future__ import annotations

from typing import Any

from zramd.device.interface import (
    STATE_HOLE,
    STATE_ZERO,
    BlockDevice,
    DeviceError,
    DeviceIOError,
    NoSpace,
)

__all__ = [
    "STATE_HOLE",
    "STATE_ZERO",
    "BlockDevice",
    "DeviceError",
    "DeviceIOError",
    "NoSpace",
    "ZramDevice",
]


def __getattr__(name: str) -> Any:
    if name == "ZramDevice":
        from zramd.device.blockdev import ZramDevice

        return ZramDevice
    raise AttributeError(name)
