"""Same-fill detection: one repeated 8-byte word (zero included), nothing else."""

from __future__ import annotations

import os

from zramd.device.samefill import ZERO_PAGE, fill_page, same_fill_word
from zramd.geometry import PAGE_SIZE


def test_zero_and_words() -> None:
    assert same_fill_word(ZERO_PAGE) == 0
    assert same_fill_word(b"\xff" * PAGE_SIZE) == 2**64 - 1
    word = 0x0102030405060708
    page = word.to_bytes(8, "little") * 512
    assert same_fill_word(page) == word
    assert fill_page(word) == page
    assert fill_page(0) == ZERO_PAGE
    assert fill_page(7, 16) == (7).to_bytes(8, "little") * 2


def test_not_same() -> None:
    base = bytearray(b"\x11" * PAGE_SIZE)
    for pos in (0, 7, 8, 2048, PAGE_SIZE - 1):
        p = bytearray(base)
        p[pos] ^= 1
        assert same_fill_word(bytes(p)) is None
    # period 4 bytes repeats with period 8 too: that is same-filled (as zram's unsigned long)
    assert same_fill_word(b"abcd" * 1024) == int.from_bytes(b"abcdabcd", "little")
    # period 16 is not
    assert same_fill_word(b"0123456789abcdef" * 256) is None
    assert same_fill_word(os.urandom(PAGE_SIZE)) is None
