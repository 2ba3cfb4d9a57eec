"""The ``persist`` export key: flag spec and TOML, an absolute path in a writable directory, one
file per export; a reload neither adds an export with a persist file (it is restored at start)
nor removes one (``zramd destroy`` writes its snapshot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zramd.config import ConfigError, ExportConfig, ServerConfig, parse_export_spec
from zramd.configfile import parse_config_text
from zramd.control.reload import apply_exports
from zramd.server.exports import ExportRegistry


def test_spec_and_toml(tmp_path: Path) -> None:
    cfg = parse_export_spec(f"zram0=64M,persist={tmp_path}/z.snap")
    assert cfg.persist == f"{tmp_path}/z.snap"
    fc = parse_config_text(f'[export.zram0]\nsize = "64M"\npersist = "{tmp_path}/z.snap"\n')
    assert fc.server.exports[0].persist == f"{tmp_path}/z.snap"


def test_refused_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_export_spec(f"zram0=64M,persist={tmp_path}/nodir/z.snap")
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        parse_export_spec(f"zram0=64M,persist={tmp_path}/d")


def test_two_exports_one_file(tmp_path: Path) -> None:
    a = parse_export_spec(f"a=64M,persist={tmp_path}/z.snap")
    b = parse_export_spec(f"b=64M,persist={tmp_path}/./z.snap")
    with pytest.raises(ConfigError, match="both persist to"):
        ServerConfig(exports=[a, b]).validate()
    c = parse_export_spec(f"c=64M,persist={tmp_path}/z.img,backing={tmp_path}/z.img")
    with pytest.raises(ConfigError, match="persist and backing are the same file"):
        ServerConfig(exports=[c]).validate()


def test_reload_keeps_persisted_exports_and_adds_none(tmp_path: Path) -> None:
    registry = ExportRegistry()
    kept = ExportConfig(name="a", size=1 << 20, persist=f"{tmp_path}/a.snap")
    registry.add(kept)
    new = ExportConfig(name="b", size=1 << 20, persist=f"{tmp_path}/b.snap")
    managed, lines = apply_exports(registry, [new], {"a"})
    text = "\n".join(lines)
    assert "export a removed from the configuration but kept: it persists to" in text
    assert "export b not added: an export with a persist file is restored when zramd starts" in text
    assert {e.name for e in registry} == {"a"} and managed == {"a"}
    registry.close()
