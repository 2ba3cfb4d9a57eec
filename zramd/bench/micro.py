"""Microbenchmarks of zramd's hot parts, in-process (``python -m zramd.bench micro``).

Theory of operation
-------------------
Each case times a tight loop over a prepared set of pages (best of ``ROUNDS`` rounds, so a noisy
neighbour on a shared machine inflates figures less) and reports ns per operation and, for
page-sized operations, MB/s. zramd's modules are imported lazily, one case at a time (``--only``
runs a few without loading the rest); the C batch cases are reported as skipped when the optional
accelerator is not built. A regression in the fio figures can then be located here:
same-fill check, codec per page, allocator store/free, page-table update, device write/read,
protocol parse + reply per request.

Pages: ``comp`` pages are 40% random bytes and 60% zeros (about 2.5:1, like fio's
``buffer_compress_percentage=60``), ``zero`` pages are zero, ``rand`` pages are incompressible.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Any

from zramd.geometry import PAGE_SIZE as PAGE

#: pages in each prepared working set
NPAGES = 256
#: rounds per case; the best round is kept
ROUNDS = 5
#: a round lasts at least this long (the loop is repeated over the working set)
MIN_ROUND_S = 0.05
#: random share of a "comp" page
COMP_RANDOM_BYTES = int(PAGE * 0.4)


def make_pages(kind: str, n: int = NPAGES, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    if kind == "zero":
        return [bytes(PAGE)] * n
    if kind == "rand":
        return [rng.randbytes(PAGE) for _ in range(n)]
    if kind == "comp":
        pad = bytes(PAGE - COMP_RANDOM_BYTES)
        return [rng.randbytes(COMP_RANDOM_BYTES) + pad for _ in range(n)]
    raise ValueError(kind)


def time_loop(fn: Callable[[Any], object], items: list[Any]) -> float:
    """Best ns per call of ``fn(item)`` over ``items``."""
    best = float("inf")
    for _ in range(ROUNDS):
        calls = 0
        t0 = time.perf_counter_ns()
        while True:
            for it in items:
                fn(it)
            calls += len(items)
            el = time.perf_counter_ns() - t0
            if el >= MIN_ROUND_S * 1e9:
                break
        best = min(best, el / calls)
    return best


def _row(name: str, ns: float, nbytes: int = PAGE, note: str = "") -> dict[str, Any]:
    return {
        "case": name,
        "ns_per_op": ns,
        "mbps": (nbytes / ns * 1e3) if nbytes else None,
        "note": note,
    }


def bench_samefill() -> list[dict[str, Any]]:
    from zramd.device.samefill import same_fill_word as check

    src = "zramd.device.samefill.same_fill_word"
    rows = []
    for kind in ("zero", "comp", "rand"):
        ns = time_loop(check, make_pages(kind))
        rows.append(_row(f"same-fill check, {kind} page", ns, note=src))
    return rows


def bench_codecs() -> list[dict[str, Any]]:
    from zramd.compress import get_codec

    rows = []
    pages = make_pages("comp")
    for name in ("lz4", "zstd"):
        codec = get_codec(name)
        blobs = [codec.compress(p) for p in pages]
        ratio = len(pages) * PAGE / sum(len(b) for b in blobs)
        note = f"{codec.params}, ratio {ratio:.2f}:1"
        ns = time_loop(codec.compress, pages)
        rows.append(_row(f"{name} compress, comp page", ns, note=note))
        decompress = codec.decompress

        def dec(b: bytes, decompress: Callable[[bytes, int], bytes] = decompress) -> bytes:
            return decompress(b, PAGE)

        rows.append(_row(f"{name} decompress, comp page", time_loop(dec, blobs), note=note))
    rows += _bench_native_batches(pages)
    return rows


def _bench_native_batches(pages: list[bytes]) -> list[dict[str, Any]]:
    """The C batch loops (zramd._native) per page, on a whole working set per call."""
    from zramd.compress import get_codec, native

    if not native.BUILT:
        return [{"case": "native batches", "ns_per_op": None, "mbps": None,
                 "note": "skipped: zramd._native is not built"}]  # fmt: skip
    mod = native.module()
    n = len(pages)
    src = b"".join(pages)
    dst = mod.new_buffer(n * PAGE)
    rows = []
    for name in ("lz4", "zstd"):
        codec = get_codec(name)
        kind = native.decode_kind(codec)
        assert kind is not None
        blobs = [codec.compress(p) for p in pages]

        def decode(b: list[bytes], k: int = kind) -> int:
            return mod.decompress_pages(dst, b, k)

        ns = time_loop(decode, [blobs]) / n
        rows.append(_row(f"native {name} decompress_pages, comp page", ns, note=f"{n} per call"))
    ns = time_loop(lambda s: mod.prepare_pages(s, 1, 1, 3633, 1, 2, 3), [src]) / n
    rows.append(_row("native lz4 prepare_pages, comp page", ns, note=f"{n} per call"))
    return rows


def bench_allocator() -> list[dict[str, Any]]:
    from zramd.allocator.pool import Pool
    from zramd.compress import get_codec

    lz4 = get_codec("lz4")
    blobs = [lz4.compress(p) for p in make_pages("comp")]
    size = sum(len(b) for b in blobs) // len(blobs)
    rows = []
    with Pool() as pool:
        # steady state: a resident population, then store+free pairs
        resident = [pool.store(b) for b in blobs * 16]

        def store_free(b: bytes) -> None:
            pool.free(pool.store(b))

        ns = time_loop(store_free, blobs)
        rows.append(_row("pool store+free", ns, size, f"~{size} B objects"))
        handles = resident[: len(blobs)]
        rows.append(_row("pool load", time_loop(lambda h: pool.load(h, size), handles), size, ""))
        for h in resident:
            pool.free(h)
    return rows


def bench_table() -> list[dict[str, Any]]:
    from zramd.device.table import STORED, PageTable

    npages = 1 << 16
    t = PageTable(npages)
    idx = list(range(0, npages, 97))
    state, handle, sz = t.state_mv, t.handle_mv, t.size_mv

    def update(i: int) -> None:
        state[i] = STORED
        handle[i] = i + 1
        sz[i] = 1600

    return [_row("table entry update (3 fields)", time_loop(update, idx), 0, "memoryview scalars")]


def bench_device() -> list[dict[str, Any]]:
    from zramd.device.blockdev import ZramDevice

    rows = []
    dev_pages = 1 << 14  # 64 MiB
    rng = random.Random(7)
    offsets = [rng.randrange(dev_pages) * PAGE for _ in range(NPAGES)]
    for algo in ("lz4", "zstd"):
        rows.extend(_bench_one_device(ZramDevice(dev_pages * PAGE, algorithm=algo), algo, offsets))
    return rows


def _bench_one_device(dev: Any, algo: str, offsets: list[int]) -> list[dict[str, Any]]:
    rows = []
    dev_pages = dev.size // PAGE

    def write(p: tuple[int, bytes]) -> None:
        dev.write_sync(p[0], p[1])

    def read(off: int) -> None:
        dev.read_sync(off, PAGE)

    try:
        for kind in ("comp", "zero"):
            pages = make_pages(kind)
            pairs = list(zip(offsets, pages, strict=True))
            for off in range(0, dev_pages * PAGE, 64 * PAGE):  # steady state: device full
                dev.write_sync(off, pages[0] * 64)
            rows.append(_row(f"device {algo} write_sync 4K, {kind}", time_loop(write, pairs)))
            rows.append(_row(f"device {algo} read_sync 4K, {kind}", time_loop(read, offsets)))
    finally:
        close = getattr(dev, "close", None)
        if close is not None:
            close()
    return rows


def bench_dispatch() -> list[dict[str, Any]]:
    """One request through the server's fast path (``Dispatcher.run_now``: validation, the
    device's synchronous door, the reply description), on an lz4 device."""
    from zramd.config import ExportConfig
    from zramd.protocol.events import Request
    from zramd.protocol.wire import CMD_READ, CMD_WRITE
    from zramd.server.dispatch import Dispatcher
    from zramd.server.exports import Export, make_device

    dev_pages = 1 << 14
    cfg = ExportConfig("bench", dev_pages * PAGE)
    exp = Export(cfg, make_device(cfg))
    d = Dispatcher(exp, structured=True, max_payload=1 << 25)
    rng = random.Random(7)
    pages = make_pages("comp")
    writes = [
        Request(CMD_WRITE, 0, i, rng.randrange(dev_pages) * PAGE, PAGE, p)
        for i, p in enumerate(pages)
    ]
    reads = [Request(CMD_READ, 0, r.cookie, r.offset, PAGE, None) for r in writes]
    try:
        for w in writes:
            d.run_now(w)
        return [
            _row("dispatch run_now WRITE 4K, comp", time_loop(d.run_now, writes)),
            _row("dispatch run_now READ 4K, comp", time_loop(d.run_now, reads)),
        ]
    finally:
        exp.device.close()


