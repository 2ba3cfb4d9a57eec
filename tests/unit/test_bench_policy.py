"""The policy-cost benchmark's report: a row per sample, the medians and their ratio."""

from __future__ import annotations

from zramd.bench.policy import render, servers


def _sample(rep: int, server: str, iops: float, grouped: int) -> dict[str, object]:
    return {
        "repetition": rep,
        "server": server,
        "iops": iops,
        "p99_us": 900.0,
        "fill_s": 1.0,
        "grouped_pages": grouped,
        "recompressed_pages": 0,
        "grouped_before": 10,
        "policy": {"passes": 3, "marked_idle": 100, "max_slice_us": 250.0, "backoffs": 7}
        if server == "policy-on"
        else {},
        "mem_used_total": 1,
        "orig_data_size": 2,
    }


def test_render_gives_every_sample_and_the_ratio_of_medians() -> None:
    assert [s.name for s in servers(5)] == ["policy-on", "policy-off"]
    assert "recompress-after=5s" in servers(5)[0].option
    raw = {
        "size": 1 << 30,
        "after_s": 5,
        "runtime_s": 20.0,
        "hot_bytes": 64 << 20,
        "samples": [
            _sample(0, "policy-on", 900.0, 4096),
            _sample(0, "policy-off", 1000.0, 0),
            _sample(1, "policy-on", 950.0, 2048),
            _sample(1, "policy-off", 1000.0, 0),
        ],
        "median_iops": {"policy-on": 925.0, "policy-off": 1000.0},
        "ratio": 0.925,
    }
    text = render(raw)
    assert text.count("| policy-on |") == 2 and text.count("| policy-off |") == 2
    assert "**0.93**" in text and "| 4096 |" in text and "1024 MiB" in text
