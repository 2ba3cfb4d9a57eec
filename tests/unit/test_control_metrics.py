"""Prometheus metrics: rendering from a real registry, address parsing, the HTTP responder."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from zramd.config import ExportConfig
from zramd.control.metrics import FAMILIES, MetricsServer, render
from zramd.server.exports import ExportRegistry

SAMPLE = re.compile(r'^([a-z_]+)\{export="((?:[^"\\]|\\.)*)"\} (\d+)$')


def parse_prometheus(text: str) -> dict[tuple[str, str], int]:
    """A strict little parser: every line is a comment or a sample; returns samples."""
    out: dict[tuple[str, str], int] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter")
            types[name] = kind
            continue
        if line.startswith("zramd_exports "):
            out[("zramd_exports", "")] = int(line.split()[1])
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        assert m.group(1) in types, f"sample before its TYPE: {line}"
        if types[m.group(1)] == "counter":
            assert m.group(1).endswith("_total")
        out[(m.group(1), m.group(2))] = int(m.group(3))
    return out


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
    assert samples[("zramd_exports", "")] == 2
    assert samples[("zramd_disksize_bytes", "a")] == 1 << 20
    assert samples[("zramd_mem_limit_bytes", "a")] == 1 << 19
    assert samples[("zramd_orig_data_size_bytes", "a")] == 5 * 4096
    assert samples[("zramd_clients", "a")] == 0
    assert samples[("zramd_disksize_bytes", 'we\\"ird\\\\name')] == 1 << 20
    assert len(samples) == 1 + 2 * len(FAMILIES)


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
        assert parse_prometheus(body.decode())[("zramd_disksize_bytes", "z")] == 1 << 20
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