def bench_protocol() -> list[dict[str, Any]]:
    """The sans-I/O core per request: parse a header (and payload), encode the reply."""
    import struct

    from zramd.protocol import NEED_DATA, ExportInfo, HandshakeComplete, ServerConnection

    disk = ExportInfo("disk", 1 << 30)

    class Catalog:
        def lookup(self, name: str) -> ExportInfo | None:
            return disk

        def list_exports(self) -> list[ExportInfo]:
            return [disk]

    page = bytes(PAGE)

    def connected(structured: bool) -> ServerConnection:
        conn = ServerConnection(Catalog())
        hs = struct.pack(">I", 3)
        if structured:
            hs += b"IHAVEOPT" + struct.pack(">II", 8, 0)
        hs += b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0)
        conn.receive_data(hs)
        assert isinstance(conn.next_event(), HandshakeComplete)
        conn.data_to_send()
        return conn

    def hdr(cmd: int, i: int) -> bytes:
        return struct.pack(">IHHQQI", 0x25609513, 0, cmd, i, i * PAGE, PAGE)

    def case(
        name: str, structured: bool, chunks: list[bytes], per_req: int, read: bool
    ) -> dict[str, Any]:
        conn = connected(structured)
        rd, ne = conn.receive_data, conn.next_event

        def feed(ch: bytes) -> None:
            rd(ch)
            while (ev := ne()) is not NEED_DATA:
                if read:
                    conn.reply_read(ev.cookie, ev.offset, page)  # type: ignore[union-attr]
                else:
                    conn.reply_ok(ev.cookie)  # type: ignore[union-attr]
            conn.data_to_send()

        return _row(name, time_loop(feed, chunks) * per_req, note="zramd.protocol.ServerConnection")

    reads = [hdr(0, i) for i in range(NPAGES)]
    writes = [hdr(1, i) + page for i in range(NPAGES)]
    split = [x for i in range(NPAGES) for x in (hdr(1, i), page)]
    return [
        case("protocol READ 4K + simple reply", False, reads, 1, True),
        case("protocol READ 4K + structured reply", True, reads, 1, True),
        case("protocol WRITE 4K one chunk + ok", False, writes, 1, False),
        case("protocol WRITE 4K header/payload split + ok", False, split, 2, False),
    ]


