"""zramd.checksum.crc32 is zlib's CRC-32, value for value, whichever implementation runs."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zramd import checksum

try:
    from zramd import _native as N
except ImportError:  # pragma: no cover - depends on the build
    N = None  # type: ignore[assignment]
needs_clmul = pytest.mark.skipif(
    N is None or not N.CRC32_CLMUL, reason="the C accelerator or PCLMULQDQ is missing"
)


@needs_clmul
def test_the_fast_crc_is_the_one_used() -> None:
    assert N is not None
    native_on = os.environ.get("ZRAMD_NATIVE", "1") != "0"
    assert (checksum.crc32 is N.crc32) == native_on


@needs_clmul
@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=3000),
    start=st.integers(0, 40),
    value=st.integers(0, 2**32 - 1),
)
def test_same_value_as_zlib(data: bytes, start: int, value: int) -> None:
    assert N is not None
    view = memoryview(data)[start:]  # unaligned starts and every length mod 16
    assert N.crc32(view, value) == zlib.crc32(view, value)
    assert N.crc32(view) == zlib.crc32(view)


@needs_clmul
@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 79, 80, 127, 128, 16 << 10, (1 << 20) + 7])
def test_lengths_around_the_folds(n: int) -> None:
    """Below 64 bytes only the table runs; from 64 on the folds, then the table for the tail;
    from 16 KiB on without the GIL."""
    assert N is not None
    data = bytes((i * 131 + (i >> 7)) & 0xFF for i in range(n))
    for value in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert N.crc32(data, value) == zlib.crc32(data, value)
    assert N.crc32(bytearray(data)) == zlib.crc32(data)


@needs_clmul
def test_chained_over_pieces_equals_whole() -> None:
    assert N is not None
    data = bytes(range(256)) * 1000
    c = 0
    for i in range(0, len(data), 10_007):
        c = N.crc32(data[i : i + 10_007], c)
    assert c == zlib.crc32(data)


@needs_clmul
def test_rejects_what_zlib_rejects() -> None:
    assert N is not None
    with pytest.raises(TypeError):
        N.crc32("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        N.crc32(b"x", 1, 2)  # type: ignore[call-arg]
