"""Several exports on one server, multi-conn coherence, and the command-line contract."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from . import nbdraw as raw
from .conftest import (
    SERVER_KIND,
    MiB,
    Server,
    export_args,
    private_args,
    run,
    start_server,
    zramd_argv,
)


def test_exports_are_isolated(server: Server) -> None:
    server.require_multi_export()
    a = nbd.NBD()
    a.connect_uri(server.uri("zram0"))
    b = nbd.NBD()
    b.connect_uri(server.uri("other"))
    data = os.urandom(256 * 1024)
    a.pwrite(data, 5 * MiB)
    a.flush()
    assert a.pread(len(data), 5 * MiB) == data
    assert b.pread(len(data), 5 * MiB) == bytes(len(data)), "write leaked into another export"
    other = os.urandom(4096)
    b.pwrite(other, 5 * MiB)
    assert a.pread(len(data), 5 * MiB) == data
    assert b.get_size() == server.size("other") != a.get_size()
    a.shutdown()
    b.shutdown()


def test_default_export_for_empty_name(server: Server) -> None:
    """The empty name selects the default export (the first one)."""
    with raw.RawClient(server.addr()) as c:
        c.greeting()
        c.go("")
        assert c.size == server.size("zram0")
        c.disconnect()


def test_export_name_option_old_clients(server: Server) -> None:
    """NBD_OPT_EXPORT_NAME, with and without the 124 zero bytes."""
    for flags, zeroes in ((raw.FLAG_FIXED_NEWSTYLE | raw.FLAG_NO_ZEROES, 0),
                          (raw.FLAG_FIXED_NEWSTYLE, 124)):
        with raw.RawClient(server.addr()) as c:
            c.greeting(flags)
            c.send_option(raw.OPT_EXPORT_NAME, b"zram0")
            size, tflags = struct.unpack(">QH", c.recv_exact(10))
            assert size == server.size("zram0") and tflags & 1
            if zeroes:
                assert c.recv_exact(zeroes) == bytes(zeroes)
            assert c.read(0, 512) is not None
            c.disconnect()


def test_multi_conn_sees_writes_after_flush(server: Server) -> None:
    conns = []
    for _ in range(3):
        h = nbd.NBD()
        h.connect_uri(server.uri("zram0"))
        assert h.can_multi_conn()
        conns.append(h)
    base = 100 * MiB
    for i, h in enumerate(conns):
        h.pwrite(bytes([0x40 + i]) * 65536, base + i * 65536)
    for h in conns:
        h.flush()
    for h in conns:
        for i in range(len(conns)):
            assert h.pread(65536, base + i * 65536) == bytes([0x40 + i]) * 65536
    # Interleaved writers on one page through different connections.
    errors: list[BaseException] = []

    def writer(h: nbd.NBD, byte: int) -> None:
        try:
            for k in range(200):
                h.pwrite(bytes([byte]), base + 3 * 65536 + (k * 2 + (byte & 1)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(conns[j], 0x60 + j)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    conns[0].flush()
    conns[1].flush()
    got = conns[2].pread(400, base + 3 * 65536)
    assert got == bytes([0x60, 0x61]) * 200, "concurrent sub-page writes lost an update"
    for h in conns:
        h.shutdown()


# -- the command line (zramd only) ---------------------------------------------------------------

zramd_only = pytest.mark.skipif(SERVER_KIND != "zramd", reason="zramd command-line contract")


@zramd_only
def test_default_export_is_zram0(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "d", exports=[])
    try:
        info = run(["nbdinfo", "--size", srv.uri("zram0")]).stdout
        assert int(info) > 0
        assert srv.stderr().strip(), "zramd must log a line when it is listening"
    finally:
        srv.stop()


@zramd_only
def test_size_suffixes_and_options(
    server_factory: Callable[[list[tuple[str, int, str]]], Server],
) -> None:
    srv = server_factory([
        ("a", 3 * MiB, "algorithm=zstd,level=3"),
        ("b", 1024 * MiB, "mem-limit=64M"),
        ("c", 4 * MiB, "algorithm=lz4,read-only,description=hello world"),
    ])
    for name in ("a", "b", "c"):
        assert int(run(["nbdinfo", "--size", srv.uri(name)]).stdout) == srv.size(name)
    h = nbd.NBD()
    h.connect_uri(srv.uri("a"))
    data = os.urandom(1 * MiB) + bytes(1 * MiB) + b"compressible" * 87381
    data = data[: 3 * MiB]
    h.pwrite(data, 0)
    assert h.pread(len(data), 0) == data
    h.shutdown()


@zramd_only
def test_stdio_mode(tmp_path: Path) -> None:
    cmd = zramd_argv() + ["serve", "--stdio", *private_args(tmp_path)]
    cmd += export_args([("zram0", 8 * MiB, "")])
    h = nbd.NBD()
    h.connect_command(cmd)
    assert h.get_size() == 8 * MiB
    h.pwrite(b"stdio!" * 1000, 4096)
    assert h.pread(6000, 4096) == b"stdio!" * 1000
    h.shutdown()


@zramd_only
def test_bad_export_spec_fails_fast(tmp_path: Path) -> None:
    cmd = zramd_argv() + ["serve", "--unix", str(tmp_path / "s.sock"), *private_args(tmp_path)]
    cmd += ["--export", "bad=12Q"]
    proc = subprocess.run(cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert proc.stderr, "an invalid --export must say why"


@zramd_only
def test_sigterm_with_client_connected(tmp_path: Path) -> None:
    """SIGTERM: in-flight work finishes, new requests get ESHUTDOWN or a close, exit status 0."""
    srv = start_server(tmp_path / "t", exports=[("zram0", 64 * MiB, "")])
    c = raw.RawClient(srv.addr()).connect_export("zram0")
    try:
        assert c.write(0, b"\x11" * 4096) == 0
        srv.procs[0].send_signal(signal.SIGTERM)
        try:
            c.request(raw.CMD_READ, 0, 4096, cookie=77)
            err = c.read_simple_reply(77)
            assert err in (0, raw.ESHUTDOWN), err
            if err == 0:
                c.recv_exact(4096)
        except (raw.PeerClosed, BrokenPipeError, ConnectionResetError):
            pass
        assert srv.procs[0].wait(timeout=15) == 0, srv.stderr()
    finally:
        c.close()
        srv.stop()


@zramd_only
@pytest.mark.slow
def test_stalled_handshake_is_dropped(server: Server) -> None:
    """A client that never finishes haggling is dropped after the handshake timeout (10 s)."""
    with raw.RawClient(server.addr(), timeout=30) as c:
        c.recv_exact(18)  # greeting, then silence
        assert c.wait_closed(timeout=20), "stalled handshake not dropped within 20 s"
    server.assert_alive()


def test_trim_and_zero_whole_export(server: Server) -> None:
    """TRIM and WRITE_ZEROES of any length inside the export (here: all 64 MiB of `other`)."""
    server.require_multi_export()
    h = nbd.NBD()
    h.connect_uri(server.uri("other"))
    size = server.size("other")
    h.pwrite(b"\xaa" * MiB, 10 * MiB)
    h.zero(size, 0)
    assert h.pread(MiB, 10 * MiB) == bytes(MiB)
    h.pwrite(b"\xab" * MiB, 20 * MiB)
    h.trim(size, 0)
    assert h.pread(MiB, 20 * MiB) == bytes(MiB)
    h.shutdown()


@zramd_only
def test_systemd_socket_activation(tmp_path: Path) -> None:
    """LISTEN_FDS: libnbd (like systemd) hands zramd a listening socket."""
    h = nbd.NBD()
    h.connect_systemd_socket_activation(
        zramd_argv() + ["serve", *private_args(tmp_path / "a")]
        + export_args([("zram0", 8 * MiB, "description=activated")])
    )
    assert h.get_size() == 8 * MiB
    h.pwrite(b"sa" * 2048, 8192)
    assert h.pread(4096, 8192) == b"sa" * 2048
    h.shutdown()
    out = run(["nbdinfo", "--size", "--", "[", *zramd_argv(), "serve",
               *private_args(tmp_path / "b"), *export_args([("zram0", 16 * MiB, "")]), "]"],
              timeout=30)
    assert int(out.stdout) == 16 * MiB
