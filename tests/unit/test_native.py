"""zramd._native (batch page codecs in C) against the Python codecs, and the device on both paths.

CI builds the extension (scripts/test sets ZRAMD_REQUIRE_NATIVE=1), so there a missing build is a
failure, not a skip: the fast path must not silently fall back.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from zramd.compress import get_codec, native
from zramd.device import DeviceIOError
from zramd.device.blockdev import ZramDevice
from zramd.device.pipeline import prepare_page, python_preparer
from zramd.device.samefill import same_fill_word
from zramd.device.table import HUGE, SAME, STORED

PAGE = 4096

if not native.BUILT:
    if os.environ.get("ZRAMD_REQUIRE_NATIVE") == "1":
        pytest.fail("zramd._native is not built (pip install -e . needs gcc and python3-dev)")
    pytest.skip("zramd._native is not built", allow_module_level=True)

N = native.module()


def pages(seed: int, n: int) -> list[bytes]:
    """A mix: compressible text-like, half-zero (fio's 60%), random, zero, same-filled, and
    almost same-filled (one word repeated, the last word differing)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 6
        if k == 0:
            words = [rnd.randbytes(rnd.randint(3, 9)) for _ in range(30)]
            p = b" ".join(rnd.choice(words) for _ in range(700))[:PAGE]
            out.append(p.ljust(PAGE, b"."))
        elif k == 1:
            out.append(rnd.randbytes(1638) + bytes(PAGE - 1638))
        elif k == 2:
            out.append(rnd.randbytes(PAGE))
        elif k == 3:
            out.append(bytes(PAGE))
        elif k == 4:
            out.append(rnd.randbytes(8) * (PAGE // 8))
        else:
            word = rnd.randbytes(8)
            out.append(word * (PAGE // 8 - 1) + bytes(b ^ 1 for b in word))
    return out


@pytest.mark.parametrize("algo", ["lz4", "lz4hc", "zstd"])
def test_decompress_pages_matches_the_codec(algo: str) -> None:
    codec = get_codec(algo)
    kind = native.decode_kind(codec)
    assert kind is not None
    src = pages(1, 40)
    items: list[bytes | tuple[int, bytes]] = []
    for i, p in enumerate(src):
        blob = codec.compress(p)
        # every item form: (kind, blob), a bare short blob (default kind), a raw page
        items.append((kind, blob) if i % 3 == 0 else blob if len(blob) < PAGE else p)
    dst = N.new_buffer(len(src) * PAGE + 7)
    assert N.decompress_pages(dst, items, kind) == -1
    assert bytes(dst[: len(src) * PAGE]) == b"".join(src)


def test_decompress_pages_reports_the_first_bad_page() -> None:
    codec = get_codec("lz4")
    good = [codec.compress(p) for p in pages(2, 6)]
    dst = bytearray(6 * PAGE)
    cases: list[tuple[int, bytes | tuple[int, bytes]]] = [
        (3, b"\xff" * 100),  # garbage
        (2, good[2][:-5]),  # truncated
        (4, codec.compress(bytes(range(256)) * 8)),  # decodes, but to 2 KiB, not a page
        (1, (2, good[1])),  # an lz4 blob decoded as zstd
    ]
    for idx, bad in cases:
        items: list[bytes | tuple[int, bytes]] = list(good)
        items[idx] = bad
        assert N.decompress_pages(dst, items, 1) == idx
    # without a default kind a short bare blob is an error too
    assert N.decompress_pages(dst, [bytes(PAGE), good[1]]) == 1
    # a page of raw bytes must be exactly a page
    assert N.decompress_pages(dst, [(0, bytes(PAGE + 1))]) == 0


def test_decompress_pages_rejects_bad_arguments() -> None:
    blob = get_codec("lz4").compress(pages(3, 1)[0])
    with pytest.raises(ValueError, match="shorter"):
        N.decompress_pages(bytearray(PAGE), [blob, blob], 1)
    with pytest.raises(ValueError, match="kind"):
        N.decompress_pages(bytearray(PAGE), [(9, blob)])
    with pytest.raises(ValueError, match="kind"):
        N.decompress_pages(bytearray(PAGE), [blob], 7)
    with pytest.raises(TypeError):
        N.decompress_pages(bytearray(PAGE), [(1, "text")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        N.decompress_pages(bytes(PAGE), [blob], 1)  # read-only destination
    with pytest.raises(ValueError):
        N.new_buffer(-1)


@pytest.mark.parametrize("algo", ["lz4", "lz4hc", "zstd"])
def test_decompress_packed_matches_the_codec(algo: str) -> None:
    """Blobs end to end (a raw page among them is copied), in one call or in two parts cut
    anywhere, as the read path splits them; a bad blob gives its index; bad offsets or
    arguments are refused before anything is decoded."""
    codec = get_codec(algo)
    kind = native.decode_kind(codec)
    assert kind is not None
    src = pages(4, 30)
    blobs = [b if len(b := codec.compress(p)) < PAGE else p for p in src]
    data = b"".join(blobs)
    ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    dst = bytearray(len(src) * PAGE)
    assert N.decompress_packed(dst, data, ends, 0, kind) == -1
    assert bytes(dst) == b"".join(src)
    for cut in (1, 13, 29):
        dst = bytearray(len(src) * PAGE)
        view = memoryview(dst)
        assert N.decompress_packed(view[: cut * PAGE], data, ends[:cut], 0, kind) == -1
        begin = int(ends[cut - 1])
        assert N.decompress_packed(view[cut * PAGE :], data, ends[cut:], begin, kind) == -1
        assert bytes(dst) == b"".join(src)
    holes = np.insert(ends, [0, 5, 5, 30], [0, int(ends[4]), int(ends[4]), int(ends[-1])])
    dst = bytearray((len(src) + 4) * PAGE)  # an empty blob is a page of zeros
    assert N.decompress_packed(dst, data, holes, 0, kind) == -1
    zero = bytes(PAGE)
    assert bytes(dst) == b"".join([zero, *src[:5], zero, zero, *src[5:], zero])
    bad = bytearray(data)
    bad[int(ends[6]) : int(ends[7])] = b"\xff" * (int(ends[7]) - int(ends[6]))
    if len(blobs[7]) < PAGE:
        assert N.decompress_packed(bytearray(len(src) * PAGE), bytes(bad), ends, 0, kind) == 7
    with pytest.raises(ValueError, match="out of range"):
        N.decompress_packed(bytearray(len(src) * PAGE), data[:-1], ends, 0, kind)
    with pytest.raises(ValueError, match="out of range"):
        N.decompress_packed(bytearray(len(src) * PAGE), data, ends[::-1].copy(), 0, kind)
    with pytest.raises(ValueError, match="length"):
        N.decompress_packed(bytearray(PAGE), data, ends, 0, kind)
    with pytest.raises(ValueError, match="kind"):
        N.decompress_packed(bytearray(len(src) * PAGE), data, ends, 0, 0)


@pytest.mark.parametrize(
    ("algo", "level"), [("lz4", None), ("lz4", 9), ("lz4hc", 4), ("zstd", 1), ("zstd", 3)]
)
@pytest.mark.parametrize("threshold", [1, 1000, 3633, PAGE])
def test_prepare_pages_matches_prepare_page(algo: str, level: int | None, threshold: int) -> None:
    codec = get_codec(algo, level=level)
    kind = native.encode_kind(codec)
    assert kind is not None
    src = pages(4, 30)
    level_arg: int = getattr(codec, "level")  # noqa: B009
    got = N.prepare_pages(b"".join(src), kind, level_arg, threshold, SAME, STORED, HUGE)
    assert len(got) == len(src)
    for page, (st, v, payload) in zip(src, got, strict=True):
        want = prepare_page(page, codec.compress, threshold)
        assert st == want[0]
        if st == SAME:
            assert (v, payload) == (want[1], None)
        elif st == HUGE:
            assert (v, payload) == (PAGE, page)
        else:
            assert payload is not None and v == len(payload) < threshold
            assert codec.decompress(payload, PAGE) == page


def same_fill_mix() -> list[bytes]:
    """Pages on both sides of the same-fill line: zero, same-filled with several words (period
    8, 4 and 1 bytes, high bits set), almost same-filled (only the last word differs, by its
    first or last byte; only the first byte differs; one middle byte differs), period 16, random."""
    words = [
        bytes(8),
        b"\xff" * 8,
        bytes(range(1, 9)),
        b"abcd" * 2,
        b"\x80" + bytes(7),
        b"\x11" * 8,
    ]
    out: list[bytes] = []
    for w in words:
        page = w * (PAGE // 8)
        out.append(page)
        for pos in (PAGE - 8, PAGE - 1, 0, PAGE // 2 + 3):
            bad = bytearray(page)
            bad[pos] ^= 1
            out.append(bytes(bad))
    out.append(bytes(range(16)) * (PAGE // 16))
    out.append(random.Random(5).randbytes(PAGE))
    return out


def test_same_fill_detectors_agree() -> None:
    """The C detector (inside prepare_pages) and the Python one (samefill.same_fill_word, used
    by the Python prepare path) classify every page alike and read the same fill word."""
    codec = get_codec("lz4")
    kind = native.encode_kind(codec)
    assert kind is not None
    src = same_fill_mix()
    buf = b"".join(src)
    got = N.prepare_pages(buf, kind, codec.level, 3633, SAME, STORED, HUGE)
    want = python_preparer(codec.compress, 3633)(buf)
    assert len(got) == len(want) == len(src)
    for i, (page, g, w) in enumerate(zip(src, got, want, strict=True)):
        word = same_fill_word(page)
        if word is None:
            assert g[0] != SAME and w[0] != SAME, i
        else:
            assert g == w == (SAME, word, None), i
    assert sum(g[0] == SAME for g in got) == 6


def lz4_length(block: bytes, ip: int, n: int) -> tuple[int, int]:
    """An lz4 length field of nibble ``n`` whose extension bytes start at ``ip``: (length,
    position after it)."""
    if n == 15:
        while True:
            n += block[ip]
            ip += 1
            if block[ip - 1] != 255:
                break
    return n, ip


def lz4_matches(block: bytes) -> list[tuple[int, int, int]]:
    """The matches of an lz4 block as (output position, offset, length)."""
    out, ip, op = [], 0, 0
    while ip < len(block):
        tok = block[ip]
        lit, ip = lz4_length(block, ip + 1, tok >> 4)
        ip += lit
        op += lit
        if ip >= len(block):
            break
        off = block[ip] | block[ip + 1] << 8
        ml, ip = lz4_length(block, ip + 2, tok & 15)
        out.append((op, off, ml + 4))
        op += ml + 4
    return out


def slow_run_matches(block: bytes, page: bytes) -> list[tuple[int, int, int]]:
    """Matches of offset 2..15 over a run of one byte: liblz4 decodes most of them with
    overlapping 8-byte copies where offset 1 would do the same in its memset path."""
    return [
        (op, off, n)
        for op, off, n in lz4_matches(block)
        if 2 <= off <= 15 and len(set(page[op - off : op])) == 1
    ]


@pytest.mark.parametrize(("kind", "level"), [(N.LZ4, 1), (N.LZ4, 9), (N.LZ4HC, 4)])
def test_lz4_runs_at_a_pages_end_decode_through_offset_one(kind: int, level: int) -> None:
    rnd = random.Random(11)
    for head, fill in [(1638, 0), (900, 0xFF), (3000, 0x20), (3500, 0)]:
        page = rnd.randbytes(head) + bytes([fill]) * (PAGE - head)
        plain = lz4.block.compress(page, store_size=False)
        assert slow_run_matches(plain, page), "liblz4 writes this run at a slow offset"
        [(state, size, block)] = N.prepare_pages(page, kind, level, 3633, SAME, STORED, HUGE)
        assert state == STORED and block is not None and size == len(block)
        assert lz4.block.decompress(block, uncompressed_size=PAGE) == page
        assert not slow_run_matches(block, page)
        assert any(off == 1 for _, off, _ in lz4_matches(block))
    # a run inside the page, not at its end, is left as the compressor wrote it
    page = rnd.randbytes(1600) + bytes(2000) + rnd.randbytes(PAGE - 3600)
    [(_, _, block)] = N.prepare_pages(page, N.LZ4, 1, 3633, SAME, STORED, HUGE)
    assert block == lz4.block.compress(page, store_size=False)


SEGMENT = hs.one_of(
    hs.binary(min_size=1, max_size=600),
    hs.tuples(hs.binary(min_size=1, max_size=8), hs.integers(1, 900)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    segments=hs.lists(SEGMENT, min_size=1, max_size=12),
    tail=hs.tuples(hs.integers(0, 255), hs.integers(0, 3000)),
    kind_level=hs.sampled_from([(N.LZ4, 1), (N.LZ4, 3), (N.LZ4HC, 4), (N.LZ4HC, 12)]),
)
def test_lz4_offsets_rewritten_decode_to_the_page(
    segments: list[bytes], tail: tuple[int, int], kind_level: tuple[int, int]
) -> None:
    """Pages of random bytes, runs and short periods (1..8 bytes), ending in a run or not: every
    stored block decodes to its page, whatever matches were given offset 1."""
    fill, n = tail
    body = b"".join(segments)[: PAGE - n]
    page = (body + bytes([fill]) * PAGE)[:PAGE]
    kind, level = kind_level
    [(state, size, block)] = N.prepare_pages(page, kind, level, PAGE + 1, SAME, STORED, HUGE)
    if state == STORED:
        assert block is not None and size == len(block)
        assert lz4.block.decompress(block, uncompressed_size=PAGE) == page
        if page[-64:] == page[-1:] * 64:
            assert not slow_run_matches(block, page)


def test_prepare_pages_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="whole number"):
        N.prepare_pages(bytes(PAGE + 1), 1, 1, 3633, SAME, STORED, HUGE)
    with pytest.raises(ValueError, match="kind"):
        N.prepare_pages(bytes(PAGE), 9, 1, 3633, SAME, STORED, HUGE)
    with pytest.raises(ValueError, match="threshold"):
        N.prepare_pages(bytes(PAGE), 1, 1, 0, SAME, STORED, HUGE)
    assert N.prepare_pages(b"", 1, 1, 3633, SAME, STORED, HUGE) == []


@pytest.fixture(params=[True, False], ids=["native", "python"])
def use_native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(native, "enabled", request.param)
    yield request.param


async def test_device_large_requests_match_a_model(use_native: bool) -> None:
    """Large unaligned writes and reads (the batched path), mixed codecs, against a bytearray
    (zstd and lz4hc writes of 256 pages or more go to the workers in two parts)."""
    rnd = random.Random(5)
    npages = 512
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(npages * PAGE, executor=ex, offload_min_pages=1024)
        model = bytearray(npages * PAGE)
        src = b"".join(pages(6, 300))
        algos = [("lz4", None), ("zstd", None), ("deflate", None), ("lz4hc", 3)]
        for step in range(60):
            if step % 15 == 0:
                algo, level = algos[(step // 15) % len(algos)]
                d.set_algorithm(algo, level=level)
            off = rnd.randrange(0, npages - 1) * PAGE + rnd.choice([0, 0, 512, 3584])
            n = min(rnd.randrange(32, 320) * PAGE + rnd.choice([0, 512, 1536]), len(model) - off)
            data = src[(step * 7) % 60 * PAGE :][:n]
            n = len(data)
            await d.write(off, data)
            model[off : off + n] = data
            roff = rnd.randrange(0, npages * PAGE - 64 * PAGE) & ~511
            rlen = rnd.randrange(32, 64) * PAGE + rnd.choice([0, 512])
            assert await d.read(roff, rlen) == model[roff : roff + rlen]
        assert await d.read(0, npages * PAGE) == model
        s = d.stats
        assert s.same_pages > 0 and s.huge_pages > 0 and s.compr_data_size > 0
        d.close()


async def test_device_corrupt_page_in_a_large_read_is_eio(use_native: bool) -> None:
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(512 * PAGE, executor=ex, offload_min_pages=1024)
        data = b"".join(pages(7, 100))
        await d.write(0, data)
        t = d.table
        idx = next(i for i in range(60, 100) if t.state_mv[i] == STORED)
        size = t.size_mv[idx]
        d.pool.free(t.handle_mv[idx])
        t.handle_mv[idx] = d.pool.store(b"\xff" * size)
        with pytest.raises(DeviceIOError):
            await d.read(0, 100 * PAGE)  # inline batch
        with pytest.raises(DeviceIOError):
            await d.read(0, 300 * PAGE)  # in the workers
        assert d.stats.failed_reads == 2
        assert await d.read(0, idx * PAGE) == data[: idx * PAGE]
        d.close()


def test_native_paths_are_what_the_server_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the server's devices are configured: reads of 1 MiB go to the workers, smaller
    multi-page reads and writes run their C batch inline; so do lz4 writes of 1 MiB, while
    zstd's go to the workers, in two parts."""
    calls = {"prepare": 0, "decompress": 0}
    mod = native.module()
    for name in calls:
        real = getattr(mod, f"{name}_pages")

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            calls[_name] += 1
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(mod, f"{name}_pages", counted)
    d = ZramDevice(512 * PAGE, offload_min_pages=1024)
    assert native.enabled
    data = b"".join(pages(8, 256))
    assert d.write_now(0, data)  # inline
    assert calls["prepare"] == 1
    got = d.read_now(0, 64 * PAGE)
    assert got is not None and got[0] == data[: 64 * PAGE]
    assert calls["decompress"] == 1
    assert d.read_now(0, 256 * PAGE) is None  # must be awaited: it goes to the workers
    assert d.read_now(0, 4 * PAGE) is not None and calls["decompress"] == 1  # few pages: Python
    d.set_algorithm("zstd")
    assert not d.write_now(0, data)  # must be awaited: zstd compresses in the workers
    assert calls["prepare"] == 1
    small = data[: 255 * PAGE]
    assert d.write_now(PAGE, small) and calls["prepare"] == 2  # below 1 MiB: inline

    async def offloaded() -> None:
        with ThreadPoolExecutor(2) as ex:
            z = ZramDevice(512 * PAGE, executor=ex, offload_min_pages=1024, algorithm="zstd")
            await z.write(0, data)
            assert calls["prepare"] == 4  # two parts
            assert await z.read(0, len(data)) == data
            z.close()

    asyncio.run(offloaded())
    d.close()


@pytest.mark.parametrize(("algo", "level"), [("lz4", None), ("lz4hc", 4), ("zstd", 3)])
def test_prepare_pages_at_a_pages_own_compressed_size(algo: str, level: int | None) -> None:
    """The threshold is the first compressed size stored raw: a page whose compressed length L
    equals it is HUGE, with the threshold at L + 1 it is STORED, in C as in Python (each with its
    own L: the C batch links the system's liblz4, whose output may differ from python-lz4's)."""
    codec = get_codec(algo, level=level)
    kind = native.encode_kind(codec)
    assert kind is not None
    level_arg: int = getattr(codec, "level")  # noqa: B009
    checked = 0
    for page in pages(9, 24):
        st, size, _payload = N.prepare_pages(page, kind, level_arg, PAGE + 1, SAME, STORED, HUGE)[0]
        if st != STORED:
            continue
        assert N.prepare_pages(page, kind, level_arg, size, SAME, STORED, HUGE)[0][0] == HUGE
        got = N.prepare_pages(page, kind, level_arg, size + 1, SAME, STORED, HUGE)[0]
        assert got[:2] == (STORED, size)
        assert codec.decompress(got[2], PAGE) == page
        py_size = len(codec.compress(page))
        assert prepare_page(page, codec.compress, py_size)[0] == HUGE
        assert prepare_page(page, codec.compress, py_size + 1)[:2] == (STORED, py_size)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("n", [16, 512], ids=["inline", "workers"])
async def test_native_read_of_pages_from_two_codecs(use_native: bool, n: int) -> None:
    """A read whose pages are all compressed, but half with lz4 and half with zstd, decodes each
    page with its own codec: inline (16 pages) and in the workers (256+ pages)."""
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(1024 * PAGE, executor=ex, offload_min_pages=1024)
        lz4 = get_codec("lz4")
        src = [p for p in pages(10, 60) if p[8:] != p[:-8] and len(lz4.compress(p)) < 3000]
        data = b"".join((src * (n // len(src) + 1))[:n])
        half = n // 2 * PAGE
        await d.write(0, data[:half])
        d.set_algorithm("zstd")
        await d.write(half, data[half:])
        t = d.table
        assert all(t.state_mv[i] == STORED for i in range(n))
        assert (t.codec_mv[0], t.codec_mv[n - 1]) == (0, 1)
        assert d.read_sync(0, n * PAGE) == data
        assert await d.read(0, n * PAGE) == data
        d.close()


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
async def test_packed_read_of_pages_mixed_with_huge_and_zero_pages(
    algo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MiB read whose compressed pages (one native codec) sit among huge pages and pages
    that read as zero (never written, trimmed, same-filled with zeros) is one packed batch:
    the same bytes and the same zero pages as the Python walk, with the native path off. A
    same-filled page of another word, or a second codec, sends it back to the walk."""
    calls: list[str] = []
    for name in ("decompress_packed", "decompress_pages"):
        real = getattr(N, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(N, name, counted)
    kinds = [p for p in pages(11, 24) if p[8:] != p[:-8]]  # compressible, half-zero, random
    with ThreadPoolExecutor(2) as ex:
        d = ZramDevice(1024 * PAGE, executor=ex, offload_min_pages=1024, algorithm=algo)
        data = bytearray(b"".join((kinds * 32)[:256]))
        assert len(data) == 256 * PAGE
        data[40 * PAGE : 48 * PAGE] = bytes(8 * PAGE)  # written as zeros: SAME with word 0
        data[200 * PAGE : 256 * PAGE] = bytes(56 * PAGE)
        await d.write(0, bytes(data[: 200 * PAGE]))  # pages 200..255 never written: EMPTY
        await d.write(40 * PAGE, bytes(8 * PAGE))
        await d.trim(100 * PAGE, 3 * PAGE)
        data[100 * PAGE : 103 * PAGE] = bytes(3 * PAGE)
        t = d.table
        states = bytes(t.state_mv[0:256])
        assert {STORED, HUGE, SAME}.issubset(states) and 0 in states

        async def both(off: int, length: int) -> tuple[object, object]:
            calls.clear()
            native_got = await d.read_with_zeros(off, length)
            monkeypatch.setattr(native, "enabled", False)
            try:
                python_got = await d.read_with_zeros(off, length)
            finally:
                monkeypatch.setattr(native, "enabled", True)
            return native_got, python_got

        got, want = await both(0, 256 * PAGE)
        assert got == want and bytes(got[0]) == bytes(data)
        assert calls == ["decompress_packed"] * len(calls) and calls
        got, want = await both(3 * PAGE + 512, 250 * PAGE)  # unaligned, zero runs cut
        assert got == want and bytes(got[0]) == bytes(data[3 * PAGE + 512 :][: 250 * PAGE])
        assert calls and set(calls) == {"decompress_packed"}
        raw = [p for p in kinds if len(get_codec(algo).compress(p)) >= PAGE][:1] * 6
        await d.write(300 * PAGE, b"".join(raw))  # huge pages among zeros: nothing decodes
        got, want = await both(290 * PAGE, 256 * PAGE)
        expect = bytes(10 * PAGE) + b"".join(raw) + bytes(240 * PAGE)
        assert got == want and bytes(got[0]) == expect
        assert calls and set(calls) == {"decompress_packed"}
        d.set_algorithm("zstd" if algo == "lz4" else "lz4")
        text = next(p for p in kinds if len(get_codec("lz4").compress(p)) < PAGE // 2)
        await d.write(60 * PAGE, text)  # a page of a second codec: the walk
        data[60 * PAGE : 61 * PAGE] = text
        got, want = await both(0, 256 * PAGE)
        assert got == want and bytes(got[0]) == bytes(data)
        assert calls and "decompress_packed" not in calls
        await d.write(60 * PAGE, bytes(PAGE))
        data[60 * PAGE : 61 * PAGE] = bytes(PAGE)
        got, want = await both(0, 256 * PAGE)
        assert got == want and set(calls) == {"decompress_packed"}
        await d.write(50 * PAGE, b"\x07" * PAGE)  # same-filled, not zero: the walk
        data[50 * PAGE : 51 * PAGE] = b"\x07" * PAGE
        got, want = await both(0, 256 * PAGE)
        assert got == want and bytes(got[0]) == bytes(data)
        assert "decompress_packed" not in calls
        d.close()


@pytest.mark.parametrize("algo", ["zstd", "lz4"])
def test_decode_group_matches_the_codec(algo: str) -> None:
    codec = get_codec(algo)
    kind = native.decode_kind(codec)
    assert kind is not None
    for n in (1, 2, 7, 16):
        data = b"".join(pages(n, n))
        blob = codec.compress(data)
        assert N.decode_group(blob, kind, len(data)) == codec.decompress(blob, len(data))
        assert N.decode_group(bytearray(blob), kind, len(data)) == data
        out = bytearray(len(data))
        assert N.decode_groups_into(out, [(0, len(data), kind, memoryview(blob))]) == -1
        assert out == data


def test_decode_groups_into_places_each_group_and_names_the_first_bad_one() -> None:
    lz4, zstd = get_codec("lz4"), get_codec("zstd")
    groups = [b"".join(pages(n, n + 1)) for n in (3, 16, 1, 5)]
    blobs = [(zstd if k % 2 else lz4).compress(g) for k, g in enumerate(groups)]
    kinds = [N.ZSTD if k % 2 else N.LZ4 for k in range(4)]
    offs = [PAGE, 5 * PAGE + 64, 23 * PAGE, 26 * PAGE]  # any offsets, the gaps left alone
    size = 40 * PAGE
    out = bytearray(b"\xee" * size)
    jobs = [(o, len(g), k, b) for o, g, k, b in zip(offs, groups, kinds, blobs, strict=True)]
    assert N.decode_groups_into(out, jobs) == -1
    want = bytearray(b"\xee" * size)
    for o, g in zip(offs, groups, strict=True):
        want[o : o + len(g)] = g
    assert out == want
    assert N.decode_groups_into(bytearray(size), []) == -1
    bad = list(jobs)
    bad[2] = (offs[2], len(groups[2]), N.LZ4, blobs[2][:-3])  # truncated
    out = bytearray(size)
    assert N.decode_groups_into(out, bad) == 2
    assert out[offs[1] : offs[1] + len(groups[1])] == groups[1]  # the jobs before it are done
    assert not any(out[offs[3] :])  # the jobs after it are not run
    for k, b in ((N.ZSTD, b""), (N.LZ4, bytes(200))):  # empty, garbage
        assert N.decode_groups_into(bytearray(PAGE), [(0, PAGE, k, b)]) == 0
    short = (0, len(groups[1]) - PAGE, N.ZSTD, blobs[1])  # decodes to more than its size
    assert N.decode_groups_into(bytearray(size), [short]) == 0
    long = (0, len(groups[1]) + PAGE, N.ZSTD, blobs[1])  # decodes to less
    assert N.decode_groups_into(bytearray(size), [long]) == 0


def test_decode_group_of_a_bad_blob_is_none() -> None:
    codec = get_codec("zstd")
    data = b"".join(pages(3, 16))
    blob = codec.compress(data)
    assert N.decode_group(blob[:-5], N.ZSTD, len(data)) is None  # truncated
    assert N.decode_group(blob[:100] + bytes(len(blob) - 100), N.ZSTD, len(data)) is None
    assert N.decode_group(blob, N.ZSTD, len(data) - PAGE) is None  # decodes to more
    assert N.decode_group(blob, N.ZSTD, len(data) + PAGE) is None  # decodes to less
    assert N.decode_group(b"", N.ZSTD, len(data)) is None
    assert N.decode_group(bytes(200), N.LZ4, len(data)) is None


def test_decode_group_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        N.decode_group(b"x", 0, PAGE)
    with pytest.raises(ValueError):
        N.decode_group(b"x", N.ZSTD, 0)
    with pytest.raises(TypeError):
        N.decode_group("x", N.ZSTD, PAGE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        N.decode_group([b"x"], N.ZSTD, PAGE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # the destination must be writable
        N.decode_groups_into(b"y" * PAGE, [(0, PAGE, N.ZSTD, b"x")])  # type: ignore[arg-type]
    dst = bytearray(2 * PAGE)
    for job in (
        (0, PAGE, 0, b"x"),  # unknown kind
        (0, PAGE, N.LZ4HC, b"x"),  # an encoder's kind: its blobs decode as lz4
        (-1, PAGE, N.LZ4, b"x"),
        (PAGE + 1, PAGE, N.LZ4, b"x"),  # past the end
        (0, 0, N.LZ4, b"x"),
    ):
        with pytest.raises(ValueError):
            N.decode_groups_into(dst, [(0, PAGE, N.LZ4, b"ok"), job])
    for jobs in ([(0, PAGE, N.LZ4)], [(0, PAGE, N.LZ4, "x")], [b"x"]):
        with pytest.raises(TypeError):
            N.decode_groups_into(dst, jobs)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        N.decode_groups_into(dst, ((0, PAGE, N.LZ4, b"x"),))  # type: ignore[arg-type]


def test_copy_objects_scatters_and_checks_every_range_first() -> None:
    import numpy as np

    dst = bytearray(64)
    src = bytes(range(32))

    def arr(*v: int) -> np.ndarray:
        return np.array(v, dtype=np.int64)

    other = bytearray(8)
    N.copy_objects(
        [(dst, arr(0, 40), src, arr(4, 20), arr(3, 5)), (other, arr(6), src, arr(0), arr(2))]
    )
    assert dst[:3] == src[4:7] and dst[40:45] == src[20:25] and other[6:] == src[:2]
    assert dst[3:40] == bytes(37)
    N.copy_objects([])
    good = (dst, arr(50), src, arr(0), arr(4))
    for bad in ((arr(62), arr(0), arr(3)), (arr(0), arr(30), arr(3)), (arr(-1), arr(0), arr(1))):
        before = bytes(dst)
        with pytest.raises(ValueError, match="out of range"):  # a later copy: none is done
            N.copy_objects([good, (dst, bad[0], src, bad[1], bad[2])])
        assert bytes(dst) == before
    with pytest.raises(ValueError, match="different lengths"):
        N.copy_objects([good, (dst, arr(0, 1), src, arr(0), arr(1))])
    with pytest.raises(TypeError):
        N.copy_objects([good, (src, arr(0), src, arr(0), arr(1))])  # bytes are not writable
    assert bytes(dst[50:54]) == bytes(4)
