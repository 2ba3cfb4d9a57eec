"""Block semantics: the device contract (interface), the page table, same-fill detection and the
zram-style device itself (blockdev). ``ZramDevice`` is imported lazily so that importing the
contract never pulls in the allocator or the codecs."""

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
