"""Real-data density: images made from real data, copied in and out with nbdcopy.

Theory of operation
-------------------
Two images, built once per run in a temp dir:

* ``ext2``: an ext2 file system (``mke2fs -d``) holding real system files (a sorted walk of
  /usr/share and /usr/lib, copied to a staging dir until the byte budget is reached). Free blocks
  are zero, as on a real disk.
* ``memory``: the anonymous memory of real processes the harness starts (python workers that
  import numpy and json and build dicts, lists, strings and arrays), read from /proc/PID/maps and
  /proc/PID/mem while they wait, concatenated and padded to whole pages. That is what swap holds.

For each image, :func:`ideal_sizes` computes the per-page compressed size a perfect zram would
store with each codec (zero and same-filled pages cost 0, a page that does not shrink costs 4096),
using zramd's own codec classes. :func:`run_density` copies the image into a fresh server with
nbdcopy, reads it back to a tmpfs file, compares sha256, and records copy rates and the server's
memory growth (RSS, plus the tmpfs backing file for qemu-nbd) per byte of image. A spec with
``stages`` (the cold-page runs, :data:`zramd.bench.servers.COLD`) runs them after the copy-in
and records the memory per byte after each (``stages``); the copy-out then checks the data as
the last stage left it.

:func:`trim_half` measures what zramd's own layout costs once a device has churned, in-process
with the device API (no server, so no RSS noise): the image is written to a
:class:`~zramd.device.blockdev.ZramDevice`, every other page is trimmed, the pool is compacted,
and the RAM then held (pool pages + pool metadata + page table) is compared with the ideal of the
live pages and split by cause. ``python -m zramd.bench.density`` prints that table for both
images and codecs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zramd.bench.servers import TMPFS_DIR, ServerSpec

PAGE = 4096
MIB = 1 << 20
#: roots of the ext2 image's files, walked in this order
EXT2_SOURCES = ("/usr/share", "/usr/lib")
#: file system allowance on top of the files' whole blocks (bitmaps, indirect blocks, slack)
EXT2_OVERHEAD = 1.10
#: fixed extra room for metadata (inode tables, journal-less ext2 group descriptors)
EXT2_EXTRA = 24 * MIB
#: spare inodes on top of the files and directories copied
EXT2_SPARE_INODES = 1024
#: files larger than this are skipped (keep the mix varied)
EXT2_MAX_FILE = 16 * MIB
#: codecs of the ideal-size column
IDEAL_CODECS = ("lz4", "zstd")
#: how long memory workers may take to build their data
WORKER_TIMEOUT_S = 60.0
#: RSS settles after a copy: wait this long before sampling
SETTLE_S = 0.3
NBDCOPY_TIMEOUT_S = 300.0
#: image budgets of :func:`main` (those of the benchmark's full mode)
TRIM_HALF_EXT2_MIB = 224
TRIM_HALF_MEMORY_MIB = 144
#: where the overhead of :func:`trim_half` goes, in the order of its table
TRIM_HALF_PARTS = ("huge", "slots", "zspages", "cache", "metadata", "table")


def build_ext2_image(path: Path, budget: int) -> Path:
    """An ext2 image holding about ``budget`` bytes (in whole 4 KiB blocks) of files from /usr."""
    staging = Path(tempfile.mkdtemp(prefix="zbench-ext2-", dir=path.parent))
    total = 0
    inodes = 0
    dirs: set[Path] = set()
    try:
        for root in EXT2_SOURCES:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for fn in sorted(filenames):
                    src = os.path.join(dirpath, fn)
                    try:
                        st = os.lstat(src)
                    except OSError:
                        continue
                    if not os.path.isfile(src) or os.path.islink(src) or st.st_size > EXT2_MAX_FILE:
                        continue
                    dst = staging / os.path.relpath(src, "/")
                    if dst.parent not in dirs:
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        dirs.add(dst.parent)
                    try:
                        shutil.copyfile(src, dst)
                    except OSError:
                        continue
                    total += -(-st.st_size // PAGE) * PAGE
                    inodes += 1
                    if total >= budget:
                        break
                if total >= budget:
                    break
            if total >= budget:
                break
        nparents = len({p for d in dirs for p in d.parents})
        inodes += len(dirs) + nparents + EXT2_SPARE_INODES
        blocks = (int(total * EXT2_OVERHEAD) + len(dirs) * PAGE + EXT2_EXTRA) // PAGE
        proc = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext2", "-b", str(PAGE), "-N", str(inodes),
             "-d", str(staging), str(path), str(blocks)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"mke2fs failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


#: the program each memory worker runs: build real Python/numpy data, then report and wait
_WORKER = r"""
import json, os, random, sys, array
import numpy as np
seed, mib = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
dict_path = '/usr/share/dict/words'
words = open(dict_path).read().split() if os.path.exists(dict_path) else None
if not words:
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 11)))
             for _ in range(20000)]
