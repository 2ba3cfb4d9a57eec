"""Microbenchmark of the protocol hot path (slow; run with ``-m slow -s`` to see the figures).

Measures CPU time (``time.process_time``) so a busy shared machine does not skew it much. The
assertion bound is generous: it catches an accidental O(n) copy or quadratic buffer, not jitter.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest

from zramd.protocol import NEED_DATA, ExportInfo, HandshakeComplete, Request, ServerConnection

pytestmark = pytest.mark.slow

N = 100_000
PAGE = bytes(4096)
DISK = ExportInfo("disk", 1 << 30)


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK

    def list_exports(self) -> list[ExportInfo]:
        return [DISK]


def connected(structured: bool) -> ServerConnection:
    conn = ServerConnection(Catalog())
    hs = struct.pack(">I", 3)
    if structured:
        hs += b"IHAVEOPT" + struct.pack(">II", 8, 0)
    hs += b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0)
    conn.receive_data(hs)
    assert isinstance(conn.next_event(), HandshakeComplete)
    conn.data_to_send()
    return conn


def hdr(cmd: int, i: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, i, i * 4096, length)


def measure(
    structured: bool,
    ring: list[bytes],
    total: int,
    reply: Callable[[ServerConnection, Request], object],
) -> float:
    conn = connected(structured)
    chunks = [ring[i % len(ring)] for i in range(total)]  # a ring: fresh socket data is cache-hot
    rd, ne = conn.receive_data, conn.next_event
    n = 0
    t = time.process_time()
    for ch in chunks:
        rd(ch)
        while (ev := ne()) is not NEED_DATA:
            reply(conn, ev)  # type: ignore[arg-type]
            n += 1
    return (time.process_time() - t) / n * 1e6


def test_hot_path_microbenchmark() -> None:
    def read_reply(c: ServerConnection, ev: Request) -> object:
        return c.reply_read(ev.cookie, ev.offset, PAGE)

    def ok(c: ServerConnection, ev: Request) -> object:
        return c.reply_ok(ev.cookie)

    reads = [hdr(0, i, 4096) for i in range(256)]
    writes = [hdr(1, i, 4096) + PAGE for i in range(256)]
    split = [x for i in range(256) for x in (hdr(1, i, 4096), PAGE)]
    figures = {
        "READ 4K + simple reply": measure(False, reads, N, read_reply),
        "READ 4K + structured reply": measure(True, reads, N, read_reply),
        "WRITE 4K in one chunk + ok": measure(False, writes, N, ok),
        "WRITE 4K header/payload split + ok": measure(False, split, 2 * N, ok),
    }
    for name, us in figures.items():
        print(f"{name:40s} {us:6.2f} us/request")
    assert all(us < 20 for us in figures.values()), figures
