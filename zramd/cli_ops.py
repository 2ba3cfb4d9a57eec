"""Operator commands of the ``zramd`` CLI: create, destroy, list, stat, reset, compact, set,
reload, attach, detach; and the operator options of ``serve`` (--config, --swap, --control).

Theory of operation
-------------------
:func:`register` adds these commands to the click group of ``cli.py``. Each command
parses its arguments (sizes with K/M/G/T suffixes), sends one request through
:class:`~zramd.control.client.ControlClient` and prints the answer; ``attach`` and
``detach`` build their command plans with ``control.attach`` and run them. Every error
is one line on stderr (``zramd: error: ...``) and exit status 1 (2 for a bad command
line). Formatting of the ``list`` table (zramctl's columns and human sizes) lives here;
the daemon sends plain numbers. No protocol, device or server logic here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from zramd.config import (
    CONTROL_ENV,
    DEFAULT_BIND,
    DEFAULT_CONTROL_PATH,
    DEFAULT_PORT,
    ConfigError,
    ServeConfig,
    format_size,
    parse_size,
)
from zramd.control.attach import (
    MKFS_TYPES,
    AttachError,
    attach_plan,
    detach_plan,
    find_free_nbd,
    read_text,
    run_plan,
)
from zramd.control.client import ControlClient
from zramd.control.daemon import OperatorHooks
from zramd.control.protocol import ControlError

log = logging.getLogger("zramd")

#: Exit status of a failed operation (click uses 2 for usage errors).
EXIT_FAILURE = 1

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"zramd: error: {message}", err=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n"))


def errors_one_line(fn: F) -> F:
    """Turn the operator errors into one line and a non-zero exit."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ControlError, ConfigError, AttachError) as e:
            fail(_one_line(e))

    return wrapper  # type: ignore[return-value]


def control_option(fn: F) -> F:
    return click.option(
        "--control",
        "control",
        metavar="PATH",
        envvar=CONTROL_ENV,
        default=DEFAULT_CONTROL_PATH,
        show_default=True,
        help=f"The daemon's control socket (env {CONTROL_ENV}).",
    )(fn)