# --- backing store -------------------------------------------------------------------------

#: objects per batch of the 1 MiB cases
BACKING_BATCH = 256
#: the cleaning simulation: objects written, the share freed at random, the object sizes
CLEAN_SIM_OBJECTS = 20000
CLEAN_SIM_FREED = 0.5
CLEAN_SIM_SIZES = (600, 3600)
CLEAN_SIM_THRESHOLDS = (0.5, 0.75, 0.9)


def bench_backing() -> list[dict[str, Any]]:
    """The backing store on a file in TMPDIR (on this machine /tmp is ext4 on the virtio disk;
    the objects stay in the page cache, so these figures are the store's own cost per object:
    syscalls, CRCs, the space map, the thread hop; the disk comes on top). 4 KiB objects one at
    a time and 1 MiB batches of 256, sync and through the async API (on uvloop, as the server),
    and a cleaning simulation
    (half of the objects freed at random, then cleaned): bytes moved per byte won and space held
    per live byte, before and after."""
    import tempfile

    from zramd.backing import BackingStore

    rows: list[dict[str, Any]] = []
    obj = random.Random(3).randbytes(PAGE)
    batch = [obj] * BACKING_BATCH
    with tempfile.TemporaryDirectory(prefix="zramd-bench-backing-") as d:
        s = BackingStore.create(os.path.join(d, "b.img"))
        try:
            rows.append(_row("backing write+free 4 KiB (sync)",
                             time_loop(lambda o: s.free_sync(s.write_many_sync([o])), [obj] * 64),
                             PAGE, "one object per call; emptied segments punched"))
            rows.append(_row("backing write+free 1 MiB batch (sync)",
                             time_loop(lambda b: s.free_sync(s.write_many_sync(b)), [batch] * 4),
                             PAGE * BACKING_BATCH, "256 x 4 KiB, one pwritev"))
            locs = s.write_many_sync(batch)
            rows.append(_row("backing read 4 KiB (sync)",
                             time_loop(s.read_sync, locs), PAGE, "pread + CRC-32 check"))
            rows.append(_row("backing read 1 MiB batch (sync)",
                             time_loop(s.read_many_sync, [locs] * 4), PAGE * BACKING_BATCH,
                             "256 adjacent objects, one pread"))
            import uvloop  # the server's loop (server.listener.install_uvloop)

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                rows.extend(runner.run(_bench_backing_async(s, obj, batch, locs)))
        finally:
            s.close()
        rows.extend(_bench_backing_cleaning(os.path.join(d, "c.img")))
    return rows


