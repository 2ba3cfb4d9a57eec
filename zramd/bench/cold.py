"""Reads of cold pages: the same data read through fio, once stored page by page and once
packed into multi-page groups.

Theory of operation
-------------------
One zramd export is started fresh for every sample and filled whole with real data (files from
/usr/share, as the persistence benchmark does) by ``nbdcopy``. Modes (:data:`MODES`): ``per-page
lz4`` and ``per-page zstd`` keep the pages as written, each compressed alone with that codec;
``grouped zstd`` and ``grouped lz4hc`` (lz4 pages, ``group-pages=16`` and the group-algorithm
zstd(level=9), the default, or lz4hc(level=9)) then mark every page idle (``zramd idle
--all``) and pack runs of up to 16 idle pages into groups (``zramd recompress --type idle
--group-pages 16``). fio then reads the device: sequential 1 MiB at QD4,
random 4 KiB at QD1 and at QD32, each for RUNTIME seconds. Reads do not take pages out of
their groups, so every read of the grouped device decodes groups (a 4 KiB read whose group is
not among the last few decoded decodes its whole 64 KiB group). The modes alternate between
repetitions; the figures are medians, and the ratios of a grouped mode to a per-page one
(:data:`RATIOS`) are what issue 11 asks about (sequential 1 MiB reads over grouped pages at
least as fast as per-page ones).
Usage: ``.venv/bin/python -m zramd.bench.cold --size 512M --repeat 3 --out docs/benchmarks``.
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

#: mode -> (export algorithms, whether the pages are grouped after the fill)
MODES = {
    "per-page lz4": ("lz4", False),
    "per-page zstd": ("zstd(level=3)", False),
    "grouped zstd": ("lz4,group-pages=16", True),
    "grouped lz4hc": ("lz4,group-pages=16,group-algorithm=lz4hc(level=9)", True),
}
#: the ratios reported: (grouped mode, per-page mode)
RATIOS = [
    ("grouped zstd", "per-page lz4"),
    ("grouped zstd", "per-page zstd"),
    ("grouped lz4hc", "per-page lz4"),
]
#: (name, fio arguments)
WORKLOADS = [
    ("seq 1M read QD4", ["--rw=read", "--bs=1M", "--iodepth=4"]),
    ("rand 4K read QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    ("rand 4K read QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
]


def run_one(mode: str, size: int, image: Path, runtime: float) -> dict[str, Any]:
    """One sample: a fresh server, filled, grouped or not, then every workload."""
    algorithms, grouped = MODES[mode]
    with ServerSpec(mode.replace(" ", "-"), "zramd", algorithms).start(size) as srv:
        subprocess.run(["nbdcopy", str(image), srv.uri], check=True, timeout=600)
        group_s = 0.0
        if grouped:
            t0 = time.monotonic()
            srv.zramd("idle", srv.spec.export_name, "--all")
            srv.zramd("recompress", srv.spec.export_name, "--type", "idle", "--group-pages", "16")
            group_s = time.monotonic() - t0
        st = srv.stat()
        figures = {}
        for name, args in WORKLOADS:
            res = parse_fio(run_fio(srv.uri, size, args, runtime))
            figures[name] = {"mbps": res["mbps"], "iops": res["iops"], "p99_us": res["p99_us"]}
    tiers = st.get("tiers") or {}
    return {
        "mode": mode,
        "group_s": group_s,
        "grouped_pages": int(tiers.get("grouped_pages") or 0),
        "pages_stored": int(st["mm_stat"]["orig_data_size"]) // 4096,
        "mem_used_total": int(st["mm_stat"]["mem_used_total"]),
        "orig_data_size": int(st["mm_stat"]["orig_data_size"]),
        "workloads": figures,
    }


def run(size: int, repeat: int, runtime: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zbench-cold-") as tmp:
        image = Path(tmp) / "data.img"
        image.write_bytes(real_files(size))
        modes = list(MODES)
        for r in range(repeat):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                log(f"cold: repetition {r + 1}/{repeat}: {mode}")
                samples.append({"repetition": r, **run_one(mode, size, image, runtime)})
    return {
        "size": size,
        "runtime_s": runtime,
        "modes": {m: {"algorithm": a, "grouped": g} for m, (a, g) in MODES.items()},
        "system": sysinfo.collect(),
        "samples": samples,
        **summarize(samples),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The median MB/s per mode and workload, and the :data:`RATIOS` of those medians."""
    med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [s for s in samples if s["mode"] == mode]
        med[mode] = {
            name: statistics.median(s["workloads"][name]["mbps"] for s in mine)
            for name, _ in WORKLOADS
        }
    return {
        "median_mbps": med,
        "ratio": {
            f"{g} / {p}": {
                name: med[g][name] / med[p][name] if med[p][name] else None
                for name, _ in WORKLOADS
            }
            for g, p in RATIOS
        },
    }


