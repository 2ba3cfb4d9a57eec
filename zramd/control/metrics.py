"""Prometheus metrics: ``serve --metrics 127.0.0.1:9109`` serves the exports' stats as text.

Theory of operation
-------------------
:func:`render` turns the registry's exports into the Prometheus text exposition format
(version 0.0.4): one family per mm_stat / io_stat field of zram, with zram's meaning,
plus disk size and connected clients, each sample labelled ``export="NAME"``; the cold-page
tiers (idle, recompressed and incompressible pages, bytes recompression saved); writeback
(pages in the backing store, pages and bytes read and written, their time, promotions,
failures, writes that waited for room); the snapshot of an export with a persist file (its
age and bytes, the last save's seconds, saves and failures: no sample for an export without
one) and the journal of one in durable mode (its bytes, records, syncs and their time,
checkpoints, whether it failed); the memory
limit in force and the writes refused with ENOSPC by cause (``cause="limit|budget|system"``);
the server-wide memory budget, its use and its refusals; and the block layer's request
counters: bytes, time, in flight, busy time, and a latency histogram per NBD command
(``command="read|write|..."``; its ``_count`` is the number of requests). Gauges are current
values; counters (``*_total``) only grow while the export exists (mm_stat's are restarted by
a reset of the export).

:class:`MetricsServer` is a deliberately tiny HTTP/1.0 responder on asyncio: it reads
one request head (bounded by :data:`MAX_REQUEST_HEAD` bytes and
:data:`REQUEST_TIMEOUT` seconds), answers ``GET /metrics`` (200) or anything else
(404/405), and closes. At most :data:`MAX_METRICS_CONNECTIONS` at once. It reads the
registry on the event-loop thread, so every scrape sees a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from zramd.config import parse_metrics_address
from zramd.control.server import export_stat
from zramd.stats import HIST_SHOWN, IO_COMMANDS, IoStats, bucket_bound_seconds

log = logging.getLogger("zramd.metrics")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_METRICS_CONNECTIONS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric name, type, source: "mm_stat"/"io_stat"/"memory"/"stat"/"tiers"/"backing"/"persist"/
#: "journal"/"top", field, help)
FAMILIES: tuple[tuple[str, str, str, str, str], ...] = (
    ("zramd_disksize_bytes", "gauge", "top", "disksize", "Size of the export."),
    ("zramd_clients", "gauge", "top", "clients", "NBD connections attached to the export."),
    ("zramd_orig_data_size_bytes", "gauge", "mm_stat", "orig_data_size",
     "Uncompressed size of the data stored (same-filled pages included)."),
    ("zramd_compr_data_size_bytes", "gauge", "mm_stat", "compr_data_size",
     "Compressed size of the data stored."),
    ("zramd_mem_used_total_bytes", "gauge", "mm_stat", "mem_used_total",
     "Memory the pool holds from the OS, overhead included."),
    ("zramd_mem_limit_bytes", "gauge", "mm_stat", "mem_limit",
     "Memory limit of the export (0 = none)."),
    ("zramd_mem_used_max_bytes", "gauge", "mm_stat", "mem_used_max",
     "Peak of mem_used_total."),
    ("zramd_same_pages", "gauge", "mm_stat", "same_pages",
     "Pages stored as one repeated word (no memory used)."),
    ("zramd_pages_compacted_total", "counter", "mm_stat", "pages_compacted",
     "Pool pages freed by compaction."),
    ("zramd_huge_pages", "gauge", "mm_stat", "huge_pages",
     "Pages stored uncompressed (incompressible)."),
    ("zramd_huge_pages_since_total", "counter", "mm_stat", "huge_pages_since",
     "Pages ever stored uncompressed."),
    ("zramd_failed_reads_total", "counter", "io_stat", "failed_reads", "Failed reads."),
    ("zramd_failed_writes_total", "counter", "io_stat", "failed_writes",
     "Failed writes (memory limit reached)."),
    ("zramd_invalid_io_total", "counter", "io_stat", "invalid_io",
     "Requests refused for their range (zero length, past the end)."),
    ("zramd_notify_free_total", "counter", "io_stat", "notify_free",
     "Pages freed by trim / write-zeroes."),
    ("zramd_effective_mem_limit_bytes", "gauge", "memory", "effective_mem_limit",
     "Memory limit in force: the export's own, or what the server's budget leaves it when "
     "lower (0 = none)."),
    ("zramd_requests_in_flight", "gauge", "stat", "in_flight",
     "Requests started on the device and not finished."),
    ("zramd_idle_pages", "gauge", "tiers", "idle_pages",
     "Pages marked idle and not read or written since."),
    ("zramd_recompressed_pages", "gauge", "tiers", "recompressed_pages",
     "Pages stored by a recompression algorithm."),
    ("zramd_incompressible_pages", "gauge", "tiers", "incompressible_pages",
     "Pages no recompression algorithm shrank (not tried again until rewritten)."),
    ("zramd_recompress_saved_bytes_total", "counter", "tiers", "recompress_saved_bytes",
     "Pool bytes recompression released (old size class minus new)."),
    ("zramd_grouped_pages", "gauge", "tiers", "grouped_pages",
     "Pages held in multi-page groups of cold pages."),
    ("zramd_groups", "gauge", "tiers", "groups", "Multi-page groups held."),
    ("zramd_group_saved_bytes_total", "counter", "tiers", "group_saved_bytes",
     "Compressed bytes packing pages into groups saved (members' objects minus the group's)."),
    ("zramd_bd_count", "gauge", "backing", "bd_count",
     "Pages whose object is in the backing store (zram bd_stat bd_count)."),
    ("zramd_bd_reads_total", "counter", "backing", "bd_reads",
     "Pages read from the backing store (zram bd_stat bd_reads)."),
    ("zramd_bd_writes_total", "counter", "backing", "bd_writes",
     "Pages written to the backing store (zram bd_stat bd_writes)."),
    ("zramd_bd_read_bytes_total", "counter", "backing", "bd_read_bytes",
     "Object bytes read from the backing store."),
    ("zramd_bd_write_bytes_total", "counter", "backing", "bd_write_bytes",
     "Object bytes written to the backing store."),
    ("zramd_bd_read_microseconds_total", "counter", "backing", "bd_read_us",
     "Time spent waiting for backing store reads."),
    ("zramd_bd_write_microseconds_total", "counter", "backing", "bd_write_us",
     "Time spent waiting for backing store writes."),
    ("zramd_bd_promoted_total", "counter", "backing", "bd_promoted",
     "Pages read back and returned to RAM."),
    ("zramd_bd_errors_total", "counter", "backing", "bd_errors",
     "Backing store operations that failed (I/O error, full, writeback limit spent)."),
    ("zramd_bd_waits_total", "counter", "backing", "bd_waits",
     "Writes that found no room and waited for writeback."),
    ("zramd_bd_wait_timeouts_total", "counter", "backing", "bd_wait_timeouts",
     "Waits for room that failed (the write got ENOSPC)."),
    ("zramd_writeback_limit_bytes", "gauge", "backing", "writeback_limit",
     "Bytes the backing store may still be written (-1 = no limit)."),
    ("zramd_writeback_high_ratio", "gauge", "backing", "writeback_high",
     "Fraction of the memory limit past which pressure writeback starts (with a backing store)."),
    ("zramd_writeback_low_ratio", "gauge", "backing", "writeback_low",
     "Fraction of the memory limit pressure writeback writes the pool down to."),
    ("zramd_writeback_wait_seconds", "gauge", "backing", "writeback_wait",
     "Longest a write waits for writeback to make room before ENOSPC."),
    ("zramd_snapshot_age_seconds", "gauge", "persist", "age_seconds",
     "Age of the export's snapshot file (-1 = none yet)."),
    ("zramd_snapshot_bytes", "gauge", "persist", "file_bytes",
     "Size of the export's snapshot file."),
    ("zramd_snapshot_last_save_seconds", "gauge", "persist", "last_save_seconds",
     "Duration of the last snapshot save (failed or not)."),
    ("zramd_snapshot_saves_total", "counter", "persist", "saves",
     "Snapshots written to the export's persist file."),
    ("zramd_snapshot_failures_total", "counter", "persist", "failures",
     "Snapshots of the export's persist file that failed (the previous file stays)."),
    ("zramd_journal_bytes", "gauge", "journal", "bytes",
     "Bytes of the durable export's journal on disk (sync=flush)."),
    ("zramd_journal_checkpoint_bytes", "gauge", "journal", "checkpoint_bytes",
     "Journal size at which a checkpoint (a snapshot) is taken."),
    ("zramd_journal_records_total", "counter", "journal", "records",
     "Writes, zeroings and trims recorded in the journal."),
    ("zramd_journal_syncs_total", "counter", "journal", "syncs",
     "Journal syncs (FLUSH and FUA requests)."),
    ("zramd_journal_datasyncs_total", "counter", "journal", "datasyncs",
     "fdatasync calls of the journal (concurrent syncs share one)."),
    ("zramd_journal_sync_microseconds_total", "counter", "journal", "sync_us",
     "Time FLUSH and FUA requests waited for the journal's sync."),
    ("zramd_journal_checkpoints_total", "counter", "journal", "checkpoints",
     "Checkpoints that cleaned the journal."),
    ("zramd_journal_checkpoint_running_seconds", "gauge", "journal",
     "checkpoint_running_seconds", "How long the checkpoint running has run (0: none)."),
    ("zramd_journal_failed", "gauge", "journal", "failed",
     "1 while the journal failed (FLUSH answers EIO until a checkpoint succeeds)."),
)
#: the histogram's bucket bounds as Prometheus ``le`` labels
_LE = [str(bucket_bound_seconds(i)) for i in range(HIST_SHOWN)] + ["+Inf"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(registry: Any) -> str:
    """The Prometheus text for every export of ``registry``."""
    exports = list(registry)
    budget = registry.budget
    stats = [export_stat(e, budget) for e in exports]
    out: list[str] = [
        "# HELP zramd_exports Exports served.",
        "# TYPE zramd_exports gauge",
        f"zramd_exports {len(stats)}",
    ]
    _server_family(out, "zramd_memory_budget_bytes", "gauge",
                   "Server-wide memory budget of all exports (0 = none).",
                   budget.limit if budget is not None else 0)  # fmt: skip
    _server_family(out, "zramd_memory_budget_used_bytes", "gauge",
                   "Memory the exports hold against the budget.",
                   budget.used if budget is not None else 0)  # fmt: skip
    _server_family(out, "zramd_memory_budget_refusals_total", "counter",
                   "Stores the budget refused (each fails one write with ENOSPC).",
                   budget.refusals if budget is not None else 0)  # fmt: skip
    for name, kind, source, field, help_ in FAMILIES:
        _head(out, name, kind, help_)
        for st in stats:
            if source == "top":
                value = st[field]
            elif st[source] is None:  # an export without a persist file, or journal
                continue
            else:
                value = st[source][field]
            if value is None:  # a setting the export does not have (no backing store)
                continue
            shown = value if isinstance(value, float) else int(value)
            out.append(f'{name}{{export="{_label(st["name"])}"}} {shown}')
    _head(out, "zramd_enospc_total", "counter",
          "Writes refused with ENOSPC, by cause: the export's mem-limit, the server's "
          "budget, or the system.")  # fmt: skip
    for st in stats:
        for cause, n in st["memory"]["enospc"].items():
            out.append(f'zramd_enospc_total{{export="{_label(st["name"])}",cause="{cause}"}} {n}')
    ios = [(_label(e.name), e.io) for e in exports]
    _head(out, "zramd_io_busy_seconds_total", "counter",
          "Time with at least one request in flight (io_ticks).")  # fmt: skip
    for label, io in ios:
        out.append(f'zramd_io_busy_seconds_total{{export="{label}"}} {io.io_ticks_ns() / 1e9}')
    _head(out, "zramd_io_bytes_total", "counter",
          "Bytes of the requests served, by NBD command (the range for trim, "
          "write_zeroes, cache and block_status).")  # fmt: skip
    for label, io in ios:
        for cmd, cname in IO_COMMANDS.items():
            out.append(
                f'zramd_io_bytes_total{{export="{label}",command="{cname}"}} {io.bytes[cmd]}'
            )
    _head(out, "zramd_request_duration_seconds", "histogram",
          "Time from a request's start on the device to its reply, by NBD command.")  # fmt: skip
    for label, io in ios:
        _histograms(out, label, io)
    return "\n".join(out) + "\n"


def _head(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")


def _server_family(out: list[str], name: str, kind: str, help_: str, value: int) -> None:
    _head(out, name, kind, help_)
    out.append(f"{name} {int(value)}")


def _histograms(out: list[str], label: str, io: IoStats) -> None:
    name = "zramd_request_duration_seconds"
    for cmd, cname in IO_COMMANDS.items():
        labels = f'export="{label}",command="{cname}"'
        counts = io.buckets(cmd)
        for le, n in zip(_LE, counts, strict=True):
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {n}')
        out.append(f"{name}_sum{{{labels}}} {io.ns[cmd] / 1e9}")
        out.append(f"{name}_count{{{labels}}} {counts[-1]}")


class MetricsServer:
    def __init__(self, registry: Any, address: str) -> None:
        self.registry = registry
        self.host, self.port = parse_metrics_address(address)
        self._server: asyncio.AbstractServer | None = None
        self._active = 0

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        socks = getattr(self._server, "sockets", None) or []
        return int(socks[0].getsockname()[1]) if socks else self.port

    async def start(self) -> None:
        from zramd.control.protocol import ControlError

        try:
            self._server = await asyncio.start_server(
                self._on_connect, self.host, self.port, limit=MAX_REQUEST_HEAD
            )
        except OSError as e:
            raise ControlError(
                f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", self.host, self.bound_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_METRICS_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            status, body = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError,
                asyncio.LimitOverrunError):
            pass
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) < 2:
            return "400 Bad Request", b"bad request\n"
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return "404 Not Found", b"not found: try /metrics\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n"
        body = render(self.registry).encode()
        return "200 OK", b"" if method == "HEAD" else body
