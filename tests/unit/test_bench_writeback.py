"""The writeback benchmark's pure parts (command lines, phases, /proc readers, summary, report)
and its RSS measurement on a real zramd with fio."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from zramd.bench import cli, writeback
from zramd.bench.writeback import NBDKIT, PHASES, ZRAMD

MIB = 1 << 20


def test_server_commands(tmp_path: Path) -> None:
    zramd, nbdkit = writeback.servers(64 * MIB)
    sock = tmp_path / "nbd.sock"
    cmd = zramd.command(sock, 256 * MIB, None)
    spec = cmd[cmd.index("--export") + 1]
    assert spec == (
        f"bench={256 * MIB}B,algorithm=lz4,mem-limit={64 * MIB}B,backing={tmp_path / 'data.img'}"
    )
    assert cmd[cmd.index("--unix") + 1] == str(sock)
    assert cmd[cmd.index("--control") + 1] == str(tmp_path / "control.sock")
    assert nbdkit.command(sock, 256 * MIB, None) == [
        "nbdkit", "-f", "-U", str(sock), "file", str(tmp_path / "data.img"), "cache=none",
    ]  # fmt: skip
    assert (tmp_path / "data.img").stat().st_size == 256 * MIB
    assert nbdkit.export_name == ""


def test_phases() -> None:
    names = [p.name for p in PHASES]
    assert names == ["rand-write", "rand-read-cold", "rand-read-hot", "seq-write", "seq-read"]
    size, args, runtime = writeback.phase_job(writeback.phase_by_name("rand-write"), 256, 32, 2.0)
    assert (size, runtime) == (256, None)
    assert "--rw=randwrite" in args and "--bs=4k" in args and "--norandommap" not in args
    size, args, runtime = writeback.phase_job(
        writeback.phase_by_name("rand-read-hot"), 256, 32, 2.0
    )
    assert (size, runtime) == (32, 2.0)
    assert "--rw=randread" in args
    size, args, runtime = writeback.phase_job(writeback.phase_by_name("seq-read"), 256, 32, 2.0)
    assert (size, runtime) == (256, None)
    assert "--bs=1M" in args


def test_proc_readers_on_self(tmp_path: Path) -> None:
    io = writeback.proc_io_bytes(os.getpid())
    assert set(io) == {"read_bytes", "write_bytes"} and min(io.values()) >= 0
    assert writeback.proc_hwm_bytes(os.getpid()) > 1 * MIB
    with writeback.RssSampler(os.getpid()) as rss:
        pass
    assert rss.max_bytes > 1 * MIB
    f = tmp_path / "f"
    f.write_bytes(b"x" * 8192)
    writeback.drop_file_cache(f)
    assert f.read_bytes() == b"x" * 8192


def _sample(server: str, phase: str, rep: int, mbps: float, rss: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "server": server, "rep": rep, "phase": phase, "mbps": mbps, "iops": mbps * 256,
        "p99_us": 100.0, "rss_max_bytes": rss, "rss_empty_bytes": 40 * MIB,
        "rss_hwm_bytes": rss + MIB, "io": {"read_bytes": 0, "write_bytes": 8 * MIB},
    }  # fmt: skip
    if server == ZRAMD:
        s["backing"] = {k: 1 for k in writeback.BACKING_DELTAS}
        s["backing_end"] = {"bd_count": 5000 + rep}
        s["pool_max_bytes"] = (50 + rep) * MIB
    return s


def _raw() -> dict[str, Any]:
    samples = []
    for rep in range(3):
        for p in PHASES:
            samples.append(_sample(ZRAMD, p.name, rep, 100.0 + rep, (60 + rep) * MIB))
            samples.append(_sample(NBDKIT, p.name, rep, 50.0, 5 * MIB))
    samples.append({"server": NBDKIT, "rep": 3, "error": "RuntimeError: boom"})
    return {
        "sysinfo": {"date": "2026-01-01", "machine": {"nproc": 2, "loadavg_at_start": [5.0]}},
        "config": {"mode": "full", "argv": "writeback", "size_mib": 256, "mem_limit_mib": 64,
                   "hot_mib": 32, "runtime": 2.0, "repeat": 3, "elapsed_s": 60.0},
        "samples": samples,
    }  # fmt: skip


def test_summarize() -> None:
    s = writeback.summarize(_raw())
    assert s["medians"]["rand-write"][ZRAMD]["mbps"] == 101.0
    assert s["medians"]["rand-write"][ZRAMD]["n"] == 3
    assert s["ratios"]["seq-read"] == 101.0 / 50.0
    assert s["medians"]["seq-read"][ZRAMD]["mbps_min"] == 100.0
    assert s["medians"]["seq-read"][ZRAMD]["mbps_max"] == 102.0
    assert s["ratio_ranges"]["seq-read"] == (100.0 / 50.0, 102.0 / 50.0)
    assert s["zramd_rss"]["sampled_max_bytes"] == 62 * MIB
    assert s["zramd_rss"]["hwm_max_bytes"] == 63 * MIB
    assert s["zramd_rss"]["bd_count_max"] == 5002
    assert s["zramd_rss"]["pool_max_bytes"] == 52 * MIB
    assert s["errors"] == [f"{NBDKIT} rep 3: RuntimeError: boom"]


def test_write_report(tmp_path: Path) -> None:
    writeback.write_report(_raw(), tmp_path)
    md = (tmp_path / "writeback.md").read_text()
    assert (
        "| rand 4K write QD16, whole set once | 101.0 (100.0-102.0) | 50.0 (50.0-50.0) | 2.02 "
        "| 2.00-2.04 |"
    ) in md
    assert "loaded machine" in md
    assert "peak RSS over the server's life (VmHWM) 63.0 MiB" in md
    assert "plus 23.0 MiB, against the limit of 64.0 MiB (0.36x)" in md
    assert "(mm_stat `mem_used_max`, largest of the repetitions): 52.0 MiB" in md
    # 40 + 64 + 5002 * 48 B + 8 + 4 + 4 MiB
    assert "= 120.2 MiB; the peak 63.0 MiB is within it." in md
    assert "boom" in md
    assert (tmp_path / "writeback.json").exists()


def test_cli_parses_writeback() -> None:
    args = cli._parser().parse_args(["writeback", "--quick", "--size", "128M"])
    assert (args.cmd, args.quick, args.size) == ("writeback", True, 128 * MIB)
    assert cli._parser().parse_args(["writeback", "--rss", "--repeat", "5"]).rss


def test_rss_per_page() -> None:
    samples = [
        {"rep": r, "pages": n, "rss_bytes": 40 * MIB + (3 * MIB if n else 0) + 30 * n + r}
        for r in range(3)
        for n in (0, 1000, 3000)
    ]
    summ = writeback.rss_per_page(samples)
    assert summ["median_rss_bytes"][0] == 40 * MIB + 1
    assert summ["per_page"] == 30.0
    assert summ["fixed_bytes"] == 3 * MIB
    assert writeback.rss_per_page(samples[:2])["per_page"] is None


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_measure_backed_rss_on_a_real_server() -> None:
    samples = writeback.measure_backed_rss([0, 512], 1)
    assert [s["pages"] for s in samples] == [0, 512]
    empty, full = samples
    assert empty["bd_count"] == 0 and full["bd_count"] == 512 and full["pool_bytes"] == 0
    assert full["rss_bytes"] > 10 * MIB and empty["rss_bytes"] > 10 * MIB
