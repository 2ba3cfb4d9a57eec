"""The control-socket commands: create, destroy, snapshot, list, stat, reset, compact, set,
reload.

Theory of operation
-------------------
Each command parses its arguments (sizes as everywhere, by ``zramd.config``: a bare number is
MiB, or a unit, or an expression in ``ram``; rounded down to whole pages), sends one
request through :class:`~zramd.control.client.ControlClient` to a running daemon and prints the
answer; ``list`` formats it with ``cli/table.py``, adding what zramctl shows that only
this machine knows: the NBD device an export is attached to (``zramd attach``'s records, see
``control/attach.py``) and its MOUNTPOINT (``[SWAP]`` or the mount directory), MIGRATED (pages
compacted, from ``stat``) and STREAMS (the daemon's codec worker threads). Errors are one line
on stderr and exit 1 (``cli/options.py``). No protocol, device or server logic here, and no
state between commands.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from zramd.cli.options import control_option, errors_one_line
from zramd.cli.table import COLUMNS, format_table, json_rows, parse_columns
from zramd.config import DEFAULT_ALGORITHM, SIZE_SYNTAX, format_size, parse_size, round_pages
from zramd.control.attach import attached_devices, mountpoint_of, read_text, state_dir
from zramd.control.client import ControlClient
from zramd.control.protocol import ControlError


def _size(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    return round_pages(parse_size(text, what=what))


@click.command()
@click.argument("name")
@click.option(
    "-s", "--size", required=True, metavar="SIZE", help=f"Disk size: {SIZE_SYNTAX}, e.g. 4G."
)
@click.option(
    "-a", "--algorithm", default=None, help=f"Compression algorithm [{DEFAULT_ALGORITHM}]."
)
@click.option("--level", type=int, default=None, help="Compression level (zstd, lz4hc...).")
@click.option(
    "--mem-limit", default=None, metavar="SIZE", help="Memory cap, e.g. 1G (0 = none; a bare "
    "number is MiB)."
)
@click.option("--read-only", is_flag=True, help="Export read-only.")
@click.option("--description", default=None, help="Text shown to NBD clients.")
@click.option("--backing", default=None, metavar="PATH", help="Backing file or block device.")
@click.option(
    "--persist", default=None, metavar="PATH", help="Snapshot file: restored now if it exists."
)
@click.option(
    "--sync",
    type=click.Choice(["stop", "flush"]),
    default=None,
    help="With --persist: flush keeps a journal synced by every FLUSH [stop].",
)
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
    backing: str | None,
    persist: str | None,
    sync: str | None,
    control: str,
) -> None:
    """Create export NAME on the running daemon (with --persist, restored from its snapshot
    and journal before it is served)."""
    args: dict[str, Any] = {"name": name, "size": _size(size, "size")}
    for key, path in (("backing", backing), ("persist", persist)):
        if path is not None:
            args[key] = os.path.abspath(path)
    if sync is not None:
        args["sync"] = sync
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


@click.command()
@click.argument("name")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@control_option
@errors_one_line
def snapshot(name: str, path: str | None, control: str) -> None:
    """Write a point-in-time snapshot of export NAME to PATH (default: its persist file) while
    its clients go on; the file is replaced atomically."""
    args: dict[str, Any] = {"name": name}
    if path is not None:
        args["path"] = os.path.abspath(path)
    with ControlClient(control) as c:
        r = c.call("snapshot", **args)
    click.echo(
        f"{name}: snapshot {r['path']}: {r['pages']} pages, {format_size(r['file_bytes'])} in "
        f"{r['seconds']:.2f}s (longest pause {r['longest_pause_ms']:.1f} ms)"
    )


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
@click.option("--raw", is_flag=True, help="Raw output: one space between cells, no alignment.")
@control_option
@errors_one_line
def list_(
    names: tuple[str, ...],
    as_json: bool,
    raw_bytes: bool,
    columns: str | None,
    output_all: bool,
    noheadings: bool,
    raw: bool,
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
        if "MIGRATED" in cols:
            for r in rows:
                r["migrated"] = c.call("stat", name=r["name"])["mm_stat"]["pages_compacted"]
    add_local_columns(rows, control)
    if as_json:
        click.echo(json.dumps(json_rows(rows, cols), indent=2))
        return
    if rows or not noheadings:
        click.echo(
            format_table(rows, cols, raw_bytes=raw_bytes, headings=not noheadings, raw=raw)
        )


def add_local_columns(rows: list[dict[str, Any]], control: str) -> None:
    """STREAMS, NBD and MOUNTPOINT of each row: what this machine knows of the export."""
    from zramd.server.listener import CODEC_WORKERS

    devices = attached_devices(state_dir(control))
    swaps, mounts = read_text("/proc/swaps"), read_text("/proc/mounts")
    for r in rows:
        r["streams"] = CODEC_WORKERS
        device = devices.get(r["name"], "")
        r["nbd"] = device
        r["mountpoint"] = mountpoint_of(device, swaps, mounts) if device else ""


@click.command()
@click.argument("name")
@click.option("-J", "--json", "as_json", is_flag=True, help="JSON output.")
@control_option
@errors_one_line
def stat(name: str, as_json: bool, control: str) -> None:
    """Show mm_stat, io_stat and stat of export NAME (zram's sysfs fields), its requests per
    NBD command, the memory limit in force, and its cold-page tiers (idle, recompressed,
    incompressible pages, bytes recompression saved, the background policy), its writeback
    counters, and its snapshot (age, size, the last save's seconds and error)."""
    with ControlClient(control) as c:
        st: dict[str, Any] = c.call("stat", name=name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(
        f"{st['name']}: disksize {st['disksize']}, algorithm {st['algorithm']}, "
        f"clients {st['clients']}"
    )
    for section in ("mm_stat", "io_stat", "stat"):
        fields: dict[str, int] = st[section]
        click.echo(f"{section}: " + " ".join(str(v) for v in fields.values()))
        width = max(len(k) for k in fields)
        for k, v in fields.items():
            click.echo(f"  {k.ljust(width)}  {v}")
    click.echo("requests:")
    for command, r in st["requests"].items():
        click.echo(
            f"  {command.ljust(12)}  {r['requests']} requests, {r['bytes']} bytes, "
            f"{r['time_us']} us"
        )
    m = st["memory"]
    by = {"budget": "the server's budget", "export": "its own"}.get(m["limited_by"], "none")
    click.echo(
        f"memory: limit in force {m['effective_mem_limit']} ({by}), own mem-limit "
        f"{m['mem_limit']}, server budget {m['budget_limit']} ({m['budget_used']} used)"
    )
    click.echo(
        "  ENOSPC by cause: " + ", ".join(f"{k} {v}" for k, v in m["enospc"].items())
    )
    tiers: dict[str, Any] = st["tiers"]
    algos = " ".join(tiers["recompression_algorithms"]) or "none"
    click.echo(f"tiers: recompression algorithms {algos}")
    counters = {k: v for k, v in tiers.items() if isinstance(v, int)}
    width = max(len(k) for k in counters)
    for k, v in counters.items():
        click.echo(f"  {k.ljust(width)}  {v}")
    policy = tiers["policy"]
    if policy is not None:
        click.echo(
            f"  policy: pages idle after {policy['recompress_after']:g}s are recompressed "
            f"({policy['recompress_type']}) every {policy['recompress_interval']:g}s; "
            f"{policy['passes']} passes, {policy['marked_idle']} marked idle, "
            f"{policy['recompressed']} recompressed, longest slice "
            f"{policy['max_slice_us']:g} us"
        )
    backing: dict[str, Any] = st["backing"]
    store: dict[str, Any] = backing["store"]
    if store:
        left = backing["writeback_limit"]
        click.echo(
            f"backing: {store['path']}, writeback-limit "
            f"{'none' if left < 0 else format_size(left) + ' left'}"
        )
        click.echo(
            f"  pressure writeback from {backing['writeback_high'] * 100:g}% down to "
            f"{backing['writeback_low'] * 100:g}% of the limit in force; a write waits up to "
            f"{backing['writeback_wait']:g}s for room"
        )
        click.echo(
            f"bd_stat: {backing['bd_count']} {backing['bd_reads']} {backing['bd_writes']}"
        )
        counters = {k: v for k, v in backing.items() if isinstance(v, int)}
        counters.update({f"store_{k}": v for k, v in store.items() if isinstance(v, int)})
        width = max(len(k) for k in counters)
        for k, v in counters.items():
            click.echo(f"  {k.ljust(width)}  {v}")
    persist: dict[str, Any] | None = st.get("persist")
    if persist is not None:
        age = persist["age_seconds"]
        taken = (
            f"taken {age:.0f}s ago, {format_size(persist['file_bytes'])}"
            if age >= 0
            else "none yet"
        )
        click.echo(f"snapshot: {persist['path']}, {taken}")
        click.echo(
            f"  last save {persist['last_save_seconds']:g}s, {persist['saves']} saves, "
            f"{persist['failures']} failed"
            + (f"; last error: {persist['last_error']}" if persist["last_error"] else "")
        )
    journal: dict[str, Any] | None = st.get("journal")
    if journal is not None:
        click.echo(
            f"journal (sync=flush): generation {journal['generation']}, "
            f"{format_size(journal['bytes'])} in {journal['generations']} file(s), checkpoint "
            f"at {format_size(journal['checkpoint_bytes'])}, {journal['checkpoints']} "
            f"checkpoints (last {journal['last_checkpoint_seconds']:g}s"
            + (
                f"; one running for {journal['checkpoint_running_seconds']:g}s)"
                if journal["checkpoint_running_seconds"]
                else ")"
            )
        )
        click.echo(
            f"  {journal['records']} records in {journal['frames']} frames, {journal['syncs']} "
            f"syncs (avg {journal['sync_avg_ms']:g} ms) in {journal['datasyncs']} fdatasyncs, "
            "backlog "
            f"{format_size(journal['backlog_bytes'])}"
            + (f"; FAILED: {journal['error']}" if journal["error"] else "")
        )


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
@click.option(
    "--mem-limit", default=None, metavar="SIZE", help="New memory cap (0 = none; a bare number "
    "is MiB)."
)
@click.option("-a", "--algorithm", default=None, help="Algorithm for pages written from now.")
@click.option("--level", type=int, default=None, help="Compression level.")
@click.option(
    "--writeback-limit", default=None, metavar="SIZE|none", help="Bytes the backing store may "
    "still be written from now (zram's writeback_limit; set again to reset; none: no limit)."
)
@click.option(
    "--writeback-high", default=None, metavar="F", help="Pressure writeback starts past this "
    "fraction of the memory limit (0.9 or 90%)."
)
@click.option(
    "--writeback-low", default=None, metavar="F", help="Pressure writeback stops at this "
    "fraction (below --writeback-high)."
)
@click.option(
    "--writeback-wait", default=None, metavar="DURATION", help="Longest a write waits for room "
    "(e.g. 2s; 0: ENOSPC at once)."
)
@control_option
@errors_one_line
def set_(
    name: str,
    mem_limit: str | None,
    algorithm: str | None,
    level: int | None,
    writeback_limit: str | None,
    writeback_high: str | None,
    writeback_low: str | None,
    writeback_wait: str | None,
    control: str,
) -> None:
    """Change the memory limit, the algorithm for new pages, the writeback limit or the
    pressure writeback settings of export NAME (the latter until a reload or restart applies
    the configuration's)."""
    args: dict[str, Any] = {"name": name}
    for key, value in (
        ("writeback_high", writeback_high),
        ("writeback_low", writeback_low),
        ("writeback_wait", writeback_wait),
    ):
        if value is not None:
            args[key] = value
    if writeback_limit is not None:
        args["writeback_limit"] = (
            "none" if writeback_limit.lower() == "none"
            else parse_size(writeback_limit, what="writeback-limit")
        )
    if mem_limit is not None:
        args["mem_limit"] = _size(mem_limit, "mem-limit")
    if algorithm is not None:
        args["algorithm"] = algorithm
    if level is not None:
        args["level"] = level
    if len(args) == 1:
        raise ControlError(
            "nothing to set: give --mem-limit, --algorithm, --level, --writeback-limit, "
            "--writeback-high, --writeback-low or --writeback-wait"
        )
    with ControlClient(control) as c:
        row = c.call("set", **args)
    budget = " (the server's budget binds)" if row["limited_by"] == "budget" else ""
    click.echo(
        f"{row['name']}: algorithm {row['algorithm']}, "
        f"mem-limit {format_size(row['mem_limit'])}{budget}"
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


COMMANDS = (create, destroy, snapshot, list_, stat, reset, compact, set_, reload)
