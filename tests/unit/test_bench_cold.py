"""The cold-read benchmark's report: medians per mode, the ratios between modes, a row per
sample."""

from __future__ import annotations

from typing import Any

from zramd.bench.cold import MODES, RATIOS, WORKLOADS, render, summarize


def _sample(rep: int, mode: str, seq: float) -> dict[str, Any]:
    return {
        "repetition": rep,
        "mode": mode,
        "group_s": 1.0,
        "grouped_pages": 100 if MODES[mode][1] else 0,
        "pages_stored": 128,
        "mem_used_total": 40,
        "orig_data_size": 100,
        "workloads": {
            name: {"mbps": seq if name.startswith("seq") else 10.0, "iops": 2500.0, "p99_us": 1.0}
            for name, _ in WORKLOADS
        },
    }


def test_summary_and_report() -> None:
    seq = {
        "per-page lz4": [900.0, 1100.0, 1000.0],
        "per-page zstd": [500.0, 600.0, 700.0],
        "grouped zstd": [800.0, 700.0, 750.0],
        "grouped lz4hc": [950.0, 900.0, 990.0],
    }
    samples = [_sample(r, m, v[r]) for m, v in seq.items() for r in range(3)]
    summary = summarize(samples)
    assert summary["median_mbps"]["per-page lz4"]["seq 1M read QD4"] == 1000.0
    ratios = summary["ratio"]
    assert list(ratios) == [f"{g} / {p}" for g, p in RATIOS]
    assert ratios["grouped zstd / per-page zstd"]["seq 1M read QD4"] == 750.0 / 600.0
    assert ratios["grouped lz4hc / per-page lz4"]["rand 4K read QD1"] == 1.0
    raw = {
        "size": 512 << 20,
        "runtime_s": 5.0,
        "modes": {m: {"algorithm": a, "grouped": g} for m, (a, g) in MODES.items()},
        "system": {"date": "d", "versions": {"zramd": "r"},
                   "machine": {"nproc": 2, "cpu": "c", "loadavg_at_start": [1.0]}},  # fmt: skip
        "samples": samples,
        **summary,
    }
    text = render(raw)
    assert text.count("| grouped zstd | 100 / 128 | 0.400 |") == 3
    assert "| seq 1M read QD4 | 1,000 | 600 | 750 | 950 | 0.75 | 1.25 | 0.95 |" in text
    assert "512 MiB" in text and "2,500" not in text and "(2.5k)" in text
