"""config.py: size parsing, export specs, ServerConfig validation, serve flag mapping."""

from __future__ import annotations

from typing import Any

import pytest

from zramd.config import (
    DEFAULT_EXPORT_MAX_SIZE,
    ConfigError,
    ExportConfig,
    ServeFlags,
    ServerConfig,
    default_export_size,
    format_size,
    parse_export_spec,
    parse_metrics_address,
    parse_size,
    serve_config,
)
from zramd.system import total_ram


def build_serve_config(**flags: Any) -> ServerConfig:
    """The ServerConfig of ``zramd serve`` with these flags and no configuration file."""
    return serve_config(ServeFlags(**flags)).server


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4096", 4096 << 20),  # a bare number is MiB, as in zram-generator
        ("4096B", 4096),
        ("1.5", 3 << 19),
        ("0", 0),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("4KB", 4096),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("4G", 4 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        (" 8M ", 8 << 20),
        ("512B", 512),
        (123, 123),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "G", "4X", "-1", "4 G B", "abc", "1.3B", "4GG", "min(4,", "ram - ram - 1"]
)
def test_parse_size_errors_name_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_size(text)
    assert repr(text) in str(ei.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (512, "512B"), (1023, "1023B"), (1024, "1K"), (1536, "1.5K"),
     (4 << 30, "4G"), (int(4.25 * (1 << 20)), "4.2M"), ((1 << 20) - 1, "1M"), (3 << 40, "3T")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_one_meaning_for_sizes_on_the_flag_and_in_the_file() -> None:
    """A bare number is MiB and expressions work, on --export as in the TOML; the commas of
    an expression's parentheses stay in the size."""
    from zramd.configfile import parse_config_text

    ram = 10000.0
    assert parse_size("min(ram / 2, 4096)", ram=ram) == 4096 << 20
    assert parse_size("ram / 4", ram=ram) == 2500 << 20
    e = parse_export_spec("a=min(ram / 2, 4096),algorithm=zstd,mem-limit=max(1, 2)")
    assert (e.size, e.algorithm, e.mem_limit) == (min(total_ram() // 2, 4096 << 20) // 4096 * 4096,
                                                  "zstd", 2 << 20)
    flag = parse_export_spec("a=2048,mem-limit=512,description=x, (y")
    file = parse_config_text('[export.a]\nsize = "2048"\nmem-limit = 512\n').server.exports[0]
    assert (flag.size, flag.mem_limit) == (file.size, file.mem_limit) == (2 << 30, 512 << 20)
    assert flag.description == "x, (y"
    assert parse_export_spec("a=4096B").size == 4096
    assert parse_export_spec("a=ram / 3").size % 4096 == 0  # rounded down to pages
    with pytest.raises(ConfigError, match=r"bad size of export 'a' 'min\(ram / 2': expected"):
        parse_export_spec("a=min(ram / 2")


def test_export_summary_uses_the_one_size_format() -> None:
    assert ExportConfig("a", 4 << 30).summary() == "a 4G lz4"
    assert ExportConfig("b", 1536 << 20, read_only=True).summary() == "b 1.5G lz4 ro"


def test_parse_export_spec_full() -> None:
    e = parse_export_spec(
        "swap=2G,algorithm=zstd,level=3,mem-limit=512M,read-only,description=fast, small"
    )
    assert e == ExportConfig(
        name="swap",
        size=2 << 30,
        algorithm="zstd",
        level=3,
        mem_limit=512 << 20,
        read_only=True,
        description="fast, small",
    )


def test_parse_export_spec_minimal() -> None:
    e = parse_export_spec("zram0=64M")
    assert (e.name, e.size, e.algorithm, e.level, e.read_only) == (
        "zram0",
        64 << 20,
        "lz4",
        None,
        False,
    )
    assert e.summary() == "zram0 64M lz4"


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("zram0", "NAME=SIZE"),
        ("=4G", "NAME=SIZE"),
        ("a=", "NAME=SIZE"),
        ("a=4Q", "'4Q'"),
        ("a=100B", "multiple of 4096"),
        ("a=0", "multiple of 4096"),
        ("a=4M,algorithm=brotli", "brotli"),
        ("a=4M,level=x", "level"),
        ("a=4M,algorithm=zstd,level=99", "level"),
        ("a=4M,colour=red", "unknown option 'colour'"),
        ("a=4M,algorithm", "needs a value"),
        ("a=4M,level=1,level=2", "twice"),
        ("a=4M,read-only=maybe", "read-only"),
        ("a=4M,mem-limit=lots", "'lots'"),
        ("a=4M,backend=plain", "unknown option 'backend'"),
        ("a=4M,backend=disk", "unknown option 'backend'"),
        ("x" * 300 + "=4M", "longer than"),
    ],
)
def test_parse_export_spec_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_export_spec(spec)
    assert fragment in str(ei.value)


