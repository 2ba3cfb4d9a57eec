"""The durable-mode benchmark: zramd with ``sync=flush`` against ``nbdkit file`` and qemu-nbd.

Theory of operation
-------------------
Three servers, each started fresh for every repetition, in an order that rotates between
repetitions, every file in a private temp dir under one directory on a real disk (``--dir``;
tmpfs and other RAM file systems are refused, see :func:`disk_of`):

* ``zramd-lz4-durable``: an lz4 export with ``persist=`` a snapshot in its temp dir and
  ``sync=flush``: a FLUSH (or a write with FUA) is answered once the journal beside the snapshot
  is ``fdatasync``-ed; the data itself stays compressed in RAM;
* ``nbdkit-file``: ``nbdkit file`` on a sparse file of the working set's size (page cache on, its
  default; FLUSH is an ``fdatasync`` of the file);
* ``qemu-nbd``: ``qemu-nbd -f raw --cache=writeback`` on a sparse raw file (the page cache on,
  FLUSH is an ``fdatasync``), ``-e 16`` so the 16 connections of the QD16 phase are served.

The phases, in order, on one server (:data:`PHASES`), each preceded by a ``sync(2)`` so that
no phase's disk traffic is paid by the next one:

1. ``seq-write``: sequential 1 MiB writes, QD4, over the whole working set, one FLUSH at the end
   (fio's ``end_fsync=1``): the first write of a fresh device;
2. ``rand-write-qd1``: random 4 KiB writes, QD1, a FLUSH every 32 writes (fio's ``fsync=32``,
   which the nbd engine sends as NBD_CMD_FLUSH), time based;
3. ``rand-write-qd16``: the same with 16 writes in flight: 16 fio jobs (one connection each) at
   QD1, each with ``fsync=32``, so one FLUSH per 32 writes overall. A single job with
   ``iodepth=16`` and ``fsync=32`` does not do that: with the nbd engine fio 3.33 sends about
   ``iodepth`` FLUSHes per 32 writes (zramd's FLUSH counter: 1 per 16 writes at QD2, 1 per 8 at
   QD4, 1 per 2 at QD16);
4. ``rand-read-hot``: random 4 KiB reads, QD16, over the working set just written, time based;
   the file servers read it from the page cache, which is theirs to use;
5. ``rand-read-dropped``: the same after the file servers' files are flushed and dropped from
   the page cache (``fsync`` then ``posix_fadvise(DONTNEED)``; zramd's snapshot and journal
   too, though zramd never reads them while it runs).

Per phase, around each fio run: the server's ``wchar`` from /proc/PID/io (bytes it handed to
``write(2)``: its file writes, plus 16 bytes per reply on the socket; ``write_bytes`` there is
not used: with large folios the page cache accounts a whole folio for every 4 KiB write that
re-dirties it), the disk's sectors written (/sys/dev/block/MAJ:MIN/stat: the whole disk, the
file system's own journal and anything else running included), the server's CPU time, and for
zramd its FLUSH and WRITE request counters and its journal's counters (``zramd stat --json``:
``journal.syncs``, frames, checkpoints). fio's completion-latency percentiles of the writes and
latency percentiles of its FLUSHes are kept for the flush phases.

Each repetition starts with the disk's own figures, fio on a file in the same directory
(:data:`DISK_JOBS`): sequential 1 MiB O_DIRECT writes and reads, QD4, and random 4 KiB
buffered writes with an ``fdatasync`` every 32 writes, QD1.

:func:`summarize` gives medians per (phase, server) and the ratios zramd / nbdkit-file and
zramd / qemu-nbd of the median throughput; :func:`write_report` renders ``durable.md`` and
saves ``durable.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zramd.bench import sysinfo
from zramd.bench.fio import DATA_ARGS, FIO_TIMEOUT_SLACK_S, parse_fio, run_fio
from zramd.bench.runner import MIB, log, save_report
from zramd.bench.servers import (
    RunningServer,
    ServerSpec,
    proc_cpu_seconds,
    proc_rss_bytes,
    zramd_command,
)
from zramd.bench.writeback import drop_file_cache

ZRAMD = "zramd-lz4-durable"
NBDKIT = "nbdkit-file"
QEMU = "qemu-nbd"
#: the servers zramd is compared with, in report order
REFERENCES = (NBDKIT, QEMU)
SERVER_NAMES = (ZRAMD, *REFERENCES)
#: the data file of the file servers and zramd's snapshot, in each server's temp dir
DATA_FILE = "data.img"
SNAPSHOT_FILE = "x.snap"
#: writes per FLUSH in the flush phases
FLUSH_EVERY = 32
#: connections of the QD16 write phase (one fio job each, QD1)
QD16_JOBS = 16
#: file systems that keep their data in RAM: refused as the benchmark's directory
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
#: fio's latency percentiles kept for the flush phases (key in fio's JSON -> our name)
PERCENTILES = {"50.000000": "p50", "99.000000": "p99", "99.900000": "p99.9"}
#: counters of ``zramd stat --json``'s journal recorded per phase (differences)
JOURNAL_DELTAS = ("records", "frames", "syncs", "sync_us", "checkpoints")
SECTOR = 512

_RAND = ("--norandommap", "--randrepeat=0")
_COMP = tuple(DATA_ARGS["comp"])
_SYNC32 = f"--fsync={FLUSH_EVERY}"


@dataclass(frozen=True)
class Phase:
    name: str
    label: str
    args: tuple[str, ...]
    timed: bool  # time based (runtime) rather than one pass over the working set
    flushes: bool = False  # a FLUSH every FLUSH_EVERY writes: latency percentiles kept
    drop: bool = False  # the servers' files dropped from the page cache before it


PHASES: tuple[Phase, ...] = (
    Phase("seq-write", "seq 1M write QD4, FLUSH at the end",
          ("--rw=write", "--bs=1M", "--iodepth=4", "--end_fsync=1", *_COMP), False),
    Phase("rand-write-qd1", f"rand 4K write QD1, FLUSH every {FLUSH_EVERY}",
          ("--rw=randwrite", "--bs=4k", "--iodepth=1", _SYNC32, *_RAND, *_COMP), True,
          flushes=True),
    Phase("rand-write-qd16", f"rand 4K write QD16 ({QD16_JOBS} x QD1), FLUSH every {FLUSH_EVERY}",
          ("--rw=randwrite", "--bs=4k", "--iodepth=1", f"--numjobs={QD16_JOBS}", "--thread",
           "--group_reporting", _SYNC32, *_RAND, *_COMP), True, flushes=True),
    Phase("rand-read-hot", "rand 4K read QD16, hot (page cache kept)",
          ("--rw=randread", "--bs=4k", "--iodepth=16", *_RAND), True),
    Phase("rand-read-dropped", "rand 4K read QD16, page cache dropped",
          ("--rw=randread", "--bs=4k", "--iodepth=16", *_RAND), True, drop=True),
)  # fmt: skip


@dataclass(frozen=True)
class DiskJob:
    name: str
    label: str
    args: tuple[str, ...]
    timed: bool


#: the disk's own figures: fio on a file in the benchmark's directory
DISK_JOBS: tuple[DiskJob, ...] = (
    DiskJob("disk-seq-write", "seq 1M write QD4, O_DIRECT",
            ("--rw=write", "--bs=1M", "--iodepth=4", "--ioengine=libaio", "--direct=1",
             "--end_fsync=1"), False),
    DiskJob("disk-seq-read", "seq 1M read QD4, O_DIRECT",
            ("--rw=read", "--bs=1M", "--iodepth=4", "--ioengine=libaio", "--direct=1"), False),
    DiskJob("disk-rand-write-sync", f"rand 4K write QD1, fdatasync every {FLUSH_EVERY}",
            ("--rw=randwrite", "--bs=4k", "--iodepth=1", "--ioengine=psync",
             f"--fdatasync={FLUSH_EVERY}", *_RAND), True),
)  # fmt: skip


def phase_by_name(name: str) -> Phase:
    for p in PHASES:
        if p.name == name:
            return p
    raise KeyError(name)


def phase_job(phase: Phase, runtime: float) -> tuple[list[str], float | None]:
    """fio's arguments and runtime for ``phase``."""
    return list(phase.args), (runtime if phase.timed else None)


