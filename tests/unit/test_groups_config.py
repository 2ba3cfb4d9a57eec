"""Multi-page group settings of an export: group-pages and group-algorithm in the flag spec and
the TOML file, handed to the device; a reload that changes them says they need the export
recreated."""

from __future__ import annotations

import logging

import pytest

from zramd.config import ConfigError, ExportConfig, parse_export_spec
from zramd.configfile import ConfigFileError, parse_config_text
from zramd.control.reload import _update_live
from zramd.server.exports import make_device


def test_spec_keys() -> None:
    cfg = parse_export_spec("t=64M,group-pages=8,group-algorithm=zstd(level=19)")
    assert (cfg.group_pages, cfg.group_algorithm, cfg.group_level) == (8, "zstd", 19)
    dev = make_device(cfg)
    try:
        assert dev._group_pages == 8  # type: ignore[attr-defined]
        codec = dev._group_codec  # type: ignore[attr-defined]
        assert (codec.name, codec.level) == ("zstd", 19)
    finally:
        dev.close()
    plain = parse_export_spec("t=64M")
    assert (plain.group_pages, plain.group_algorithm) == (0, "")
    dev = make_device(plain)
    try:
        assert dev._group_pages == 16  # type: ignore[attr-defined]
        codec = dev._group_codec  # type: ignore[attr-defined]
        assert (codec.name, codec.level) == ("zstd", 9)
    finally:
        dev.close()
    for bad, msg in (
        ("t=64M,group-pages=17", "group-pages must be in 2..16"),
        ("t=64M,group-pages=1", "group-pages must be in 2..16"),
        ("t=64M,group-pages=x", "not an integer"),
        ("t=64M,group-algorithm=zstd(level=99)", "group-algorithm"),
        ("t=64M,group-algorithm=lz4 zstd", "one algorithm expected"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_export_spec(bad)


def test_file_keys() -> None:
    text = '[export.z]\nsize = "64M"\ngroup-pages = 4\ngroup-algorithm = "deflate(level=9)"\n'
    (exp,) = parse_config_text(text).server.exports
    assert (exp.group_pages, exp.group_algorithm, exp.group_level) == (4, "deflate", 9)
    for bad, msg in (
        ("group-pages = 40", "group-pages: .*2..16"),
        ('group-pages = "4"', "group-pages: .*integer"),
        ('group-algorithm = "nope"', "group-algorithm: .*unknown compression algorithm"),
    ):
        with pytest.raises(ConfigFileError, match=msg):
            parse_config_text(f'[export.z]\nsize = "64M"\n{bad}\n')


class _Export:
    def __init__(self, cfg: ExportConfig) -> None:
        self.config = cfg
        self.device = None


@pytest.mark.parametrize(
    "change", [{"group_pages": 8}, {"group_algorithm": "lz4"}, {"group_level": 3}]
)
def test_reload_names_group_changes(change: dict[str, object]) -> None:
    old = ExportConfig(name="z", size=64 << 20, group_algorithm="zstd", group_level=9)
    new = ExportConfig(name="z", size=64 << 20, group_algorithm="zstd", group_level=9)
    for k, v in change.items():
        setattr(new, k, v)
    lines: list[tuple[str, int]] = []
    _update_live(_Export(old), new, lambda msg, level=logging.INFO: lines.append((msg, level)))
    ((msg, level),) = lines
    assert level == logging.WARNING
    assert ("group-pages" if "group_pages" in change else "group-algorithm") in msg
