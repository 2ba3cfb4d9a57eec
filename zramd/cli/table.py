"""The ``list`` table: zramctl's columns, human sizes, alignment, and the JSON rows.

Theory of operation
-------------------
The daemon sends plain numbers (bytes, counts); this module turns rows into zramctl-style text:
:data:`COLUMNS` maps a column name to its row key and kind, sizes are shown with
:func:`zramd.config.format_size` (or in bytes with ``--bytes``), text columns are left-aligned and
numbers right-aligned. ``--json`` gives the same columns with the daemon's numbers untouched,
and each export's block-layer ``stat`` (requests, sectors, ticks: ``/sys/block/zramN/stat``).
MEM-LIMIT is the limit in force, LIMIT-BY what sets it (``export``, or ``budget`` when the
server-wide budget leaves the export less than its own limit). IDLE, RECOMPRESSED,
INCOMPRESSIBLE and GROUPED count pages, RECOMP-SAVED the pool bytes recompression released,
GROUPS the multi-page groups and GROUP-SAVED the compressed bytes packing them saved; ``--json``
carries these tier counters (:data:`zramd.stats.TIER_FIELDS`) and the writeback counters
(:data:`zramd.stats.BACKING_FIELDS`: bd_count, bd_reads, bd_writes and more) with the pressure
writeback's watermarks and wait (:data:`WRITEBACK_SETTINGS`) for every export.
``--raw`` is util-linux's raw format: cells separated by one space, no alignment, and blanks,
backslashes and control characters in a cell written as ``\\xHH`` (an empty cell stays
empty).
Knows nothing of sockets or the daemon.
"""

from __future__ import annotations

from typing import Any

from zramd.config import ConfigError, format_size
from zramd.stats import BACKING_FIELDS, TIER_FIELDS

#: the pressure writeback's settings in a row (None without a backing store)
WRITEBACK_SETTINGS = ("writeback_high", "writeback_low", "writeback_wait")

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
    "STREAMS": ("streams", "int"),
    "MIGRATED": ("migrated", "int"),
    "MOUNTPOINT": ("mountpoint", "str"),
    "NBD": ("nbd", "str"),
    "RO": ("read_only", "bool"),
    "DESCRIPTION": ("description", "str"),
    "LIMIT-BY": ("limited_by", "str"),
    "IDLE": ("idle_pages", "int"),
    "RECOMPRESSED": ("recompressed_pages", "int"),
    "INCOMPRESSIBLE": ("incompressible_pages", "int"),
    "RECOMP-SAVED": ("recompress_saved_bytes", "size"),
    "GROUPED": ("grouped_pages", "int"),
    "GROUPS": ("groups", "int"),
    "GROUP-SAVED": ("group_saved_bytes", "size"),
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


def raw_cell(cell: str) -> str:
    """A cell of ``--raw`` output: blanks, backslashes and control characters as ``\\xHH``."""
    return "".join(
        f"\\x{ord(ch):02x}" if ch.isspace() or ch == "\\" or not ch.isprintable() else ch
        for ch in cell
    )


def format_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    *,
    raw_bytes: bool,
    headings: bool,
    raw: bool = False,
) -> str:
    table = [[format_cell(r, c, raw_bytes) for c in columns] for r in rows]
    if raw:
        lines = ([columns] if headings else []) + table
        return "\n".join(" ".join(raw_cell(cell) for cell in line) for line in lines)
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
    """The columns' keys of each row, its block-layer ``stat`` (the request counters), its
    tier counters, its writeback counters and settings and its snapshot's status (``persist``,
    None without a persist file)."""
    keys = [COLUMNS[c][0] for c in columns]
    return {
        "exports": [
            {
                **{k: r.get(k) for k in keys},
                "stat": r.get("stat"),
                "tiers": {f: r.get(f) for f in TIER_FIELDS},
                "backing": {f: r.get(f) for f in (*BACKING_FIELDS, *WRITEBACK_SETTINGS)},
                "persist": r.get("persist"),
            }
            for r in rows
        ]
    }
