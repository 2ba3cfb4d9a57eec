"""The writeback benchmark: zramd with a backing file against ``nbdkit file``.

Theory of operation
-------------------
The working set is four times zramd's memory limit. Two servers, each started fresh for every
repetition, in an order that rotates between repetitions:

* ``zramd-lz4-backed``: an lz4 export with ``mem-limit=`` the limit and ``backing=`` a file in
  the server's private temp dir (pressure writeback moves the coldest pages there);
* ``nbdkit-file``: ``nbdkit file`` on a sparse file of the working set's size in its temp dir,
  with ``cache=none`` (nbdkit drops the pages it touched from the page cache), so that the
  reference keeps no more of the data in RAM than zramd may.

Before every measured phase the harness flushes both servers' files and drops them from the
page cache (``fsync`` then ``posix_fadvise(DONTNEED)``), so that no phase reads what the one
before left in the page cache. The phases, in order, on one server (:data:`PHASES`):

1. ``rand-write``: random 4 KiB writes, QD16, every page of the working set once;
2. ``rand-read-cold``: random 4 KiB reads, QD16, over the whole working set (time based);
3. ``rand-read-hot``: the hot subset (half the limit, at offset 0) is written again sequentially
   (not measured: its pages become the most recently used, which zramd keeps in RAM), then
   random 4 KiB reads, QD16, over it (time based);
4. ``seq-write``: sequential 1 MiB writes, QD4, over the whole working set;
5. ``seq-read``: sequential 1 MiB reads, QD4, over the whole working set.

A thread samples the server's VmRSS every :data:`RSS_POLL_S` during each phase; the maximum per
phase, the server's VmHWM (peak RSS over its life), its RSS when empty and zramd's pool peak
(``mem_used_max``) are recorded; so are, per phase, the storage bytes each server read and wrote
(/proc/PID/io) and zramd's writeback counters (``zramd stat``: pages read from the store,
promoted back to RAM).
:func:`summarize` gives medians per (phase, server) with the lowest and highest, ratios zramd /
nbdkit-file of the median throughput and the range of each repetition's ratio;
:func:`write_report` renders ``writeback.md`` and saves ``writeback.json``. The report sets
zramd's peak RSS against the stated bound: the empty server, the limit,
:data:`RSS_PER_BACKED_PAGE` per page in the store plus :data:`RSS_BACKED_FIXED`, one pressure
burst and the clients' requests in flight.

``writeback --rss`` measures the overhead that bound is made of (:func:`measure_backed_rss`): a
fresh zramd with a 1 GiB export (``mem-limit=32M``, a backing file) per point, ``n`` pages of
fio's compressible data written (pressure writeback moves most of them) and then every page
written back (``zramd idle --all``, ``zramd writeback --type idle``: the pool empty), its VmRSS
read; the points alternate their order between repetitions. :func:`rss_per_page` gives the
medians, the RSS per page between the two largest points and the fixed part.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zramd.bench import sysinfo
from zramd.bench.fio import DATA_ARGS, parse_fio, run_fio
from zramd.bench.runner import MIB, log, save_report
from zramd.bench.servers import RunningServer, ServerSpec, proc_rss_bytes, zramd_command
from zramd.device.backed import BURST_BYTES
from zramd.geometry import PAGE_SIZE

ZRAMD = "zramd-lz4-backed"
NBDKIT = "nbdkit-file"
#: the working set over zramd's memory limit
WORKING_SET_PER_LIMIT = 4
#: seconds between RSS samples
RSS_POLL_S = 0.05
#: the file of each server in its temp dir
DATA_FILE = "data.img"
#: zramd's writeback counters recorded per phase (differences)
BACKING_DELTAS = ("bd_reads", "bd_writes", "bd_read_bytes", "bd_write_bytes", "bd_promoted")
RAND_ARGS = ["--bs=4k", "--iodepth=16", *DATA_ARGS["comp"]]
SEQ_ARGS = ["--bs=1M", "--iodepth=4", *DATA_ARGS["comp"]]
#: the stated RSS overhead of a backed export (docs/operator.md, Writeback, Memory): bytes per
#: page in the backing store, and once the store is in use
RSS_PER_BACKED_PAGE = 48
RSS_BACKED_FIXED = 8 * MIB
#: the most request payload the benchmark's clients have in flight (the 1 MiB phases, QD4)
CLIENT_IN_FLIGHT = 4 * MIB
#: ``writeback --rss``: pages written back per point (the empty server first), the export, its
#: memory limit, and the pause before RSS is read (deferred frees, compaction)
RSS_POINTS = (0, 131072, 262144)
RSS_EXPORT_SIZE = 1 << 30
RSS_MEM_LIMIT = 32 * MIB
RSS_SETTLE_S = 1.0


@dataclass(frozen=True)
class Phase:
    name: str
    label: str
    args: tuple[str, ...]
    timed: bool  # time based (runtime) rather than one pass over its range
    hot: bool = False  # over the hot subset only, after a rewrite of it


PHASES: tuple[Phase, ...] = (
    Phase("rand-write", "rand 4K write QD16, whole set once", ("--rw=randwrite", *RAND_ARGS),
          False),
    Phase("rand-read-cold", "rand 4K read QD16, whole set", ("--rw=randread", "--norandommap",
          "--randrepeat=0", *RAND_ARGS), True),
    Phase("rand-read-hot", "rand 4K read QD16, hot subset", ("--rw=randread", "--norandommap",
          "--randrepeat=0", *RAND_ARGS), True, hot=True),
    Phase("seq-write", "seq 1M write QD4, whole set", ("--rw=write", *SEQ_ARGS), False),
    Phase("seq-read", "seq 1M read QD4, whole set", ("--rw=read", *SEQ_ARGS), False),
)  # fmt: skip


def phase_by_name(name: str) -> Phase:
    for p in PHASES:
        if p.name == name:
            return p
    raise KeyError(name)


@dataclass
class FileServerSpec(ServerSpec):
    """A server over a file in its temp dir: zramd's backing file or nbdkit's data file
    (:meth:`command` creates nbdkit's, sparse; zramd creates its own)."""

    mem_limit: int = 0

    def command(self, sock: Path, size: int, backing: Path | None) -> list[str]:
        path = sock.parent / DATA_FILE
        if self.kind == "zramd":
            spec = (
                f"{self.export_name}={size}B,algorithm={self.option},"
                f"mem-limit={self.mem_limit}B,backing={path}"
            )
            control = ["--control", str(sock.parent / "control.sock")]
            return [*zramd_command(), "serve", "--unix", str(sock), *control, "--export", spec]
        if self.kind == "nbdkit":
            with open(path, "wb") as f:
                f.truncate(size)
            return ["nbdkit", "-f", "-U", str(sock), "file", str(path), "cache=none"]
        raise ValueError(f"unknown server kind {self.kind!r}")


def servers(mem_limit: int) -> list[FileServerSpec]:
    return [
        FileServerSpec(ZRAMD, "zramd", "lz4", mem_limit=mem_limit),
        FileServerSpec(NBDKIT, "nbdkit", "", export_name=""),
    ]


def drop_file_cache(path: Path) -> None:
    """Flush ``path`` and drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class RssSampler:
    """The largest VmRSS of a process seen while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            self.max_bytes = max(self.max_bytes, proc_rss_bytes(self.pid))
        except (FileNotFoundError, ProcessLookupError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def proc_hwm_bytes(pid: int) -> int:
    """VmHWM (peak RSS) of the process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_io_bytes(pid: int) -> dict[str, int]:
    """Bytes the process read from and wrote to storage (``read_bytes``, ``write_bytes`` of
    /proc/PID/io: the page cache's accounting, sockets excluded)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {k: int(fields[k]) for k in ("read_bytes", "write_bytes")}


def zramd_stat(srv: RunningServer) -> dict[str, Any] | None:
    """``zramd stat --json`` of the export of a zramd server; None for other servers."""
    if srv.spec.kind != "zramd":
        return None
    return srv.stat()


def backing_counters(srv: RunningServer) -> dict[str, int] | None:
    """A zramd server's writeback counters (``zramd stat``); None for other servers."""
    stat = zramd_stat(srv)
    if stat is None:
        return None
    return {k: v for k, v in stat["backing"].items() if k != "store"}


def phase_job(
    phase: Phase, size: int, hot: int, runtime: float
) -> tuple[int, list[str], float | None]:
    """fio's size, arguments and runtime for ``phase``."""
    return (hot if phase.hot else size), list(phase.args), (runtime if phase.timed else None)


def run_phases(srv: RunningServer, size: int, hot: int, runtime: float) -> list[dict[str, Any]]:
    """Every phase on ``srv`` in order; one result per phase."""
    data = srv.workdir / DATA_FILE
    out: list[dict[str, Any]] = []
    for phase in PHASES:
        if phase.hot:
            run_fio(srv.uri, hot, ["--rw=write", *SEQ_ARGS], None)
        drop_file_cache(data)
        fsize, args, rt = phase_job(phase, size, hot, runtime)
        io0, bd0 = proc_io_bytes(srv.pid), backing_counters(srv)
        with RssSampler(srv.pid) as rss:
            t0 = time.monotonic()
            res = parse_fio(run_fio(srv.uri, fsize, args, rt))
            res["wall_s"] = time.monotonic() - t0
        if not srv.alive():
            raise RuntimeError(f"{srv.spec.name} died during {phase.name}")
        io1, bd1 = proc_io_bytes(srv.pid), backing_counters(srv)
        res["rss_max_bytes"] = rss.max_bytes
        res["io"] = {k: io1[k] - io0[k] for k in io0}
        if bd0 is not None and bd1 is not None:
            res["backing"] = {k: bd1[k] - bd0[k] for k in BACKING_DELTAS}
        out.append({"phase": phase.name, **res})
    return out


def run_writeback(
    size: int, repeat: int, runtime: float, mode: str, argv: str, note: str
) -> dict[str, Any]:
    """The whole benchmark: raw results for :func:`write_report`."""
    t0 = time.monotonic()
    limit = size // WORKING_SET_PER_LIMIT
    hot = limit // 2
    specs = servers(limit)
    raw: dict[str, Any] = {"sysinfo": sysinfo.collect(), "samples": []}
    for rep in range(repeat):
        k = rep % len(specs)
        for spec in specs[k:] + specs[:k]:
            base = {"server": spec.name, "rep": rep}
            try:
                with spec.start(size) as srv:
                    empty = srv.rss_bytes()
                    phases = run_phases(srv, size, hot, runtime)
                    extra: dict[str, Any] = {"rss_empty_bytes": empty,
                                             "rss_hwm_bytes": proc_hwm_bytes(srv.pid)}  # fmt: skip
                    stat = zramd_stat(srv)
                    if stat is not None:
                        extra["backing_end"] = {
                            k: v for k, v in stat["backing"].items() if k != "store"
                        }
                        extra["pool_max_bytes"] = stat["mm_stat"]["mem_used_max"]
            except Exception as exc:  # a failed sample is data, not the end of the run
                raw["samples"].append({**base, "error": f"{type(exc).__name__}: {exc}"})
                log(f"writeback rep {rep} {spec.name}: FAILED {exc}")
                continue
            for p in phases:
                raw["samples"].append({**base, **extra, **p})
                log(
                    f"writeback rep {rep} {p['phase']:15s} {spec.name:17s} {p['mbps']:8.1f} MB/s "
                    f"{p['iops']:8.0f} IOPS RSS max {p['rss_max_bytes'] / MIB:6.1f} MiB"
                )
    raw["config"] = {
        "mode": mode, "argv": argv, "size_mib": size // MIB, "mem_limit_mib": limit // MIB,
        "hot_mib": hot // MIB, "runtime": runtime, "repeat": repeat,
        "elapsed_s": time.monotonic() - t0, "note": note,
    }  # fmt: skip
    return raw


def measure_backed_rss(points: Sequence[int], repeat: int) -> list[dict[str, int]]:
    """VmRSS of zramd with ``n`` pages written back, per point and repetition (see the module
    doc): ``pages``, ``rss_bytes``, ``bd_count`` and the pool's ``pool_bytes``."""
    spec = FileServerSpec(ZRAMD, "zramd", "lz4", mem_limit=RSS_MEM_LIMIT)
    out: list[dict[str, int]] = []
    for rep in range(repeat):
        for n in points if rep % 2 == 0 else list(reversed(points)):
            with spec.start(RSS_EXPORT_SIZE) as srv:
                name = spec.export_name
                if n:
                    run_fio(srv.uri, n * PAGE_SIZE, ["--rw=write", *SEQ_ARGS], None)
                    srv.zramd("idle", name, "--all")
                    srv.zramd("writeback", name, "--type", "idle")
                time.sleep(RSS_SETTLE_S)
                stat = zramd_stat(srv)
                assert stat is not None
                out.append({
                    "rep": rep, "pages": n, "rss_bytes": srv.rss_bytes(),
                    "bd_count": stat["backing"]["bd_count"],
                    "pool_bytes": stat["mm_stat"]["mem_used_total"],
                })  # fmt: skip
            log(f"writeback rss rep {rep} {n:7d} pages: RSS {out[-1]['rss_bytes'] / MIB:.1f} MiB")
    return out


def rss_per_page(samples: list[dict[str, int]]) -> dict[str, Any]:
    """The median RSS per point, the bytes per page written back between the two largest
    points, and the fixed part (the smallest point with pages over the empty server, less its
    pages at that rate)."""
    by: dict[int, list[int]] = {}
    for s in samples:
        by.setdefault(s["pages"], []).append(s["rss_bytes"])
    med = {n: statistics.median(v) for n, v in sorted(by.items())}
    points = sorted(med)
    out: dict[str, Any] = {"median_rss_bytes": med, "per_page": None, "fixed_bytes": None}
    if len(points) >= 3:
        a, b = points[-2], points[-1]
        per_page = (med[b] - med[a]) / (b - a)
        out["per_page"] = per_page
        out["fixed_bytes"] = med[a] - med[points[0]] - per_page * a
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per phase and server, ratios zramd / nbdkit-file, zramd's RSS maxima."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: list[str] = []
    for s in raw.get("samples", []):
        if s.get("error"):
            errors.append(f"{s['server']} rep {s['rep']}: {s['error']}")
        else:
            groups.setdefault((s["phase"], s["server"]), []).append(s)
    med: dict[str, dict[str, dict[str, float | None]]] = {}
    for (phase, srv), ss in groups.items():
        med.setdefault(phase, {})[srv] = {
            "mbps": _median([x["mbps"] for x in ss]),
            "mbps_min": min(x["mbps"] for x in ss),
            "mbps_max": max(x["mbps"] for x in ss),
            "iops": _median([x["iops"] for x in ss]),
            "p99_us": _median([x["p99_us"] for x in ss if x.get("p99_us") is not None]),
            "rss_max_bytes": max(x["rss_max_bytes"] for x in ss),
            "read_bytes": _median([x["io"]["read_bytes"] for x in ss]),
            "write_bytes": _median([x["io"]["write_bytes"] for x in ss]),
            "bd_reads": _median([x["backing"]["bd_reads"] for x in ss if "backing" in x]),
            "bd_promoted": _median([x["backing"]["bd_promoted"] for x in ss if "backing" in x]),
            "n": len(ss),
        }
    ratios: dict[str, float | None] = {}
    for phase, per in med.items():
        a = per.get(ZRAMD, {}).get("mbps")
        b = per.get(NBDKIT, {}).get("mbps")
        ratios[phase] = a / b if a and b else None
    by_rep: dict[tuple[str, int], dict[str, float]] = {}
    for (phase, srv), ss in groups.items():
        for x in ss:
            by_rep.setdefault((phase, x["rep"]), {})[srv] = x["mbps"]
    spread: dict[str, list[float]] = {}
    for (phase, _), pair in by_rep.items():
        if pair.get(ZRAMD) and pair.get(NBDKIT):
            spread.setdefault(phase, []).append(pair[ZRAMD] / pair[NBDKIT])
    ratio_ranges = {phase: (min(r), max(r)) for phase, r in spread.items()}
    z = [s for ss in groups.values() for s in ss if s["server"] == ZRAMD]
    rss = {
        "sampled_max_bytes": max((s["rss_max_bytes"] for s in z), default=None),
        "hwm_max_bytes": max((s["rss_hwm_bytes"] for s in z), default=None),
        "empty_max_bytes": max((s["rss_empty_bytes"] for s in z), default=None),
        "pool_max_bytes": max((s["pool_max_bytes"] for s in z if "pool_max_bytes" in s),
                              default=None),
        "bd_count_max": max((s["backing_end"]["bd_count"] for s in z if "backing_end" in s),
                            default=None),
    }  # fmt: skip
    return {
        "medians": med,
        "ratios": ratios,
        "ratio_ranges": ratio_ranges,
        "zramd_rss": rss,
        "errors": errors,
    }


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _spread(per: dict[str, Any]) -> str:
    """``median (min-max)`` of a server's MB/s."""
    if per.get("mbps") is None:
        return "-"
    return f"{per['mbps']:.1f} ({per['mbps_min']:.1f}-{per['mbps_max']:.1f})"


def render_markdown(raw: dict[str, Any], summ: dict[str, Any]) -> str:
    info = raw.get("sysinfo", {})
    cfg = raw.get("config", {})
    mach = info.get("machine", {})
    limit = cfg.get("mem_limit_mib", 0) * MIB
    out = [
        "# Writeback: zramd with a backing file against nbdkit file\n",
        f"Run {info.get('date', '?')} with `python -m zramd.bench {cfg.get('argv', '')}` "
        f"({cfg.get('mode', '?')} mode): working set {cfg.get('size_mib', '?')} MiB, zramd's "
        f"mem-limit {cfg.get('mem_limit_mib', '?')} MiB, hot subset {cfg.get('hot_mib', '?')} "
        f"MiB, {cfg.get('runtime', '?')} s per time-based read phase, {cfg.get('repeat', '?')} "
        f"repetitions, servers interleaved and started fresh for every repetition; figures are "
        f"medians. Total wall time {cfg.get('elapsed_s', 0) / 60:.1f} min.\n",
        f"Machine: {mach.get('nproc', '?')} CPUs ({mach.get('cpu', '?')}), "
        f"{mach.get('ram_gib', '?')} GiB RAM, load average at start "
        f"{mach.get('loadavg_at_start', '?')}: a shared, loaded machine, so absolute figures "
        "are noisy; the ratios of the same run are what to read. Both files are on the same "
        "file system; each phase starts with them flushed and dropped from the page cache, and "
        "nbdkit runs with `cache=none`.\n",
    ]
    if cfg.get("note"):
        out.append(f"Note: {cfg['note']}\n")
    out += [
        f"| phase | {ZRAMD} MB/s | {NBDKIT} MB/s | ratio | ratio range | {ZRAMD} p99 µs "
        f"| {NBDKIT} p99 µs | {ZRAMD} RSS max MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in PHASES:
        per = summ["medians"].get(phase.name, {})
        z, n = per.get(ZRAMD, {}), per.get(NBDKIT, {})
        lo_hi = summ.get("ratio_ranges", {}).get(phase.name)
        out.append(
            f"| {phase.label} | {_spread(z)} | {_spread(n)} "
            f"| {_num(summ['ratios'].get(phase.name), 2)} "
            f"| {'-' if lo_hi is None else f'{lo_hi[0]:.2f}-{lo_hi[1]:.2f}'} "
            f"| {_num(z.get('p99_us'), 0)} | {_num(n.get('p99_us'), 0)} "
            f"| {_mib(z.get('rss_max_bytes'))} |"
        )
    out += [
        "",
        "MB/s: the median (the lowest-highest) of the repetitions. Ratio: zramd / nbdkit-file, "
        "median throughput; ratio range: the lowest and highest ratio of one repetition's two "
        "runs (back to back). Phases run in the order of the table on one server; the hot subset "
        "is rewritten sequentially (not measured) before its reads.\n",
        "Storage I/O per phase (MiB, medians; `read_bytes` and `write_bytes` of /proc/PID/io, "
        "the server's file I/O as the page cache accounts it) and zramd's pages read from its "
        "backing store (`bd_reads`) and taken back into RAM (`bd_promoted`):\n",
        f"| phase | {ZRAMD} read | {ZRAMD} written | {NBDKIT} read | {NBDKIT} written "
        "| bd_reads | bd_promoted |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in PHASES:
        per = summ["medians"].get(phase.name, {})
        z, n = per.get(ZRAMD, {}), per.get(NBDKIT, {})
        out.append(
            f"| {phase.label} | {_mib(z.get('read_bytes'))} | {_mib(z.get('write_bytes'))} "
            f"| {_mib(n.get('read_bytes'))} | {_mib(n.get('write_bytes'))} "
            f"| {_num(z.get('bd_reads'), 0)} | {_num(z.get('bd_promoted'), 0)} |"
        )
    rss = summ["zramd_rss"]
    peak = max(rss["sampled_max_bytes"] or 0, rss["hwm_max_bytes"] or 0)
    empty = rss["empty_max_bytes"] or 0
    out += [
        "",
        f"**zramd's memory**: mem-limit {_mib(limit)} MiB; RSS of the empty server "
        f"{_mib(empty)} MiB (interpreter, modules, codecs); largest RSS sampled every "
        f"{RSS_POLL_S * 1000:.0f} ms during the phases {_mib(rss['sampled_max_bytes'])} MiB, "
        f"peak RSS over the server's life (VmHWM) {_mib(rss['hwm_max_bytes'])} MiB: the empty "
        f"server plus {_mib(peak - empty)} MiB, against the limit of {_mib(limit)} MiB "
        f"({_num((peak - empty) / limit if limit else None, 2)}x). The pool's own peak "
        f"(mm_stat `mem_used_max`, largest of the repetitions): "
        f"{_mib(rss['pool_max_bytes'])} MiB. Pages in the backing store "
        f"at the end (bd_count, largest of the repetitions): "
        f"{rss['bd_count_max'] if rss['bd_count_max'] is not None else '-'}.\n",
    ]
    if limit and empty and rss["bd_count_max"] is not None:
        bound = (
            empty + limit + RSS_PER_BACKED_PAGE * rss["bd_count_max"] + RSS_BACKED_FIXED
            + BURST_BYTES + CLIENT_IN_FLIGHT
        )  # fmt: skip
        verdict = "within it" if peak <= bound else f"over it by {_mib(peak - bound)} MiB"
        out.append(
            f"Against the stated overhead (docs/operator.md, Writeback, Memory): the empty "
            f"server + the limit + {RSS_PER_BACKED_PAGE} B per page in the store + "
            f"{_mib(RSS_BACKED_FIXED)} MiB + one pressure burst ({_mib(BURST_BYTES)} MiB) + the "
            f"requests in flight ({_mib(CLIENT_IN_FLIGHT)} MiB) = {_mib(bound)} MiB; the peak "
            f"{_mib(peak)} MiB is {verdict}.\n"
        )
    if summ["errors"]:
        out += ["Failed samples:", *(f"- {e}" for e in summ["errors"]), ""]
    return "\n".join(out)


def write_report(raw: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Save ``writeback.json`` and render ``writeback.md`` into ``out_dir``."""
    summ = summarize(raw)
    save_report(out_dir, "writeback", {**raw, "summary": summ}, render_markdown(raw, summ))
    return summ