@dataclass
class DurableServerSpec(ServerSpec):
    """A server whose data lives in files in its temp dir: zramd's snapshot and journal, or the
    file servers' data file (:meth:`command` creates it, sparse)."""

    def command(self, sock: Path, size: int, backing: Path | None) -> list[str]:
        d = sock.parent
        if self.kind == "zramd":
            spec = (
                f"{self.export_name}={size}B,algorithm={self.option},"
                f"persist={d / SNAPSHOT_FILE},sync=flush"
            )
            control = ["--control", str(d / "control.sock")]
            return [*zramd_command(), "serve", "--unix", str(sock), *control, "--export", spec]
        path = d / DATA_FILE
        with open(path, "wb") as f:
            f.truncate(size)
        if self.kind == "nbdkit":
            return ["nbdkit", "-f", "-U", str(sock), "file", str(path)]
        if self.kind == "qemu-nbd-file":
            return [
                "qemu-nbd", "-f", "raw", "-x", self.export_name, "-k", str(sock), "-t",
                "-e", str(QD16_JOBS), "--cache=writeback", str(path),
            ]  # fmt: skip
        raise ValueError(f"unknown server kind {self.kind!r}")


def servers(parent_dir: str | None) -> list[DurableServerSpec]:
    return [
        DurableServerSpec(ZRAMD, "zramd", "lz4", parent_dir=parent_dir),
        DurableServerSpec(NBDKIT, "nbdkit", "", export_name="", parent_dir=parent_dir),
        DurableServerSpec(QEMU, "qemu-nbd-file", "", parent_dir=parent_dir),
    ]


