"""The cost of the background policy to clients: fio on a device the policy is working on,
against the same device with the policy off.

Theory of operation
-------------------
Two zramd configurations of one export (lz4 for new pages, ``zstd(level=3)`` to recompress,
groups of 16 pages): ``policy-on`` adds ``recompress-after=AFTER`` (every pass marks the pages
not accessed for AFTER seconds idle, packs runs of them into groups, recompresses the rest),
``policy-off`` has no policy. Per repetition each is started fresh, in an order that alternates
between repetitions, and:

1. the whole device is filled with real data (files from /usr/share, as the persistence
   benchmark does) by ``nbdcopy``;
2. fio runs random 4 KiB reads and writes (70/30, QD8) over the first :data:`HOT_FRACTION` of
   the device at once, its first AFTER + 1 seconds not counted (``--ramp_time``), then
   RUNTIME seconds measured: the client's working set stays hot from the start, while the
   rest of the device turns cold after AFTER seconds and the policy packs it;
4. the policy's figures are read (``zramd stat --json``: passes, pages marked, grouped and
   recompressed, its longest slice, its back-offs) and the pool's size.

The ratio ``policy-on / policy-off`` of the median IOPS is the policy's cost to the client
(issue 11 aims at 0.9 or better); the policy's progress during the run says what it did for it
(it backs off while clients are busy). Usage:
``.venv/bin/python -m zramd.bench.policy --size 1G --repeat 3 --out docs/benchmarks``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from zramd.bench import sysinfo
from zramd.bench.fio import parse_fio, run_fio
from zramd.bench.persist import real_files
from zramd.bench.runner import MIB, log, save_report, size_arg
from zramd.bench.servers import ServerSpec

#: the share of the device the client works on (at its start)
HOT_FRACTION = 1 / 16
BASE = "lz4 zstd(level=3),group-pages=16"


def servers(after: int) -> list[ServerSpec]:
    return [
        ServerSpec(
            "policy-on",
            "zramd",
            f"{BASE},recompress-after={after}s,recompress-interval=1s",
        ),
        ServerSpec("policy-off", "zramd", BASE),
    ]


def run_one(
    spec: ServerSpec, size: int, image: Path, after: int, runtime: float
) -> dict[str, Any]:
    """One repetition of one configuration (see the module doc)."""
    with spec.start(size) as srv:
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", str(image), srv.uri], check=True, timeout=600)
        fill_s = time.monotonic() - t0
        before = srv.stat()
        hot = int(size * HOT_FRACTION)
        args = ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=8",
                "--buffer_compress_percentage=60", "--buffer_compress_chunk=4k",
                "--refill_buffers", f"--ramp_time={after + 1}s"]  # fmt: skip
        res = parse_fio(run_fio(srv.uri, hot, args, after + 1 + runtime))
        after_st = srv.stat()
    pol0 = before["tiers"].get("policy") or {}
    pol = after_st["tiers"].get("policy") or {}
    return {
        "server": spec.name,
        "iops": res["iops"],
        "p99_us": res["p99_us"],
        "fill_s": fill_s,
        # what the policy did while fio ran (its own counters)
        "grouped_pages": int(pol.get("grouped") or 0) - int(pol0.get("grouped") or 0),
        "recompressed_pages": int(pol.get("recompressed") or 0)
        - int(pol0.get("recompressed") or 0),
        "grouped_before": int(pol0.get("grouped") or 0),
        "policy": {k: pol.get(k) for k in ("passes", "marked_idle", "max_slice_us", "backoffs")},
        "mem_used_total": int(after_st["mm_stat"]["mem_used_total"]),
        "orig_data_size": int(after_st["mm_stat"]["orig_data_size"]),
    }


def run(size: int, repeat: int, after: int, runtime: float) -> dict[str, Any]:
    specs = servers(after)
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zbench-policy-") as tmp:
        image = Path(tmp) / "data.img"
        image.write_bytes(real_files(size))
        for r in range(repeat):
            order = specs if r % 2 == 0 else specs[::-1]
            for spec in order:
                log(f"policy: repetition {r + 1}/{repeat}: {spec.name}")
                samples.append({"repetition": r, **run_one(spec, size, image, after, runtime)})
    med = {
        s.name: statistics.median(x["iops"] for x in samples if x["server"] == s.name)
        for s in specs
    }
    return {
        "size": size,
        "after_s": after,
        "runtime_s": runtime,
        "hot_bytes": int(size * HOT_FRACTION),
        "system": sysinfo.collect(),
        "samples": samples,
        "median_iops": med,
        "ratio": med["policy-on"] / med["policy-off"] if med["policy-off"] else None,
    }


def render(raw: dict[str, Any]) -> str:
    lines = [
        "# The background policy's cost to a client",
        "",
        f"Device {raw['size'] // MIB} MiB of real data (files from /usr/share); fio randrw 70/30 "
        f"4 KiB QD8 over the first {raw['hot_bytes'] // MIB} MiB from the end of the copy-in, "
        f"{raw['runtime_s']:g} s measured after {raw['after_s'] + 1} s of ramp, while the rest "
        f"turns cold after {raw['after_s']} s and the policy (``recompress-after="
        f"{raw['after_s']}s``, groups of 16, zstd level 3 to recompress) packs it. "
        "Produced by `python -m zramd.bench.policy`.",
        "",
        "| repetition | server | IOPS | p99 µs | grouped before fio | grouped by the end | "
        "recompressed during | policy passes | longest slice µs | back-offs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in raw["samples"]:
        p = s["policy"]
        lines.append(
            f"| {s['repetition'] + 1} | {s['server']} | {s['iops']:.0f} | "
            f"{s['p99_us'] or 0:.0f} | {s['grouped_before']} | {s['grouped_pages']} | "
            f"{s['recompressed_pages']} | "
            f"{p.get('passes') or '-'} | {p.get('max_slice_us') or '-'} | "
            f"{p.get('backoffs') or '-'} |"
        )
    ratio = raw["ratio"]
    lines += [
        "",
        "Median IOPS: "
        + ", ".join(f"{k} {v:.0f}" for k, v in raw["median_iops"].items())
        + (f"; ratio policy-on / policy-off **{ratio:.2f}**." if ratio else "."),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m zramd.bench.policy", description=__doc__)
    ap.add_argument("--size", type=size_arg, default="1G", help="device size (filled whole)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--after", type=int, default=5, help="recompress-after, seconds")
    ap.add_argument("--runtime", type=float, default=20.0, help="fio seconds")
    ap.add_argument("--out", type=Path, default=None, help="directory for policy.md/.json")
    args = ap.parse_args()
    if args.repeat < 1 or args.runtime <= 0 or args.after < 1:
        ap.error("--repeat and --after must be at least 1 and --runtime more than 0")
    raw = run(args.size, args.repeat, args.after, args.runtime)
    text = render(raw)
    print(text)
    if args.out is not None:
        save_report(args.out, "policy", raw, text)


if __name__ == "__main__":
    main()