def test_test_devices_are_not_reachable_from_zramd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test devices live in tests/support: no spec, file key or environment reaches them."""
    from zramd.configfile import ConfigFileError, parse_config_text

    monkeypatch.setenv("ZRAMD_TEST_BACKENDS", "1")
    with pytest.raises(ConfigError, match="unknown option 'backend'"):
        parse_export_spec("t=1M,backend=corrupt-read")
    with pytest.raises(ConfigFileError, match="backend: unknown key"):
        parse_config_text('[export.t]\nsize = "1M"\nbackend = "plain"\n')


def test_read_only_false_value() -> None:
    assert parse_export_spec("a=4M,read-only=no").read_only is False
    assert parse_export_spec("a=4M,read-only=yes").read_only is True


def test_default_export_size() -> None:
    assert default_export_size(2 << 30) == 1 << 30
    assert default_export_size(64 << 30) == DEFAULT_EXPORT_MAX_SIZE
    assert default_export_size((1 << 30) + 12345) % 4096 == 0


def test_server_config_validation() -> None:
    e = ExportConfig("a", 1 << 20)
    ServerConfig(exports=[e]).validate()
    with pytest.raises(ConfigError, match="no exports"):
        ServerConfig().validate()
    with pytest.raises(ConfigError, match="twice"):
        ServerConfig(exports=[e, ExportConfig("a", 1 << 20)]).validate()
    with pytest.raises(ConfigError, match="max-payload"):
        ServerConfig(exports=[e], max_payload=1 << 20).validate()
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(exports=[e], port=70000).validate()
    with pytest.raises(ConfigError, match="default export"):
        ServerConfig(exports=[e], default_export="b").validate()


def test_serve_flags_listeners() -> None:
    c = build_serve_config(exports=["a=1M"])
    assert (c.bind, c.port, c.unix, c.stdio) == ("127.0.0.1", 10809, None, False)
    c = build_serve_config(unix="/tmp/x.sock", exports=["a=1M"])
    assert (c.bind, c.port, c.unix) == (None, None, "/tmp/x.sock")
    c = build_serve_config(unix="/tmp/x.sock", port=0, exports=["a=1M"])
    assert (c.bind, c.port, c.unix) == ("127.0.0.1", 0, "/tmp/x.sock")
    c = build_serve_config(stdio=True, exports=["a=1M"])
    assert (c.bind, c.port, c.stdio) == (None, None, True)
    with pytest.raises(ConfigError):
        build_serve_config(stdio=True, port=1)
    c = build_serve_config()
    assert [e.name for e in c.exports] == ["zram0"]
    c = build_serve_config(exports=["a=1M"], max_payload="48M", unix_mode="660")
    assert c.max_payload == 48 << 20 and c.unix_mode == 0o660


def test_parse_metrics_address() -> None:
    assert parse_metrics_address("127.0.0.1:9109") == ("127.0.0.1", 9109)
    assert parse_metrics_address("9109") == ("127.0.0.1", 9109)
    assert parse_metrics_address(":0") == ("127.0.0.1", 0)
    assert parse_metrics_address("[::1]:9") == ("::1", 9)
    for bad in ("x", "1.2.3.4:http", "[::1]9", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="bad metrics address"):
            parse_metrics_address(bad)


def test_unix_alone_means_unix_only_with_or_without_a_file() -> None:
    """One rule for --unix: Unix only unless a flag or the file asks for TCP."""
    from zramd.configfile import parse_config_text

    def listeners(flags: ServeFlags, text: str | None) -> tuple[str | None, int | None, str | None]:
        file = parse_config_text(text + '[export.a]\nsize = "4M"\n') if text is not None else None
        c = serve_config(flags, file).server
        return c.bind, c.port, c.unix

    unix = ServeFlags(unix="/tmp/x.sock", exports=["a=4M"])
    assert listeners(unix, None) == listeners(unix, "") == (None, None, "/tmp/x.sock")
    assert listeners(ServeFlags(), 'unix = "/tmp/f.sock"\n') == (None, None, "/tmp/f.sock")
    assert listeners(unix, "port = 10900\n") == ("127.0.0.1", 10900, "/tmp/x.sock")
    assert listeners(unix, 'bind = "::1"\n') == ("::1", 10809, "/tmp/x.sock")
    with_port = ServeFlags(unix="/tmp/x.sock", port=0)
    assert listeners(with_port, "") == ("127.0.0.1", 0, "/tmp/x.sock")
    assert listeners(ServeFlags(port=5), 'bind = ""\n') == ("127.0.0.1", 5, None)
    assert listeners(ServeFlags(bind=""), "") == (None, None, None)
    assert listeners(ServeFlags(), "") == ("127.0.0.1", 10809, None)


def test_empty_control_in_the_file_disables_the_control_socket() -> None:
    """``control = ""`` in the file does what ``--control ''`` does."""
    from zramd.configfile import parse_config_text

    file = parse_config_text('control = ""\n[export.a]\nsize = "4M"\n')
    out = serve_config(ServeFlags(), file)
    assert out.control is None and out.control_required
    assert serve_config(ServeFlags(control=""), None).control is None
    flag_wins = serve_config(ServeFlags(control="/tmp/c.sock"), file)
    assert flag_wins.control == "/tmp/c.sock"
