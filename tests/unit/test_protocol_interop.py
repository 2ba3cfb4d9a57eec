"""The protocol core against real clients (libnbd, nbdinfo, qemu-io) through a tiny threaded driver.

The driver here is deliberately naive (blocking sockets, a bytearray per export): it exists to
check the bytes the core produces against independent client implementations, not to be a server.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from zramd.protocol import (
    NEED_DATA,
    Command,
    ConnectionClosed,
    ExportInfo,
    HandshakeComplete,
    Request,
    ServerConnection,
    wire,
)

pytestmark = pytest.mark.e2e

nbd = pytest.importorskip("nbd")

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
SIZE = 4 * 1024 * 1024


class Catalog:
    def __init__(self, exports: list[ExportInfo]) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name or "disk")

    def list_exports(self) -> list[ExportInfo]:
        return list(self.exports.values())


class MiniServer:
    """One thread per connection; a bytearray per export."""

    def __init__(self, structured: bool = True) -> None:
        self.catalog = Catalog(
            [ExportInfo("disk", SIZE, description="test disk"), ExportInfo("ro", SIZE, True)]
        )
        self.stores = {"disk": bytearray(SIZE), "ro": bytearray(b"\xab" * SIZE)}
        self.structured = structured
        self.errors: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accept_thread = threading.Thread(target=self._accept, daemon=True)
        self.accept_thread.start()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        self.sock.close()
        self.accept_thread.join(5)
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, s: socket.socket) -> None:
        conn = ServerConnection(self.catalog, structured_replies=self.structured)
        store = bytearray()
        contexts: dict[int, str] = {}
        read_only = False
        try:
            s.sendall(conn.data_to_send())
            while True:
                data = s.recv(256 * 1024)
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, HandshakeComplete):
                        s.sendall(conn.data_to_send())
                        store = self.stores[ev.export.name]
                        contexts = ev.meta_contexts
                        read_only = ev.export.read_only
                    elif isinstance(ev, ConnectionClosed):
                        s.sendall(conn.data_to_send())
                        if ev.error:
                            self.errors.append(ev.reason)
                        return
                    else:
                        assert isinstance(ev, Request)
                        bufs = self._handle(conn, ev, store, contexts, read_only)
                        if bufs:
                            s.sendall(b"".join(bytes(b) for b in bufs))
                out = conn.data_to_send()
                if out:
                    s.sendall(out)
                if not data:
                    return
        except OSError as e:
            self.errors.append(repr(e))
        finally:
            s.close()

    @staticmethod
    def _handle(
        conn: ServerConnection,
        ev: Request,
        store: bytearray,
        contexts: dict[int, str],
        read_only: bool,
    ) -> list[bytes | bytearray | memoryview]:
        cmd, off, n = ev.command, ev.offset, ev.length
        if cmd == Command.DISC:
            return []
        if cmd in (Command.FLUSH, Command.CACHE):
            return conn.reply_ok(ev.cookie)
        if cmd not in (
            Command.READ,
            Command.WRITE,
            Command.TRIM,
            Command.WRITE_ZEROES,
            Command.BLOCK_STATUS,
        ):
            return conn.reply_error(ev.cookie, wire.EINVAL, f"unknown command {cmd}")
        if off + n > len(store):
            return conn.reply_error(ev.cookie, wire.EINVAL, "out of range")
        if read_only and cmd in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
            return conn.reply_error(ev.cookie, wire.EPERM, "read-only export")
        if cmd == Command.READ:
            holes = [
                (p - off, PAGE)
                for p in range(off - off % PAGE, off + n, PAGE)
                if p >= off and p + PAGE <= off + n and store[p : p + PAGE] == ZERO_PAGE
            ]
            df = bool(ev.flags & wire.CMD_FLAG_DF)
            return conn.reply_read(ev.cookie, off, memoryview(store)[off : off + n], holes, df)
        if cmd == Command.WRITE:
            if ev.payload_dropped or ev.data is None:
                return conn.reply_error(ev.cookie, wire.EOVERFLOW, "payload too large")
            store[off : off + n] = ev.data
            return conn.reply_ok(ev.cookie)
        if cmd in (Command.TRIM, Command.WRITE_ZEROES):
            store[off : off + n] = bytes(n)
            return conn.reply_ok(ev.cookie)
        # BLOCK_STATUS, page granular, starting at the page containing off
        extents: list[tuple[int, int]] = []
        p = off - off % PAGE
        while p < off + n:
            state = wire.STATE_HOLE | wire.STATE_ZERO if store[p : p + PAGE] == ZERO_PAGE else 0
            length = min(p + PAGE, off + n) - max(p, off)
            if extents and extents[-1][1] == state:
                extents[-1] = (extents[-1][0] + length, state)
            else:
                extents.append((length, state))
            p += PAGE
        out: list[bytes | bytearray | memoryview] = []
        ids = list(contexts)
        for i, ctx_id in enumerate(ids):
            out += conn.reply_block_status(ev.cookie, ctx_id, extents, done=i == len(ids) - 1)
        return out or conn.reply_error(ev.cookie, wire.EINVAL, "no meta context selected")


@pytest.fixture
def server() -> Iterator[MiniServer]:
    srv = MiniServer()
    yield srv
    srv.close()
    assert srv.errors == []


def uri(srv: MiniServer, name: str = "disk") -> str:
    return f"nbd://127.0.0.1:{srv.port}/{name}"


def test_libnbd_structured_roundtrip(server: MiniServer) -> None:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri(server))
    assert h.get_size() == SIZE
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation")
    assert h.can_df() and h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
    assert h.can_fast_zero() and h.can_multi_conn() and h.can_cache() and not h.is_read_only()
    payload = bytes(range(256)) * 64  # 16 KiB
    h.pwrite(payload, 8192, nbd.CMD_FLAG_FUA)
    assert h.pread(len(payload), 8192) == payload
    # a read spanning data and zero pages goes out as OFFSET_DATA + OFFSET_HOLE chunks
    assert h.pread(64 * 1024, 0) == bytes(8192) + payload + bytes(64 * 1024 - 8192 - len(payload))
    chunks: list[tuple[int, int, int]] = []

    def chunk_cb(subbuf: bytes, offset: int, status: int, error: object) -> int:
        chunks.append((offset, len(subbuf), status))
        return 0

    assert h.pread_structured(20480, 0, chunk_cb) == bytes(8192) + payload[:12288]
    assert chunks == [(0, 8192, nbd.READ_HOLE), (8192, 12288, nbd.READ_DATA)]
    chunks.clear()
    assert h.pread_structured(8192, 0, chunk_cb, nbd.CMD_FLAG_DF) == bytes(8192)
    assert chunks == [(0, 8192, nbd.READ_DATA)]  # DF: one content chunk
    seen: list[tuple[str, list[int]]] = []

    def cb(metacontext: str, offset: int, entries: list[int], err: object) -> int:
        seen.append((metacontext, list(entries)))
        return 0

    h.block_status(65536, 0, cb)
    assert seen == [("base:allocation", [8192, 3, 16384, 0, 65536 - 24576, 3])]
    h.zero(4096, 8192)
    h.trim(4096, 12288)
    h.flush()
    h.cache(4096, 0)
    assert h.pread(16384, 8192) == bytes(8192) + payload[8192:]
    with pytest.raises(nbd.Error):
        h.pread(4096, SIZE)  # out of range: structured ERROR chunk, connection goes on
    assert h.pread(4, 12288 + 4096) == payload[12288 : 12288 + 4]
    h.shutdown()


def test_libnbd_simple_replies(server: MiniServer) -> None:
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri(server))
    assert not h.get_structured_replies_negotiated() and not h.can_df()
    h.pwrite(b"x" * 5000, 100)
    assert h.pread(5000, 100) == b"x" * 5000
    with pytest.raises(nbd.Error):
        h.pread(4096, SIZE)
    assert h.pread(1, 100) == b"x"
    h.shutdown()


def test_libnbd_read_only_export(server: MiniServer) -> None:
    h = nbd.NBD()
    h.connect_uri(uri(server, "ro"))
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    assert h.pread(16, 0) == b"\xab" * 16
    h.shutdown()


def test_libnbd_option_mode(server: MiniServer) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(f"nbd://127.0.0.1:{server.port}/")
    names: list[tuple[str, str]] = []

    def on_export(name: str, desc: str) -> int:
        names.append((name, desc))
        return 0

    h.opt_list(on_export)
    assert names == [("disk", "test disk"), ("ro", "")]
    ctxs: list[str] = []
    h.set_export_name("disk")
    h.add_meta_context("base:")

    def on_context(name: str) -> int:
        ctxs.append(name)
        return 0

    h.opt_list_meta_context(on_context)
    assert ctxs == ["base:allocation"]
    h.set_export_name("missing")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("disk")
    h.set_full_info(True)
    h.opt_info()
    assert h.get_size() == SIZE and h.get_canonical_export_name() == "disk"
    assert h.get_export_description() == "test disk"
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
    h.opt_go()
    assert h.pread(4, 0) == bytes(4)
    h.shutdown()


def test_libnbd_opt_abort(server: MiniServer) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri(server))
    h.opt_abort()
    assert server.errors == []


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo not installed")
def test_nbdinfo_json(server: MiniServer) -> None:
    out = subprocess.run(
        ["nbdinfo", "--json", uri(server)], capture_output=True, text=True, timeout=30, check=True
    )
    info = json.loads(out.stdout)
    (exp,) = info["exports"]
    assert exp["export-size"] == SIZE
    assert exp["is_read_only"] is False
    assert exp["can_multi_conn"] is True
    assert info["protocol"] == "newstyle-fixed"


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_qemu_io_patterns(server: MiniServer) -> None:
    cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -z 1M 1M",
        "read -P 0 1M 1M",
        "write -f -P 0x11 2M 4k",
        "discard 3M 512k",
        "flush",
        "read -P 0x11 2M 4k",
    ]
    args = ["qemu-io", "-f", "raw", uri(server)]
    for c in cmds:
        args += ["-c", c]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Pattern verification failed" not in res.stdout
