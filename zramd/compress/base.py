"""The codec interface shared by every compression backend.

Theory of operation
-------------------
A :class:`Codec` turns one page (or any byte string) into a compressed blob and back. It is
stateless from the caller's point of view: ``compress`` and ``decompress`` may be called from any
thread at the same time (backends with per-stream state keep one stream per thread). Compressed
blobs carry no length prefix; the caller keeps the original size and passes it to ``decompress``.

Invariant: ``decompress`` returns exactly ``size`` bytes or raises :class:`CodecError`; it never
returns garbage of the wrong length. A codec declares whether the C batch loops can run its
format (``native_decode`` / ``native_encode``), so nobody probes for it. Codecs know nothing
about pages' meaning, pools or devices.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class CodecError(Exception):
    """Compressed input is corrupt or does not decode to the expected size."""


@runtime_checkable
class Codec(Protocol):
    """One configured compression algorithm."""

    #: registry name, e.g. ``"lz4"``
    name: str
    #: the level (or lz4's acceleration) in effect; 0 for a codec without levels
    level: int
    #: the C batch kinds of this codec's format (:mod:`zramd.compress.native`), or None: decode
    #: (1 = lz4 block, 2 = zstd frame) and encode (1 = lz4 fast, 3 = lz4hc, both at ``level``)
    native_decode: int | None
    native_encode: int | None

    @property
    def params(self) -> dict[str, Any]:
        """The effective parameters (level, dictionary size, ...), for display and stats."""
        ...

    def compress(self, page: Buffer) -> bytes:
        """Compress ``page``; the result has no size prefix."""
        ...

    def decompress(self, data: Buffer, size: int) -> bytes:
        """Return the ``size`` original bytes of ``data``; raise CodecError otherwise."""
        ...
