"""Batch page codecs in C (``zramd._native``), when the optional extension is built.

Theory of operation
-------------------
Every codec declares the native *kind* of its format (:class:`~zramd.compress.base.Codec`):
``native_decode`` (lz4 and lz4hc blocks, zstd frames without a dictionary) and ``native_encode``
(lz4 fast, lz4hc, with the codec's ``level`` as acceleration or level), None for the others.
:func:`decode_kind` / :func:`encode_kind` return that kind, or None when the extension is
missing, disabled (``ZRAMD_NATIVE=0``) or the codec has no native form; callers then use the
codec's own per-page methods, which produce the same pages. The C loops run with the
GIL released, so two worker threads decode or encode one large request on both cores. The C
lz4 encoder gives the matches over a run of one byte offset 1 in pages that end in such a run
(liblz4 decodes them several times faster), so its blocks may differ from ``lz4.block``'s byte
for byte, never in what they decode to.

Invariants: a native batch decodes a page only into exactly ``PAGE_SIZE`` bytes (else the index
of the failing page is reported and the caller raises CodecError); an encoded page is stored
compressed only below the huge threshold, as the device's Python preparer decides.
"""

from __future__ import annotations

import os
from types import ModuleType

from zramd.compress.base import Codec

_native: ModuleType | None
try:
    from zramd import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

#: the extension is importable (built at install time with the system's liblz4/libzstd)
BUILT = _native is not None
#: whether zramd uses it (``ZRAMD_NATIVE=0`` turns it off, e.g. to compare)
enabled = BUILT and os.environ.get("ZRAMD_NATIVE", "1") != "0"


def module() -> ModuleType:
    assert _native is not None, "zramd._native is not built"
    return _native


def decode_kind(codec: Codec) -> int | None:
    return codec.native_decode if enabled else None


def encode_kind(codec: Codec) -> int | None:
    return codec.native_encode if enabled else None


#: native encode kinds that cost several times lz4 fast per page (zstd, lz4hc)
SLOW_ENCODE_KINDS = (2, 3)


def slow_encode(codec: Codec) -> bool:
    """Whether ``codec`` compresses in a C batch at a cost worth a thread hop for large writes
    (zstd, lz4hc: 5-10 us per 4 KiB page here, against about 2 for lz4)."""
    return encode_kind(codec) in SLOW_ENCODE_KINDS