async def _bench_backing_async(
    s: Any, obj: bytes, batch: list[bytes], locs: list[int]
) -> list[dict[str, Any]]:
    async def timed(fn: Callable[[], Any], n: int) -> float:
        best = float("inf")
        for _ in range(ROUNDS):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                await fn()
            best = min(best, (time.perf_counter_ns() - t0) / n)
        return best

    async def wf1() -> None:
        await s.free(await s.write_many([obj]))

    async def wfb() -> None:
        await s.free(await s.write_many(batch))

    async def r16() -> None:
        await asyncio.gather(*(s.read(loc) for loc in locs[:16]))

    return [
        _row("backing write+free 4 KiB (async)", await timed(wf1, 500), PAGE,
             "one object per call, thread hop included"),
        _row("backing write+free 1 MiB batch (async)", await timed(wfb, 20),
             PAGE * BACKING_BATCH, ""),
        _row("backing read 4 KiB (async)", await timed(lambda: s.read(locs[0]), 500), PAGE,
             "one at a time, thread hop included"),
        _row("backing read 4 KiB x16 concurrent (async)", await timed(r16, 50) / 16, PAGE,
             "16 reads in flight, per read"),
        _row("backing read 1 MiB batch (async)", await timed(lambda: s.read_many(locs), 20),
             PAGE * BACKING_BATCH, ""),
    ]