def _size(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    return parse_size(text, what=what)


# --- list formatting --------------------------------------------------------------------------

#: column name -> (row key, kind) ; kind: "str", "size", "int", "ratio"
COLUMNS: dict[str, tuple[str, str]] = {
    "NAME": ("name", "str"),
    "DISKSIZE": ("disksize", "size"),
    "DATA": ("data", "size"),
    "COMPR": ("compr", "size"),
    "ALGORITHM": ("algorithm", "str"),
    "ZERO-PAGES": ("zero_pages", "int"),
    "TOTAL": ("total", "size"),
    "MEM-LIMIT": ("mem_limit", "size"),
    "MEM-USED": ("mem_used", "size"),
    "COMP-RATIO": ("comp_ratio", "ratio"),
    "CLIENTS": ("clients", "int"),
    "RO": ("read_only", "bool"),
    "DESCRIPTION": ("description", "str"),
}
DEFAULT_COLUMNS = list(COLUMNS)[:11]


def parse_columns(spec: str | None) -> list[str]:
    if not spec:
        return list(DEFAULT_COLUMNS)
    spec = spec.strip()
    extend = spec.startswith("+")
    names = [c.strip().upper() for c in spec.lstrip("+").split(",") if c.strip()]
    for c in names:
        if c not in COLUMNS:
            raise ConfigError(f"unknown column {c!r} (available: {', '.join(COLUMNS)})")
    return [*DEFAULT_COLUMNS, *names] if extend else names


def format_cell(row: dict[str, Any], column: str, raw_bytes: bool) -> str:
    key, kind = COLUMNS[column]
    v = row.get(key)
    if kind == "size":
        return str(int(v or 0)) if raw_bytes else format_size(int(v or 0))
    if kind == "ratio":
        return f"{float(v or 0):.2f}"
    if kind == "bool":
        return "1" if v else "0"
    return str(v if v is not None else "")


def format_table(
    rows: list[dict[str, Any]], columns: list[str], *, raw_bytes: bool, headings: bool
) -> str:
    table = [[format_cell(r, c, raw_bytes) for c in columns] for r in rows]
    widths = [len(c) if headings else 0 for c in columns]
    for line in table:
        widths = [max(w, len(cell)) for w, cell in zip(widths, line, strict=True)]
    left = {c for c in columns if COLUMNS[c][1] == "str"}
    out = []
    lines = ([columns] if headings else []) + table
    for line in lines:
        cells = []
        for c, w, cell in zip(columns, widths, line, strict=True):
            cells.append(cell.ljust(w) if c in left else cell.rjust(w))
        out.append(" ".join(cells).rstrip())
    return "\n".join(out)


def json_rows(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    keys = [COLUMNS[c][0] for c in columns]
    return {"exports": [{k: r.get(k) for k in keys} for r in rows]}


# --- commands ---------------------------------------------------------------------------------


@click.command()
@click.argument("name")
@click.option("-s", "--size", required=True, metavar="SIZE", help="Disk size, e.g. 4G.")
@click.option("-a", "--algorithm", default=None, help="Compression algorithm [lz4].")
@click.option("--level", type=int, default=None, help="Compression level (zstd, lz4hc...).")
@click.option("--mem-limit", default=None, metavar="SIZE", help="Memory cap, e.g. 1G (0 = none).")
@click.option("--read-only", is_flag=True, help="Export read-only.")
@click.option("--description", default=None, help="Text shown to NBD clients.")
@control_option
@errors_one_line
def create(
    name: str,
    size: str,
    algorithm: str | None,
    level: int | None,
    mem_limit: str | None,
    read_only: bool,
    description: str | None,
    control: str,
) -> None:
    """Create export NAME on the running daemon."""
    args: dict[str, Any] = {"name": name, "size": _size(size, "size")}
    if algorithm is not None:
        args["algorithm"] = algorithm
    if level is not None:
        args["level"] = level
    if mem_limit is not None:
        args["mem_limit"] = _size(mem_limit, "mem-limit")
    if read_only:
        args["read_only"] = True
    if description is not None:
        args["description"] = description
    with ControlClient(control) as c:
        row = c.call("create", **args)
    click.echo(f"created {row['name']}: {format_size(row['disksize'])} {row['algorithm']}")


@click.command()
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="Disconnect connected clients first.")
@control_option
@errors_one_line
def destroy(name: str, force: bool, control: str) -> None:
    """Destroy export NAME (refused while clients are connected unless --force)."""
    with ControlClient(control) as c:
        c.call("destroy", name=name, force=force)
    click.echo(f"destroyed {name}")


@click.command(name="list")
@click.argument("names", nargs=-1)
@click.option("-J", "--json", "as_json", is_flag=True, help="JSON output.")
@click.option("-b", "--bytes", "raw_bytes", is_flag=True, help="Sizes in bytes.")
@click.option(
    "-o",
    "--output",
    "columns",
    metavar="COLUMNS",
    default=None,
    help=f"Columns, comma-separated ('+' to add to the defaults): {', '.join(COLUMNS)}.",
)
@click.option("--output-all", is_flag=True, help="All columns.")
@click.option("-n", "--noheadings", is_flag=True, help="No header line.")
@control_option
@errors_one_line
def list_(
    names: tuple[str, ...],
    as_json: bool,
    raw_bytes: bool,
    columns: str | None,
    output_all: bool,
    noheadings: bool,
    control: str,
) -> None:
    """List exports, zramctl-style."""
    cols = list(COLUMNS) if output_all else parse_columns(columns)
    with ControlClient(control) as c:
        rows: list[dict[str, Any]] = c.call("list")
    if names:
        known = {r["name"] for r in rows}
        missing = [n for n in names if n not in known]
        if missing:
            raise ControlError(f"no export named {missing[0]!r}")
        rows = [r for r in rows if r["name"] in names]
    if as_json:
        click.echo(json.dumps(json_rows(rows, cols), indent=2))
        return
    if rows or not noheadings:
        click.echo(format_table(rows, cols, raw_bytes=raw_bytes, headings=not noheadings))


@click.command()
@click.argument("name")
@click.option("-J", "--json", "as_json", is_flag=True, help="JSON output.")
@control_option
@errors_one_line
def stat(name: str, as_json: bool, control: str) -> None:
    """Show mm_stat and io_stat of export NAME (zram's sysfs fields)."""
    with ControlClient(control) as c:
        st: dict[str, Any] = c.call("stat", name=name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(
        f"{st['name']}: disksize {st['disksize']}, algorithm {st['algorithm']}, "
        f"clients {st['clients']}"
    )
    for section in ("mm_stat", "io_stat"):
        fields: dict[str, int] = st[section]
        click.echo(f"{section}: " + " ".join(str(v) for v in fields.values()))
        width = max(len(k) for k in fields)
        for k, v in fields.items():
            click.echo(f"  {k.ljust(width)}  {v}")


@click.command()
@click.argument("name")
@control_option
@errors_one_line
def reset(name: str, control: str) -> None:
    """Free all data of export NAME (it reads as zeros again)."""
    with ControlClient(control) as c:
        c.call("reset", name=name)
    click.echo(f"reset {name}")


@click.command()
@click.argument("name", required=False)
@control_option
@errors_one_line
def compact(name: str | None, control: str) -> None:
    """Compact the memory pool of export NAME (all exports without NAME)."""
    with ControlClient(control) as c:
        if name:
            targets = [name]
        else:
            targets = [r["name"] for r in c.call("list")]
        results: list[dict[str, Any]] = []
        show = len(targets) > 1 and sys.stderr.isatty()
        with click.progressbar(
            targets, label="compacting", file=sys.stderr, hidden=not show
        ) as bar:
            for t in bar:
                results.extend(c.call("compact", name=t))
    for r in results:
        click.echo(f"{r['name']}: {r['pages_compacted']} pages compacted")


@click.command(name="set")
@click.argument("name")
@click.option("--mem-limit", default=None, metavar="SIZE", help="New memory cap (0 = none).")
@click.option("-a", "--algorithm", default=None, help="Algorithm for pages written from now.")
@click.option("--level", type=int, default=None, help="Compression level.")
@control_option
@errors_one_line
def set_(
    name: str, mem_limit: str | None, algorithm: str | None, level: int | None, control: str
) -> None:
    """Change the memory limit or the algorithm for new pages of export NAME."""
    args: dict[str, Any] = {"name": name}
    if mem_limit is not None:
        args["mem_limit"] = _size(mem_limit, "mem-limit")
    if algorithm is not None:
        args["algorithm"] = algorithm
    if level is not None:
        args["level"] = level
    if len(args) == 1:
        raise ControlError("nothing to set: give --mem-limit, --algorithm or --level")
    with ControlClient(control) as c:
        row = c.call("set", **args)
    click.echo(
        f"{row['name']}: algorithm {row['algorithm']}, mem-limit {format_size(row['mem_limit'])}"
    )


@click.command()
@control_option
@errors_one_line
def reload(control: str) -> None:
    """Re-read the daemon's configuration file (like SIGHUP)."""
    with ControlClient(control) as c:
        lines: list[str] = c.call("reload")
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("name")
@click.argument("device", required=False)
@click.option("--host", default=DEFAULT_BIND, show_default=True, help="zramd TCP address.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="zramd TCP port.")
@click.option("--unix", default=None, metavar="PATH", help="zramd NBD Unix socket instead.")
@click.option("-C", "--connections", type=int, default=1, show_default=True)
@click.option(
    "-t", "--timeout", type=int, default=0, help="Per-request timeout in seconds [0 = none]."
)
@click.option("--swap", is_flag=True, help="mkswap + swapon --discard.")
@click.option("--priority", type=int, default=None, help="Swap priority [100].")
@click.option("--mkfs", type=click.Choice(MKFS_TYPES), default=None, help="Make a filesystem.")
@click.option("--mount", default=None, metavar="DIR", help="Mount it on DIR (-o discard).")
@click.option("--read-only", is_flag=True, help="Attach read-only.")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@control_option
@errors_one_line
def attach(
    name: str,
    device: str | None,
    host: str,
    port: int,
    unix: str | None,
    connections: int,
    timeout: int,
    swap: bool,
    priority: int | None,
    mkfs: str | None,
    mount: str | None,
    read_only: bool,
    dry_run: bool,
    control: str,
) -> None:
    """Attach export NAME to a kernel NBD device (default: the first free /dev/nbdN)."""
    check_export_for_attach(control, name, writable=swap or bool(mkfs) or not read_only)
    if device is None:
        device = "/dev/nbd0" if dry_run else find_free_nbd()
    plan = attach_plan(
        name, device, host=host, port=port, unix=unix, connections=connections,
        timeout=timeout, swap=swap, priority=priority, mkfs=mkfs, mount=mount,
        read_only=read_only,
    )
    if dry_run:
        for argv in plan.commands():
            click.echo(" ".join(argv))
        return
    if not os.path.exists(device):
        raise AttachError(f"{device} does not exist: load the kernel module with `modprobe nbd`")
    run_plan(plan)
    what = "swap" if swap else (f"mounted on {mount}" if mount else "block device")
    click.echo(f"{name} attached to {device} ({what})")


def check_export_for_attach(control: str, name: str, *, writable: bool) -> None:
    """If the daemon's control socket answers, make sure the export exists (and is writable
    when it will be written). An unreachable daemon is not an error here: the NBD server
    may be another zramd, or reachable only over the network; nbd-client will tell."""
    if not os.path.exists(control):
        return
    try:
        with ControlClient(control, timeout=10) as c:
            rows: list[dict[str, Any]] = c.call("list")
    except ControlError as e:
        if str(e).startswith("cannot reach"):
            return
        raise
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        known = ", ".join(r["name"] for r in rows) or "none"
        raise ControlError(f"no export named {name!r} (exports: {known})")
    if writable and row.get("read_only"):
        raise AttachError(f"export {name!r} is read-only: use --read-only (not swap or mkfs)")


@click.command()
@click.argument("device")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@errors_one_line
def detach(device: str, dry_run: bool) -> None:
    """swapoff / umount DEVICE, then disconnect it (nbd-client -d)."""
    plan = detach_plan(device, read_text("/proc/swaps"), read_text("/proc/mounts"))
    if dry_run:
        for argv in plan.commands():
            click.echo(" ".join(argv))
        return
    run_plan(plan, rollback=False)
    click.echo(f"{device} detached")


OPERATOR_COMMANDS = (create, destroy, list_, stat, reset, compact, set_, reload, attach, detach)


def register(group: click.Group) -> None:
    """Add the operator commands to ``group`` (the ``zramd`` click group)."""
    for cmd in OPERATOR_COMMANDS:
        group.add_command(cmd)


# --- serve: configuration file, swap safety, control socket -----------------------------------


def apply_swap_safety(mode: str) -> None:
    """``--swap``: mlockall, PR_SET_IO_FLUSHER, oom_score_adj. Raises ConfigError (require)."""
    from zramd.system import SwapSafetyError
    from zramd.system import apply_swap_safety as apply

    try:
        apply(mode)
    except SwapSafetyError as e:
        raise ConfigError(str(e)) from None


def operator_hooks(cfg: ServeConfig) -> OperatorHooks:
    """The control socket, SIGHUP reload and metrics the daemon runs next to its listeners."""
    return OperatorHooks(
        control_path=cfg.control,
        control_required=cfg.control_required,
        config_path=cfg.config_path,
        flag_exports=cfg.flag_exports,
        metrics=cfg.metrics,
    )


def serve_operator_options(fn: F) -> F:
    """The operator options of ``serve``: --config, --swap[=on|require|off], --control,
    --metrics."""
    fn = click.option(
        "--metrics",
        "metrics",
        metavar="ADDR:PORT",
        default=None,
        help="Serve Prometheus metrics over HTTP, e.g. 127.0.0.1:9109 ('' disables).",
    )(fn)
    fn = click.option(
        "--control",
        "control",
        metavar="PATH",
        envvar=CONTROL_ENV,
        default=None,
        help=f"Control socket [{DEFAULT_CONTROL_PATH}]; '' disables it.",
    )(fn)
    fn = click.option(
        "--swap",
        "swap",
        type=click.Choice(["off", "on", "require"]),
        is_flag=False,
        flag_value="on",
        default=None,
        help="Swap safety: mlockall, PR_SET_IO_FLUSHER, oom_score_adj -1000 "
        "(--swap=require: refuse to start without them).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        metavar="FILE",
        default=None,
        help="TOML configuration file [/etc/zramd/zramd.toml when present]; SIGHUP reloads it.",
    )(fn)
    return fn
