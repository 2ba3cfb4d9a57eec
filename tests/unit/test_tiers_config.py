"""Recompression settings in zram-generator's vocabulary: compression-algorithm with further
algorithms and a trailing parameter list, recompress-after / recompress-interval, in the flag
spec and the TOML file; the registry starts and stops the background policy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from zramd.config import (
    Compression,
    ConfigError,
    ExportConfig,
    parse_compression,
    parse_duration,
    parse_export_spec,
)
from zramd.configfile import ConfigFileError, parse_config_text
from zramd.control.reload import apply_exports
from zramd.control.server import ControlServer
from zramd.server.exports import ExportRegistry


def test_compression_algorithm_words() -> None:
    assert parse_compression("lz4") == Compression("lz4")
    assert parse_compression("ZSTD(level=3)") == Compression("zstd", 3)
    assert parse_compression("lz4 zstd(level=3) (type=idle)") == Compression(
        "lz4", None, [("zstd", 3)], "idle"
    )
    assert parse_compression(" lzo  zstd  deflate(level=9) (type=huge_idle)") == Compression(
        "lzo", None, [("zstd", None), ("deflate", 9)], "huge-idle"
    )
    for bad, msg in (
        ("(type=idle)", "expected ALGORITHM"),
        ("lz4 (type=idle) zstd", "come last"),
        ("lz4 zstd (type=huge)", "supported is type=idle|huge_idle"),
        ("lz4 zstd(dict=x)", "unknown parameter"),
        ("lz4 zstd(level=3", "unbalanced"),
        ("lz4 zstd lz4 zstd lz4", "at most 3"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_compression(bad)


def test_durations() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("90s") == parse_duration("90") == parse_duration(90) == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("2d") == 172800
    assert parse_duration("5min") == 300
    for bad in ("10 parsecs", "-1", "m"):
        with pytest.raises(ConfigError, match="duration"):
            parse_duration(bad)


def test_export_spec() -> None:
    cfg = parse_export_spec(
        "t=64M,algorithm=lz4 zstd(level=3) (type=huge_idle),recompress-after=10m,"
        "recompress-interval=30s"
    )
    assert (cfg.algorithm, cfg.level, cfg.recompression) == ("lz4", None, [("zstd", 3)])
    assert cfg.recompress_after == 600 and cfg.recompress_interval == 30
    assert cfg.recompress_type == "huge-idle"
    with pytest.raises(ConfigError, match="recompress-after needs recompression algorithms"):
        parse_export_spec("t=64M,recompress-after=10m")
    grouped = parse_export_spec("t=64M,recompress-after=10m,group-pages=16")
    assert grouped.group_pages == 16 and not grouped.recompression
    with pytest.raises(ConfigError, match="recompress-interval must be at least"):
        parse_export_spec("t=64M,algorithm=lz4 zstd,recompress-after=1m,recompress-interval=0")
    with pytest.raises(ConfigError, match="unknown compression algorithm 'nope'"):
        parse_export_spec("t=64M,algorithm=lz4 nope")


def test_toml_keys() -> None:
    fc = parse_config_text(
        """
[export.swap]
size = "1G"
compression-algorithm = "lz4 zstd(level=3)"
recompress-after = "10m"
recompress-interval = 120
""",
        "f.toml",
    )
    e = fc.server.exports[0]
    assert e.recompression == [("zstd", 3)] and e.recompress_after == 600
    assert e.recompress_interval == 120
    with pytest.raises(ConfigFileError, match="f.toml: export.s: recompress-after: "):
        parse_config_text('[export.s]\nsize = "1G"\nrecompress-after = "10m"\n', "f.toml")
    with pytest.raises(ConfigFileError, match="export.s: recompress-interval: bad"):
        parse_config_text(
            '[export.s]\nsize = "1G"\ncompression-algorithm = "lz4 zstd"\n'
            'recompress-interval = "soon"\n',
            "f.toml",
        )


async def test_registry_starts_and_stops_the_policy() -> None:
    reg = ExportRegistry()
    cfg = ExportConfig(
        name="p", size=1 << 20, recompression=[("zstd", 3)], recompress_after=60,
        recompress_interval=1,
    )
    exp = reg.add(cfg)
    assert exp.policy is not None and exp.policy.task is not None
    assert exp.policy.group_pages == 0
    task = exp.policy.task
    plain = reg.add(ExportConfig(name="q", size=1 << 20))
    assert plain.policy is None
    grouping = reg.add(ExportConfig(name="g", size=1 << 20, recompress_after=60, group_pages=8))
    assert grouping.policy is not None and grouping.policy.group_pages == 8
    reg.remove("p")
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
    exp2 = reg.add(ExportConfig(
        name="r", size=1 << 20, recompression=[("zstd", 3)], recompress_after=60,
    ))
    assert exp2.policy is not None
    task2 = exp2.policy.task
    reg.close()
    await asyncio.sleep(0)
    assert task2 is not None and task2.done()


async def test_reload_changes_recompression_and_the_policy_live() -> None:
    reg = ExportRegistry()
    reg.add(ExportConfig(name="r", size=1 << 20))
    managed = {"r"}
    want = ExportConfig(
        name="r", size=1 << 20, recompression=[("zstd", 3)], recompress_after=600,
        recompress_interval=30,
    )
    managed, lines = apply_exports(reg, [want], managed)
    exp = reg.get("r")
    assert exp.device.recompression_algorithms == ["zstd(level=3)"]
    assert exp.policy is not None and exp.policy.after == 600 and exp.policy.task is not None
    assert lines == [
        "export r: recompression algorithms zstd(level=3)",
        "export r: pages idle after 600s recompressed every 30s",
    ]
    first = exp.policy.task
    off = ExportConfig(name="r", size=1 << 20, recompression=[("zstd", 3)])
    _, lines = apply_exports(reg, [off], managed)
    await asyncio.sleep(0)
    assert exp.policy is None and first.done()
    assert lines == ["export r: background recompression off"]
    reg.close()


async def test_reset_stops_the_policy_around_the_reset(tmp_path: Path) -> None:
    reg = ExportRegistry()
    exp = reg.add(ExportConfig(
        name="z", size=1 << 20, recompression=[("zstd", 3)], recompress_after=60,
    ))
    exp.device.write_sync(0, b"x" * 4096)
    server = ControlServer(reg, str(tmp_path / "c.sock"))
    before = exp.policy.task
    answer = await server.handle_line(b'{"op": "reset", "name": "z"}')
    assert answer["ok"], answer
    assert before is not None and before.done()
    assert exp.policy.task is not None and not exp.policy.task.done()
    assert exp.device.stats.pages_stored == 0
    reg.close()
