"""``backing=PATH`` and the pressure writeback's ``writeback-high``, ``writeback-low`` and
``writeback-wait``: the export spec and the TOML keys, their validation, the registry opening the
store with the export (with those settings) and closing it with it, ``stat``, ``list --json``
and a reload showing and changing the settings."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from zramd.backing import BackingStore
from zramd.backing import format as fmt
from zramd.cli.table import COLUMNS, json_rows
from zramd.config import ConfigError, ExportConfig, ServerConfig, parse_export_spec
from zramd.configfile import ConfigFileError, parse_config_text
from zramd.control.metrics import render
from zramd.control.reload import apply_exports
from zramd.control.server import export_row, export_stat
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


def test_spec_takes_the_writeback_settings(tmp_path: Path) -> None:
    b = tmp_path / "b.img"
    cfg = parse_export_spec(f"swap=64M,backing={b}")
    assert (cfg.writeback_high, cfg.writeback_low, cfg.writeback_wait) == (0.9, 0.8, 2.0)
    cfg = parse_export_spec(
        f"swap=64M,backing={b},writeback-high=95%,writeback-low=0.5,writeback-wait=1m"
    )
    assert (cfg.writeback_high, cfg.writeback_low, cfg.writeback_wait) == (0.95, 0.5, 60.0)
    cfg = parse_export_spec(f"swap=64M,backing={b},writeback-high=1,writeback-wait=0")
    assert (cfg.writeback_high, cfg.writeback_wait) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("writeback-high=0.95", "export 'swap': writeback-high needs a backing store"),
        ("writeback-wait=1s", "export 'swap': writeback-wait needs a backing store"),
        ("BACKING,writeback-high=1.5", "writeback-high 1.5 must be in \\(0, 1\\]"),
        ("BACKING,writeback-high=0", "writeback-high 0 must be in \\(0, 1\\]"),
        ("BACKING,writeback-low=0", "writeback-low 0 must be in \\(0, 1\\]"),
        ("BACKING,writeback-low=-10%", "writeback-low -0.1 must be in \\(0, 1\\]"),
        ("BACKING,writeback-low=0.9", "writeback-low 0.9 must be below writeback-high 0.9"),
        (
            "BACKING,writeback-high=0.6,writeback-low=70%",
            "writeback-low 0.7 must be below writeback-high 0.6",
        ),
        ("BACKING,writeback-high=most", "bad writeback-high of export 'swap' 'most': expected"),
        ("BACKING,writeback-low=nan", "bad writeback-low of export 'swap' 'nan': expected"),
        ("BACKING,writeback-wait=-1", "bad writeback-wait of export 'swap' '-1'"),
        ("BACKING,writeback-wait=soon", "bad writeback-wait of export 'swap' 'soon'"),
        ("BACKING,writeback-wait", "writeback-wait needs a value"),
    ],
)
def test_writeback_settings_are_checked(tmp_path: Path, options: str, message: str) -> None:
    options = options.replace("BACKING", f"backing={tmp_path}/b.img")
    with pytest.raises(ConfigError, match=message) as e:
        parse_export_spec(f"swap=64M,{options}")
    assert "\n" not in str(e.value)


def test_toml_writeback_settings(tmp_path: Path) -> None:
    head = f'[export.swap]\nsize = "64M"\nbacking = "{tmp_path}/b.img"\n'
    fc = parse_config_text(
        head + 'writeback-high = "85%"\nwriteback-low = 0.6\nwriteback-wait = "1m"\n', "z.toml"
    )
    exp = fc.server.exports[0]
    assert (exp.writeback_high, exp.writeback_low, exp.writeback_wait) == (0.85, 0.6, 60.0)
    exp = parse_config_text(head + "writeback-wait = 0.5\n", "z.toml").server.exports[0]
    assert (exp.writeback_high, exp.writeback_low, exp.writeback_wait) == (0.9, 0.8, 0.5)
    for text, message in [
        ("writeback-low = 0.95\n", "z.toml: export.swap: writeback-low: .*below writeback-high"),
        ("writeback-high = 2\n", r"z.toml: export.swap: writeback-high: .*must be in \(0, 1\]"),
        ("writeback-high = true\n", "z.toml: export.swap: writeback-high: bad writeback-high"),
        ('writeback-wait = "-1s"\n', "z.toml: export.swap: writeback-wait: bad writeback-wait"),
    ]:
        with pytest.raises(ConfigFileError, match=message):
            parse_config_text(head + text, "z.toml")
    with pytest.raises(
        ConfigFileError, match="export.swap: writeback-low: .*needs a backing store"
    ):
        parse_config_text('[export.swap]\nsize = "64M"\nwriteback-low = 0.5\n', "z.toml")


def test_writeback_settings_reach_the_device_stat_list_and_reload(tmp_path: Path) -> None:
    reg = ExportRegistry()
    cfg = ExportConfig(
        name="swap",
        size=4 << 20,
        backing=str(tmp_path / "b.img"),
        writeback_high=0.7,
        writeback_low=0.5,
        writeback_wait=0.25,
    )
    exp = reg.add(cfg)
    plain = reg.add(ExportConfig(name="plain", size=4 << 20))
    try:
        assert exp.device.writeback_settings == {"high": 0.7, "low": 0.5, "wait": 0.25}
        want = {"writeback_high": 0.7, "writeback_low": 0.5, "writeback_wait": 0.25}
        backing = export_stat(exp, reg.budget)["backing"]
        assert {k: backing[k] for k in want} == want
        none = {k: None for k in want}
        assert {k: export_stat(plain, None)["backing"][k] for k in want} == none
        rows = json_rows([export_row(exp, reg.budget), export_row(plain, None)], list(COLUMNS))
        assert [{k: r["backing"][k] for k in want} for r in rows["exports"]] == [want, none]
        text = render(reg)
        assert 'zramd_writeback_high_ratio{export="swap"} 0.7' in text
        assert 'zramd_writeback_wait_seconds{export="swap"} 0.25' in text
        assert 'zramd_writeback_low_ratio{export="plain"}' not in text
        new = ExportConfig(
            name="swap", size=4 << 20, backing=cfg.backing, writeback_high=0.95, writeback_low=0.9
        )
        _, lines = apply_exports(reg, [new, ExportConfig(name="plain", size=4 << 20)], set())
        assert "export swap: pressure writeback from 0.95 to 0.9 of the limit, writes wait " \
            "up to 2s" in lines
        assert exp.device.writeback_settings == {"high": 0.95, "low": 0.9, "wait": 2.0}
        assert exp.config.writeback_high == 0.95
    finally:
        reg.close()


async def test_set_changes_the_pressure_writeback_settings(tmp_path: Path) -> None:
    """``zramd set --writeback-high/--writeback-low/--writeback-wait`` through the control
    socket: applied to the device and the configuration, checked with one line, refused for an
    export without a backing store."""
    from zramd.control.client import ControlClient
    from zramd.control.protocol import ControlError
    from zramd.control.server import ControlServer

    reg = ExportRegistry()
    reg.add(ExportConfig(name="b", size=4 << 20, mem_limit=2 << 20, backing=str(tmp_path / "f")))
    reg.add(ExportConfig(name="plain", size=4 << 20))
    path = str(tmp_path / "c.sock")
    srv = ControlServer(reg, path)
    await srv.start()

    async def call(**args: object) -> object:
        def _do() -> object:
            with ControlClient(path, timeout=10) as c:
                return c.call("set", **args)

        return await asyncio.to_thread(_do)

    try:
        await call(name="b", writeback_high="70%", writeback_low="0.5", writeback_wait="0")
        exp = reg.get("b")
        assert exp is not None
        assert exp.device.writeback_settings == {"high": 0.7, "low": 0.5, "wait": 0.0}
        assert (exp.config.writeback_high, exp.config.writeback_low) == (0.7, 0.5)
        with pytest.raises(ControlError, match="writeback-low .* must be below"):
            await call(name="b", writeback_low="0.8")
        assert exp.device.writeback_settings["low"] == 0.5  # unchanged
        with pytest.raises(ControlError, match="bad writeback-wait"):
            await call(name="b", writeback_wait="soon")
        with pytest.raises(ControlError, match="'plain': it has no backing store"):
            await call(name="plain", writeback_high="0.8")
    finally:
        await srv.close()
        reg.close()
