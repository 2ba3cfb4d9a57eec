"""Prometheus metrics: rendering from a real registry, address parsing, the HTTP responder."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from zramd.config import ExportConfig
from zramd.control.metrics import FAMILIES, MetricsServer, render
from zramd.server.exports import ExportRegistry

SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"(?:,|$)')
Key = tuple[str, str, frozenset[tuple[str, str]]]


def parse_prometheus(text: str) -> dict[Key, float]:
    """A strict little parser: every line is a comment or a sample of a declared family (a
    histogram's as ``_bucket``/``_sum``/``_count``); returns the samples by (name, export
    label, the other labels)."""
    out: dict[Key, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter", "histogram")
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, label_text, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if types.get(family) != "histogram":
            family = name
        assert family in types, f"sample before its TYPE: {line}"
        if types[family] == "counter":
            assert name.endswith("_total")
        labels = dict(LABEL.findall(label_text))
        assert ",".join(f'{k}="{v}"' for k, v in labels.items()) == label_text, line
        export = labels.pop("export", "")
        out[(name, export, frozenset(labels.items()))] = float(value)
    return out


def sample(samples: dict[Key, float], name: str, export: str = "", **labels: str) -> float:
    return samples[(name, export, frozenset(labels.items()))]


@pytest.fixture
def registry() -> Any:
    reg = ExportRegistry()
    yield reg
    reg.close()


async def test_render(registry: Any) -> None:
    registry.add(ExportConfig(name="a", size=1 << 20, mem_limit=1 << 19))
    registry.add(ExportConfig(name='we"ird\\name', size=1 << 20))
    await registry.get("a").device.write(0, b"abc" * 4096 + bytes(8192))
    samples = parse_prometheus(render(registry))
    assert sample(samples, "zramd_exports") == 2
    assert sample(samples, "zramd_disksize_bytes", "a") == 1 << 20
    assert sample(samples, "zramd_mem_limit_bytes", "a") == 1 << 19
    assert sample(samples, "zramd_effective_mem_limit_bytes", "a") == 1 << 19
    assert sample(samples, "zramd_orig_data_size_bytes", "a") == 5 * 4096
    assert sample(samples, "zramd_clients", "a") == 0
    assert sample(samples, "zramd_disksize_bytes", 'we\\"ird\\\\name') == 1 << 20
    assert sample(samples, "zramd_memory_budget_bytes") == 0
    assert sample(samples, "zramd_enospc_total", "a", cause="budget") == 0
    per_export = [k for k in samples if k[1] == "a"]
    # + busy seconds; no snapshot or journal families without a persist file, no pressure
    # writeback settings without a backing store
    plain = [
        f
        for f in FAMILIES
        if f[2] not in ("persist", "journal") and not f[3].startswith("writeback_")
        or f[3] == "writeback_limit"
    ]
    assert len([k for k in per_export if not k[2]]) == len(plain) + 1


async def test_render_io_and_budget() -> None:
    from tests.support.devices import PlainDevice
    from zramd.allocator import MemoryBudget
    from zramd.protocol.events import Request
    from zramd.server.dispatch import Dispatcher

    registry = ExportRegistry(budget=MemoryBudget(1 << 20))
    try:
        registry.add(ExportConfig(name="b", size=1 << 20))
        exp = registry.add(ExportConfig(name="p", size=1 << 20), device=PlainDevice(1 << 20))
        d = Dispatcher(exp, structured=False, max_payload=1 << 20)
        await d.execute(Request(1, 0, 1, 0, 8192, bytes(8192)))
        await d.execute(Request(0, 0, 2, 0, 4096, None))
        await d.execute(Request(4, 0, 3, 0, 1 << 20, None))  # trim
        await d.execute(Request(0, 0, 4, 1 << 20, 512, None))  # past the end: invalid_io
        samples = parse_prometheus(render(registry))
    finally:
        registry.close()
    assert sample(samples, "zramd_memory_budget_bytes") == 1 << 20
    assert sample(samples, "zramd_memory_budget_used_bytes") == 0
    assert sample(samples, "zramd_memory_budget_refusals_total") == 0
    assert sample(samples, "zramd_effective_mem_limit_bytes", "b") == 1 << 20
    assert sample(samples, "zramd_invalid_io_total", "p") == 1
    assert sample(samples, "zramd_requests_in_flight", "p") == 0
    assert sample(samples, "zramd_io_bytes_total", "p", command="write") == 8192
    assert sample(samples, "zramd_io_bytes_total", "p", command="read") == 4096
    assert sample(samples, "zramd_io_bytes_total", "p", command="trim") == 1 << 20
    hist = "zramd_request_duration_seconds"
    for command, n in (("read", 1), ("write", 1), ("trim", 1), ("flush", 0)):
        assert sample(samples, f"{hist}_count", "p", command=command) == n
        assert sample(samples, f"{hist}_bucket", "p", command=command, le="+Inf") == n
    buckets = sorted(
        (float(dict(k[2])["le"]), v)
        for k, v in samples.items()
        if k[0] == f"{hist}_bucket" and k[1] == "p" and dict(k[2])["command"] == "write"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 1  # cumulative
    assert sample(samples, f"{hist}_sum", "p", command="write") > 0
    assert sample(samples, "zramd_io_busy_seconds_total", "p") > 0


async def _get(port: int, request: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


async def test_http(registry: Any) -> None:
    registry.add(ExportConfig(name="z", size=1 << 20))
    srv = MetricsServer(registry, "127.0.0.1:0")
    await srv.start()
    try:
        port = srv.bound_port
        resp = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert b"text/plain; version=0.0.4" in head
        assert sample(parse_prometheus(body.decode()), "zramd_disksize_bytes", "z") == 1 << 20
        assert (await _get(port, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await _get(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
        # an oversized head is dropped without an answer, and the server lives on
        assert await _get(port, b"GET /" + b"a" * 10000 + b" HTTP/1.0\r\n\r\n") == b""
        assert (await _get(port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
    finally:
        await srv.close()


async def test_port_in_use(registry: Any) -> None:
    a = MetricsServer(registry, "127.0.0.1:0")
    await a.start()
    try:
        from zramd.control.protocol import ControlError

        with pytest.raises(ControlError, match="cannot serve metrics on 127.0.0.1:"):
            await MetricsServer(registry, f"127.0.0.1:{a.bound_port}").start()
    finally:
        await a.close()
