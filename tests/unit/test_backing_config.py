"""``backing=PATH``: the export spec and the TOML key, their validation, and the registry opening
the store with the export and closing it with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zramd.backing import BackingStore
from zramd.backing import format as fmt
from zramd.config import ConfigError, ExportConfig, ServerConfig, parse_export_spec
from zramd.configfile import ConfigFileError, parse_config_text
from zramd.server.exports import ExportRegistry


def test_spec_takes_a_backing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.img"
    cfg = parse_export_spec(f"swap=64M,backing={path},description=a, b")
    assert cfg.backing == str(path) and cfg.description == "a, b"
    monkeypatch.chdir(tmp_path)
    assert parse_export_spec("swap=64M,backing=rel.img").backing == str(tmp_path / "rel.img")
    assert parse_export_spec("swap=64M").backing is None


def test_backing_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_export_spec(f"swap=64M,backing={tmp_path}/nowhere/b.img")
    with pytest.raises(ConfigError, match="neither a regular file nor a block device"):
        parse_export_spec(f"swap=64M,backing={tmp_path}")
    with pytest.raises(ConfigError, match="absolute"):
        ExportConfig(name="x", size=1 << 20, backing="b.img").validate()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="neither"):
        parse_export_spec(f"swap=64M,backing={fifo}")
    existing = tmp_path / "old.img"
    existing.write_bytes(b"")
    assert parse_export_spec(f"swap=64M,backing={existing}").backing == str(existing)


def test_two_exports_cannot_share_a_backing(tmp_path: Path) -> None:
    img = tmp_path / "b.img"
    img.write_bytes(b"")
    link = tmp_path / "link.img"
    link.symlink_to(img)
    a = ExportConfig(name="a", size=1 << 20, backing=str(img))
    b = ExportConfig(name="b", size=1 << 20, backing=str(link))
    with pytest.raises(ConfigError, match="'a' and 'b' both use the backing"):
        ServerConfig(exports=[a, b]).validate()
    c = ExportConfig(name="c", size=1 << 20, backing=str(tmp_path / "new.img"))
    d = ExportConfig(name="d", size=1 << 20, backing=str(tmp_path / "." / "new.img"))
    with pytest.raises(ConfigError, match="both use"):
        ServerConfig(exports=[c, d]).validate()
    ServerConfig(exports=[a, c]).validate()


def test_toml_backing(tmp_path: Path) -> None:
    text = f'[export.swap]\nsize = "64M"\nbacking = "{tmp_path}/b.img"\n'
    fc = parse_config_text(text, "z.toml")
    assert fc.server.exports[0].backing == f"{tmp_path}/b.img"
    with pytest.raises(ConfigFileError, match=r"z.toml: export.swap: backing: .*absolute"):
        parse_config_text('[export.swap]\nsize = "64M"\nbacking = "b.img"\n', "z.toml")
    with pytest.raises(ConfigFileError, match=r"backing: expected an absolute path"):
        parse_config_text('[export.swap]\nsize = "64M"\nbacking = 3\n', "z.toml")


def test_registry_opens_the_store_with_the_export_and_closes_it(tmp_path: Path) -> None:
    path = str(tmp_path / "b.img")
    reg = ExportRegistry()
    exp = reg.add(ExportConfig(name="swap", size=4 << 20, backing=path))
    assert isinstance(exp.backing, BackingStore)
    with open(path, "rb") as f:
        assert fmt.decode_header(f.read(fmt.HEADER_BYTES)).segment_size == fmt.SEGMENT_SIZE
    # the same file for another export (or another daemon) is refused: the registry unchanged
    with pytest.raises(ConfigError, match=f"export 'other': backing {path}: in use"):
        reg.add(ExportConfig(name="other", size=4 << 20, backing=path))
    assert "other" not in reg
    reg.remove("swap")
    again = BackingStore.open(path)  # closed with the export: free to open
    again.close()
    foreign = tmp_path / "data"
    foreign.write_bytes(b"precious" * 1000)
    with pytest.raises(ConfigError, match="holds something else"):
        reg.add(ExportConfig(name="x", size=4 << 20, backing=str(foreign)))
    assert foreign.read_bytes() == b"precious" * 1000
    reg.add(ExportConfig(name="y", size=4 << 20, backing=path))
    reg.close()
    BackingStore.open(path).close()
