"""Codec registry: find a configured :class:`Codec` by name.

Theory of operation
-------------------
``get_codec(name, level=..., dictionary=...)`` builds a codec instance; ``available_codecs()``
lists the names. Unknown names, bad levels and unsupported parameters raise ValueError with a
message that lists the choices, so the CLI/config layer can show it as is. The registry knows
nothing about devices or pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zramd.compress.backends import (
    DeflateCodec,
    Lz4Codec,
    Lz4HcCodec,
    LzoCodec,
    NoneCodec,
    ZstdCodec,
)
from zramd.compress.base import Buffer, Codec, CodecError

__all__ = [
    "Buffer",
    "Codec",
    "CodecError",
    "DEFAULT_CODEC",
    "available_codecs",
    "get_codec",
]

#: The default algorithm (zram's is lzo-rle; lz4 has zramd's C batch loops, see ``native``).
DEFAULT_CODEC = "lz4"

_FACTORIES: dict[str, Callable[..., Codec]] = {
    "lz4": Lz4Codec,
    "lz4hc": Lz4HcCodec,
    "zstd": ZstdCodec,
    "deflate": DeflateCodec,
    "lzo": LzoCodec,
    "none": NoneCodec,
}
#: zram algorithms zramd does not have -> the one-line answer naming what to use instead
_UNAVAILABLE = {
    "lzo-rle": "lzo-rle is not available in zramd (no binding has the kernel's RLE extension): "
    "use lzo (the same LZO1X format, without it) or lz4",
}
#: codecs that accept a pre-trained dictionary
_DICT_CODECS = frozenset({"zstd"})


def available_codecs() -> list[str]:
    """Names accepted by :func:`get_codec`, default first."""
    return [DEFAULT_CODEC] + sorted(n for n in _FACTORIES if n != DEFAULT_CODEC)


def get_codec(
    name: str, *, level: int | None = None, dictionary: bytes | None = None, **params: Any
) -> Codec:
    """Build codec ``name``. Raises ValueError for unknown names or invalid parameters."""
    factory = _FACTORIES.get(name)
    if factory is None:
        if name in _UNAVAILABLE:
            raise ValueError(_UNAVAILABLE[name])
        raise ValueError(
            f"unknown compression algorithm {name!r}; choose one of: "
            + ", ".join(available_codecs())
        )
    if params:
        raise ValueError(f"codec {name!r}: unsupported parameter(s): {', '.join(sorted(params))}")
    if dictionary is not None:
        if name not in _DICT_CODECS:
            raise ValueError(
                f"codec {name!r} takes no dictionary; dictionaries work with: "
                + ", ".join(sorted(_DICT_CODECS))
            )
        return factory(level=level, dictionary=dictionary)
    return factory(level=level)