def _bench_backing_cleaning(path: str) -> list[dict[str, Any]]:
    """The same random half of the same objects freed, then cleaned to the end at each
    threshold: space held per live byte before and after, bytes moved per byte won."""
    from zramd.backing import BackingStore

    rows = []
    lo, hi = CLEAN_SIM_SIZES
    for threshold in CLEAN_SIM_THRESHOLDS:
        rng = random.Random(5)
        data = [rng.randbytes(rng.randint(lo, hi)) for _ in range(CLEAN_SIM_OBJECTS)]
        s = BackingStore.create(path)
        try:
            locs = []
            for k in range(0, len(data), BACKING_BATCH):
                locs += s.write_many_sync(data[k : k + BACKING_BATCH])
            live = dict(zip(locs, data, strict=True))
            gone = [x for x in locs if rng.random() < CLEAN_SIM_FREED]
            s.free_sync(gone)
            for x in gone:
                del live[x]
            payload = sum(map(len, live.values()))
            held_before = s.used_bytes()
            t0 = time.perf_counter_ns()
            moved = 0
            while True:
                got = s.clean_sync(max_segments=8, threshold=threshold)
                if not got.segments:
                    break
                moved += sum(len(live[o]) for o, _ in got.relocations)
                for o, n in got.relocations:
                    live[n] = live.pop(o)
                s.free_sync([o for o, _ in got.relocations])
            el = time.perf_counter_ns() - t0
            held_after = s.used_bytes()
        finally:
            s.close()
        won = held_before - held_after
        note = (f"threshold {threshold}: space/live {held_before / payload:.2f} -> "
                f"{held_after / payload:.2f} (4 KiB blocks: {len(live) * PAGE / payload:.2f}); "
                f"moved {moved / max(won, 1):.2f} B per B won")
        rows.append(_row(f"backing cleaning at {threshold} (per 4 KiB moved)",
                         el / max(moved, 1) * PAGE, PAGE, note))
    return rows


def bench_groups() -> list[dict[str, Any]]:
    """Reads of grouped pages (zstd groups of 16 pages) beside per-page ones, on a 64 MiB
    device: a 4 KiB read whose group is cached (decoded) and one whose group is not (a random
    page: it decodes its whole 64 KiB group), and sequential 1 MiB reads."""
    import numpy as np

    from zramd.device.blockdev import ZramDevice
    from zramd.device.table import IDLE

    dev_pages = 1 << 14
    pages = make_pages("comp")
    rng = random.Random(7)
    rand = [rng.randrange(dev_pages) * PAGE for _ in range(NPAGES)]
    hit = [rng.randrange(16) * PAGE for _ in range(NPAGES)]  # the pages of one group
    seq = list(range(0, dev_pages * PAGE, 1 << 20))
    rows = []
    for grouped in (False, True):
        dev = ZramDevice(dev_pages * PAGE, algorithm="zstd")
        try:
            for off in range(0, dev_pages * PAGE, 64 * PAGE):
                p0 = off // PAGE
                dev.write_sync(off, b"".join(pages[(p0 + i) % NPAGES] for i in range(64)))
            if grouped:
                dev.table.flags[:] |= np.uint8(IDLE)
                dev.group_sync(0, dev_pages - 1, group_pages=16)
            rows.extend(_bench_group_reads(dev, grouped, hit, rand, seq))
        finally:
            dev.close()
    return rows


def _bench_group_reads(
    dev: Any, grouped: bool, hit: list[int], rand: list[int], seq: list[int]
) -> list[dict[str, Any]]:
    def read4k(off: int) -> None:
        dev.read_sync(off, PAGE)

    def read1m(off: int) -> None:
        dev.read_sync(off, 1 << 20)

    label = "grouped" if grouped else "per page"
    rows = []
    if grouped:
        rows.append(_row("groups read_sync 4K, group cached", time_loop(read4k, hit)))
    rows.append(_row(f"groups read_sync 4K random, {label}", time_loop(read4k, rand),
                     note="group not cached" if grouped else ""))
    rows.append(_row(f"groups read_sync 1M sequential, {label}", time_loop(read1m, seq), 1 << 20))
    return rows


CASES: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
    ("samefill", bench_samefill),
    ("codec", bench_codecs),
    ("allocator", bench_allocator),
    ("table", bench_table),
    ("device", bench_device),
    ("dispatch", bench_dispatch),
    ("protocol", bench_protocol),
    ("backing", bench_backing),
    ("groups", bench_groups),
]


def run_micro(only: list[str] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, fn in CASES:
        if only and name not in only:
            continue
        rows.extend(fn())
    return rows


def format_micro(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | ns/op | MB/s | note |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        ns = f"{r['ns_per_op']:.0f}" if r["ns_per_op"] is not None else "-"
        mb = f"{r['mbps']:.0f}" if r.get("mbps") else "-"
        lines.append(f"| {r['case']} | {ns} | {mb} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_micro(run_micro()))
    print(f"(pid {os.getpid()})")
