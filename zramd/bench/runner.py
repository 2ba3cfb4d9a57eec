"""The run: which sample when, with what, and the raw results.

Theory of operation
-------------------
For each repetition, for each workload, every server is started fresh, prefilled, measured and
stopped; the server order rotates with the repetition, so no server always runs first or last.
Density samples follow the same pattern per image. A server that fails to start
``MAX_START_FAILURES`` times is dropped for the rest of the run (and the failures recorded), so a
broken build costs seconds, not the whole run. Progress goes to stderr; the raw results dict is
what :mod:`zramd.bench.report` renders.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zramd.bench import density, sysinfo
from zramd.bench.fio import FILL, Workload, run_sample
from zramd.bench.servers import ServerSpec, ServerStartError
from zramd.config import ConfigError, parse_size

MIB = 1 << 20
MAX_START_FAILURES = 2
#: log lines that mark a sample as suspect
SUSPECT_LOG_MARKERS = ("Traceback", "ERROR")
LOG_TAIL = 20000


@dataclass
class RunConfig:
    servers: list[ServerSpec]
    workloads: list[Workload]
    size: int
    runtime: float
    repeat: int
    density: bool = True
    density_repeat: int = 1
    ext2_budget: int = 200 * MIB
    memory_budget: int = 128 * MIB
    micro: bool = True
    mode: str = "full"
    argv: str = ""
    note: str = ""
    failures: dict[str, int] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size_arg(text: str) -> int:
    """An argparse type: a size as zramd's configuration reads it (``config.parse_size``: "4G",
    a bare number is MiB), a bad one refused in one line."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def save_report(out_dir: Path, name: str, raw: dict[str, Any], text: str) -> None:
    """Write a benchmark's ``NAME.json`` (``raw``, indented) and ``NAME.md`` (``text``) into
    ``out_dir``, made if need be."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(text)


def _log_warnings(text: str) -> str:
    """Lines of a server log that make its figures suspect (a crash, an error)."""
    bad = [ln for ln in text.splitlines() if any(m in ln for m in SUSPECT_LOG_MARKERS)]
    return " | ".join(bad[:3])


def _usable(cfg: RunConfig, spec: ServerSpec) -> bool:
    return cfg.failures.get(spec.name, 0) < MAX_START_FAILURES


def _rotated(items: list[ServerSpec], k: int) -> list[ServerSpec]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def run_fio_matrix(cfg: RunConfig) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    total = cfg.repeat * len(cfg.workloads) * len(cfg.servers)
    done = 0
    for rep in range(cfg.repeat):
        for wi, wl in enumerate(cfg.workloads):
            for spec in _rotated(cfg.servers, rep + wi):
                done += 1
                if not _usable(cfg, spec):
                    continue
                base = {"server": spec.name, "workload": wl.name, "rep": rep}
                try:
                    srv = spec.start(cfg.size)
                    try:
                        res = run_sample(srv, wl, cfg.size, cfg.runtime)
                        alive = srv.alive()
                        warn = _log_warnings(srv.log_tail(LOG_TAIL))
                    finally:
                        rc = srv.stop()
                    if not alive:
                        raise RuntimeError(f"{spec.name} died during the job")
                    res["exit_code"] = rc
                    if warn:
                        res["warning"] = warn
                        log(f"{spec.name}: {warn}")
                except ServerStartError as exc:
                    cfg.failures[spec.name] = cfg.failures.get(spec.name, 0) + 1
                    samples.append({**base, "error": f"start: {exc}"})
                    log(f"{done}/{total} {spec.name} {wl.name}: START FAILED {exc}")
                    continue
                except Exception as exc:  # a failed sample is data, not the end of the run
                    samples.append({**base, "error": f"{type(exc).__name__}: {exc}"})
                    log(f"{done}/{total} {spec.name} {wl.name}: FAILED {exc}")
                    continue
                pre = res.pop("prefill")
                samples.append({**base, **res})
                if wl.name == "seq-write":
                    samples.append({**base, "workload": FILL, **pre})
                log(
                    f"{done}/{total} rep {rep} {wl.name:22s} {spec.name:15s} "
                    f"{res['mbps']:8.1f} MB/s {res['iops']:9.0f} IOPS "
                    f"p99 {res['p99_us'] or 0:8.0f} us cpu {res['cpu_pct'] or 0:4.0f}%"
                )
    return samples


def run_density_all(
    cfg: RunConfig, workdir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    images: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        p = density.build_ext2_image(workdir / "ext2.img", cfg.ext2_budget)
        paths["ext2"] = p
        images["ext2"] = {"description": "ext2 file system of files from /usr/share, /usr/lib"}
    except Exception as exc:
        errors["ext2"] = f"{type(exc).__name__}: {exc}"
        log(f"ext2 image failed: {exc}")
    try:
        p = density.build_memory_image(workdir / "memory.img", cfg.memory_budget)
        paths["memory"] = p
        images["memory"] = {
            "description": "anonymous memory of 3 python processes (numpy, json, dicts, text)"
        }
    except Exception as exc:
        errors["memory"] = f"{type(exc).__name__}: {exc}"
        log(f"memory image failed: {exc}")
    for name, p in paths.items():
        images[name].update(density.ideal_sizes(p))
        images[name]["sha256"] = density.sha256_file(p)
    log(f"images built in {time.monotonic() - t0:.1f}s: "
        + ", ".join(f"{k} {v['bytes'] // MIB} MiB" for k, v in images.items()))  # fmt: skip
    samples: list[dict[str, Any]] = []
    for rep in range(cfg.density_repeat):
        for ii, (name, p) in enumerate(paths.items()):
            for spec in _rotated(cfg.servers, rep + ii):
                if not _usable(cfg, spec):
                    continue
                base = {"server": spec.name, "image": name, "rep": rep}
                try:
                    res = density.run_density(spec, p, images[name]["sha256"])
                except Exception as exc:
                    samples.append({**base, "error": f"{type(exc).__name__}: {exc}"})
                    log(f"density {name} {spec.name}: FAILED {exc}")
                    continue
                stages = res.pop("stages")
                samples.append({**base, **res})
                log(
                    f"density rep {rep} {name:7s} {spec.name:15s} in {res['copy_in_mbps']:7.1f} "
                    f"out {res['copy_out_mbps']:7.1f} MB/s mem/byte {res['mem_per_byte']:.3f} "
                    f"sha {'ok' if res['sha256_ok'] else 'MISMATCH'}"
                )
                for stage, per_byte in stages.items():  # a row of its own, no copy rates
                    samples.append({**base, **res, "server": f"{spec.name} {stage}",
                                    "copy_in_mbps": None, "copy_out_mbps": None,
                                    "mem_per_byte": per_byte})  # fmt: skip
                    log(f"density rep {rep} {name:7s} {spec.name} {stage}: mem/byte "
                        f"{per_byte:.3f}")  # fmt: skip
    return images, samples, errors


def run(cfg: RunConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    raw: dict[str, Any] = {"sysinfo": sysinfo.collect()}
    try:
        if cfg.workloads:
            raw["fio_samples"] = run_fio_matrix(cfg)
        if cfg.density:
            with tempfile.TemporaryDirectory(prefix="zbench-img-") as d:
                raw["images"], raw["density_samples"], raw["image_errors"] = run_density_all(
                    cfg, Path(d)
                )
        if cfg.micro:
            from zramd.bench.micro import run_micro

            raw["micro"] = run_micro()
    finally:
        raw["config"] = {
            "mode": cfg.mode,
            "argv": cfg.argv,
            "size_mib": cfg.size // MIB,
            "runtime": cfg.runtime,
            "repeat": cfg.repeat,
            "density_repeat": cfg.density_repeat,
            "servers": [s.name for s in cfg.servers],
            "workloads": [w.name for w in cfg.workloads],
            "elapsed_s": time.monotonic() - t0,
            "start_failures": cfg.failures,
            "note": cfg.note,
        }
    return raw