def render(raw: dict[str, Any]) -> str:
    def cell(mbps: float, iops: float, name: str) -> str:
        return f"{mbps:,.0f}" if name.startswith("seq") else f"{mbps:,.0f} ({iops / 1000:.1f}k)"

    names = [name for name, _ in WORKLOADS]
    modes = list(raw["modes"])
    lines = [
        "# Reads of cold pages: grouped against per page",
        "",
        f"Device {raw['size'] // MIB} MiB of real data (files from /usr/share), filled by "
        "nbdcopy into a fresh zramd per sample. Modes: "
        + "; ".join(f"`{m}`: `algorithm={v['algorithm']}`" for m, v in raw["modes"].items())
        + "; the grouped modes then ran `zramd idle --all` and `zramd recompress --type idle "
        "--group-pages 16` (groups of up to 16 pages, compressed with the export's "
        "group-algorithm: zstd(level=9) by default). fio over the whole device, "
        f"{raw['runtime_s']:g} s per workload, modes alternating between repetitions. MB/s = "
        "10^6 B/s; IOPS in parentheses. Produced by `python -m zramd.bench.cold`.",
        "",
        "| repetition | mode | grouped pages / held | RAM per byte | "
        + " | ".join(names)
        + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for s in raw["samples"]:
        w = s["workloads"]
        lines.append(
            f"| {s['repetition'] + 1} | {s['mode']} | {s['grouped_pages']} / {s['pages_stored']} "
            f"| {s['mem_used_total'] / max(s['orig_data_size'], 1):.3f} | "
            + " | ".join(cell(w[n]["mbps"], w[n]["iops"], n) for n in names)
            + " |"
        )
    lines += [
        "",
        "Medians (MB/s) and ratios:",
        "",
        "| workload | " + " | ".join(modes) + " | " + " | ".join(raw["ratio"]) + " |",
        "|---|" + "---:|" * (len(modes) + len(raw["ratio"])),
    ]
    for n in names:
        ratios = [r[n] for r in raw["ratio"].values()]
        lines.append(
            f"| {n} | "
            + " | ".join(f"{raw['median_mbps'][m][n]:,.0f}" for m in modes)
            + " | "
            + " | ".join("-" if r is None else f"{r:.2f}" for r in ratios)
            + " |"
        )
    m = raw["system"]["machine"]
    lines += ["", f"Run {raw['system']['date']}, zramd {raw['system']['versions']['zramd']}; "
              f"machine: {m['nproc']} CPUs ({m['cpu']}), load average at start "
              f"{m['loadavg_at_start']}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m zramd.bench.cold", description=__doc__)
    ap.add_argument("--size", type=size_arg, default="512M", help="device size (filled whole)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0, help="fio seconds per workload")
    ap.add_argument("--out", type=Path, default=None, help="directory for cold.md/.json")
    args = ap.parse_args()
    if args.repeat < 1 or args.runtime <= 0:
        ap.error("--repeat must be at least 1 and --runtime more than 0")
    raw = run(args.size, args.repeat, args.runtime)
    text = render(raw)
    print(text)
    if args.out is not None:
        save_report(args.out, "cold", raw, text)


if __name__ == "__main__":
    main()
