"""Micro-benchmark of the device's sync hot path: ``python -m zramd.bench_micro [algo]``.

Theory of operation
-------------------
Measures microseconds per operation for 4 KiB writes/reads (zero, compressible about 2.5:1,
incompressible pages) and 1 MiB writes/reads through ``ZramDevice.write_sync``/``read_sync``,
next to the bare codec cost, so the device's own overhead per page is visible. Overwrites cycle
over a fixed set of slots so the pool stays at a steady size. Not used by the server.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from zramd.compress import get_codec
from zramd.device.blockdev import ZramDevice

PAGE = 4096
#: distinct slots the 4 KiB benchmarks cycle over
SLOTS = 1024
#: target compression ratio of the "compressible" pages
TARGET_RATIO = 2.5
#: vocabulary size of the compressible pages (tuned for TARGET_RATIO with lz4)
VOCAB = 8
#: probability of a vocabulary word (else 3 random bytes)
WORD_PROB = 0.93


def compressible_page(seed: int) -> bytes:
    """Words drawn from a small random vocabulary: lz4 lands near TARGET_RATIO (about 2.5:1)."""
    rnd = random.Random(seed)
    vocab = [rnd.randbytes(rnd.randint(2, 10)) for _ in range(VOCAB)]
    out = bytearray()
    while len(out) < PAGE:
        out += rnd.choice(vocab) if rnd.random() < WORD_PROB else rnd.randbytes(3)
    return bytes(out[:PAGE])


def _time(fn: Callable[[int], object], n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def run(algo: str = "lz4") -> dict[str, float]:
    codec = get_codec(algo)
    dev = ZramDevice(SLOTS * PAGE * 4, algorithm=algo)
    pages = {
        "zero": [bytes(PAGE)] * SLOTS,
        "compressible": [compressible_page(i) for i in range(SLOTS)],
        "incompressible": [os.urandom(PAGE) for _ in range(SLOTS)],
    }
    out: dict[str, float] = {}
    n = 20000
    for kind, ps in pages.items():
        blobs = [codec.compress(p) for p in ps]
        ratio = PAGE / max(1, min(PAGE, len(blobs[1])))

        def c_compress(i: int, ps: list[bytes] = ps) -> object:
            return codec.compress(ps[i % SLOTS])

        def d_write(i: int, ps: list[bytes] = ps) -> None:
            dev.write_sync((i % SLOTS) * PAGE, ps[i % SLOTS])

        def c_decompress(i: int, blobs: list[bytes] = blobs) -> object:
            return codec.decompress(blobs[i % SLOTS], PAGE)

        out[f"codec.compress {kind}"] = _time(c_compress, n)
        out[f"write 4K {kind}"] = _time(d_write, n)
        out[f"codec.decompress {kind}"] = _time(c_decompress, n)
        out[f"read 4K {kind}"] = _time(lambda i: dev.read_sync((i % SLOTS) * PAGE, PAGE), n)
        out[f"ratio {kind}"] = ratio
    big = b"".join(pages["compressible"][:256])
    out["write 1M compressible"] = _time(lambda i: dev.write_sync((i % 4) << 20, big), 200)
    out["read 1M compressible"] = _time(lambda i: dev.read_sync((i % 4) << 20, 1 << 20), 200)
    out["write 512B unaligned"] = _time(
        lambda i: dev.write_sync((i % SLOTS) * PAGE + 512, big[:512]), n // 4
    )
    dev.close()
    return out


async def _async_run(algo: str) -> dict[str, float]:
    """The async API as the server drives it: one request at a time, then 8 in flight."""
    out: dict[str, float] = {}
    pages = [compressible_page(i) for i in range(SLOTS)]
    big = b"".join(pages[:256])
    with ThreadPoolExecutor(2) as ex:
        dev = ZramDevice(SLOTS * PAGE * 4, algorithm=algo, executor=ex)
        n = 10000
        t0 = time.perf_counter()
        for i in range(n):
            await dev.write((i % SLOTS) * PAGE, pages[i % SLOTS])
        out["async write 4K compressible"] = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for i in range(n):
            await dev.read((i % SLOTS) * PAGE, PAGE)
        out["async read 4K compressible"] = (time.perf_counter() - t0) / n * 1e6
        m = 100
        t0 = time.perf_counter()
        for i in range(m):
            await dev.write((i % 4) << 20, big)
        out["async write 1M (offloaded)"] = (time.perf_counter() - t0) / m * 1e6
        t0 = time.perf_counter()
        for _ in range(0, m, 4):
            await asyncio.gather(*(dev.write(k << 20, big) for k in range(4)))
        out["async write 1M, 4 in flight, per req"] = (time.perf_counter() - t0) / m * 1e6
        t0 = time.perf_counter()
        for i in range(m):
            await dev.read((i % 4) << 20, 1 << 20)
        out["async read 1M (offloaded)"] = (time.perf_counter() - t0) / m * 1e6
        dev.close()
    return out


def main() -> None:
    algo = sys.argv[1] if len(sys.argv) > 1 else "lz4"
    results = run(algo)
    results.update(asyncio.run(_async_run(algo)))
    for k, v in results.items():
        unit = "" if k.startswith("ratio") else " us"
        print(f"{algo:8s} {k:38s} {v:8.2f}{unit}")


if __name__ == "__main__":
    main()
