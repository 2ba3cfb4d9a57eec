"""Typed configuration of zramd: exports, listeners, limits, and how flags and file combine.

Theory of operation
-------------------
Everything a server needs to start is one :class:`ServerConfig` holding a list of
:class:`ExportConfig`; ``zramd serve`` adds the operator settings (control socket, swap safety,
metrics) in a :class:`ServeConfig`. This module owns every default and limit (the constants
below), the value parsers shared by the command line and the TOML file (:func:`size_bytes` and
:func:`parse_size`: one meaning for sizes, a bare number is MiB as in zram-generator;
:func:`parse_export_spec`, :func:`parse_network`, :func:`parse_metrics_address`), the one size
formatter (:func:`format_size`), and the one merge, :func:`serve_config`: the flags
(:class:`ServeFlags`, collected by ``cli/serve.py``) over the file (:class:`FileConfig`, read by
``configfile.py``) over the defaults, validated once. The same value is accepted or refused
with the same message everywhere. Every error is a :class:`ConfigError` naming the offending
value; nothing here prints, exits, reads files (a backing path is only ``stat``-ed) or knows
about click, and nothing here imports the server, control or cli layers.

Invariants after validation (``ServerConfig.validate``): export names are unique, non-empty,
UTF-8 strings of at most :data:`MAX_EXPORT_NAME` bytes; sizes are positive multiples of
:data:`EXPORT_SIZE_ALIGN`; codecs exist; every limit is within its named range; TLS settings
are consistent; allow-list entries parse; a backing path is absolute, a regular file or a
block device (or a file to create in an existing directory), and no two exports name the same
one (compared by device and inode when it exists).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from zramd.compress import get_codec
from zramd.device.backed import HIGH_WATERMARK, LOW_WATERMARK, ROOM_WAIT, check_writeback
from zramd.device.groups import MAX_GROUP_PAGES, MIN_MEMBERS
from zramd.geometry import PAGE_SIZE
from zramd.protocol import wire
from zramd.protocol.limits import DEFAULT_MAX_PAYLOAD
from zramd.sizeexpr import SizeExprError, evaluate_mib
from zramd.system import total_ram

#: Export sizes must be whole pages (the device works in pages).
EXPORT_SIZE_ALIGN = PAGE_SIZE
#: Export names travel in NBD strings: SHOULD be <= 256 bytes (nbd.md 1.2).
MAX_EXPORT_NAME = 256
#: Largest export we accept (the NBD size field is 64-bit; devices are sparse). 2^60 bytes = 1 EiB.
MAX_EXPORT_SIZE = 1 << 60
#: Default export when none is given on the command line.
DEFAULT_EXPORT_NAME = "zram0"
DEFAULT_EXPORT_MAX_SIZE = 4 << 30
DEFAULT_ALGORITHM = "lz4"
DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 10809
#: Simultaneous client connections, all exports together (qemu-nbd 9.1 uses 100).
DEFAULT_MAX_CONNECTIONS = 100
#: Seconds a client may take to reach transmission (qemu-nbd 9.1 and CVE-2024-7409 use 10 s).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Largest READ/WRITE payload served: the protocol's default (protocol/limits.py), configurable
#: between these bounds.
MIN_MAX_PAYLOAD = wire.BLOCK_SIZE_MAX_PAYLOAD
MAX_MAX_PAYLOAD = 0xFFFFFFFF
#: Requests in flight per connection before we stop reading (the kernel queue depth is 128).
DEFAULT_MAX_IN_FLIGHT = 256
#: bytes held by running requests, all connections together (zramd/server/flow.py)
DEFAULT_MAX_IN_FLIGHT_BYTES = 256 << 20
MIN_IN_FLIGHT_BYTES = 1 << 20
#: Control socket of the daemon, and the environment variable naming another one.
DEFAULT_CONTROL_PATH = "/run/zramd/control.sock"
CONTROL_ENV = "ZRAMD_CONTROL"
#: Metrics address: ``PORT`` alone listens on this host.
DEFAULT_METRICS_HOST = "127.0.0.1"
#: Swap safety when neither a flag nor the file says (``system.SWAP_MODES``).
DEFAULT_SWAP = "off"
#: Unix socket permission bits.
DEFAULT_UNIX_MODE = 0o600
#: busy-poll window after a reply, in microseconds (zramd/server/session.py "Busy polling")
DEFAULT_POLL_US = 50
MAX_POLL_US = 1000
#: Attaching an export to a kernel NBD device (zram-generator's defaults): swap priority,
#: the file systems ``mkfs`` may make, the one a mount point gets, the default options.
DEFAULT_SWAP_PRIORITY = 100
SWAP_PRIORITY_RANGE = (-1, 32767)
MKFS_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
DEFAULT_FS_TYPE = "ext2"
#: Background recompression: seconds between passes unless ``recompress-interval`` says, and
#: the fewest allowed (a pass scans the whole table, in slices)
DEFAULT_RECOMPRESS_INTERVAL = 60.0
MIN_RECOMPRESS_INTERVAL = 1.0
#: recompression algorithms after the first (zram: up to three secondary algorithms)
MAX_RECOMPRESSION_ALGORITHMS = 3
#: what the policy recompresses (zram's recompress ``type=``, with ``-`` for ``_``)
RECOMPRESS_TYPES = ("idle", "huge-idle")
#: when an export with a persist file is made durable: ``stop`` (a snapshot at stop and
#: ``zramd destroy``), ``flush`` (also a journal synced on every FLUSH and FUA)
SYNC_MODES = ("stop", "flush")
#: TLS modes (nbd.md 5): off = NOTLS, on = STARTTLS optional, require = FORCEDTLS.
TLS_MODES = ("off", "on", "require")
DEFAULT_TLS = "off"


class ConfigError(ValueError):
    """A bad configuration value; the message names it."""


#: A size without a unit is in MiB, everywhere (zram-generator's unit for ``zram-size``).
SIZE_UNIT = 1 << 20
#: What a size may be, for help texts and errors.
SIZE_SYNTAX = (
    "a number of MiB, a number with a unit (512B, 64K, 512M, 4G, 1T) or an expression in "
    "ram (MiB) like min(ram / 2, 4096)"
)

_UNITS: dict[str, int] = {
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?|(b))?\s*$", re.IGNORECASE)


def size_bytes(text: str, *, ram: float | None = None) -> int:
    """Bytes from what an operator wrote, on the command line or in the file: ``"2048"`` and
    ``"1.5"`` are MiB; ``"4096B"``, ``"64K"``, ``"512MiB"``, ``"4G"``, ``"1T"`` have their unit
    (K = 1024); anything else is an expression in ``ram`` (MemTotal in MiB; ``ram`` overrides
    it) whose result is MiB, evaluated by :mod:`zramd.sizeexpr`. Raises ConfigError saying what
    was expected (without the value's name: callers add it)."""
    m = _SIZE_RE.match(text)
    if m is not None:
        number, unit, byte = m.group(1), m.group(2), m.group(3)
        scale = 1 if byte else _UNITS[unit.lower()] if unit else SIZE_UNIT
        value = float(number) * scale if "." in number else int(number) * scale
        if value != int(value):
            raise ConfigError("not a whole number of bytes")
        return int(value)
    try:
        mib = evaluate_mib(text, total_ram() / SIZE_UNIT if ram is None else ram)
    except SizeExprError as e:
        raise ConfigError(
            f"expected a size like \"4G\" (a bare number is MiB) or an expression in ram (MiB) "
            f"like \"min(ram / 2, 4096)\": {e}"
        ) from None
    if mib < 0:
        raise ConfigError(f"must not be negative ({mib:g} MiB)")
    return int(mib * SIZE_UNIT)


def parse_size(text: str | int, *, what: str = "size", ram: float | None = None) -> int:
    """Bytes from an operator's size (:func:`size_bytes`: a bare number is MiB). An int is
    already bytes (a value of the control protocol). Raises ConfigError naming the value."""
    if isinstance(text, bool):
        raise ConfigError(f"bad {what} {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"bad {what} {text!r}: must not be negative")
        return text
    try:
        return size_bytes(text, ram=ram)
    except ConfigError as e:
        raise ConfigError(f"bad {what} {text!r}: {e}") from None


def round_pages(n: int) -> int:
    """``n`` rounded down to whole pages (export sizes and memory limits)."""
    return n - n % EXPORT_SIZE_ALIGN


def format_size(n: int) -> str:
    """util-linux style: 0B, 512B, 4K, 1.5M, 4G (binary units, one decimal when needed)."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        if value < 1024 or unit == "E":
            text = f"{value:.1f}"
            if text.endswith(".0"):
                text = text[:-2]
            if text == "1024":  # rounding reached the next unit
                continue
            return f"{text}{unit}"
    return f"{n}B"  # pragma: no cover


_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_duration(value: str | int | float, *, what: str = "duration") -> float:
    """Seconds from ``"10m"``, ``"90s"``, ``"1.5h"``, ``"2d"`` or a number of seconds. Raises
    ConfigError naming ``what``."""
    if isinstance(value, bool):
        raise ConfigError(f"bad {what} {value!r}: expected a duration like \"10m\"")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _DURATION_UNITS:
            raise ConfigError(
                f"bad {what} {value!r}: expected a duration like \"10m\" (units s, m, h, d)"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    if seconds < 0:
        raise ConfigError(f"bad {what} {value!r}: must not be negative")
    return seconds


def parse_fraction(value: str | int | float, *, what: str = "fraction") -> float:
    """A fraction from ``0.9``, ``"0.9"`` or ``"90%"`` (the range is checked by the caller).
    Raises ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"bad {what} {value!r}: expected a fraction like 0.9 or \"90%\"")
    if not isinstance(value, str):
        return float(value)
    text = value.strip()
    percent = text.endswith("%")
    try:
        fraction = float(text[:-1]) / 100 if percent else float(text)
    except ValueError:
        raise ConfigError(
            f"bad {what} {value!r}: expected a fraction like 0.9 or \"90%\""
        ) from None
    if fraction != fraction:  # NaN
        raise ConfigError(f"bad {what} {value!r}: expected a fraction like 0.9 or \"90%\"")
    return fraction


_ALGO_RE = re.compile(r"^([A-Za-z0-9_-]*)(?:\((.*)\))?$")


@dataclass
class Compression:
    """What a ``compression-algorithm`` says, in zram-generator's vocabulary: the algorithm of
    new pages with its level, the recompression algorithms after it (tried in order), and the
    recompression parameters of a trailing parameter list without an algorithm."""

    algorithm: str
    level: int | None = None
    recompression: list[tuple[str, int | None]] = field(default_factory=list)
    recompress_type: str | None = None


def parse_compression(text: str) -> Compression:
    """``"lz4 zstd(level=3) (type=idle)"``: whitespace-separated algorithms, each with optional
    ``(level=N)``; the first compresses new pages, the others (at most
    :data:`MAX_RECOMPRESSION_ALGORITHMS`) recompress; a last ``(type=idle|huge_idle)`` alone is
    what the background policy recompresses. Raises ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"expected a string like \"lz4 zstd(level=3)\", got {text!r}")
    items = _compression_items(text)
    if not items or not items[0][0]:
        raise ConfigError(f"{text!r}: expected ALGORITHM[(level=N)] [ALGORITHM[(level=N)]...]")
    out: Compression | None = None
    for name, params in items:
        if not name:
            if out is None or params is None or out.recompress_type is not None:
                raise ConfigError(f"{text!r}: a parameter list needs an algorithm before it")
            out.recompress_type = _recompress_params(text, params)
            continue
        if out is not None and out.recompress_type is not None:
            raise ConfigError(f"{text!r}: the recompression parameters (type=...) come last")
        level = _level_param(text, params)
        if out is None:
            out = Compression(name, level)
        else:
            out.recompression.append((name, level))
    assert out is not None
    if len(out.recompression) > MAX_RECOMPRESSION_ALGORITHMS:
        raise ConfigError(
            f"{text!r}: at most {MAX_RECOMPRESSION_ALGORITHMS} recompression algorithms"
        )
    return out


def parse_one_algorithm(text: str) -> tuple[str, int | None]:
    """One algorithm: ``"zstd(level=3)"`` -> ("zstd", 3); ``"lz4"`` -> ("lz4", None). Raises
    ConfigError."""
    comp = parse_compression(text)
    if comp.recompression or comp.recompress_type is not None:
        raise ConfigError(
            f"{text!r}: one algorithm expected here (recompression algorithms follow the first "
            "in compression-algorithm)"
        )
    return comp.algorithm, comp.level


def _compression_items(text: str) -> list[tuple[str, str | None]]:
    """The words of a compression-algorithm value (spaces inside parentheses kept)."""
    words: list[str] = []
    depth, cur = 0, ""
    for ch in text.strip():
        if ch.isspace() and depth == 0:
            if cur:
                words.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise ConfigError(f"{text!r}: unbalanced parentheses")
        cur += ch
    if depth:
        raise ConfigError(f"{text!r}: unbalanced parentheses")
    if cur:
        words.append(cur)
    out: list[tuple[str, str | None]] = []
    for w in words:
        m = _ALGO_RE.match(w)
        if m is None:
            raise ConfigError(f"{text!r}: expected ALGORITHM or ALGORITHM(level=N), got {w!r}")
        out.append((m.group(1).lower(), m.group(2)))
    return out


def _level_param(text: str, params: str | None) -> int | None:
    level: int | None = None
    if params is None or not params.strip():
        return level
    for item in params.split(","):
        k, eq, v = item.partition("=")
        if k.strip().lower() != "level" or not eq:
            raise ConfigError(f"{text!r}: unknown parameter {item.strip()!r} (supported: level=N)")
        try:
            level = int(v.strip())
        except ValueError:
            raise ConfigError(f"{text!r}: level {v.strip()!r} is not an integer") from None
    return level


def _recompress_params(text: str, params: str) -> str:
    kind: str | None = None
    for item in params.split(","):
        k, eq, v = item.partition("=")
        value = v.strip().lower().replace("_", "-")
        if k.strip().lower() != "type" or not eq or value not in RECOMPRESS_TYPES:
            raise ConfigError(
                f"{text!r}: recompression parameter {item.strip()!r}: supported is type="
                + "|".join(t.replace("-", "_") for t in RECOMPRESS_TYPES)
            )
        kind = value
    assert kind is not None
    return kind


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``127.0.0.1`` (= /32), ``::1``, ``fd00::/8``. Raises ConfigError."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(
            f"bad allow entry {text!r}: expected an IP address or ADDR/PREFIX (e.g. 10.0.0.0/8)"
        ) from None


@dataclass
class AttachConfig:
    """How ``zramd attach NAME`` uses an export, in zram-generator's words: ``fs-type`` is
    ``swap`` or a file system made with mkfs; ``mount-point`` (which makes the default
    fs-type ext2) where it is mounted; ``options`` the swapon or mount options (default
    ``discard``, so freed blocks free memory); ``swap-priority`` (default 100)."""

    swap_priority: int | None = None
    fs_type: str | None = None
    mount_point: str | None = None
    options: str | None = None

    @property
    def kind(self) -> str:
        """``swap`` or the file system type, as zram-generator resolves it."""
        return self.fs_type or (DEFAULT_FS_TYPE if self.mount_point else "swap")

    def validate(self, name: str) -> None:
        where = f"export {name!r}"
        kind = self.kind
        if kind != "swap" and kind not in MKFS_TYPES:
            raise ConfigError(
                f"{where}: fs-type {kind!r} is not swap or one of {', '.join(MKFS_TYPES)}"
            )
        if kind == "swap" and self.mount_point:
            raise ConfigError(f"{where}: mount-point needs a file system fs-type, not swap")
        if kind != "swap" and not self.mount_point:
            raise ConfigError(f"{where}: fs-type {kind} needs a mount-point")
        if self.mount_point is not None and not self.mount_point.startswith("/"):
            raise ConfigError(f"{where}: mount-point must be an absolute path")
        if self.swap_priority is not None:
            low, high = SWAP_PRIORITY_RANGE
            if kind != "swap":
                raise ConfigError(f"{where}: swap-priority needs fs-type swap")
            if not low <= self.swap_priority <= high:
                raise ConfigError(f"{where}: swap-priority must be in {low}..{high}")


@dataclass
class ExportConfig:
    """One export: a name and the compressed device behind it."""

    name: str
    size: int
    algorithm: str = DEFAULT_ALGORITHM
    level: int | None = None
    mem_limit: int = 0
    read_only: bool = False
    description: str = ""
    #: what ``zramd attach`` does with it (the file's swap-priority, fs-type, ...)
    attach: AttachConfig = field(default_factory=AttachConfig)
    #: recompression algorithms with their levels, tried in order (``compression-algorithm``'s
    #: further algorithms)
    recompression: list[tuple[str, int | None]] = field(default_factory=list)
    #: the background policy: pages not accessed for this many seconds are marked idle,
    #: packed into multi-page groups when ``group_pages`` is given and recompressed (0: no
    #: policy), every ``recompress_interval`` seconds; ``recompress_type`` idle or huge-idle
    #: (only the huge ones among them)
    recompress_after: float = 0.0
    recompress_interval: float = DEFAULT_RECOMPRESS_INTERVAL
    recompress_type: str = "idle"
    #: the backing store below RAM (issue 12): an absolute path of a regular file (created and
    #: grown as needed, sparse) or a block device; None: none
    backing: str | None = None
    #: pressure writeback (with a backing store): it starts when the pool passes ``high`` of the
    #: memory limit in force and stops under ``low`` (fractions); a write without room waits
    #: up to ``wait`` seconds for it
    writeback_high: float = HIGH_WATERMARK
    writeback_low: float = LOW_WATERMARK
    writeback_wait: float = ROOM_WAIT
    #: the snapshot file (issue 13): written on stop and ``zramd destroy``, restored on start;
    #: an absolute path (None: the export is not kept across restarts)
    persist: str | None = None
    #: when the persist file's data is on stable storage (SYNC_MODES): ``stop`` or ``flush``
    sync: str = "stop"
    #: multi-page groups of cold pages (``recompress --group-pages``, and its default): pages
    #: per group (0: the device's, 16) and their algorithm with its level ("": the device's,
    #: zstd level 9)
    group_pages: int = 0
    group_algorithm: str = ""
    group_level: int | None = None

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("export name must not be empty")
        raw = self.name.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_EXPORT_NAME:
            raise ConfigError(f"export name {self.name!r} is longer than {MAX_EXPORT_NAME} bytes")
        if "\0" in self.name or "," in self.name or "=" in self.name:
            raise ConfigError(f"export name {self.name!r} must not contain NUL, ',' or '='")
        if self.size <= 0 or self.size % EXPORT_SIZE_ALIGN:
            raise ConfigError(
                f"export {self.name!r}: size {self.size} must be a positive multiple of "
                f"{EXPORT_SIZE_ALIGN}"
            )
        if self.size > MAX_EXPORT_SIZE:
            raise ConfigError(f"export {self.name!r}: size {self.size} is too large")
        if self.mem_limit < 0:
            raise ConfigError(f"export {self.name!r}: mem-limit must not be negative")
        check_mem_limit(self.name, self.size, self.mem_limit)
        if len(self.description.encode()) > MAX_EXPORT_NAME * 16:
            raise ConfigError(f"export {self.name!r}: description too long")
        try:
            get_codec(self.algorithm, level=self.level)
            for name, level in self.recompression:
                get_codec(name, level=level)
        except ValueError as e:
            raise ConfigError(f"export {self.name!r}: {e}") from None
        if self.group_pages and not MIN_MEMBERS <= self.group_pages <= MAX_GROUP_PAGES:
            raise ConfigError(
                f"export {self.name!r}: group-pages must be in {MIN_MEMBERS}..{MAX_GROUP_PAGES}"
            )
        if self.group_algorithm:
            try:
                get_codec(self.group_algorithm, level=self.group_level)
            except ValueError as e:
                raise ConfigError(f"export {self.name!r}: group-algorithm: {e}") from None
        if self.recompress_after and not self.recompression and not self.group_pages:
            raise ConfigError(
                f"export {self.name!r}: recompress-after needs recompression algorithms (list "
                f"them after the first compression algorithm, e.g. \"{self.algorithm} "
                f"zstd(level=3)\") or group-pages"
            )
        if self.recompress_after < 0:
            raise ConfigError(f"export {self.name!r}: recompress-after must not be negative")
        if self.recompress_interval < MIN_RECOMPRESS_INTERVAL:
            raise ConfigError(
                f"export {self.name!r}: recompress-interval must be at least "
                f"{MIN_RECOMPRESS_INTERVAL:g}s"
            )
        if self.recompress_type not in RECOMPRESS_TYPES:
            raise ConfigError(
                f"export {self.name!r}: recompress type must be one of "
                + ", ".join(RECOMPRESS_TYPES)
            )
        if self.backing is not None:
            check_backing_path(self.name, self.backing)
        else:
            for key, value, default in (
                ("writeback-high", self.writeback_high, HIGH_WATERMARK),
                ("writeback-low", self.writeback_low, LOW_WATERMARK),
                ("writeback-wait", self.writeback_wait, ROOM_WAIT),
            ):
                if value != default:
                    raise ConfigError(
                        f"export {self.name!r}: {key} needs a backing store (backing=PATH)"
                    )
        try:
            check_writeback(self.writeback_high, self.writeback_low, self.writeback_wait)
        except ValueError as e:
            raise ConfigError(f"export {self.name!r}: {e}") from None
        if self.persist is not None:
            check_persist_path(self.name, self.persist)
        if self.sync not in SYNC_MODES:
            raise ConfigError(
                f"export {self.name!r}: sync {self.sync!r} must be one of " + ", ".join(SYNC_MODES)
            )
        if self.sync == "flush" and self.persist is None:
            raise ConfigError(f"export {self.name!r}: sync=flush needs a persist file")
        self.attach.validate(self.name)

    def summary(self) -> str:
        """``zram0 4.0G lz4`` (+ ``ro``), for the listening log line."""
        parts = [self.name, format_size(self.size), self.algorithm]
        if self.read_only:
            parts.append("ro")
        return " ".join(parts)


def check_mem_limit(name: str, size: int, mem_limit: int) -> None:
    """Refuse a memory limit above the export's size: the pool never holds more than the data, so
    such a limit never binds, and it is a slip (a unit, or the size and the limit swapped)."""
    if mem_limit > size:
        raise ConfigError(
            f"export {name!r}: mem-limit {format_size(mem_limit)} is larger than the export "
            f"({format_size(size)}); a limit binds only below the size (0 = none)"
        )


def check_backing_path(name: str, path: str) -> None:
    """Refuse a backing path that is relative, neither a regular file nor a block device, or a
    missing file whose directory does not exist or is not writable."""
    if not os.path.isabs(path):
        raise ConfigError(f"export {name!r}: backing {path!r} must be an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ConfigError(
                f"export {name!r}: backing {path}: directory {parent} does not exist"
            ) from None
        if not os.access(parent, os.W_OK):
            raise ConfigError(
                f"export {name!r}: backing {path}: cannot create it in {parent} (not writable)"
            ) from None
        return
    except OSError as e:
        raise ConfigError(f"export {name!r}: backing {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(
            f"export {name!r}: backing {path} is neither a regular file nor a block device"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"export {name!r}: backing {path} is not readable and writable")


def check_persist_path(name: str, path: str) -> None:
    """Refuse a snapshot path that is relative, a directory or other non-regular file, or in a
    directory that does not exist or is not writable (the snapshot is written beside it)."""
    if not os.path.isabs(path):
        raise ConfigError(f"export {name!r}: persist {path!r} must be an absolute path")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"export {name!r}: persist {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(
            f"export {name!r}: persist {path}: cannot write in {parent} (not writable)"
        )
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"export {name!r}: persist {path} is not a regular file")


def backing_identity(path: str) -> tuple[int, int] | str:
    """What makes two backing paths the same: (device, inode) of an existing file or device,
    else the path with its symlinks resolved."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


_SPEC_KEYS = (
    "algorithm",
    "level",
    "mem-limit",
    "read-only",
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
    "description",
)


def _spec_items(spec: str) -> list[tuple[int, str]]:
    """``spec`` cut at its commas outside parentheses: (offset, item) pairs, so a size like
    ``min(ram / 2, 4096)`` stays whole."""
    items: list[tuple[int, str]] = []
    depth = start = 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append((start, spec[start:i]))
            start = i + 1
    items.append((start, spec[start:]))
    return items


def parse_export_spec(spec: str) -> ExportConfig:
    """Parse ``NAME=SIZE[,algorithm=ALG][,level=N][,mem-limit=SIZE][,read-only]
    [,recompress-after=DURATION][,recompress-interval=DURATION][,group-pages=N]
    [,group-algorithm=ALG][,backing=PATH][,writeback-high=F][,writeback-low=F]
    [,writeback-wait=DURATION][,persist=PATH][,sync=stop|flush][,description=T]``.

    Sizes as everywhere (:func:`size_bytes`: a bare number is MiB; expressions keep the commas
    inside their parentheses), rounded down to whole pages. ``algorithm`` is a
    compression-algorithm value (:func:`parse_compression`: ``lz4 zstd(level=3)`` recompresses
    with zstd); ``level`` sets the first algorithm's. ``group-pages`` (2..16) and
    ``group-algorithm`` (one algorithm, e.g. ``zstd(level=19)``) are what multi-page groups of
    cold pages are packed with. ``backing`` is a file or block device, ``persist`` the snapshot
    file (a relative path is taken from the current directory), ``sync=flush`` makes it durable
    at every FLUSH (a journal beside it). ``writeback-high`` and ``writeback-low`` are
    fractions of the memory limit (``0.9`` or ``90%``) where pressure writeback starts and
    stops, ``writeback-wait`` the longest a write waits for room. ``description`` must come
    last: its text may contain commas."""
    (_, head), *rest = _spec_items(spec)
    name, eq, size_text = head.partition("=")
    name = name.strip()
    if not eq or not name or not size_text.strip():
        raise ConfigError(f"bad export spec {spec!r}: expected NAME=SIZE[,option=value...]")
    cfg = ExportConfig(
        name=name, size=round_pages(parse_size(size_text, what=f"size of export {name!r}"))
    )
    seen: set[str] = set()
    for offset, item in rest:
        key, has_value, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if key == "description":
            cfg.description = spec[offset + item.index("=") + 1 :] if has_value else ""
            break
        if key not in _SPEC_KEYS:
            raise ConfigError(
                f"bad export spec {spec!r}: unknown option {key!r} (known: {', '.join(_SPEC_KEYS)})"
            )
        if key in seen:
            raise ConfigError(f"bad export spec {spec!r}: {key!r} given twice")
        seen.add(key)
        if key == "read-only":
            if has_value and value.strip().lower() not in ("", "1", "true", "yes", "on"):
                if value.strip().lower() in ("0", "false", "no", "off"):
                    continue
                raise ConfigError(f"bad export spec {spec!r}: read-only takes no value")
            cfg.read_only = True
            continue
        if not has_value or not value.strip():
            raise ConfigError(f"bad export spec {spec!r}: {key} needs a value")
        value = value.strip()
        if key == "algorithm":
            comp = parse_compression(value)
            cfg.algorithm, cfg.recompression = comp.algorithm, comp.recompression
            if comp.level is not None:
                cfg.level = comp.level
            if comp.recompress_type is not None:
                cfg.recompress_type = comp.recompress_type
        elif key in ("recompress-after", "recompress-interval"):
            seconds = parse_duration(value, what=f"{key} of export {name!r}")
            if key == "recompress-after":
                cfg.recompress_after = seconds
            else:
                cfg.recompress_interval = seconds
        elif key == "level":
            try:
                cfg.level = int(value)
            except ValueError:
                raise ConfigError(
                    f"bad export spec {spec!r}: level {value!r} is not an integer"
                ) from None
        elif key == "group-pages":
            try:
                cfg.group_pages = int(value)
            except ValueError:
                raise ConfigError(
                    f"bad export spec {spec!r}: group-pages {value!r} is not an integer"
                ) from None
        elif key == "group-algorithm":
            cfg.group_algorithm, cfg.group_level = parse_one_algorithm(value)
        elif key == "mem-limit":
            cfg.mem_limit = round_pages(parse_size(value, what=f"mem-limit of export {name!r}"))
        elif key == "backing":
            cfg.backing = os.path.abspath(value)
        elif key in ("writeback-high", "writeback-low"):
            fraction = parse_fraction(value, what=f"{key} of export {name!r}")
            setattr(cfg, key.replace("-", "_"), fraction)
        elif key == "writeback-wait":
            cfg.writeback_wait = parse_duration(value, what=f"{key} of export {name!r}")
        elif key == "persist":
            cfg.persist = os.path.abspath(value)
        elif key == "sync":
            cfg.sync = value.strip()
    cfg.validate()
    return cfg


def default_export_size(ram: int | None = None) -> int:
    """min(RAM/2, 4 GiB), rounded down to whole pages."""
    if ram is None:
        ram = total_ram()
    size = min(ram // 2, DEFAULT_EXPORT_MAX_SIZE)
    return max(EXPORT_SIZE_ALIGN, size - size % EXPORT_SIZE_ALIGN)


def default_export() -> ExportConfig:
    return ExportConfig(name=DEFAULT_EXPORT_NAME, size=default_export_size())


@dataclass
class ServerConfig:
    """Listeners, limits and exports of one server process.

    ``bind``/``port`` None means "no TCP listener". ``unix`` is a socket path. ``stdio`` serves
    exactly one connection on stdin/stdout. Socket activation (LISTEN_FDS) is detected at start."""

    bind: str | None = DEFAULT_BIND
    port: int | None = DEFAULT_PORT
    unix: str | None = None
    unix_mode: int = DEFAULT_UNIX_MODE
    stdio: bool = False
    exports: list[ExportConfig] = field(default_factory=list)
    default_export: str | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES
    global_mem_limit: int = 0
    #: STARTTLS: "off" | "on" | "require"; certificates in nbdkit's layout (zramd/server/tls.py).
    tls: str = DEFAULT_TLS
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    #: TCP client allow-list (see parse_network); empty = everyone (zramd/server/access.py).
    allow: list[str] = field(default_factory=list)
    #: busy-poll window (µs) for the next request of a lone connection; 0 = never poll.
    poll_us: int = DEFAULT_POLL_US
    #: this start only (``serve --discard-snapshot``): an export whose snapshot file is bad or
    #: foreign starts empty, the file renamed aside (zramd/server/persistence.py)
    discard_snapshot: bool = False

    def validate(self) -> None:
        if not self.exports:
            raise ConfigError("no exports configured")
        names: set[str] = set()
        backings: dict[tuple[int, int] | str, str] = {}
        files: dict[str, str] = {}
        for e in self.exports:
            e.validate()
            if e.name in names:
                raise ConfigError(f"export {e.name!r} defined twice")
            names.add(e.name)
            if e.backing is not None:
                other = backings.setdefault(backing_identity(e.backing), e.name)
                if other != e.name:
                    raise ConfigError(
                        f"exports {other!r} and {e.name!r} both use the backing {e.backing}"
                    )
            if e.persist is not None:
                other = files.setdefault(os.path.realpath(e.persist), e.name)
                if other != e.name:
                    raise ConfigError(
                        f"exports {other!r} and {e.name!r} both persist to {e.persist}"
                    )
                if e.backing is not None and backing_identity(e.persist) == backing_identity(
                    e.backing
                ):
                    raise ConfigError(
                        f"export {e.name!r}: persist and backing are the same file {e.persist}"
                    )
        if self.default_export is not None and self.default_export not in names:
            raise ConfigError(f"default export {self.default_export!r} is not defined")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"bad port {self.port}: must be 0..65535")
        if self.max_connections < 1:
            raise ConfigError(f"bad max-connections {self.max_connections}: must be >= 1")
        if not self.handshake_timeout > 0:
            raise ConfigError(f"bad handshake-timeout {self.handshake_timeout}: must be > 0")
        if not MIN_MAX_PAYLOAD <= self.max_payload <= MAX_MAX_PAYLOAD:
            raise ConfigError(
                f"bad max-payload {self.max_payload}: must be between "
                f"{format_size(MIN_MAX_PAYLOAD)} and {MAX_MAX_PAYLOAD} "
                f"({format_size(MIN_MAX_PAYLOAD)} must always work, nbd.md 1.9)"
            )
        if self.max_in_flight < 1:
            raise ConfigError(f"bad max-in-flight {self.max_in_flight}: must be >= 1")
        if self.max_in_flight_bytes < MIN_IN_FLIGHT_BYTES:
            raise ConfigError(
                f"bad max-in-flight-bytes {self.max_in_flight_bytes}: must be at least "
                f"{format_size(MIN_IN_FLIGHT_BYTES)}"
            )
        if self.global_mem_limit < 0:
            raise ConfigError("global mem-limit must not be negative")
        if not 0 <= self.poll_us <= MAX_POLL_US:
            raise ConfigError(f"bad poll-us {self.poll_us}: must be 0..{MAX_POLL_US} microseconds")
        # TLS: the certificate files are opened by server/tls.py at start
        if self.tls not in TLS_MODES:
            raise ConfigError(f"bad tls mode {self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if self.tls != "off" and not self.tls_certificates:
            raise ConfigError(f"tls {self.tls!r} needs tls-certificates DIR")
        if self.tls_verify_peer and self.tls == "off":
            raise ConfigError("tls-verify-peer needs tls on or require")
        for entry in self.allow:
            parse_network(entry)




def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on :data:`DEFAULT_METRICS_HOST`)."""
    t = text.strip()
    host, port_text = DEFAULT_METRICS_HOST, t
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or t[end + 1 : end + 2] != ":":
            raise ConfigError(f"bad metrics address {text!r}: expected [ADDR]:PORT")
        host, port_text = t[1:end], t[end + 2 :]
    elif ":" in t:
        host, _, port_text = t.rpartition(":")
        host = host or DEFAULT_METRICS_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad metrics address {text!r}: expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad metrics address {text!r}: port out of range")
    return host, port


@dataclass
class FileConfig:
    """What one configuration file says (``configfile.py`` builds it)."""

    path: str
    server: ServerConfig
    #: the control socket; ``""`` = none (as ``--control ''``), None = not in the file
    control: str | None = None
    swap: str | None = None
    metrics: str | None = None
    #: exports disabled by a size of 0 (zram-generator semantics)
    disabled: list[str] = field(default_factory=list)
    #: the top-level keys the file sets (a key left out keeps its default)
    keys: set[str] = field(default_factory=set)


def merge_exports(
    file_exports: list[ExportConfig], flag_exports: list[ExportConfig]
) -> list[ExportConfig]:
    """File exports, with flag exports of the same name replacing them, flags appended."""
    flag_names = {e.name for e in flag_exports}
    return [e for e in file_exports if e.name not in flag_names] + list(flag_exports)


@dataclass
class ServeFlags:
    """The options given to ``zramd serve``; None (or empty) = not given."""

    bind: str | None = None
    port: int | None = None
    unix: str | None = None
    unix_mode: str | None = None
    stdio: bool = False
    exports: Sequence[str] = ()
    max_connections: int | None = None
    handshake_timeout: float | None = None
    max_payload: str | None = None
    poll_us: int | None = None
    tls: str | None = None
    tls_certificates: str | None = None
    tls_verify_peer: bool | None = None
    allow: Sequence[str] = ()
    swap: str | None = None
    control: str | None = None
    metrics: str | None = None
    discard_snapshot: bool = False


@dataclass
class ServeConfig:
    """Everything ``zramd serve`` runs with: the NBD server and the operator settings."""

    server: ServerConfig
    #: exports given as flags: a reload keeps them and they win over the file's
    flag_exports: list[ExportConfig] = field(default_factory=list)
    #: the configuration file (a SIGHUP re-reads it), or None
    file: FileConfig | None = None
    control: str | None = DEFAULT_CONTROL_PATH
    #: False for the default control socket: the daemon runs without it when it is taken
    control_required: bool = False
    swap: str = DEFAULT_SWAP
    metrics: str | None = None


def serve_config(flags: ServeFlags, file: FileConfig | None = None) -> ServeConfig:
    """The configuration of ``zramd serve``: ``flags`` over ``file`` over the defaults.

    Listeners: ``--stdio`` replaces every other listener. Otherwise a Unix socket (``--unix`` or
    the file's ``unix``) makes a Unix-only server unless TCP is asked for: by ``--bind`` or
    ``--port``, or by ``bind`` or ``port`` in the file. With no listener configured at all, TCP
    on 127.0.0.1:10809. ``--bind ''`` (``bind = ""``) turns TCP off. Flag exports replace file
    exports of the same name; with none at all, :func:`default_export`. Raises ConfigError."""
    base = file.server if file is not None else ServerConfig()
    file_keys = file.keys if file is not None else set()
    flag_exports = [parse_export_spec(s) for s in flags.exports]
    cfg = replace(
        base,
        exports=merge_exports(base.exports, flag_exports) or [default_export()],
        allow=list(flags.allow) if flags.allow else list(base.allow),
    )
    _merge_listeners(cfg, flags, tcp_in_file=bool(file_keys & {"bind", "port"}))
    if flags.unix_mode is not None:
        try:
            cfg.unix_mode = int(flags.unix_mode, 8)
        except ValueError:
            raise ConfigError(
                f"bad unix-mode {flags.unix_mode!r}: expected octal, e.g. 0600"
            ) from None
    if flags.max_connections is not None:
        cfg.max_connections = flags.max_connections
    if flags.handshake_timeout is not None:
        cfg.handshake_timeout = flags.handshake_timeout
    if flags.max_payload is not None:
        cfg.max_payload = parse_size(flags.max_payload, what="max-payload")
    if flags.poll_us is not None:
        cfg.poll_us = flags.poll_us
    if flags.tls_certificates is not None:
        cfg.tls_certificates = flags.tls_certificates or None
    if flags.tls is not None:
        cfg.tls = flags.tls
    if flags.tls_verify_peer:  # a flag: absent leaves the file's value
        cfg.tls_verify_peer = True
    cfg.discard_snapshot = flags.discard_snapshot
    cfg.validate()
    out = ServeConfig(server=cfg, flag_exports=flag_exports, file=file)
    out.swap = flags.swap or (file.swap if file is not None and file.swap else DEFAULT_SWAP)
    if flags.control is not None:
        out.control, out.control_required = flags.control or None, True
    elif file is not None and file.control is not None:
        out.control, out.control_required = file.control or None, True
    elif flags.stdio:
        out.control = None
    out.metrics = (flags.metrics if flags.metrics is not None else (
        file.metrics if file is not None else None)) or None
    if out.metrics:
        parse_metrics_address(out.metrics)
    return out


def _merge_listeners(cfg: ServerConfig, flags: ServeFlags, *, tcp_in_file: bool) -> None:
    if flags.stdio:
        if flags.unix or flags.bind or flags.port is not None:
            raise ConfigError("--stdio cannot be combined with --unix, --bind or --port")
        cfg.stdio = True
        cfg.bind = cfg.port = cfg.unix = None
        return
    if flags.unix:
        cfg.unix = flags.unix
    if flags.bind is not None:
        cfg.bind = flags.bind or None
    if flags.port is not None:
        cfg.port = flags.port
        if cfg.bind is None and flags.bind is None:
            cfg.bind = DEFAULT_BIND  # --port over a file without TCP: TCP on the default host
    tcp_asked = tcp_in_file or flags.bind is not None or flags.port is not None
    if cfg.unix and not tcp_asked:
        cfg.bind = None  # a Unix socket and no TCP setting anywhere: Unix only
    if cfg.bind is None:
        cfg.port = None
    elif cfg.port is None:
        cfg.port = DEFAULT_PORT
