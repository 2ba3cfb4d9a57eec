"""fio workloads through fio's nbd engine, and the parsing of fio's JSON output.

Theory of operation
-------------------
A :class:`Workload` is one fio job (pattern, block size, queue depth, data kind). :func:`run_sample`
takes a freshly started server, prefills the whole device sequentially (1 MiB, QD4, same data kind)
so reads and overwrites run in steady state, then runs the measured job time-based and samples
the server's CPU time around it. The prefill's own throughput is kept as the "fresh device"
sequential write figure.

Data kinds: ``comp`` is about 2.5:1 compressible per 4 KiB page (fio fills 60% of each 4 KiB chunk
with a compressible pattern and refills the buffer for every I/O); ``zero`` is all-zero pages.

fio's nbd engine prints a line on stdout, so the JSON goes to a file (``--output``).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zramd.bench.servers import RunningServer

#: data options per kind
DATA_ARGS: dict[str, list[str]] = {
    "comp": [
        "--buffer_compress_percentage=60",
        "--buffer_compress_chunk=4k",
        "--refill_buffers",
    ],
    "zero": ["--zero_buffers"],
}
#: slack on top of the runtime before a fio run is declared hung
FIO_TIMEOUT_SLACK_S = 120.0
P99_KEY = "99.000000"


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio --rw
    bs: str
    iodepth: int
    data: str  # "comp" | "zero"
    rwmixread: int | None = None
    label: str = ""

    @property
    def is_seq(self) -> bool:
        return self.rw in ("read", "write")

    def fio_args(self) -> list[str]:
        args = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]
        if self.rwmixread is not None:
            args.append(f"--rwmixread={self.rwmixread}")
        if not self.is_seq:
            args += ["--norandommap", "--randrepeat=0"]
        return args + DATA_ARGS[self.data]


def _wl(
    name: str, rw: str, bs: str, qd: int, data: str, label: str, mix: int | None = None
) -> Workload:
    return Workload(name, rw, bs, qd, data, mix, label)


#: the full set; ``fill`` is not a job of its own: it is the prefill of ``seq-write``
WORKLOADS: list[Workload] = [
    _wl("seq-write", "write", "1M", 4, "comp", "seq 1M write QD4"),
    _wl("seq-read", "read", "1M", 4, "comp", "seq 1M read QD4"),
    _wl("rand-write-qd1", "randwrite", "4k", 1, "comp", "rand 4K write QD1"),
    _wl("rand-write-qd32", "randwrite", "4k", 32, "comp", "rand 4K write QD32"),
    _wl("rand-read-qd1", "randread", "4k", 1, "comp", "rand 4K read QD1"),
    _wl("rand-read-qd32", "randread", "4k", 32, "comp", "rand 4K read QD32"),
    _wl("rand-rw7030-qd16", "randrw", "4k", 16, "comp", "rand 4K 70/30 QD16", 70),
    _wl("zero-seq-write", "write", "1M", 4, "zero", "zero: seq 1M write QD4"),
    _wl("zero-seq-read", "read", "1M", 4, "zero", "zero: seq 1M read QD4"),
    _wl("zero-rand-write-qd32", "randwrite", "4k", 32, "zero", "zero: rand 4K write QD32"),
    _wl("zero-rand-read-qd32", "randread", "4k", 32, "zero", "zero: rand 4K read QD32"),
]
#: pseudo-workload: the prefill of seq-write, i.e. the first write of a fresh device
FILL = "seq-write-fresh"
FILL_LABEL = "seq 1M write QD4, fresh device"
QUICK_WORKLOADS = [w.name for w in WORKLOADS]


def workload_by_name(name: str) -> Workload:
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise KeyError(f"unknown workload {name!r}; choose from {', '.join(w.name for w in WORKLOADS)}")


def run_fio(uri: str, size: int, args: list[str], runtime: float | None) -> dict[str, Any]:
    """Run one fio job against ``uri``; return fio's parsed JSON."""
    with tempfile.NamedTemporaryFile(prefix="zbench-fio-", suffix=".json") as out:
        cmd = [
            "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
            "--output-format=json", f"--output={out.name}", *args,
        ]  # fmt: skip
        timeout = FIO_TIMEOUT_SLACK_S
        if runtime is not None:
            cmd += ["--time_based", f"--runtime={int(runtime * 1000)}ms"]
            timeout += runtime
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        text = Path(out.name).read_text()
        if proc.returncode != 0 or not text.strip():
            raise RuntimeError(
                f"fio failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1500:]}"
            )
    return json.loads(text[text.index("{") :])


def parse_fio(result: dict[str, Any]) -> dict[str, Any]:
    """Throughput (MB/s = 1e6 B/s), IOPS and p99 completion latency (µs) of the first job,
    read and write summed; p99 is the larger of the two directions that did I/O."""
    job = result["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    bw = 0.0
    iops = 0.0
    p99s: dict[str, float] = {}
    for direction in ("read", "write"):
        d = job[direction]
        if d.get("total_ios", 0) == 0:
            continue
        bw += d["bw_bytes"]
        iops += d["iops"]
        pct = d.get("clat_ns", {}).get("percentile", {})
        if P99_KEY in pct:
            p99s[direction] = pct[P99_KEY] / 1000.0
    return {
        "mbps": bw / 1e6,
        "iops": iops,
        "p99_us": max(p99s.values()) if p99s else None,
        "p99_us_by_dir": p99s,
        "runtime_s": job.get("job_runtime", 0) / 1000.0,
    }


def prefill(srv: RunningServer, size: int, data: str) -> dict[str, Any]:
    args = ["--rw=write", "--bs=1M", "--iodepth=4", *DATA_ARGS[data]]
    cpu0 = srv.cpu_seconds()
    t0 = time.monotonic()
    res = parse_fio(run_fio(srv.uri, size, args, None))
    res["wall_s"] = time.monotonic() - t0
    res["cpu_s"] = srv.cpu_seconds() - cpu0
    return res


def run_sample(srv: RunningServer, wl: Workload, size: int, runtime: float) -> dict[str, Any]:
    """Prefill then measure ``wl`` on ``srv``. Returns the measured figures, with the prefill's
    under ``prefill``."""
    pre = prefill(srv, size, wl.data)
    cpu0 = srv.cpu_seconds()
    t0 = time.monotonic()
    res = parse_fio(run_fio(srv.uri, size, wl.fio_args(), runtime))
    wall = time.monotonic() - t0
    cpu = srv.cpu_seconds() - cpu0
    res["wall_s"] = wall
    res["cpu_s"] = cpu
    # fio's own runtime excludes its startup; CPU is shared over the wall time of the run
    res["cpu_pct"] = 100.0 * cpu / wall if wall > 0 else None
    res["rss_bytes"] = srv.rss_bytes()
    res["prefill"] = pre
    pre["cpu_pct"] = 100.0 * pre["cpu_s"] / pre["wall_s"] if pre["wall_s"] > 0 else None
    return res
