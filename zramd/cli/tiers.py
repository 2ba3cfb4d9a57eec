"""The cold-page commands: idle, pages, recompress, writeback.

Theory of operation
-------------------
Each command sends its request to a running daemon through
:class:`~zramd.control.client.ControlClient` and prints the answer, as ``cli/commands.py``
does. ``pages`` and ``recompress`` work over a page range the daemon answers part by part (a
control answer is bounded): the command asks again from the ``next`` page until the range is
done, printing rows as they come (``pages``) or moving a progress bar (``recompress``, only
when stdout is a terminal); a recompression that moved pages ends with a compaction of the
export's pool, so the memory the old objects held (scattered over its zspages) goes back.
``writeback`` moves pages of one type to the export's backing store the same way, part by part
with a progress bar (``--pages LO-HI`` as ``--range``).
``--range LO-HI`` names pages (4 KiB each), both ends included.
Errors are one line on stderr and exit 1 (``cli/options.py``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from zramd.cli.options import control_option, errors_one_line
from zramd.control.client import ControlClient
from zramd.control.protocol import ControlError

#: ``pages``' marks, one letter each, as zram's block_state prints them: same, written back,
#: huge, idle, recompressed, grouped, incompressible (``.`` where not set)
FLAG_LETTERS = (
    ("same", "s"),
    ("backed", "w"),
    ("huge", "h"),
    ("idle", "i"),
    ("recompressed", "r"),
    ("grouped", "g"),
    ("incompressible", "n"),
)
RECOMPRESS_TYPES = ("idle", "huge", "huge-idle")


def parse_range(text: str | None) -> tuple[int, int | None]:
    """``LO-HI`` (pages, both included) or ``N`` -> ``(first, stop)``; None: everything."""
    if text is None:
        return 0, None
    lo, dash, hi = text.partition("-")
    try:
        first = int(lo)
        last = int(hi) if dash else first
    except ValueError:
        raise ControlError(f"bad range {text!r}: expected LO-HI (page numbers)") from None
    if first < 0 or last < first:
        raise ControlError(f"bad range {text!r}: expected 0 <= LO <= HI")
    return first, last + 1


def flag_letters(flags: list[str]) -> str:
    return "".join(letter if name in flags else "." for name, letter in FLAG_LETTERS)


@click.command()
@click.argument("name")
@click.option("--all", "all_", is_flag=True, help="Mark every page that holds data idle.")
@click.option(
    "--age", default=None, metavar="DURATION",
    help="Mark the pages not read or written for this long idle, e.g. 10m (s, m, h, d).",
)
@control_option
@errors_one_line
def idle(name: str, all_: bool, age: str | None, control: str) -> None:
    """Mark pages of export NAME idle (zram's idle): all of them, or by age. A read or write
    clears the mark; recompress --type idle takes the idle pages."""
    if all_ == (age is not None):
        raise ControlError("give either --all or --age DURATION")
    args: dict[str, Any] = {"name": name}
    if all_:
        args["all"] = True
    else:
        args["age"] = age
    with ControlClient(control) as c:
        r = c.call("idle", **args)
    click.echo(f"{r['name']}: {r['marked']} pages marked idle, {r['idle_pages']} idle")


@click.command()
@click.argument("name")
@click.option("--range", "range_", default=None, metavar="LO-HI",
              help="Pages LO to HI (both included); default all.")
@click.option("-J", "--json", "as_json", is_flag=True, help="JSON output.")
@control_option
@errors_one_line
def pages(name: str, range_: str | None, as_json: bool, control: str) -> None:
    """List the pages of export NAME that hold data, like zram's debugfs block_state: index,
    seconds since the last access, marks (s same, w written back, h huge, i idle,
    r recompressed, g grouped, n incompressible), object size and algorithm."""
    first, stop = parse_range(range_)
    out = sys.stdout
    if as_json:
        out.write("[")
    sep = ""
    with ControlClient(control) as c:
        pos = first
        while True:
            args: dict[str, Any] = {"name": name, "first": pos}
            if stop is not None:
                args["stop"] = stop
            r = c.call("pages", **args)
            for p in r["pages"]:
                if as_json:
                    out.write(sep + "\n  " + json.dumps(p))
                    sep = ","
                else:
                    out.write(
                        f"{p['index']:>10} {p['age']:>8} {flag_letters(p['flags'])} "
                        f"{p['size']:>5} {p['algorithm']}\n"
                    )
            pos = r["next"]
            if pos >= r["stop"]:
                break
    if as_json:
        out.write("\n]\n" if sep else "]\n")


@click.command()
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(RECOMPRESS_TYPES), default=None,
              help="Only idle pages, huge pages, or idle huge pages (default: all pages).")
@click.option("--threshold", type=click.IntRange(0, 4096), default=0, metavar="BYTES",
              help="Only objects of at least this many bytes.")
@click.option("--algorithm", default=None, metavar="ALG",
              help="One algorithm, e.g. zstd(level=9), instead of the export's recompression "
              "algorithms.")
@click.option("--max-pages", type=click.IntRange(0), default=None, metavar="N",
              help="Try at most N pages.")
@click.option("--group-pages", type=click.IntRange(1, 16), default=1, metavar="N",
              help="1: page by page; 2..16: pack runs of up to N idle pages into one object.")
@click.option("--range", "range_", default=None, metavar="LO-HI",
              help="Pages LO to HI (both included); default all.")
@control_option
@errors_one_line
def recompress(
    name: str,
    kind: str | None,
    threshold: int,
    algorithm: str | None,
    max_pages: int | None,
    group_pages: int,
    range_: str | None,
    control: str,
) -> None:
    """Recompress pages of export NAME with its recompression algorithms (zram's recompress):
    a page's new object is kept only when it takes a smaller pool size class; pages nothing
    shrinks are marked incompressible and skipped from then on."""
    first, stop = parse_range(range_)
    base: dict[str, Any] = {"name": name, "group_pages": group_pages}
    if kind is not None:
        base["type"] = kind
    if threshold:
        base["threshold"] = threshold
    if algorithm is not None:
        base["algorithm"] = algorithm
    if stop is not None:
        base["stop"] = stop
    total = {"tried": 0, "recompressed": 0, "incompressible": 0, "saved": 0, "groups": 0}
    nospace = False
    with ControlClient(control) as c:
        end = stop if stop is not None else c.call("stat", name=name)["disksize"] // 4096
        show = sys.stdout.isatty()
        with click.progressbar(length=max(end - first, 1), label="recompressing",
                               hidden=not show) as bar:
            pos = first
            while pos < end:
                args = {**base, "first": pos}
                if max_pages is not None:
                    args["max_pages"] = max_pages - total["tried"]
                r = c.call("recompress", **args)
                for k in total:
                    total[k] += r.get(k, 0)
                bar.update(r["next"] - pos)
                pos = r["next"]
                nospace = r["nospace"]
                if nospace or r["aborted"] or (
                    max_pages is not None and total["tried"] >= max_pages
                ):
                    break
        if total["recompressed"] and group_pages == 1:
            # the old objects were freed all over the pool: give their pages back
            c.call("compact", name=name)
    what = "grouped" if group_pages > 1 else "recompressed"
    line = (
        f"{name}: {total['tried']} pages tried, {total['recompressed']} {what}, "
        f"{total['incompressible']} incompressible, {total['saved']} bytes saved"
    )
    if group_pages > 1:
        line += f", {total['groups']} groups"
    click.echo(line)
    if nospace:
        raise ControlError(f"{name}: stopped early: the memory limit left no room for a new copy")


WRITEBACK_TYPES = ("idle", "huge", "huge-idle", "incompressible")


@click.command()
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(WRITEBACK_TYPES), required=True,
              help="Idle pages, huge pages, idle huge pages, or pages marked incompressible.")
@click.option("--pages", "range_", default=None, metavar="LO-HI",
              help="Pages LO to HI (both included); default all.")
@click.option("--max-pages", type=click.IntRange(0), default=None, metavar="N",
              help="Write back at most N pages.")
@control_option
@errors_one_line
def writeback(
    name: str, kind: str, range_: str | None, max_pages: int | None, control: str
) -> None:
    """Write pages of export NAME to its backing store (zram's writeback): their compressed
    objects go as they are; a read brings a page back. Stops early when the store is full, the
    writeback limit is spent (zramd set --writeback-limit) or the store fails."""
    first, stop = parse_range(range_)
    base: dict[str, Any] = {"name": name, "type": kind}
    if stop is not None:
        base["stop"] = stop
    total = {"tried": 0, "written": 0, "bytes": 0}
    error = ""
    with ControlClient(control) as c:
        end = stop if stop is not None else c.call("stat", name=name)["disksize"] // 4096
        with click.progressbar(length=max(end - first, 1), label="writing back",
                               hidden=not sys.stdout.isatty()) as bar:
            pos = first
            while pos < end:
                args = {**base, "first": pos}
                if max_pages is not None:
                    args["max_pages"] = max_pages - total["tried"]
                r = c.call("writeback", **args)
                for k in total:
                    total[k] += r[k]
                bar.update(r["next"] - pos)
                pos = r["next"]
                error = r["error"]
                if error or (max_pages is not None and total["tried"] >= max_pages):
                    break
    click.echo(
        f"{name}: {total['tried']} pages tried, {total['written']} written back, "
        f"{total['bytes']} bytes"
    )
    if error:
        why = {
            "full": "the backing store is full",
            "budget": "the writeback limit is spent",
        }.get(error, "the backing store failed (see the server's log)")
        raise ControlError(f"{name}: stopped early: {why}")


COMMANDS = (idle, pages, recompress, writeback)