keep = []
target = mib << 20
used = 0
kind = 0
while used < target:
    kind = (kind + 1) % 6
    if kind == 0:   # dict of str -> tuple records
        d = {f"user:{rng.randrange(10**9)}": (rng.choice(words), rng.random(), rng.randrange(1000))
             for _ in range(20000)}
        keep.append(d); used += 20000 * 260
    elif kind == 1:  # a json document parsed into objects
        doc = json.dumps([{"id": i, "name": " ".join(rng.choices(words, k=4)),
                           "tags": rng.choices(words, k=3), "score": rng.random()}
                          for i in range(8000)])
        keep.append(json.loads(doc)); keep.append(doc); used += 8000 * 900
    elif kind == 2:  # numpy: small ints, smooth floats, random floats
        keep.append(np.arange(500000, dtype=np.int64) % 977)
        keep.append(np.sin(np.linspace(0, 100, 250000)))
        keep.append(np.random.default_rng(seed + used).normal(size=125000))
        used += 5 * 10**6
    elif kind == 3:  # text
        keep.append(" ".join(rng.choices(words, k=200000)).encode()); used += 1_700_000
    elif kind == 4:  # list of ints and floats
        keep.append([rng.randrange(10**6) for _ in range(100000)]); used += 3_600_000
    else:           # array of counters
        keep.append(array.array("l", (rng.randrange(256) for _ in range(200000))))
        used += 1_600_000
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.read()
"""


def _anon_regions(pid: int) -> list[tuple[int, int]]:
    regions = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            perms = parts[1]
            path = parts[5] if len(parts) > 5 else ""
            if "r" not in perms or (path and path != "[heap]"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            regions.append((lo, hi))
    return regions


def build_memory_image(path: Path, budget: int, workers: int = 3) -> Path:
    """Concatenate the anonymous memory of ``workers`` python processes into ``path``."""
    per_worker_mib = max(8, budget // MIB // workers)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(seed), str(per_worker_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for seed in range(workers)
    ]
    written = 0
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError("memory worker failed to build its data")
        with open(path, "wb") as out:
            for p in procs:
                quota = budget // workers
                got = 0
                with open(f"/proc/{p.pid}/mem", "rb", buffering=0) as mem:
                    for lo, hi in _anon_regions(p.pid):
                        addr = lo
                        while addr < hi and got < quota:
                            n = min(hi - addr, MIB, quota - got)
                            try:
                                mem.seek(addr)
                                chunk = mem.read(n)
                            except OSError:
                                break
                            if not chunk:
                                break
                            out.write(chunk)
                            got += len(chunk)
                            addr += len(chunk)
                written += got
            pad = (-written) % PAGE
            out.write(b"\0" * pad)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return path


def ideal_sizes(path: Path) -> dict[str, Any]:
    """Per-page stored bytes of a perfect zram for each codec; zero/same-filled pages cost 0."""
    from zramd.compress import get_codec

    codecs = {name: get_codec(name) for name in IDEAL_CODECS}
    sizes = dict.fromkeys(IDEAL_CODECS, 0)
    pages = zero = same = huge_lz4 = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(256 * PAGE)
            if not block:
                break
            for off in range(0, len(block), PAGE):
                page = block[off : off + PAGE]
                pages += 1
                if page[8:] == page[:-8]:
                    if page.count(0) == PAGE:
                        zero += 1
                    else:
                        same += 1
                    continue
                for name, codec in codecs.items():
                    n = len(codec.compress(page))
                    if n >= PAGE:
                        n = PAGE
                        if name == "lz4":
                            huge_lz4 += 1
                    sizes[name] += n
    data = pages * PAGE
    return {
        "bytes": data,
        "pages": pages,
        "zero_pages": zero,
        "same_pages": same,
        "huge_pages_lz4": huge_lz4,
        "ideal_bytes": sizes,
        "ideal_ratio": {k: (data / v if v else None) for k, v in sizes.items()},
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def run_density(spec: ServerSpec, image: Path, image_sha: str) -> dict[str, Any]:
    """Copy ``image`` into a fresh ``spec`` server and back; figures for one sample."""
    size = os.path.getsize(image)
    dev_size = -(-size // MIB) * MIB
    srv = spec.start(dev_size)
    out_fd, out_name = tempfile.mkstemp(prefix="zbench-out-", dir=TMPFS_DIR)
    os.close(out_fd)
    out = Path(out_name)
    try:
        time.sleep(SETTLE_S)
        mem0 = srv.memory_bytes()
        cpu0 = srv.cpu_seconds()
        t0 = time.monotonic()
        subprocess.run(
            ["nbdcopy", str(image), srv.uri], check=True, capture_output=True,
            timeout=NBDCOPY_TIMEOUT_S,
        )  # fmt: skip
        t_in = time.monotonic() - t0
        cpu_in = srv.cpu_seconds() - cpu0
        time.sleep(SETTLE_S)
        mem1 = srv.memory_bytes()
        stages: dict[str, float] = {}
        for stage, commands in spec.stages:
            for cmd, *args in commands:
                srv.zramd(cmd, spec.export_name, *args)
            time.sleep(SETTLE_S)
            stages[stage] = (srv.memory_bytes() - mem0) / size
        out.unlink()
        t0 = time.monotonic()
        subprocess.run(
            ["nbdcopy", srv.uri, str(out)], check=True, capture_output=True,
            timeout=NBDCOPY_TIMEOUT_S,
        )  # fmt: skip
        t_out = time.monotonic() - t0
        with open(out, "r+b") as f:  # the device is rounded up to MiB: compare the image's bytes
            f.truncate(size)
        ok = sha256_file(out) == image_sha
        growth = mem1 - mem0
        return {
            "bytes": size,
            "copy_in_mbps": size / t_in / 1e6,
            "copy_out_mbps": size / t_out / 1e6,
            "cpu_in_s": cpu_in,
            "mem_growth_bytes": growth,
            "mem_per_byte": growth / size,
            "sha256_ok": ok,
            "stages": stages,
        }
    finally:
        out.unlink(missing_ok=True)
        srv.stop()


def trim_half(image: Path, algorithm: str, *, chain_size: int = 8) -> dict[str, Any]:
    """Write ``image`` to a fresh device (1 MiB writes), trim every other page, compact; return
    the RAM then held against the ideal of the live pages, split by cause (bytes):

    * ``huge``: pages stored raw (compressed size at or above the device's huge threshold) pay
      4096 minus their compressed size;
    * ``slots``: size-class rounding, each object's slot minus its size;
    * ``zspages``: free slots and tail bytes of the live zspages;
    * ``cache``: the pool's warm cache (dropped by compaction);
    * ``metadata``: the pool's Python-side bookkeeping (``Pool.metadata_bytes``);
    * ``table``: the device's page table (every page of the device, live or not).

    ``codec`` is what the device stored beyond the ideal plus ``huge``: 0 when it compresses
    exactly like ``zramd.compress`` (the native batch codecs may differ by a few bytes)."""
    from zramd.compress import get_codec
    from zramd.device.blockdev import ZramDevice

    codec = get_codec(algorithm)
    data = image.read_bytes()
    npages = len(data) // PAGE
    dev = ZramDevice(npages * PAGE, algorithm=algorithm, chain_size=chain_size)
    try:
        for off in range(0, npages * PAGE, MIB):
            dev.write_sync(off, data[off : min(off + MIB, npages * PAGE)])
        for idx in range(1, npages, 2):
            dev.trim_sync(idx * PAGE, PAGE)
        pool = dev.pool
        before_compact = pool.total_bytes
        dev.compact()
        ideal = huge = live = 0
        for idx in range(0, npages, 2):
            page = data[idx * PAGE : (idx + 1) * PAGE]
            if page[8:] == page[:-8]:
                continue
            live += 1
            n = min(len(codec.compress(page)), PAGE)
            ideal += n
            if n >= dev.huge_threshold:
                huge += PAGE - n
        stats = dev.stats
        slot_bytes = shared_bytes = 0  # classes that share zspages (not the huge one)
        for c in pool.class_stats():
            size, objs, used, pages = (c[k] for k in ("size", "objs_per_zspage", "obj_used",
                                                      "pages_used"))  # fmt: skip
            assert isinstance(size, int) and isinstance(used, int) and isinstance(pages, int)
            if objs != 1:
                slot_bytes += used * size
                shared_bytes += pages * PAGE
        stored = stats.compr_data_size - stats.huge_pages * PAGE
        parts = {
            "huge": huge,
            "slots": slot_bytes - stored,
            "zspages": shared_bytes - slot_bytes,
            "cache": pool.cached_bytes,
            "metadata": pool.metadata_bytes,
            "table": dev.table.nbytes,
        }
        ram = pool.total_bytes + pool.metadata_bytes + dev.table.nbytes
        return {
            "image": image.name,
            "algorithm": algorithm,
            "chain_size": chain_size,
            "live_pages": live,
            "ideal_bytes": ideal,
            "pool_before_compact": before_compact,
            "pool_bytes": pool.total_bytes,
            "ram_bytes": ram,
            "ram_per_ideal": ram / ideal if ideal else None,
            "parts": parts,
            "codec": stats.compr_data_size - ideal - huge,
        }
    finally:
        dev.close()


def trim_half_markdown(rows: list[dict[str, Any]]) -> str:
    """The table of :func:`trim_half` results: RAM per ideal byte, then each part of it."""
    head = ("| image | codec | live pages | ideal MiB | pool before compact | pool | RAM | "
            + " | ".join(TRIM_HALF_PARTS) + " | codec |")  # fmt: skip
    out = [head, "| --- | --- |" + " ---: |" * (6 + len(TRIM_HALF_PARTS))]
    for r in rows:
        ideal = r["ideal_bytes"]
        cells = [
            r["image"], r["algorithm"], f"{r['live_pages']}", f"{ideal / MIB:.1f}",
            f"{r['pool_before_compact'] / ideal:.3f}", f"{r['pool_bytes'] / ideal:.3f}",
            f"**{r['ram_per_ideal']:.3f}**",
        ]  # fmt: skip
        cells += [f"{r['parts'][k] / ideal:.3f}" for k in TRIM_HALF_PARTS]
        cells.append(f"{r['codec'] / ideal:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m zramd.bench.density [--json] [--chain-size N] [IMAGE ...]``: :func:`trim_half`
    for lz4 and zstd on the given images, or on a fresh ext2 and memory image."""
    ap = argparse.ArgumentParser(prog="python -m zramd.bench.density")
    ap.add_argument("images", nargs="*", type=Path)
    ap.add_argument("--chain-size", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zbench-density-") as tmp:
        images: list[Path] = args.images
        if not images:
            images = [
                build_ext2_image(Path(tmp) / "ext2.img", TRIM_HALF_EXT2_MIB * MIB),
                build_memory_image(Path(tmp) / "memory.img", TRIM_HALF_MEMORY_MIB * MIB),
            ]
        rows = [trim_half(img, algo, chain_size=args.chain_size)
                for img in images for algo in IDEAL_CODECS]  # fmt: skip
    print(json.dumps(rows, indent=1) if args.json else trim_half_markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
