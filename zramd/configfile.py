"""The TOML configuration file (``/etc/zramd/zramd.toml``): parsing and validation.

Theory of operation
-------------------
The file is read with the stdlib ``tomllib`` and turned into the same typed objects
the command line builds (:class:`zramd.config.ServerConfig` with its
:class:`~zramd.config.ExportConfig` list), plus the operator settings that are not
part of the NBD server proper (control socket, swap safety, metrics), kept in
:class:`~zramd.config.FileConfig` with the set of keys the file gives. Command-line flags
are applied on top by :func:`zramd.config.serve_config`.

Layout (documented in ``systemd/zramd.toml.example``)::

    bind = "127.0.0.1"          # "" for no TCP listener
    port = 10809
    unix = "/run/zramd/nbd.sock"
    unix-mode = "0660"
    control = "/run/zramd/control.sock"
    swap = "on"                 # "off" | "on" | "require" (or true/false)
    max-connections = 100
    tls = "require"             # "off" | "on" | "require"
    tls-certificates = "/etc/zramd/tls"   # ca-cert.pem, server-cert.pem, server-key.pem
    tls-verify-peer = false
    allow = ["127.0.0.1/32", "10.0.0.0/8"]   # TCP clients; absent = everyone
    ...
    [export.zram0]
    size = "min(ram / 2, 4096)"   # zram-generator expression in MiB, or "4G"
    compression-algorithm = "lz4 zstd(level=3)"   # zstd recompresses (zram-generator's words)
    recompress-after = "10m"      # pages not accessed for 10 minutes are recompressed,
    recompress-interval = "1m"    #   checked every minute (default), in the background
    group-pages = 16              # recompress --group-pages packs up to 16 idle pages together
    group-algorithm = "zstd(level=9)"   #   with this algorithm (default zstd level 9)
    mem-limit = "1G"
    backing = "/var/lib/zramd/zram0.img"   # a file (sparse, created) or a block device below
    writeback-high = 0.9          # pressure writeback starts at 90% of mem-limit (default),
    writeback-low = 0.8           #   stops under 80% (default); "90%" works too
    writeback-wait = "2s"         # a write without room waits this long for it (default)
    persist = "/var/lib/zramd/zram0.snap"  # snapshot on stop, restored on start
    sync = "stop"                 # or "flush": a journal beside it, synced by every FLUSH
    read-only = false
    description = "swap"
    fs-type = "ext4"              # what `zramd attach zram0` does (zram-generator's words):
    mount-point = "/var/tmp/z"    #   mkfs.TYPE and a mount with options (default "discard"),
    options = "discard"           #   or, without both, swap (with swap-priority, default 100)

Sizes, here as on the command line (``config.size_bytes``): a TOML number, a bare number in
a string or an expression is MiB (zram-generator's unit, with ``ram`` = MemTotal in MiB); a
string with a unit (``"4096B"``, ``"4G"``, ``"512MiB"``) has that unit. Export sizes and
memory limits are rounded down to whole 4 KiB pages. A size of 0 disables the
export, as in zram-generator. Every error is a :class:`ConfigFileError` whose message
names the file, the key and what was expected. This module never exits or prints.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from zramd.config import (
    MAX_POLL_US,
    MIN_IN_FLIGHT_BYTES,
    SIZE_UNIT,
    TLS_MODES,
    ConfigError,
    ExportConfig,
    FileConfig,
    ServerConfig,
    format_size,
    parse_compression,
    parse_duration,
    parse_fraction,
    parse_network,
    parse_one_algorithm,
    round_pages,
    size_bytes,
)
from zramd.system import SWAP_MODES

DEFAULT_CONFIG_PATH = "/etc/zramd/zramd.toml"
#: Refuse config files larger than this (they are a few lines).
MAX_CONFIG_FILE = 1 << 20


class ConfigFileError(ConfigError):
    """A bad configuration file; the message is ``FILE: key: problem``."""


def parse_size_value(value: Any, *, ram: float | None = None, what: str = "size") -> int:
    """Bytes from a config size, rounded down to whole pages: a TOML number is MiB, a string
    is read by :func:`zramd.config.size_bytes` (bare number or expression: MiB; or a unit).
    ``ram`` (MiB) overrides MemTotal. Raises ConfigError saying what was expected."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{what} {value!r} must not be negative")
        return round_pages(int(value * SIZE_UNIT))
    if isinstance(value, str):
        return round_pages(size_bytes(value, ram=ram))
    raise ConfigError(f"expected a size (number or string), got {type(value).__name__}")


