"""Snapshot and restore speed of one export, in process, against the disk's own speed.

Theory of operation
-------------------
Fills an export of ``--size`` with ``--data`` bytes of real files (from /usr/share, page after
page, repeated as needed) through the device's async write, then measures, with the server's own
code (:mod:`zramd.server.persistence`):

* the snapshot at stop (no client): seconds, logical GB/s, file MB/s;
* a live snapshot while a client task writes random 4 KiB pages: the longest hold of the loop
  the snapshot reports (capture or slice), and the client's slowest write against the same
  client without a snapshot running;
* the restore into a new export from a cold file (its pages dropped from the page cache with
  ``posix_fadvise(DONTNEED)``): seconds, logical GB/s, file MB/s; then checks sampled ranges
  against the original;
* the disk: sequential O_DIRECT write and read of ``--disk-probe`` bytes beside the snapshot,
  in 4 MiB ``write``/``readv`` calls, then the same with fio (1 MiB, QD4) when fio is there.

Usage: ``.venv/bin/python -m zramd.bench.persist --dir /var/tmp/zb --size 4G --data 2G``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import mmap
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zramd.config import ExportConfig, parse_size
from zramd.server import persistence
from zramd.server.exports import ExportRegistry

MiB = 1 << 20


def real_files(budget: int) -> bytes:
    out = bytearray()
    for dirpath, dirnames, filenames in os.walk("/usr/share"):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as f:
                    data = f.read(budget - len(out))
            except OSError:
                continue
            out += data + bytes(-len(data) % 4096)
            if len(out) >= budget:
                return bytes(out[:budget])
    return bytes(out)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_probe(path: str, n: int) -> tuple[float, float]:
    """Sequential O_DIRECT write then read of ``n`` bytes: (write MB/s, read MB/s)."""
    buf = mmap.mmap(-1, 4 * MiB)
    buf.write(os.urandom(4 * MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    t = time.perf_counter()
    for _ in range(n // (4 * MiB)):
        os.write(fd, buf)
    os.fsync(fd)
    w = n / (time.perf_counter() - t) / 1e6
    os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    t = time.perf_counter()
    while os.readv(fd, [buf]) > 0:
        pass
    r = n / (time.perf_counter() - t) / 1e6
    os.close(fd)
    os.unlink(path)
    return w, r


def fio_probe(path: Path, n: int) -> tuple[float, float]:
    """fio, sequential 1 MiB O_DIRECT writes then reads of ``n`` bytes at QD4: (write MB/s,
    read MB/s)."""
    from zramd.bench.durable import run_fio_file
    from zramd.bench.fio import parse_fio

    common = ["--bs=1M", "--iodepth=4", "--ioengine=libaio", "--direct=1"]
    try:
        w = parse_fio(run_fio_file(path, n, ["--rw=write", "--end_fsync=1", *common], None))
        r = parse_fio(run_fio_file(path, n, ["--rw=read", *common], None))
    finally:
        path.unlink(missing_ok=True)
    return w["mbps"], r["mbps"]


async def client(dev: object, size: int, stop: asyncio.Event, worst: list[float]) -> int:
    rnd = random.Random(1)
    page = os.urandom(2048) + bytes(2048)
    n = 0
    while not stop.is_set():
        t = time.perf_counter()
        await dev.write(rnd.randrange(size // 4096) * 4096, page)  # type: ignore[attr-defined]
        worst[0] = max(worst[0], time.perf_counter() - t)
        n += 1
        await asyncio.sleep(0)
    return n


async def main(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    data = parse_size(args.data)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    snap = str(d / "bench.snap")
    ex = ThreadPoolExecutor(2)
    reg = ExportRegistry(ex)
    exp = reg.add(ExportConfig(name="bench", size=size, persist=snap))
    src = real_files(min(data, 512 * MiB))
    t = time.perf_counter()
    off = 0
    while off < data:
        n = min(len(src), data - off)
        for a in range(0, n, MiB):
            await exp.device.write(off + a, src[a : min(a + MiB, n)])
        off += n
    st = exp.device.stats
    print(
        f"filled {data / 2**30:.2f} GiB of a {size / 2**30:.1f} GiB export in "
        f"{time.perf_counter() - t:.1f}s: {st.compr_data_size / MiB:.0f} MiB compressed, "
        f"pool {st.mem_used_total / MiB:.0f} MiB"
    )
    info = await persistence.save(exp)
    rnd = random.Random(2)
    offsets = [rnd.randrange(size // MiB) * MiB for _ in range(64)]
    sums = [hashlib.sha256((await exp.device.read_with_zeros(a, MiB))[0]).digest() for a in offsets]
    print(
        f"snapshot at stop: {info.seconds:.2f}s, {data / info.seconds / 1e9:.2f} GB/s logical, "
        f"{info.file_bytes / info.seconds / 1e6:.0f} MB/s to a file of "
        f"{info.file_bytes / MiB:.0f} MiB"
    )
    stop = asyncio.Event()
    base = [0.0]
    task = asyncio.create_task(client(exp.device, size, stop, base))
    await asyncio.sleep(info.seconds)
    stop.set()
    nbase = await task
    stop = asyncio.Event()
    worst = [0.0]
    task = asyncio.create_task(client(exp.device, size, stop, worst))
    live = await persistence.save(exp, str(d / "live.snap"))
    stop.set()
    nlive = await task
    print(
        f"live snapshot with a client writing 4 KiB pages: {live.seconds:.2f}s, capture "
        f"{live.capture_pause * 1e3:.1f} ms, longest hold of the loop "
        f"{live.longest_pause * 1e3:.1f} ms; the client's slowest write "
        f"{worst[0] * 1e3:.1f} ms ({nlive} writes) against {base[0] * 1e3:.1f} ms without a "
        f"snapshot ({nbase} writes in as long)"
    )
    os.unlink(d / "live.snap")
    reg.close()  # releases the snapshot's lock for the restoring export
    drop_cache(snap)
    reg2 = ExportRegistry(ex)
    exp2 = reg2.add(ExportConfig(name="bench", size=size, persist=snap))
    t = time.perf_counter()
    await persistence.restore(exp2)
    secs = time.perf_counter() - t
    fsize = os.path.getsize(snap)
    print(
        f"restore from a cold file: {secs:.2f}s, {data / secs / 1e9:.2f} GB/s logical, "
        f"{fsize / secs / 1e6:.0f} MB/s of file"
    )
    for a, digest in zip(offsets, sums, strict=True):
        x = await exp2.device.read_with_zeros(a, MiB)
        assert hashlib.sha256(x[0]).digest() == digest, a
    print("64 sampled MiB equal the original at its snapshot")
    reg2.close()
    w, r = disk_probe(str(d / "probe"), parse_size(args.disk_probe))
    print(f"disk, O_DIRECT sequential: write {w:.0f} MB/s, read {r:.0f} MB/s")
    if shutil.which("fio") is not None:
        fw, fr = fio_probe(d / "probe", parse_size(args.disk_probe))
        print(f"disk, fio 1 MiB O_DIRECT QD4 sequential: write {fw:.0f} MB/s, read {fr:.0f} MB/s")
    os.unlink(snap)
    for lock in (snap + ".lock", str(d / "live.snap.lock")):  # the snapshots' lock files stay
        Path(lock).unlink(missing_ok=True)
    ex.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="2G")
    ap.add_argument("--disk-probe", default="1G")
    asyncio.run(main(ap.parse_args()))
