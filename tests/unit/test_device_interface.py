"""device/interface.py: the contract's shared helpers (zero runs from BLOCK_STATUS extents)."""

from __future__ import annotations

from zramd.device.interface import zero_runs


def test_zero_runs() -> None:
    assert zero_runs([(4096, 3), (4096, 2), (4096, 0), (4096, 2)], 16384) == [
        (0, 8192),
        (12288, 4096),
    ]
    assert zero_runs([(8192, 0), (8192, 2)], 10000) == [(8192, 1808)]