def parse_algorithm(text: str) -> tuple[str, int | None]:
    """One algorithm: ``"zstd(level=3)"`` -> ("zstd", 3); ``"lz4"`` -> ("lz4", None)."""
    return parse_one_algorithm(text)


def _octal_mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f"expected an octal mode like \"0600\", got {value!r}") from None
    else:
        raise ConfigError(f"expected an octal mode like \"0600\", got {value!r}")
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"mode {value!r} out of range 0..0777")
    return mode


def _typed(value: Any, kind: type | tuple[type, ...], expected: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"expected {expected}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"expected {expected}, got {value!r}")
    return value


def _poll_us(value: Any) -> int:
    expected = f"microseconds 0..{MAX_POLL_US} (0: no busy polling)"
    v: int = _typed(value, int, expected)
    if not 0 <= v <= MAX_POLL_US:
        raise ConfigError(f"expected {expected}, got {value!r}")
    return v


def _on_off_mode(value: Any, modes: tuple[str, ...]) -> str:
    """A mode key: true/false mean "on"/"off", else one of ``modes`` (any case)."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, str) and value.lower() in modes:
        return value.lower()
    raise ConfigError(f"expected one of {', '.join(modes)} (or true/false), got {value!r}")


def _swap_mode(value: Any) -> str:
    return _on_off_mode(value, SWAP_MODES)


# key -> (parser, ServerConfig attribute or FileConfig attribute)
def _positive_int(value: Any) -> int:
    v = _typed(value, int, "a positive integer")
    if v < 1:
        raise ConfigError(f"expected a positive integer, got {value!r}")
    return int(v)


def _seconds(value: Any) -> float:
    v = _typed(value, (int, float), "a number of seconds")
    if not v > 0:
        raise ConfigError(f"expected a positive number of seconds, got {value!r}")
    return float(v)


def _bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value * SIZE_UNIT
    return size_bytes(_typed(value, str, "a size like \"64M\" (a bare number is MiB)"))


def _in_flight_bytes(value: Any) -> int:
    n = _bytes(value)
    if n < MIN_IN_FLIGHT_BYTES:
        raise ConfigError(
            f"expected a size of at least \"{format_size(MIN_IN_FLIGHT_BYTES)}\", got {value!r}"
        )
    return n


def _opt_str(value: Any) -> str | None:
    v = _typed(value, str, "a string")
    return v or None


def _str(value: Any) -> str:
    """A string kept as given: ``""`` means "off" (``control``), unlike a missing key."""
    v: str = _typed(value, str, "a string")
    return v


def _tls_mode(value: Any) -> str:
    return _on_off_mode(value, TLS_MODES)


def _allow_list(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"expected a list of addresses like [\"127.0.0.1/32\"], got {value!r}")
    for v in items:
        parse_network(v)
    return list(items)


_SERVER_KEYS: dict[str, tuple[Any, str]] = {
    "bind": (_opt_str, "bind"),
    "port": (lambda v: _typed(v, int, "a TCP port number 0..65535"), "port"),
    "unix": (_opt_str, "unix"),
    "unix-mode": (_octal_mode, "unix_mode"),
    "default-export": (lambda v: _typed(v, str, "an export name"), "default_export"),
    "max-connections": (_positive_int, "max_connections"),
    "handshake-timeout": (_seconds, "handshake_timeout"),
    "max-payload": (_bytes, "max_payload"),
    "max-in-flight": (_positive_int, "max_in_flight"),
    "max-in-flight-bytes": (_in_flight_bytes, "max_in_flight_bytes"),
    "mem-limit": (_bytes, "global_mem_limit"),
    "tls": (_tls_mode, "tls"),
    "tls-certificates": (_opt_str, "tls_certificates"),
    "tls-verify-peer": (lambda v: _typed(v, bool, "true or false"), "tls_verify_peer"),
    "allow": (_allow_list, "allow"),
    "poll-us": (_poll_us, "poll_us"),
}
_FILE_KEYS: dict[str, Any] = {
    "control": _str,
    "swap": _swap_mode,
    "metrics": _opt_str,
}
_EXPORT_KEYS = (
    "size",
    "compression-algorithm",
    "mem-limit",
    "read-only",
    "description",
    "swap-priority",
    "fs-type",
    "mount-point",
    "options",
    "recompress-after",
    "recompress-interval",
    "group-pages",
    "group-algorithm",
    "backing",
    "writeback-high",
    "writeback-low",
    "writeback-wait",
    "persist",
    "sync",
)
#: zram-generator spellings accepted as aliases
_EXPORT_ALIASES = {"zram-size": "size", "zram-resident-limit": "mem-limit"}


def parse_config_text(text: str, path: str = "<string>", *, ram: float | None = None) -> FileConfig:
    """Parse the TOML ``text`` of file ``path``; ``ram`` (MiB) overrides MemTotal for tests."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    server = ServerConfig()
    fc = FileConfig(path=path, server=server)
    exports_table: Any = {}
    for key, value in data.items():
        if key == "export":
            exports_table = value
            continue
        try:
            if key in _SERVER_KEYS:
                parser, attr = _SERVER_KEYS[key]
                setattr(server, attr, parser(value))
                fc.keys.add(key)
            elif key in _FILE_KEYS:
                setattr(fc, key, _FILE_KEYS[key](value))
                fc.keys.add(key)
            elif isinstance(value, dict):
                raise ConfigError(f"unknown table [{key}] (exports go in [export.{key}])")
            else:
                known = ", ".join(sorted([*_SERVER_KEYS, *_FILE_KEYS]))
                raise ConfigError(f"unknown key (known: {known}, and [export.NAME] tables)")
        except ConfigError as e:
            raise ConfigFileError(f"{path}: {key}: {e}") from None
    if server.bind is None:
        server.port = None
    if not isinstance(exports_table, dict):
        raise ConfigFileError(f"{path}: export: expected tables like [export.zram0]")
    for name, table in exports_table.items():
        if not isinstance(table, dict):
            raise ConfigFileError(f"{path}: export.{name}: expected a table [export.{name}]")
        exp = _parse_export(path, name, table, ram)
        if exp is None:
            fc.disabled.append(name)
        else:
            server.exports.append(exp)
    return fc


def _parse_export(path: str, name: str, table: dict[str, Any], ram: float | None) -> (
    ExportConfig | None
):
    where = f"{path}: export.{name}"
    seen: dict[str, str] = {}
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = _EXPORT_ALIASES.get(raw_key, raw_key)
        if key not in _EXPORT_KEYS:
            raise ConfigFileError(
                f"{where}: {raw_key}: unknown key (known: {', '.join(_EXPORT_KEYS)})"
            )
        if key in seen:
            raise ConfigFileError(f"{where}: {raw_key}: same as {seen[key]!r}, given twice")
        seen[key] = raw_key
        values[key] = value
    if "size" not in values:
        raise ConfigFileError(
            f"{where}: size: missing (expected e.g. size = \"min(ram / 2, 4096)\" or \"4G\")"
        )
    try:
        size = parse_size_value(values["size"], ram=ram, what=f"size of export {name!r}")
    except ConfigError as e:
        raise ConfigFileError(f"{where}: {seen['size']}: {e}") from None
    if size == 0:
        return None
    exp = ExportConfig(name=name, size=size)
    try:
        if "compression-algorithm" in values:
            key = "compression-algorithm"
            comp = parse_compression(values[key])
            exp.algorithm, exp.level = comp.algorithm, comp.level
            exp.recompression = comp.recompression
            if comp.recompress_type is not None:
                exp.recompress_type = comp.recompress_type
        for key in ("recompress-after", "recompress-interval"):
            if key in values:
                seconds = parse_duration(values[key], what=key)
                setattr(exp, key.replace("-", "_"), seconds)
        if "mem-limit" in values:
            key = seen["mem-limit"]
            exp.mem_limit = parse_size_value(values["mem-limit"], ram=ram, what="mem-limit")
        if "read-only" in values:
            key = "read-only"
            exp.read_only = bool(_typed(values[key], bool, "true or false"))
        if "description" in values:
            key = "description"
            exp.description = _typed(values[key], str, "a string")
        if "backing" in values:
            key = "backing"
            exp.backing = _typed(values[key], str, "an absolute path")
        for key in ("writeback-high", "writeback-low"):
            if key in values:
                setattr(exp, key.replace("-", "_"), parse_fraction(values[key], what=key))
        if "writeback-wait" in values:
            key = "writeback-wait"
            exp.writeback_wait = parse_duration(values[key], what=key)
        if "persist" in values:
            key = "persist"
            exp.persist = _typed(values[key], str, "an absolute path")
        if "sync" in values:
            key = "sync"
            exp.sync = _typed(values[key], str, '"stop" or "flush"')
        if "group-pages" in values:
            key = "group-pages"
            exp.group_pages = _typed(values[key], int, "an integer 2..16")
        if "group-algorithm" in values:
            key = "group-algorithm"
            text = _typed(values[key], str, 'a string like "zstd(level=9)"')
            exp.group_algorithm, exp.group_level = parse_algorithm(text)
        key = "swap-priority"
        if key in values:
            exp.attach.swap_priority = _typed(values[key], int, "an integer -1..32767")
        for key in ("fs-type", "mount-point", "options"):
            if key in values:
                setattr(exp.attach, key.replace("-", "_"), _typed(values[key], str, "a string"))
    except ConfigError as e:
        raise ConfigFileError(f"{where}: {key}: {e}") from None
    try:
        exp.validate()
    except ConfigError as e:
        raise ConfigFileError(f"{where}: {_blame(str(e), seen)}: {e}") from None
    return exp


def _blame(message: str, seen: dict[str, str]) -> str:
    """The key a validation message is about (ExportConfig.validate names it in prose)."""
    for word, key in (
        ("recompress-after", "recompress-after"),
        ("recompress-interval", "recompress-interval"),
        ("group-pages", "group-pages"),
        ("group-algorithm", "group-algorithm"),
        ("writeback-low", "writeback-low"),
        ("writeback-high", "writeback-high"),
        ("writeback-wait", "writeback-wait"),
        ("algorithm", "compression-algorithm"),
        ("level", "compression-algorithm"),
        ("codec", "compression-algorithm"),
        ("mem-limit", "mem-limit"),
        ("recompress type", "compression-algorithm"),
        ("description", "description"),
        ("sync", "sync"),
        ("backing", "backing"),
        ("persist", "persist"),
        ("swap-priority", "swap-priority"),
        ("mount-point", "mount-point"),
        ("fs-type", "fs-type"),
        ("name", "name"),
    ):
        if word in message:
            return seen.get(key, key)
    return seen.get("size", "size")


def changed_keys(old: FileConfig, new: FileConfig) -> list[str]:
    """The top-level keys whose value differs between two readings of a file, sorted (a key
    added or removed counts when its value differs from the default it replaced)."""
    changed = []
    for key in sorted(old.keys | new.keys):
        if key in _SERVER_KEYS:
            attr = _SERVER_KEYS[key][1]
            before, after = getattr(old.server, attr), getattr(new.server, attr)
        else:
            before, after = getattr(old, key), getattr(new, key)
        if before != after:
            changed.append(key)
    return changed


def load_file(path: str | os.PathLike[str], *, ram: float | None = None) -> FileConfig:
    """Read and parse a configuration file; errors name the file."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_FILE + 1)
    except OSError as e:
        raise ConfigFileError(f"{p}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_FILE:
        raise ConfigFileError(f"{p}: larger than {MAX_CONFIG_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{p}: not UTF-8: {e}") from None
    return parse_config_text(text, p, ram=ram)


def default_config_path() -> str | None:
    """``/etc/zramd/zramd.toml`` when it exists, else None."""
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_serve_file(path: str | None) -> FileConfig | None:
    """The file ``serve --config PATH`` names: None = the default file when it exists,
    ``""`` = no file."""
    if path is None:
        path = default_config_path()
    return load_file(path) if path else None