def data_files(srv: RunningServer) -> list[Path]:
    """The files holding a server's data: the data file, or zramd's snapshot and journal."""
    if srv.spec.kind == "zramd":
        return sorted(srv.workdir.glob(SNAPSHOT_FILE + "*"))
    return [srv.workdir / DATA_FILE]


def _mounts() -> list[tuple[str, str, str]]:
    """(device, mount point, type) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            out.append((dev, mnt.replace("\\040", " "), fstype))
    return out


def disk_of(path: Path) -> dict[str, Any]:
    """The file system ``path`` is on (its type and block device ``MAJ:MIN``); raises
    ValueError for a file system that keeps its data in RAM."""
    real = os.path.realpath(path)
    best = ("", "", "")
    for dev, mnt, fstype in _mounts():
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype)
    if best[2] in RAM_FILESYSTEMS:
        raise ValueError(f"{path} is on {best[2]} ({best[1]}): the benchmark needs a real disk")
    st = os.stat(real)
    block = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return {"fstype": best[2], "block": block}


def disk_sectors_written(block: str) -> int | None:
    """Sectors written to the block device ``MAJ:MIN`` since boot; None if not a block device."""
    try:
        with open(f"/sys/dev/block/{block}/stat") as f:
            return int(f.read().split()[6])
    except (OSError, IndexError, ValueError):
        return None


def proc_io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io of a process, every field."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def zramd_counters(srv: RunningServer) -> dict[str, int] | None:
    """A zramd server's FLUSH and WRITE requests and journal counters; None for other servers."""
    if srv.spec.kind != "zramd":
        return None
    stat = srv.stat()
    out = {f"journal_{k}": int(stat["journal"][k]) for k in JOURNAL_DELTAS}
    out["flush_requests"] = int(stat["requests"]["flush"]["requests"])
    out["write_requests"] = int(stat["requests"]["write"]["requests"])
    out["journal_bytes"] = int(stat["journal"]["bytes"])
    out["compr_data_size"] = int(stat["mm_stat"]["compr_data_size"])
    out["mem_used_total"] = int(stat["mm_stat"]["mem_used_total"])
    return out


