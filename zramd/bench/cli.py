"""Command line of the harness.

Theory of operation
-------------------
``python -m zramd.bench [run] [options]`` runs fio workloads, real-data density and the
microbenchmarks and writes ``results.md``, ``results.json`` and ``chart.png`` to ``--out``
(default ``docs/benchmarks``); ``micro`` only prints the microbenchmarks; ``report`` re-renders
the markdown and chart from a saved ``results.json``; ``density`` runs only the real-data
density, with the cold-page run (recompression, multi-page groups) beside per-page lz4 and
zstd and nbdkit-zstd, into ``docs/benchmarks/density``; ``writeback`` runs zramd with a backing
file against ``nbdkit file`` (:mod:`zramd.bench.writeback`) into ``docs/benchmarks/writeback.md``;
``durable`` runs zramd's durable mode (``sync=flush``) against ``nbdkit file`` and qemu-nbd on
files of one disk (:mod:`zramd.bench.durable`) into ``docs/benchmarks/durable.md``.
Modes: full (default, < 15 min on the 2-core dev machine) and ``--quick`` (~3 min: smaller
device, shorter jobs, fewer workloads). Explicit options override the mode's defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from zramd.bench import durable, report, writeback
from zramd.bench.fio import WORKLOADS, workload_by_name
from zramd.bench.runner import MIB, RunConfig, log, run
from zramd.bench.servers import (
    ALL_SERVERS,
    GROUP,
    GROUP_19,
    RECOMPRESS,
    REFERENCE,
    server_by_name,
)

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
DENSITY_OUT = DEFAULT_OUT / "density"
#: the servers of ``density``: per-page zramd (lz4 then grouped, zstd), lz4 then recompressed
#: with zstd, lz4 then grouped with zstd level 19, and the reference
DENSITY_SERVERS = (
    GROUP,
    server_by_name("zramd-zstd"),
    RECOMPRESS,
    GROUP_19,
    server_by_name(REFERENCE),
)
#: mode -> defaults (size MiB, runtime s, repeat, ext2 MiB, memory MiB, density repeats, workloads)
MODES: dict[str, dict[str, object]] = {
    "full": {
        "size": 256, "runtime": 2.0, "repeat": 3, "ext2": 224, "memory": 144, "drepeat": 2,
        "workloads": [w.name for w in WORKLOADS],
    },
    "quick": {
        "size": 64, "runtime": 1.0, "repeat": 3, "ext2": 64, "memory": 48, "drepeat": 1,
        "workloads": [
            "seq-write", "seq-read", "rand-write-qd32", "rand-read-qd1", "rand-read-qd32",
            "rand-rw7030-qd16", "zero-rand-read-qd32",
        ],
    },
}  # fmt: skip
#: mode -> defaults of ``writeback`` (working set MiB, runtime s, repeat)
WRITEBACK_MODES: dict[str, dict[str, float]] = {
    "full": {"size": 256, "runtime": 3.0, "repeat": 3},
    "quick": {"size": 64, "runtime": 1.0, "repeat": 3},
}
#: mode -> defaults of ``durable`` (working set MiB, runtime s, repeat)
DURABLE_MODES: dict[str, dict[str, float]] = {
    "full": {"size": 1024, "runtime": 5.0, "repeat": 3},
    "quick": {"size": 128, "runtime": 1.0, "repeat": 1},
}
#: where ``durable`` puts its files unless told: a directory on a disk (not tmpfs)
DURABLE_DIR = Path("/var/tmp")
REQUIRED_TOOLS = ("fio", "nbdkit", "qemu-nbd", "nbdcopy", "mke2fs")


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _writeback(args: argparse.Namespace, args_list: list[str]) -> int:
    if shutil.which("fio") is None or shutil.which("nbdkit") is None:
        print("missing tools: fio, nbdkit (run scripts/install-deps.sh)", file=sys.stderr)
        return 2
    d = WRITEBACK_MODES["quick" if args.quick else "full"]
    if args.rss:
        samples = writeback.measure_backed_rss(writeback.RSS_POINTS, args.repeat or 3)
        summ = writeback.rss_per_page(samples)
        for n, rss in summ["median_rss_bytes"].items():
            print(f"{n:7d} pages written back: RSS {rss / 1e6:.1f} MB (median)")
        print(f"per page written back: {summ['per_page']:.1f} B; fixed: "
              f"{summ['fixed_bytes'] / 1e6:.1f} MB")  # fmt: skip
        return 0
    size = args.size or int(d["size"]) * MIB
    log(f"writeback run: {size // MIB} MiB working set -> {args.out}")
    raw = writeback.run_writeback(
        size,
        args.repeat or int(d["repeat"]),
        args.runtime or float(d["runtime"]),
        "quick" if args.quick else "full",
        " ".join(args_list),
        args.note,
    )
    summ = writeback.write_report(raw, args.out)
    log(f"wrote {args.out / 'writeback.md'}")
    for phase, ratio in summ["ratios"].items():
        print(f"{phase:16s} {writeback.ZRAMD}/{writeback.NBDKIT} "
              + ("-" if ratio is None else f"{ratio:.2f}"))  # fmt: skip
    return 0


def _durable(args: argparse.Namespace, args_list: list[str]) -> int:
    missing = [t for t in ("fio", "nbdkit", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (run scripts/install-deps.sh)", file=sys.stderr)
        return 2
    try:
        disk = durable.disk_of(args.dir)
    except (OSError, ValueError) as exc:
        print(f"--dir: {exc}", file=sys.stderr)
        return 2
    d = DURABLE_MODES["quick" if args.quick else "full"]
    size = args.size or int(d["size"]) * MIB
    log(f"durable run: {size // MIB} MiB working set in {args.dir} ({disk['fstype']}, block "
        f"device {disk['block']}) -> {args.out}")  # fmt: skip
    raw = durable.run_durable(
        size,
        args.repeat or int(d["repeat"]),
        args.runtime or float(d["runtime"]),
        args.dir,
        "quick" if args.quick else "full",
        " ".join(args_list),
        args.note,
    )
    summ = durable.write_report(raw, args.out)
    log(f"wrote {args.out / 'durable.md'}")
    for phase, per in summ["ratios"].items():
        print(f"{phase:18s} " + "  ".join(
            f"{durable.ZRAMD}/{ref} " + ("-" if r is None else f"{r:.2f}") for ref, r in per.items()
        ))  # fmt: skip
    return 0 if not summ["errors"] else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zramd.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="full benchmark (default)")
    r.add_argument("--quick", action="store_true", help="~3 minute run")
    r.add_argument("--repeat", type=int, help="repetitions per sample (>= 3 for the record)")
    r.add_argument("--size", type=_size, help="device size for fio jobs, e.g. 256M")
    r.add_argument("--runtime", type=float, help="seconds per measured fio job")
    r.add_argument("--servers", help="comma list: " + ",".join(s.name for s in ALL_SERVERS))
    r.add_argument("--workloads", help="comma list: " + ",".join(w.name for w in WORKLOADS))
    r.add_argument("--no-fio", action="store_true")
    r.add_argument("--no-density", action="store_true")
    r.add_argument("--no-micro", action="store_true")
    r.add_argument("--density-repeat", type=int)
    r.add_argument("--out", type=Path, default=DEFAULT_OUT)
    r.add_argument("--note", default="", help="free text for the report header")
    m = sub.add_parser("micro", help="microbenchmarks of the hot parts only")
    m.add_argument(
        "--only", help="comma list of cases: samefill,codec,allocator,table,device,dispatch"
    )
    m.add_argument("--json", action="store_true")
    d = sub.add_parser("density", help="real-data density only, cold pages included")
    d.add_argument("--quick", action="store_true", help="smaller images")
    d.add_argument("--repeat", type=int, default=1, help="samples per server and image")
    d.add_argument("--out", type=Path, default=DENSITY_OUT)
    d.add_argument("--note", default="", help="free text for the report header")
    w = sub.add_parser("writeback", help="zramd with a backing file against nbdkit file")
    w.add_argument("--quick", action="store_true", help="smaller working set, shorter phases")
    w.add_argument("--size", type=_size, help="working set, 4x zramd's memory limit, e.g. 256M")
    w.add_argument("--repeat", type=int, help="repetitions (>= 3 for the record)")
    w.add_argument("--runtime", type=float, help="seconds per time-based read phase")
    w.add_argument("--out", type=Path, default=DEFAULT_OUT)
    w.add_argument("--note", default="", help="free text for the report header")
    w.add_argument(
        "--rss", action="store_true", help="only the RSS per page written back (no report)"
    )
    du = sub.add_parser("durable", help="zramd's durable mode against nbdkit file and qemu-nbd")
    du.add_argument("--quick", action="store_true", help="small working set, short phases")
    du.add_argument("--size", type=_size, help="working set, e.g. 1G")
    du.add_argument("--repeat", type=int, help="repetitions (>= 3 for the record)")
    du.add_argument("--runtime", type=float, help="seconds per time-based phase")
    du.add_argument(
        "--dir",
        type=Path,
        default=DURABLE_DIR,
        help="directory on a disk (not tmpfs) for every server's files",
    )
    du.add_argument("--out", type=Path, default=DEFAULT_OUT)
    du.add_argument("--note", default="", help="free text for the report header")
    rep = sub.add_parser("report", help="re-render results.md and chart.png from results.json")
    rep.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0].startswith("-") and args_list[0] not in ("-h", "--help"):
        args_list.insert(0, "run")
    args = _parser().parse_args(args_list)
    if args.cmd == "micro":
        from zramd.bench.micro import format_micro, run_micro

        rows = run_micro(args.only.split(",") if args.only else None)
        print(json.dumps(rows, indent=1) if args.json else format_micro(rows))
        return 0
    if args.cmd == "report":
        raw = json.loads((args.out / "results.json").read_text())
        raw.pop("summary", None)
        report.write_report(raw, args.out)
        print(args.out / "results.md")
        return 0
    if args.cmd == "writeback":
        return _writeback(args, args_list)
    if args.cmd == "durable":
        return _durable(args, args_list)
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (run scripts/install-deps.sh)", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    d = MODES[mode]
    if args.cmd == "density":
        cfg = RunConfig(
            servers=list(DENSITY_SERVERS),
            workloads=[],
            size=0,
            runtime=0.0,
            repeat=0,
            density_repeat=args.repeat,
            ext2_budget=int(d["ext2"]) * MIB,  # type: ignore[call-overload]
            memory_budget=int(d["memory"]) * MIB,  # type: ignore[call-overload]
            micro=False,
            mode=mode,
            argv=" ".join(args_list),
            note=args.note,
        )
        log(f"density run ({mode}): {', '.join(s.name for s in DENSITY_SERVERS)} -> {args.out}")
        report.write_report(run(cfg), args.out)
        log(f"wrote {args.out / 'results.md'}")
        return 0
    wl_names = args.workloads.split(",") if args.workloads else list(d["workloads"])  # type: ignore[call-overload]
    cfg = RunConfig(
        servers=[server_by_name(n) for n in args.servers.split(",")]
        if args.servers
        else list(ALL_SERVERS),
        workloads=[] if args.no_fio else [workload_by_name(n) for n in wl_names],
        size=args.size or int(d["size"]) * MIB,  # type: ignore[call-overload]
        runtime=args.runtime or float(d["runtime"]),  # type: ignore[arg-type]
        repeat=args.repeat or int(d["repeat"]),  # type: ignore[call-overload]
        density=not args.no_density,
        density_repeat=args.density_repeat or int(d["drepeat"]),  # type: ignore[call-overload]
        ext2_budget=int(d["ext2"]) * MIB,  # type: ignore[call-overload]
        memory_budget=int(d["memory"]) * MIB,  # type: ignore[call-overload]
        micro=not args.no_micro,
        mode=mode,
        argv=" ".join(args_list[1:]),
        note=args.note,
    )
    log(
        f"{mode} run: {len(cfg.servers)} servers x {len(cfg.workloads)} workloads x "
        f"{cfg.repeat} reps, {cfg.size // MIB} MiB, {cfg.runtime:g}s per job -> {args.out}"
    )
    raw = run(cfg)
    summ = report.write_report(raw, args.out)
    log(f"wrote {args.out / 'results.md'}")
    for wl, per in summ["ratios"].items():
        parts = [
            f"{z}/{report.REFERENCE} {per[z][report.REFERENCE]:.2f}"
            for z in per
            if z.startswith("zramd") and per[z].get(report.REFERENCE)
        ]
        if parts:
            print(f"{wl:22s} " + "  ".join(parts))
    return 0
