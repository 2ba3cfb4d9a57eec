"""Access control end to end: loopback-only default bind, restrictive socket modes, the TCP
allow-list (flags and config file), and TLS off answering STARTTLS with ERR_UNSUP."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from . import nbdraw as raw
from .conftest import Server, run
from .zramd_with import start_zramd, wait_for_log

OPT_STARTTLS = 5
REP_ERR_TLS_REQD = 0x80000005


def _listening_tcp(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.append(addr)
    return found


def _stop(srv: Server) -> None:
    srv.stop()


def test_default_bind_is_loopback_and_sockets_are_0600(tmp_path: Path) -> None:
    srv = start_zramd(tmp_path, bind=False)  # --port without --bind
    try:
        assert f"127.0.0.1:{srv.port}" in srv.stderr()
        assert _listening_tcp(srv.port) == ["0100007F"]  # 127.0.0.1 only, no 0.0.0.0 / ::
        assert stat.S_IMODE(os.stat(srv.sock).st_mode) == 0o600
        control = tmp_path / "control.sock"
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        run(["nbdinfo", srv.uri(unix=True)])
    finally:
        _stop(srv)


def test_unix_mode_flag(tmp_path: Path) -> None:
    srv = start_zramd(tmp_path, "--unix-mode", "0660")
    try:
        assert stat.S_IMODE(os.stat(srv.sock).st_mode) == 0o660
    finally:
        _stop(srv)


def test_allow_list_refuses_non_matching_tcp_client(tmp_path: Path) -> None:
    srv = start_zramd(tmp_path, "--allow", "10.0.0.0/8", "--allow", "192.168.0.0/16")
    try:
        proc = run(["nbdinfo", srv.uri()], check=False, timeout=30)
        assert proc.returncode != 0, proc.stdout
        with raw.RawClient(srv.addr()) as c:  # closed before any byte, no greeting
            with pytest.raises(raw.PeerClosed):
                c.recv_exact(18)
        wait_for_log(srv, "not in the allow list")
        run(["nbdinfo", srv.uri(unix=True)])  # Unix clients are local: always served
        srv.assert_alive()
    finally:
        _stop(srv)


def test_allow_list_serves_matching_tcp_client(tmp_path: Path) -> None:
    srv = start_zramd(tmp_path, "--allow", "127.0.0.1/32")
    try:
        run(["nbdinfo", srv.uri()])
        assert "not in the allow list" not in srv.stderr()
    finally:
        _stop(srv)


def test_allow_list_from_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "zramd.toml"
    cfg.write_text('allow = ["10.0.0.0/8"]\n[export.zram0]\nsize = "16M"\n')
    srv = start_zramd(tmp_path / "a", "--config", str(cfg), exports=[])
    try:
        proc = run(["nbdinfo", srv.uri()], check=False, timeout=30)
        assert proc.returncode != 0
        wait_for_log(srv, "not in the allow list")
    finally:
        _stop(srv)
    # the command line replaces the file's list
    srv = start_zramd(tmp_path / "b", "--config", str(cfg), "--allow", "127.0.0.0/8", exports=[])
    try:
        run(["nbdinfo", srv.uri()])
    finally:
        _stop(srv)


def test_bad_allow_entry_is_a_config_error(tmp_path: Path) -> None:
    from .conftest import zramd_argv

    proc = run(
        zramd_argv() + ["serve", "--port", "0", "--control", "", "--allow", "example.com"],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 2 and "bad allow entry" in proc.stderr, proc.stderr


def test_tls_off_answers_starttls_unsup(tmp_path: Path) -> None:
    srv = start_zramd(tmp_path)
    try:
        with raw.RawClient(srv.addr()) as c:
            c.greeting()
            c.send(struct.pack(">QII", raw.IHAVEOPT, OPT_STARTTLS, 0))
            assert c.read_option_reply()[:2] == (OPT_STARTTLS, raw.REP_ERR_UNSUP)
            c.send_option(raw.OPT_LIST)  # never ERR_TLS_REQD without TLS
            while True:
                _, rtype, _ = c.read_option_reply()
                assert rtype != REP_ERR_TLS_REQD
                if rtype == raw.REP_ACK:
                    break
        proc = run(["nbdinfo", f"nbds://127.0.0.1:{srv.port}/zram0"], check=False, timeout=30)
        assert proc.returncode != 0
    finally:
        _stop(srv)