def _pct_us(d: dict[str, Any], key: str) -> dict[str, float]:
    pct = d.get(key, {}).get("percentile", {})
    return {name: pct[k] / 1000.0 for k, name in PERCENTILES.items() if k in pct}


def latencies(result: dict[str, Any]) -> dict[str, Any]:
    """fio's write completion-latency and FLUSH latency percentiles (µs) and its FLUSH count."""
    job = result["jobs"][0]
    sync = job.get("sync", {})
    return {
        "write_clat_us": _pct_us(job.get("write", {}), "clat_ns"),
        "sync_lat_us": _pct_us(sync, "lat_ns"),
        "fio_syncs": int(sync.get("total_ios", 0)),
        "fio_writes": int(job.get("write", {}).get("total_ios", 0)),
    }


def run_fio_file(path: Path, size: int, args: list[str], runtime: float | None) -> dict[str, Any]:
    """One fio job on a plain file (the disk's own figures); fio's parsed JSON."""
    cmd = ["fio", "--name=disk", f"--filename={path}", f"--size={size}",
           "--output-format=json", *args]  # fmt: skip
    timeout = FIO_TIMEOUT_SLACK_S
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={int(runtime * 1000)}ms"]
        timeout += runtime
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0 or "{" not in text:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.decode()[-1500:]}")
    result: dict[str, Any] = json.loads(text[text.index("{") :])
    return result


def run_disk(base: Path, size: int, runtime: float) -> list[dict[str, Any]]:
    """The disk's own figures (:data:`DISK_JOBS`) on a file in ``base``."""
    path = base / "disk-probe.img"
    out: list[dict[str, Any]] = []
    try:
        for job in DISK_JOBS:
            os.sync()
            res = parse_fio(
                run_fio_file(path, size, list(job.args), runtime if job.timed else None)
            )
            out.append({"phase": job.name, **res})
    finally:
        path.unlink(missing_ok=True)
    return out


