"""The durable benchmark's pure parts: command lines, phases, the disk check, summary, report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from zramd.bench import cli, durable
from zramd.bench.durable import DISK_JOBS, NBDKIT, PHASES, QEMU, ZRAMD

MIB = 1 << 20


def test_server_commands(tmp_path: Path) -> None:
    zramd, nbdkit, qemu = durable.servers(str(tmp_path))
    assert [s.name for s in (zramd, nbdkit, qemu)] == [ZRAMD, NBDKIT, QEMU]
    assert all(s.parent_dir == str(tmp_path) for s in (zramd, nbdkit, qemu))
    sock = tmp_path / "nbd.sock"
    cmd = zramd.command(sock, 256 * MIB, None)
    spec = cmd[cmd.index("--export") + 1]
    assert spec == f"bench={256 * MIB}B,algorithm=lz4,persist={tmp_path / 'x.snap'},sync=flush"
    assert cmd[cmd.index("--unix") + 1] == str(sock)
    assert cmd[cmd.index("--control") + 1] == str(tmp_path / "control.sock")
    assert not (tmp_path / "data.img").exists()
    assert nbdkit.command(sock, 256 * MIB, None) == [
        "nbdkit", "-f", "-U", str(sock), "file", str(tmp_path / "data.img"),
    ]  # fmt: skip
    assert (tmp_path / "data.img").stat().st_size == 256 * MIB
    assert (tmp_path / "data.img").stat().st_blocks == 0  # sparse
    cmd = qemu.command(sock, 128 * MIB, None)
    assert cmd[:3] == ["qemu-nbd", "-f", "raw"] and cmd[-1] == str(tmp_path / "data.img")
    assert "--cache=writeback" in cmd and cmd[cmd.index("-e") + 1] == "16"
    assert cmd[cmd.index("-x") + 1] == qemu.export_name == "bench"
    assert (tmp_path / "data.img").stat().st_size == 128 * MIB
    assert nbdkit.export_name == ""


def test_phases() -> None:
    names = [p.name for p in PHASES]
    assert names == [
        "seq-write", "rand-write-qd1", "rand-write-qd16", "rand-read-hot", "rand-read-dropped",
    ]  # fmt: skip
    args, rt = durable.phase_job(durable.phase_by_name("seq-write"), 5.0)
    assert rt is None and "--end_fsync=1" in args and "--bs=1M" in args
    for name, jobs in (("rand-write-qd1", None), ("rand-write-qd16", "--numjobs=16")):
        phase = durable.phase_by_name(name)
        args, rt = durable.phase_job(phase, 5.0)
        assert rt == 5.0 and phase.flushes
        assert "--fsync=32" in args and "--iodepth=1" in args and "--rw=randwrite" in args
        assert (jobs in args) if jobs else not any(a.startswith("--numjobs") for a in args)
    assert durable.phase_by_name("rand-read-dropped").drop
    assert not durable.phase_by_name("rand-read-hot").drop
    names = [j.name for j in DISK_JOBS]
    assert names == ["disk-seq-write", "disk-seq-read", "disk-rand-write-sync"]


def test_disk_of(tmp_path: Path) -> None:
    d = durable.disk_of(tmp_path)
    st = os.stat(tmp_path)
    assert d["block"] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" and d["fstype"]
    if any(m == "/dev/shm" and t == "tmpfs" for _, m, t in durable._mounts()):
        with pytest.raises(ValueError, match="real disk"):
            durable.disk_of(Path("/dev/shm"))
    assert durable.disk_sectors_written("0:0") is None


def test_proc_io_counters() -> None:
    io = durable.proc_io_counters(os.getpid())
    assert {"wchar", "rchar", "write_bytes", "read_bytes"} <= set(io)


def test_latencies() -> None:
    job = {
        "write": {"total_ios": 64, "clat_ns": {"percentile": {"50.000000": 70000,
                                                              "99.000000": 210000}}},
        "sync": {"total_ios": 2, "lat_ns": {"percentile": {"50.000000": 1_000_000,
                                                           "99.900000": 4_000_000}}},
    }  # fmt: skip
    lat = durable.latencies({"jobs": [job]})
    assert lat == {
        "write_clat_us": {"p50": 70.0, "p99": 210.0},
        "sync_lat_us": {"p50": 1000.0, "p99.9": 4000.0},
        "fio_syncs": 2,
        "fio_writes": 64,
    }
    assert durable.latencies({"jobs": [{"read": {}}]})["fio_syncs"] == 0


def _sample(server: str, phase: str, rep: int, mbps: float) -> dict[str, Any]:
    s: dict[str, Any] = {
        "server": server, "rep": rep, "phase": phase, "mbps": mbps, "iops": mbps * 256,
        "p99_us": 100.0, "wchar": 8 * MIB, "disk_write_bytes": 9 * MIB, "cpu_s": 1.0,
        "write_clat_us": {"p50": 50.0 + rep, "p99": 200.0, "p99.9": 900.0},
        "sync_lat_us": {"p50": 1000.0, "p99": 3000.0, "p99.9": 5000.0},
        "fio_syncs": 10, "fio_writes": 320,
    }  # fmt: skip
    if server == ZRAMD:
        s["wchar"] = 3 * MIB
        s["zramd"] = {
            "flush_requests": 10, "write_requests": 320, "journal_syncs": 10,
            "journal_frames": 12, "journal_checkpoints": 0, "journal_bytes": 40 * MIB,
            "compr_data_size": 30 * MIB,
        }  # fmt: skip
    return s


def _raw() -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    for rep in range(3):
        samples += [{"server": "disk", "rep": rep, "phase": j.name, "mbps": 500.0,
                     "iops": 500.0, "p99_us": 4000.0} for j in DISK_JOBS]  # fmt: skip
        for p in PHASES:
            samples.append(_sample(ZRAMD, p.name, rep, 100.0 + rep))
            samples.append(_sample(NBDKIT, p.name, rep, 50.0))
            samples.append(_sample(QEMU, p.name, rep, 200.0))
    samples.append({"server": QEMU, "rep": 3, "error": "RuntimeError: boom"})
    return {
        "sysinfo": {"date": "2026-01-01", "machine": {"nproc": 2, "loadavg_at_start": [5.0]}},
        "disk": {"fstype": "ext4", "block": "254:0"},
        "config": {"mode": "full", "argv": "durable", "size_mib": 1024, "runtime": 5.0,
                   "repeat": 3, "elapsed_s": 60.0},
        "samples": samples,
    }  # fmt: skip


def test_summarize() -> None:
    s = durable.summarize(_raw())
    m = s["medians"]["rand-write-qd1"][ZRAMD]
    assert m["mbps"] == 101.0 and m["n"] == 3
    assert m["write_p50_us"] == 51.0 and m["sync_p99.9_us"] == 5000.0
    assert m["flush_requests"] == 10 and m["compr_data_size"] == 30 * MIB
    assert "flush_requests" not in s["medians"]["rand-write-qd1"][NBDKIT]
    assert s["ratios"]["seq-write"] == {NBDKIT: 101.0 / 50.0, QEMU: 101.0 / 200.0}
    assert "disk-seq-write" not in s["ratios"]
    assert s["medians"]["disk-seq-write"]["disk"]["mbps"] == 500.0
    assert s["errors"] == [f"{QEMU} rep 3: RuntimeError: boom"]


def test_write_report(tmp_path: Path) -> None:
    durable.write_report(_raw(), tmp_path)
    md = (tmp_path / "durable.md").read_text()
    assert (
        "| seq 1M write QD4, FLUSH at the end | 101.0 | 25856 | 50.0 | 12800 | 200.0 | 51200 "
        "| 2.02 | 0.51 |"
    ) in md
    row = "| rand 4K write QD1, FLUSH every 32 |"
    assert f"{row} zramd-lz4-durable | 0.05 | 0.20 | 0.90 | 1.00 " in md
    assert "| 1 / 32.0 |" in md
    assert f"{row} 3.0 | 9.0 | 8.0 | 9.0 | 8.0 | 9.0 | 10 | 10 | 0 |" in md
    assert "received 10 FLUSH requests for 320 writes (1 / 32.0)" in md
    assert "| seq 1M write QD4, O_DIRECT | 500.0 | 500 | 4.00 |" in md
    assert "(ext4, block device 254:0)" in md and "loaded machine" in md
    assert "boom" in md
    assert (tmp_path / "durable.json").exists()


def test_cli_parses_durable() -> None:
    args = cli._parser().parse_args(["durable", "--quick", "--size", "128M", "--repeat", "2"])
    assert (args.cmd, args.quick, args.size, args.repeat) == ("durable", True, 128 * MIB, 2)
    assert args.dir == cli.DURABLE_DIR
