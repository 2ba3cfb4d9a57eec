"""Compression backends: lz4, lz4hc, zstd, deflate, lzo and none.

Theory of operation
-------------------
Each class wraps one library behind :class:`~zramd.compress.base.Codec`. All are safe to call from
several threads: lz4.block and zlib's one-shot functions hold no shared state, and zstd keeps one
compressor/decompressor pair per thread (``threading.local``) because zstandard objects are not
thread-safe. lz4, zstd and lzo release the GIL while they work, so worker threads compress in
parallel.

Compressed blobs are minimal: lz4 is stored without its size prefix, zstd frames carry no content
size, checksum or dictionary id, deflate is raw (no zlib header), lzo is a bare LZO1X stream (no
python-lzo header). The original size always comes
from the caller. Every backend checks the decoded length and raises CodecError on any mismatch or
library error, so a corrupt blob can never be returned as data.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import lz4.block
import lzo
import zstandard

from zramd.compress.base import Buffer, CodecError

#: lz4 "fast" acceleration range accepted here (1 = best ratio; lz4 clamps above 65537).
LZ4_ACCEL_MIN, LZ4_ACCEL_MAX, LZ4_ACCEL_DEFAULT = 1, 65537, 1
#: lz4hc compression levels (lz4 LZ4HC_CLEVEL_MIN..MAX); 9 is lz4's default.
LZ4HC_LEVEL_MIN, LZ4HC_LEVEL_MAX, LZ4HC_LEVEL_DEFAULT = 1, 12, 9
#: zstd levels; negative levels are zstd's "fast" modes. zram's default is 3, ours 1 (speed).
ZSTD_LEVEL_MIN, ZSTD_LEVEL_MAX, ZSTD_LEVEL_DEFAULT = -7, 22, 1
#: raw deflate levels (zlib).
DEFLATE_LEVEL_MIN, DEFLATE_LEVEL_MAX, DEFLATE_LEVEL_DEFAULT = 0, 9, 6
#: raw deflate: negative window bits = no zlib header/trailer, 32 KiB window.
DEFLATE_WBITS = -15


def _check_level(name: str, level: int, lo: int, hi: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not lo <= level <= hi:
        raise ValueError(f"codec {name!r}: level must be an integer in {lo}..{hi}, got {level!r}")
    return level


class Lz4Codec:
    """lz4 block format, mode ``fast``; ``level`` is the acceleration (higher = faster, worse)."""

    name = "lz4"
    #: kinds for zramd.compress.native (1 = lz4 block, 3 = lz4hc); ``level`` goes with them
    native_decode: int | None = 1
    native_encode: int | None = 1

    def __init__(self, level: int | None = None) -> None:
        self.level = _check_level(
            self.name,
            LZ4_ACCEL_DEFAULT if level is None else level,
            LZ4_ACCEL_MIN,
            LZ4_ACCEL_MAX,
        )
        self._compress = lz4.block.compress
        self._decompress = lz4.block.decompress

    @property
    def params(self) -> dict[str, Any]:
        return {"acceleration": self.level}

    def compress(self, page: Buffer) -> bytes:
        return self._compress(page, mode="fast", acceleration=self.level, store_size=False)

    def decompress(self, data: Buffer, size: int) -> bytes:
        try:
            out: bytes = self._decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4: {exc}") from None
        if len(out) != size:
            raise CodecError(f"lz4: decoded {len(out)} bytes, expected {size}")
        return out


class Lz4HcCodec(Lz4Codec):
    """lz4 block format, mode ``high_compression`` (same decoder as lz4)."""

    name = "lz4hc"
    native_encode: int | None = 3

    def __init__(self, level: int | None = None) -> None:
        self.level = _check_level(
            self.name,
            LZ4HC_LEVEL_DEFAULT if level is None else level,
            LZ4HC_LEVEL_MIN,
            LZ4HC_LEVEL_MAX,
        )
        self._compress = lz4.block.compress
        self._decompress = lz4.block.decompress

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level}

    def compress(self, page: Buffer) -> bytes:
        return self._compress(
            page, mode="high_compression", compression=self.level, store_size=False
        )


class ZstdCodec:
    """zstd frames without content size/checksum/dict id; optional pre-trained dictionary."""

    name = "zstd"

    def __init__(self, level: int | None = None, dictionary: bytes | None = None) -> None:
        self.level = _check_level(
            self.name,
            ZSTD_LEVEL_DEFAULT if level is None else level,
            ZSTD_LEVEL_MIN,
            ZSTD_LEVEL_MAX,
        )
        self.dictionary = dictionary
        #: zstd frames decode and encode natively (kind 2) unless they need the dictionary
        self.native_decode: int | None = 2 if dictionary is None else None
        self.native_encode: int | None = 2 if dictionary is None else None
        self._dict: zstandard.ZstdCompressionDict | None = None
        if dictionary is not None:
            if not dictionary:
                raise ValueError("codec 'zstd': dictionary is empty")
            self._dict = zstandard.ZstdCompressionDict(bytes(dictionary))
            self._dict.precompute_compress(level=self.level)
        self._local = threading.local()

    @property
    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"level": self.level}
        if self.dictionary is not None:
            p["dict_size"] = len(self.dictionary)
        return p

    def _streams(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        local = self._local
        try:
            return local.c, local.d
        except AttributeError:
            kw: dict[str, Any] = {}
            if self._dict is not None:
                kw["dict_data"] = self._dict
            local.c = zstandard.ZstdCompressor(
                level=self.level,
                write_content_size=False,
                write_checksum=False,
                write_dict_id=False,
                **kw,
            )
            local.d = zstandard.ZstdDecompressor(**kw)
            return local.c, local.d

    def compress(self, page: Buffer) -> bytes:
        return self._streams()[0].compress(page)

    def decompress(self, data: Buffer, size: int) -> bytes:
        d = self._streams()[1]
        try:
            out: bytes = d.decompress(data, max_output_size=size or 1)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: {exc}") from None
        if len(out) != size:
            raise CodecError(f"zstd: decoded {len(out)} bytes, expected {size}")
        return out


class DeflateCodec:
    """Raw deflate (zlib without header), 32 KiB window."""

    name = "deflate"
    native_decode: int | None = None
    native_encode: int | None = None

    def __init__(self, level: int | None = None) -> None:
        self.level = _check_level(
            self.name,
            DEFLATE_LEVEL_DEFAULT if level is None else level,
            DEFLATE_LEVEL_MIN,
            DEFLATE_LEVEL_MAX,
        )

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level, "winbits": -DEFLATE_WBITS}

    def compress(self, page: Buffer) -> bytes:
        return zlib.compress(page, self.level, DEFLATE_WBITS)

    def decompress(self, data: Buffer, size: int) -> bytes:
        d = zlib.decompressobj(DEFLATE_WBITS)
        try:
            out = d.decompress(data, size)
        except zlib.error as exc:
            raise CodecError(f"deflate: {exc}") from None
        if len(out) != size or not d.eof or d.unconsumed_tail:
            raise CodecError(f"deflate: corrupt or wrong-size stream (decoded {len(out)})")
        return out


class LzoCodec:
    """LZO1X-1 through liblzo2 (python-lzo): the format and compressor of the kernel's ``lzo``,
    without levels. python-lzo reads only ``bytes``, so other buffers are copied first."""

    name = "lzo"
    native_decode: int | None = None
    native_encode: int | None = None

    def __init__(self, level: int | None = None) -> None:
        if level is not None:
            raise ValueError("codec 'lzo' takes no level")
        self.level = 0

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def compress(self, page: Buffer) -> bytes:
        out: bytes = lzo.compress(page if type(page) is bytes else bytes(page), 1, False)
        return out

    def decompress(self, data: Buffer, size: int) -> bytes:
        try:
            out: bytes = lzo.decompress(data if type(data) is bytes else bytes(data), False, size)
        except lzo.error as exc:
            raise CodecError(f"lzo: {exc}") from None
        if len(out) != size:
            raise CodecError(f"lzo: decoded {len(out)} bytes, expected {size}")
        return out


class NoneCodec:
    """Identity: every page ends up stored raw (as a huge page)."""

    name = "none"
    native_decode: int | None = None
    native_encode: int | None = None

    def __init__(self, level: int | None = None) -> None:
        if level is not None:
            raise ValueError("codec 'none' takes no level")
        self.level = 0

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def compress(self, page: Buffer) -> bytes:
        return bytes(page)

    def decompress(self, data: Buffer, size: int) -> bytes:
        if len(data) != size:
            raise CodecError(f"none: got {len(data)} bytes, expected {size}")
        return bytes(data)