def _delta(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {k: after[k] - before[k] for k in after}


def run_phases(srv: RunningServer, size: int, runtime: float, block: str) -> list[dict[str, Any]]:
    """Every phase on ``srv`` in order; one result per phase."""
    out: list[dict[str, Any]] = []
    for phase in PHASES:
        os.sync()
        if phase.drop:
            for f in data_files(srv):
                drop_file_cache(f)
        args, rt = phase_job(phase, runtime)
        io0, disk0, z0 = proc_io_counters(srv.pid), disk_sectors_written(block), zramd_counters(srv)
        cpu0 = proc_cpu_seconds(srv.pid)
        t0 = time.monotonic()
        result = run_fio(srv.uri, size, args, rt)
        wall = time.monotonic() - t0
        if not srv.alive():
            raise RuntimeError(f"{srv.spec.name} died during {phase.name}: {srv.log_tail()}")
        cpu = proc_cpu_seconds(srv.pid) - cpu0
        io1, disk1, z1 = proc_io_counters(srv.pid), disk_sectors_written(block), zramd_counters(srv)
        res: dict[str, Any] = {"phase": phase.name, **parse_fio(result), **latencies(result)}
        res["wall_s"] = wall
        res["cpu_s"] = cpu
        res["wchar"] = io1["wchar"] - io0["wchar"]
        res["write_bytes"] = io1["write_bytes"] - io0["write_bytes"]
        res["disk_write_bytes"] = (
            (disk1 - disk0) * SECTOR if disk0 is not None and disk1 is not None else None
        )
        zd = _delta(z1, z0)
        if zd is not None and z1 is not None:
            zd["journal_bytes"] = z1["journal_bytes"]  # at the end, not a difference
            zd["compr_data_size"] = z1["compr_data_size"]
            zd["mem_used_total"] = z1["mem_used_total"]
            res["zramd"] = zd
        out.append(res)
    return out


def run_durable(
    size: int, repeat: int, runtime: float, parent: Path, mode: str, argv: str, note: str
) -> dict[str, Any]:
    """The whole benchmark: raw results for :func:`write_report`."""
    t0 = time.monotonic()
    parent.mkdir(parents=True, exist_ok=True)
    disk = disk_of(parent)
    base = Path(tempfile.mkdtemp(prefix="zbd-", dir=parent))
    specs = servers(str(base))
    raw: dict[str, Any] = {"sysinfo": sysinfo.collect(), "disk": disk, "samples": []}
    try:
        for rep in range(repeat):
            try:
                for d in run_disk(base, size, runtime):
                    raw["samples"].append({"server": "disk", "rep": rep, **d})
                    log(f"durable rep {rep} {d['phase']:20s} {d['mbps']:8.1f} MB/s "
                        f"{d['iops']:8.0f} IOPS")  # fmt: skip
            except Exception as exc:
                raw["samples"].append({"server": "disk", "rep": rep,
                                       "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                log(f"durable rep {rep} disk: FAILED {exc}")
            k = rep % len(specs)
            for spec in specs[k:] + specs[:k]:
                sample = {"server": spec.name, "rep": rep}
                try:
                    with spec.start(size) as srv:
                        phases = run_phases(srv, size, runtime, disk["block"])
                        end = {"rss_end_bytes": proc_rss_bytes(srv.pid)}
                except Exception as exc:  # a failed sample is data, not the end of the run
                    raw["samples"].append({**sample, "error": f"{type(exc).__name__}: {exc}"})
                    log(f"durable rep {rep} {spec.name}: FAILED {exc}")
                    continue
                for p in phases:
                    raw["samples"].append({**sample, **end, **p})
                    log(
                        f"durable rep {rep} {p['phase']:17s} {spec.name:17s} "
                        f"{p['mbps']:8.1f} MB/s {p['iops']:8.0f} IOPS "
                        f"wrote {p['wchar'] / MIB:7.1f} MiB"
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    raw["config"] = {
        "mode": mode, "argv": argv, "size_mib": size // MIB, "runtime": runtime,
        "repeat": repeat, "elapsed_s": time.monotonic() - t0, "note": note,
    }  # fmt: skip
    return raw


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _med_key(ss: list[dict[str, Any]], *path: str) -> float | None:
    vals = []
    for s in ss:
        v: Any = s
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(float(v))
    return _median(vals)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per phase and server, ratios of zramd's median throughput to each reference's."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: list[str] = []
    for s in raw.get("samples", []):
        if s.get("error"):
            errors.append(f"{s['server']} rep {s['rep']}: {s['error']}")
        else:
            groups.setdefault((s["phase"], s["server"]), []).append(s)
    med: dict[str, dict[str, dict[str, float | None]]] = {}
    for (phase, srv), ss in groups.items():
        m: dict[str, float | None] = {
            "mbps": _med_key(ss, "mbps"),
            "iops": _med_key(ss, "iops"),
            "p99_us": _med_key(ss, "p99_us"),
            "wchar": _med_key(ss, "wchar"),
            "disk_write_bytes": _med_key(ss, "disk_write_bytes"),
            "cpu_s": _med_key(ss, "cpu_s"),
            "fio_syncs": _med_key(ss, "fio_syncs"),
            "fio_writes": _med_key(ss, "fio_writes"),
            "n": len(ss),
        }
        for pct in PERCENTILES.values():
            m[f"write_{pct}_us"] = _med_key(ss, "write_clat_us", pct)
            m[f"sync_{pct}_us"] = _med_key(ss, "sync_lat_us", pct)
        if any("zramd" in s for s in ss):
            for k in (
                "flush_requests",
                "write_requests",
                "journal_syncs",
                "journal_frames",
                "journal_checkpoints",
                "journal_bytes",
                "compr_data_size",
            ):
                m[k] = _med_key(ss, "zramd", k)  # fmt: skip
        med.setdefault(phase, {})[srv] = m
    ratios: dict[str, dict[str, float | None]] = {}
    for phase, per in med.items():
        if ZRAMD not in per:
            continue  # the disk's own jobs
        a = per.get(ZRAMD, {}).get("mbps")
        ratios[phase] = {}
        for ref in REFERENCES:
            b = per.get(ref, {}).get("mbps")
            ratios[phase][ref] = a / b if a and b else None
    return {"medians": med, "ratios": ratios, "errors": errors}


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.2f}"


def render_markdown(raw: dict[str, Any], summ: dict[str, Any]) -> str:
    info = raw.get("sysinfo", {})
    cfg = raw.get("config", {})
    mach = info.get("machine", {})
    disk = raw.get("disk", {})
    med = summ["medians"]
    out = [
        "# Durable mode: zramd with sync=flush against nbdkit file and qemu-nbd\n",
        f"Run {info.get('date', '?')} with `python -m zramd.bench {cfg.get('argv', '')}` "
        f"({cfg.get('mode', '?')} mode): working set {cfg.get('size_mib', '?')} MiB, "
        f"{cfg.get('runtime', '?')} s per time-based phase, {cfg.get('repeat', '?')} "
        "repetitions, servers interleaved and started fresh for every repetition; figures are "
        f"medians. Total wall time {cfg.get('elapsed_s', 0) / 60:.1f} min.\n",
        f"Machine: {mach.get('nproc', '?')} CPUs ({mach.get('cpu', '?')}), "
        f"{mach.get('ram_gib', '?')} GiB RAM, load average at start "
        f"{mach.get('loadavg_at_start', '?')}: a shared, loaded machine, so absolute figures "
        "are noisy; the ratios of the same run are what to read. Every server's files are on "
        f"the same file system ({disk.get('fstype', '?')}, block device "
        f"{disk.get('block', '?')}): zramd's snapshot and journal, nbdkit's and "
        "qemu-nbd's raw file. zramd runs `persist=FILE,sync=flush` (lz4); `nbdkit file` and "
        "`qemu-nbd -f raw --cache=writeback` keep the page cache on (their defaults) and answer "
        "a FLUSH with an `fdatasync` of the file.\n",
    ]
    if cfg.get("note"):
        out.append(f"Note: {cfg['note']}\n")
    head = " | ".join(f"{s} MB/s | {s} IOPS" for s in SERVER_NAMES)
    ratio_head = " | ".join(f"zramd / {r}" for r in REFERENCES)
    out += [
        f"| phase | {head} | {ratio_head} |",
        "| --- |" + " ---: |" * (2 * len(SERVER_NAMES) + len(REFERENCES)),
    ]
    for phase in PHASES:
        per = med.get(phase.name, {})
        cells = " | ".join(
            f"{_num(per.get(s, {}).get('mbps'))} | {_num(per.get(s, {}).get('iops'), 0)}"
            for s in SERVER_NAMES
        )
        rat = " | ".join(_num(summ["ratios"].get(phase.name, {}).get(r), 2) for r in REFERENCES)
        out.append(f"| {phase.label} | {cells} | {rat} |")
    out += [
        "",
        "Ratios: zramd's median throughput over the reference's. Phases run in the order of "
        "the table on one server. The hot reads are of the data just written: zramd serves them "
        "from its compressed pages in RAM, the file servers from the page cache; the last row "
        "is the same after the file servers' files are flushed and dropped from the page cache "
        f"(`posix_fadvise(DONTNEED)`). The QD16 write phase is {QD16_JOBS} fio jobs (one "
        f"connection each) at QD1 with `fsync={FLUSH_EVERY}`: one job at `iodepth=16` with "
        f"`fsync={FLUSH_EVERY}` makes fio's nbd engine send about 16 FLUSHes per "
        f"{FLUSH_EVERY} writes (counted by zramd), not one.\n",
        "Latency of the flush phases (ms, medians of the repetitions' percentiles): fio's "
        "completion latency of the writes, and of the FLUSH requests:\n",
        "| phase | server | write p50 | write p99 | write p99.9 | FLUSH p50 | FLUSH p99 "
        "| FLUSH p99.9 | FLUSHes / writes (fio) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in PHASES:
        if not phase.flushes:
            continue
        for s in SERVER_NAMES:
            m = med.get(phase.name, {}).get(s, {})
            fs, fw = m.get("fio_syncs"), m.get("fio_writes")
            out.append(
                f"| {phase.label} | {s} | {_ms(m.get('write_p50_us'))} "
                f"| {_ms(m.get('write_p99_us'))} | {_ms(m.get('write_p99.9_us'))} "
                f"| {_ms(m.get('sync_p50_us'))} | {_ms(m.get('sync_p99_us'))} "
                f"| {_ms(m.get('sync_p99.9_us'))} "
                f"| 1 / {_num(fw / fs if fs and fw else None)} |"
            )
    out += [
        "",
        "Bytes written per phase (MiB, medians): `wchar` of /proc/PID/io is what the server "
        "handed to `write(2)` (its file writes, plus 16 bytes per reply on the socket; for "
        "zramd the journal and any checkpoint snapshot); `disk` is the sectors the block "
        "device wrote during the phase (the file system's journal and anything else on the "
        "machine included). `write_bytes` of /proc/PID/io is not used: with large folios the "
        "page cache accounts a whole folio for each 4 KiB write that re-dirties one (it "
        "reported about 1.3 MB per 4 KiB write with an fdatasync every 32 on this kernel).\n",
        "| phase | " + " | ".join(f"{s} wchar | {s} disk" for s in SERVER_NAMES)
        + " | zramd FLUSHes | zramd journal syncs | zramd checkpoints |",
        "| --- |" + " ---: |" * (2 * len(SERVER_NAMES) + 3),
    ]  # fmt: skip
    for phase in PHASES:
        if phase.name.startswith("rand-read"):
            continue
        per = med.get(phase.name, {})
        cells = " | ".join(
            f"{_mib(per.get(s, {}).get('wchar'))} | {_mib(per.get(s, {}).get('disk_write_bytes'))}"
            for s in SERVER_NAMES
        )
        z = per.get(ZRAMD, {})
        out.append(
            f"| {phase.label} | {cells} | {_num(z.get('flush_requests'), 0)} "
            f"| {_num(z.get('journal_syncs'), 0)} | {_num(z.get('journal_checkpoints'), 0)} |"
        )
    zw = med.get("rand-write-qd1", {}).get(ZRAMD, {})
    fl, wr = zw.get("flush_requests"), zw.get("write_requests")
    seq = med.get("seq-write", {}).get(ZRAMD, {})
    out += [
        "",
        f"zramd's own counters confirm the FLUSHes: in the QD1 flush phase it received "
        f"{_num(fl, 0)} FLUSH requests for {_num(wr, 0)} writes "
        f"(1 / {_num(wr / fl if fl and wr else None)}), each answered after its journal's "
        f"`fdatasync` (`journal.syncs`). After the sequential write its pages held "
        f"{_mib(seq.get('compr_data_size'))} MiB compressed for {cfg.get('size_mib', '?')} MiB "
        f"written, its journal {_mib(seq.get('journal_bytes'))} MiB.\n",
        "CPU seconds of the server per phase (medians):\n",
        "| phase | " + " | ".join(SERVER_NAMES) + " |",
        "| --- |" + " ---: |" * len(SERVER_NAMES),
    ]
    for phase in PHASES:
        per = med.get(phase.name, {})
        out.append(f"| {phase.label} | "
                   + " | ".join(_num(per.get(s, {}).get("cpu_s"), 2) for s in SERVER_NAMES)
                   + " |")  # fmt: skip
    out += [
        "",
        "The disk's own figures, fio on a file in the same directory, at the start of every "
        "repetition (medians):\n",
        "| job | MB/s | IOPS | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for job in DISK_JOBS:
        m = med.get(job.name, {}).get("disk", {})
        out.append(f"| {job.label} | {_num(m.get('mbps'))} | {_num(m.get('iops'), 0)} "
                   f"| {_ms(m.get('p99_us'))} |")  # fmt: skip
    out.append("")
    if summ["errors"]:
        out += ["Failed samples:", *(f"- {e}" for e in summ["errors"]), ""]
    return "\n".join(out)


def write_report(raw: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Save ``durable.json`` and render ``durable.md`` into ``out_dir``."""
    summ = summarize(raw)
    save_report(out_dir, "durable", {**raw, "summary": summ}, render_markdown(raw, summ))
    return summ
