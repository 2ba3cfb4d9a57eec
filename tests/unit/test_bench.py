"""The benchmark harness's pure parts: fio JSON parsing, summaries, report, ideal sizes, /proc."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from zramd.bench import density, report
from zramd.bench.fio import FILL, WORKLOADS, parse_fio, workload_by_name
from zramd.bench.servers import ALL_SERVERS, proc_cpu_seconds, proc_rss_bytes, server_by_name

PAGE = 4096


def _fio_json(read_bw: float, read_iops: float, write_bw: float, write_iops: float) -> dict:
    def d(bw: float, iops: float, p99: float) -> dict[str, Any]:
        return {
            "total_ios": 1 if bw else 0,
            "bw_bytes": bw,
            "iops": iops,
            "clat_ns": {"percentile": {"99.000000": p99}},
        }

    return {
        "jobs": [
            {
                "error": 0,
                "job_runtime": 1500,
                "read": d(read_bw, read_iops, 2_000_000),
                "write": d(write_bw, write_iops, 5_000_000),
            }
        ]
    }


def test_parse_fio_sums_directions_and_takes_worst_p99() -> None:
    r = parse_fio(_fio_json(70e6, 700, 30e6, 300))
    assert r["mbps"] == pytest.approx(100.0)
    assert r["iops"] == pytest.approx(1000)
    assert r["p99_us"] == pytest.approx(5000.0)
    assert r["runtime_s"] == pytest.approx(1.5)


def test_parse_fio_ignores_idle_direction() -> None:
    r = parse_fio(_fio_json(0, 0, 30e6, 300))
    assert r["mbps"] == pytest.approx(30.0)
    assert r["p99_us_by_dir"] == {"write": 5000.0}


def test_parse_fio_raises_on_job_error() -> None:
    j = _fio_json(1, 1, 1, 1)
    j["jobs"][0]["error"] = 5
    with pytest.raises(RuntimeError):
        parse_fio(j)


def test_workload_args() -> None:
    w = workload_by_name("rand-rw7030-qd16")
    args = w.fio_args()
    assert "--rw=randrw" in args and "--rwmixread=70" in args and "--iodepth=16" in args
    assert "--buffer_compress_percentage=60" in args
    assert "--zero_buffers" in workload_by_name("zero-seq-read").fio_args()
    assert len({w.name for w in WORKLOADS}) == len(WORKLOADS)


def test_server_commands() -> None:
    sock = Path("/tmp/x.sock")
    z = server_by_name("zramd-zstd").command(sock, 1 << 20, None)
    assert z[z.index("--unix") + 1] == str(sock)
    assert z[z.index("--export") + 1] == "bench=1048576B,algorithm=zstd"
    assert z[z.index("--control") + 1] == "/tmp/control.sock"  # beside the socket: private
    assert "allocator=zstd" in server_by_name("nbdkit-zstd").command(sock, 1 << 20, None)
    q = server_by_name("qemu-nbd-tmpfs").command(sock, 1 << 20, Path("/dev/shm/f"))
    assert q[0] == "qemu-nbd" and q[-1] == "/dev/shm/f"
    assert {s.name for s in ALL_SERVERS} >= {"zramd-lz4", "nbdkit-zstd"}


def test_proc_readers_on_self() -> None:
    assert proc_rss_bytes(os.getpid()) > 1 << 20
    assert proc_cpu_seconds(os.getpid()) > 0


def test_ideal_sizes(tmp_path: Path) -> None:
    img = tmp_path / "img"
    text = (b"the quick brown fox jumps over the lazy dog " * 100)[:PAGE]
    with open(img, "wb") as f:
        f.write(bytes(PAGE))  # zero
        f.write(b"\xab\xcd" * (PAGE // 2))  # same-filled
        f.write(os.urandom(PAGE))  # incompressible: stored raw
        f.write(text)
    r = density.ideal_sizes(img)
    assert r["pages"] == 4 and r["zero_pages"] == 1 and r["same_pages"] == 1
    for codec in ("lz4", "zstd"):
        assert PAGE < r["ideal_bytes"][codec] < PAGE + 400
    assert r["huge_pages_lz4"] == 1


def test_trim_half_splits_ram_over_the_ideal(tmp_path: Path) -> None:
    img = tmp_path / "img"
    rnd = random.Random(3)
    words = [bytes(rnd.choices(b"abcdefghij", k=rnd.randint(2, 9))) for _ in range(200)]
    with open(img, "wb") as f:
        for i in range(512):
            if i % 7 == 0:
                f.write(bytes(PAGE))
            elif i % 11 == 0:
                f.write(rnd.randbytes(3700) + bytes(PAGE - 3700))  # ~3.7 KiB: stored raw
            else:  # text of a page-dependent vocabulary: objects of many sizes
                vocab = words[: 2 + i % 150]
                f.write(b" ".join(rnd.choices(vocab, k=2000))[:PAGE])
    r = density.trim_half(img, "lz4")
    assert r["live_pages"] == len([i for i in range(0, 512, 2) if i % 7])
    parts = r["parts"]
    assert set(parts) == set(density.TRIM_HALF_PARTS)
    # RAM = ideal + the named parts + what the device's codec stored beyond the ideal
    assert r["ram_bytes"] == r["ideal_bytes"] + sum(parts.values()) + r["codec"]
    assert all(v >= 0 for k, v in parts.items() if k != "huge") and parts["huge"] > 0
    assert r["pool_bytes"] <= r["pool_before_compact"]
    text = density.trim_half_markdown([r])
    assert text.count("\n") == 3 and f"| img | lz4 | {r['live_pages']} |" in text


def _raw() -> dict[str, Any]:
    samples = []
    for rep in range(3):
        servers = (("zramd-lz4", 300.0 + rep), ("nbdkit-zstd", 100.0), ("qemu-nbd-tmpfs", 150))
        for srv, mbps in servers:
            for wl in ("rand-write-qd32", FILL):
                samples.append(
                    {
                        "server": srv,
                        "workload": wl,
                        "rep": rep,
                        "mbps": mbps,
                        "iops": mbps * 1e6 / PAGE,
                        "p99_us": 100.0,
                        "cpu_pct": 50.0,
                    }
                )
    samples.append({"server": "zramd-zstd", "workload": "rand-write-qd32", "rep": 0, "error": "x"})
    return {
        "sysinfo": {"date": "d", "machine": {"nproc": 2}, "versions": {"zramd": "abc"}},
        "config": {"mode": "quick", "size_mib": 64, "runtime": 1, "repeat": 3, "elapsed_s": 60},
        "fio_samples": samples,
        "images": {
            "ext2": {
                "description": "x",
                "bytes": 8 * PAGE,
                "pages": 8,
                "zero_pages": 2,
                "same_pages": 0,
                "ideal_bytes": {"lz4": 4 * PAGE, "zstd": 3 * PAGE},
            }
        },
        "density_samples": [
            {
                "server": "zramd-lz4",
                "image": "ext2",
                "rep": 0,
                "copy_in_mbps": 1.0,
                "copy_out_mbps": 2.0,
                "mem_per_byte": 0.5,
                "sha256_ok": True,
            }
        ],
    }


def test_summarize_medians_and_ratios() -> None:
    s = report.summarize(_raw())
    assert s["medians"]["rand-write-qd32"]["zramd-lz4"]["mbps"] == pytest.approx(301.0)
    assert s["ratios"]["rand-write-qd32"]["zramd-lz4"]["nbdkit-zstd"] == pytest.approx(3.01)
    assert "rand-write-qd32/zramd-zstd" in s["errors"]
    assert s["density"]["ext2"]["zramd-lz4"]["mem_per_byte"] == 0.5


def test_write_report(tmp_path: Path) -> None:
    report.write_report(_raw(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| rand 4K write QD32 |" in md
    assert "3.01" in md and "| 3x | yes |" in md
    assert "ideal lz4" in md
    assert (tmp_path / "results.json").exists()


def test_cold_pages_table() -> None:
    raw = _raw()
    ext2 = raw["images"]["ext2"]
    base = {"image": "ext2", "rep": 0, "copy_in_mbps": 1.0, "copy_out_mbps": 2.0,
            "sha256_ok": True}  # fmt: skip
    figures = {"zramd-zstd": 0.45, "zramd-lz4+zstd after recompress": 0.42,
               "zramd-lz4 after grouping": 0.36, "zramd-lz4-zstd19 after grouping": 0.35,
               "nbdkit-zstd": 0.40}  # fmt: skip
    raw["density_samples"] += [{**base, "server": k, "mem_per_byte": v} for k, v in figures.items()]
    md = report.render_markdown(raw, report.summarize(raw), None)
    assert "## Cold pages" in md
    row = next(line for line in md.splitlines() if line.startswith("| ext2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:7] == ["0.500", "0.450", "0.420", "0.360", "0.350", "0.400"]
    assert cells[7:9] == [f"{ext2['ideal_bytes'][k] / ext2['bytes']:.3f}" for k in ("lz4", "zstd")]
    assert cells[9:] == ["**1.11x**", "**1.14x**"]
    # no cold run, no table
    assert "## Cold pages" not in report.render_markdown(_raw(), report.summarize(_raw()), None)


def test_micro_protocol_case_runs() -> None:
    from zramd.bench.micro import run_micro

    rows = run_micro(["protocol"])
    assert [r["case"].split()[1] for r in rows] == ["READ", "READ", "WRITE", "WRITE"]
    assert all(r["ns_per_op"] and r["ns_per_op"] > 0 for r in rows), rows
