"""Codecs: round trips, corrupt input -> CodecError (never wrong-length data), registry errors,
zstd dictionaries, thread safety."""

from __future__ import annotations

import os
import random
import threading

import pytest

from zramd.compress import CodecError, available_codecs, get_codec

PAGE = 4096


def _pages() -> list[bytes]:
    rnd = random.Random(1)
    text = b"".join(rnd.choice([b"alpha ", b"beta ", b"gamma ", b"delta\n"]) for _ in range(1200))
    return [
        bytes(PAGE),
        b"\xab" * PAGE,
        os.urandom(PAGE),
        text[:PAGE],
        os.urandom(1000) + bytes(PAGE - 1000),
        b"x",
        b"",
    ]


@pytest.mark.parametrize("name", available_codecs())
def test_round_trip(name: str) -> None:
    codec = get_codec(name)
    assert codec.name == name
    assert isinstance(codec.params, dict)
    for page in _pages():
        blob = codec.compress(page)
        assert codec.decompress(blob, len(page)) == page
        assert codec.decompress(memoryview(blob), len(page)) == page
    text = _pages()[3]
    if name != "none":
        assert len(codec.compress(text)) < PAGE // 2


@pytest.mark.parametrize("name", available_codecs())
def test_memoryview_input(name: str) -> None:
    codec = get_codec(name)
    page = _pages()[3]
    buf = bytearray(b"." * 100 + page)
    blob = codec.compress(memoryview(buf)[100:])
    assert codec.decompress(blob, PAGE) == page


@pytest.mark.parametrize("name", available_codecs())
def test_corrupt_input_raises(name: str) -> None:
    codec = get_codec(name)
    page = _pages()[3]
    blob = codec.compress(page)
    rnd = random.Random(7)
    bad_inputs = [
        b"",
        blob[: len(blob) // 2],  # truncated
        blob + b"\0" * 7,  # trailing junk / too long for none
        bytes(rnd.getrandbits(8) for _ in range(len(blob))),  # garbage
    ]
    for bad in bad_inputs:
        try:
            out = codec.decompress(bad, PAGE)
        except CodecError:
            continue
        # a decoder may accept garbage that happens to be valid, but never with a wrong length
        assert len(out) == PAGE
    # wrong expected size: always an error, never short/long data
    with pytest.raises(CodecError):
        codec.decompress(blob, PAGE - 1)
    with pytest.raises(CodecError):
        codec.decompress(blob, PAGE + 1)


@pytest.mark.parametrize("name", ["lz4", "lz4hc", "zstd", "deflate", "lzo"])
def test_garbage_is_error(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(CodecError):
        codec.decompress(b"\xff" * 64, PAGE)


def test_levels() -> None:
    assert get_codec("lz4", level=8).params == {"acceleration": 8}
    assert get_codec("lz4hc", level=12).params == {"level": 12}
    assert get_codec("zstd", level=-3).params == {"level": -3}
    assert get_codec("deflate", level=1).params["level"] == 1
    text = _pages()[3]
    assert get_codec("zstd", level=19).decompress(get_codec("zstd", level=19).compress(text), PAGE)


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("lz4", 0),
        ("lz4hc", 13),
        ("zstd", 23),
        ("deflate", 10),
        ("none", 1),
        ("lzo", 1),
        ("lz4", "3"),
    ],
)
def test_bad_level(name: str, level: object) -> None:
    with pytest.raises(ValueError, match="level"):
        get_codec(name, level=level)  # type: ignore[arg-type]


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as ei:
        get_codec("lz5")
    msg = str(ei.value)
    for n in available_codecs():
        assert n in msg
    assert available_codecs()[0] == "lz4"
    assert set(available_codecs()) == {"lz4", "lz4hc", "zstd", "deflate", "lzo", "none"}


def test_lzo_rle_names_the_algorithms_to_use() -> None:
    with pytest.raises(ValueError) as ei:
        get_codec("lzo-rle")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("lzo-rle is not available in zramd")
    assert msg.endswith("use lzo (the same LZO1X format, without it) or lz4")
    # the flag, the TOML and ``zramd create`` validate an export's algorithm through this
    from zramd.config import ConfigError, ExportConfig

    with pytest.raises(ConfigError, match=r"^export 'swap': lzo-rle is not available in zramd"):
        ExportConfig(name="swap", size=PAGE, algorithm="lzo-rle").validate()


def test_lzo_is_the_kernels_lzo1x_format() -> None:
    import lzo

    codec = get_codec("lzo")
    assert codec.params == {} and codec.level == 0
    page = _pages()[3]
    blob = codec.compress(page)
    # a bare LZO1X-1 stream: what liblzo2 (and the kernel's lzo1x_decompress_safe) decodes
    assert blob == lzo.compress(page, 1, False)
    assert lzo.decompress(blob, False, PAGE) == page


def test_unknown_param_and_dictionary_misuse() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        get_codec("lz4", winbits=3)
    with pytest.raises(ValueError, match="dictionary"):
        get_codec("lz4", dictionary=b"abc")
    with pytest.raises(ValueError, match="empty"):
        get_codec("zstd", dictionary=b"")


def test_zstd_dictionary() -> None:
    import zstandard

    rnd = random.Random(3)
    words = [bytes(rnd.getrandbits(8) for _ in range(12)) for _ in range(64)]

    def sample() -> bytes:
        return b"".join(rnd.choice(words) for _ in range(PAGE // 12 + 1))[:PAGE]

    samples = [sample() for _ in range(300)]
    dict_bytes = zstandard.train_dictionary(8192, samples).as_bytes()
    plain = get_codec("zstd", level=3)
    withdict = get_codec("zstd", level=3, dictionary=dict_bytes)
    assert withdict.params["dict_size"] == len(dict_bytes)
    page = sample()
    blob = withdict.compress(page)
    assert withdict.decompress(blob, PAGE) == page
    assert len(blob) < len(plain.compress(page))
    # a blob made with the dictionary does not decode without it
    with pytest.raises(CodecError):
        plain.decompress(blob, PAGE)


@pytest.mark.parametrize("name", ["zstd", "lz4", "deflate", "lzo"])
def test_threads_share_one_codec(name: str) -> None:
    codec = get_codec(name)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(200):
                page = bytes([rnd.getrandbits(3) for _ in range(64)]) * 64
                assert codec.decompress(codec.compress(page), PAGE) == page
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
