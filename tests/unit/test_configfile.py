"""The TOML configuration file: good files, bad files and their messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from zramd.config import ConfigError
from zramd.configfile import (
    ConfigFileError,
    load_file,
    parse_algorithm,
    parse_config_text,
    parse_size_value,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "zramd.toml.example"
MIB = 1 << 20
RAM = 16000.0  # MiB, so tests do not depend on this machine


def test_example_file_loads() -> None:
    fc = load_file(EXAMPLE, ram=RAM)
    assert [e.name for e in fc.server.exports] == ["swap"]
    assert fc.server.exports[0].size == 4096 * MIB
    assert fc.server.exports[0].algorithm == "lz4"
    assert fc.server.exports[0].description == "swap"
    assert fc.control == "/run/zramd/control.sock"
    assert fc.swap == "on"
    assert fc.server.bind == "127.0.0.1" and fc.server.port == 10809
    fc.server.validate()


def test_full_file(tmp_path: Path) -> None:
    p = tmp_path / "z.toml"
    p.write_text(
        """
bind = ""
unix = "/tmp/x.sock"
unix-mode = "0660"
control = "/tmp/c.sock"
swap = true
max-connections = 7
handshake-timeout = 2.5
max-payload = "32M"
max-in-flight = 9
mem-limit = "1G"
default-export = "b"
poll-us = 0
max-in-flight-bytes = "64M"

[export.a]
zram-size = "ram / 4"
compression-algorithm = "zstd(level=3)"
zram-resident-limit = 100
read-only = true
description = "hello, world"

[export.b]
size = "64M"

[export.off]
size = 0
"""
    )
    fc = load_file(p, ram=RAM)
    s = fc.server
    assert s.bind is None and s.port is None
    assert s.unix == "/tmp/x.sock" and s.unix_mode == 0o660
    assert fc.control == "/tmp/c.sock" and fc.swap == "on"
    assert (s.max_connections, s.handshake_timeout, s.max_payload, s.max_in_flight) == (
        7, 2.5, 32 * MIB, 9,
    )
    assert s.global_mem_limit == 1 << 30
    assert s.default_export == "b"
    assert s.poll_us == 0
    assert s.max_in_flight_bytes == 64 * MIB
    a, b = s.exports
    assert a.size == 4000 * MIB and a.algorithm == "zstd" and a.level == 3
    assert a.mem_limit == 100 * MIB and a.read_only and a.description == "hello, world"
    assert b.size == 64 * MIB and b.algorithm == "lz4" and not b.read_only
    assert fc.disabled == ["off"]
    s.validate()
    assert load_file(p).server.exports[1].name == "b"


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (2048, 2048 * MIB),
        ("2048", 2048 * MIB),
        ("min(ram / 2, 4096)", 4096 * MIB),
        ("ram / 3", (int(RAM / 3 * MIB) // 4096) * 4096),
        ("4G", 4 << 30),
        ("512MiB", 512 * MIB),
        ("1.5G", 3 << 29),
        (0.5, MIB // 2),
    ],
)
def test_size_values(value: object, want: int) -> None:
    assert parse_size_value(value, ram=RAM) == want


@pytest.mark.parametrize(
    ("value", "msg"),
    [
        ("ram /", "unexpected end of expression at column 6"),
        ("4Q", "unexpected 'Q' at column 2"),
        (True, "expected a size"),
        ([1], "expected a size"),
        ("ram - 20000", "negative"),
    ],
)
def test_size_value_errors(value: object, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_size_value(value, ram=RAM)


def test_algorithm() -> None:
    assert parse_algorithm("zstd(level=3)") == ("zstd", 3)
    assert parse_algorithm("LZ4") == ("lz4", None)
    with pytest.raises(ConfigError, match="recompression"):
        parse_algorithm("zstd lz4")
    with pytest.raises(ConfigError, match="unknown parameter 'dict=1'"):
        parse_algorithm("zstd(dict=1)")


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("port = ", "F.toml: not valid TOML"),
        ("port = \"x\"", "F.toml: port: expected a TCP port number"),
        ("unix-mode = \"999\"", "F.toml: unix-mode: expected an octal mode"),
        ("swap = \"maybe\"", "F.toml: swap: expected one of off, on, require"),
        ("max-connections = 0", "F.toml: max-connections: expected a positive integer"),
        ("handshake-timeout = -1", "F.toml: handshake-timeout: expected a positive number"),
        ("colour = 1", "F.toml: colour: unknown key"),
        ("poll-us = 5000", "F.toml: poll-us: expected microseconds 0..1000"),
        (
            "max-in-flight-bytes = \"7K\"",
            "F.toml: max-in-flight-bytes: expected a size of at least",
        ),
        ("poll-us = \"50\"", "F.toml: poll-us: expected microseconds 0..1000"),
        (
            "[zram0]\nsize = 1",
            r"F.toml: zram0: unknown table \[zram0\] \(exports go in \[export.zram0\]\)",
        ),
        ("export = 3", "F.toml: export: expected tables"),
        ("[export.a]\n", "F.toml: export.a: size: missing"),
        ("[export.a]\nsize = \"ram +\"", "F.toml: export.a: size: expected a size like"),
        ("[export.a]\nsize = 1\nfoo = 2", "F.toml: export.a: foo: unknown key"),
        ("[export.a]\nsize = 1\nzram-size = 2", "export.a: zram-size: same as 'size'"),
        ("[export.a]\nsize = 1\nread-only = \"yes\"", "read-only: expected true or false"),
        ("[export.a]\nsize = 1\ndescription = 5", "export.a: description: expected a string"),
        (
            "[export.a]\nsize = 1\ncompression-algorithm = \"zstd(lvl=1)\"",
            "export.a: compression-algorithm: 'zstd\\(lvl=1\\)': unknown parameter",
        ),
        ("[export.a]\nsize = 1\nmem-limit = \"x\"", "export.a: mem-limit: expected a size"),
        ("[export.a]\nsize = 1\ncompression-algorithm = \"nosuch\"",
         "export.a: compression-algorithm: .*nosuch"),
    ],
)
def test_bad_files(text: str, msg: str) -> None:
    with pytest.raises(ConfigFileError, match=msg):
        parse_config_text(text, "F.toml", ram=RAM)


def test_unknown_codec_named(tmp_path: Path) -> None:
    """An unknown algorithm is refused (by the codec registry when present)."""
    p = tmp_path / "c.toml"
    p.write_text("[export.a]\nsize = 1\ncompression-algorithm = \"nosuch\"\n")
    try:
        from zramd.compress import get_codec  # noqa: F401
    except ImportError:
        pytest.skip("codec registry not in the tree yet")
    with pytest.raises(ConfigFileError, match=f"{p}: export.a: compression-algorithm"):
        load_file(p, ram=RAM)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"nope.toml: cannot read: No such file"):
        load_file(tmp_path / "nope.toml")


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.toml"
    p.write_bytes(b"port = 1\n\xff\xfe")
    with pytest.raises(ConfigFileError, match="not UTF-8"):
        load_file(p)


def test_uses_real_ram_when_not_given(tmp_path: Path) -> None:
    from zramd.system import total_ram

    p = tmp_path / "r.toml"
    p.write_text("[export.a]\nsize = \"ram / 8\"\n")
    size = load_file(p).server.exports[0].size
    assert abs(size - total_ram() / 8) <= 4096


def test_one_loader_reads_the_example() -> None:
    assert load_file(EXAMPLE).server.exports[0].name == "swap"
