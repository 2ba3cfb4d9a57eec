"""STARTTLS end to end: real clients (nbdinfo, qemu-io, nbdcopy) over TLS with certificates this
test generates, require mode refusing plaintext, verify-peer, and the CVE-2021-3716 reset.

Each server is a real ``zramd serve`` process (tests/e2e/zramd_with.py); raw-socket checks use
tests/e2e/nbdraw.py with the stdlib ``ssl`` module layered on the socket after STARTTLS.
"""

from __future__ import annotations

import os
import shutil
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import nbdraw as raw
from .conftest import MiB, Server, run
from .tls_certs import Pki, make_pki
from .zramd_with import start_zramd, wait_for_log

OPT_STARTTLS = 5
OPT_SET_META_CONTEXT = 10
REP_ERR_TLS_REQD = 0x80000005
TFLAG_SEND_DF = 1 << 7


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(tmp: pytest.TempPathFactory, pki: Pki, *flags: str) -> Iterator[Server]:
    srv = start_zramd(tmp.mktemp("tls"), "--tls-certificates", str(pki.server), *flags)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def require_srv(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    yield from _server(tmp_path_factory, pki, "--tls", "require")


@pytest.fixture(scope="module")
def on_srv(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    yield from _server(tmp_path_factory, pki, "--tls", "on", "--handshake-timeout", "2")


@pytest.fixture(scope="module")
def verify_srv(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    yield from _server(tmp_path_factory, pki, "--tls", "require", "--tls-verify-peer")


def nbds(srv: Server, certs: Path, name: str = "zram0") -> str:
    return f"nbds://127.0.0.1:{srv.port}/{name}?tls-certificates={certs}"


def client_context(pki: Pki, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if with_cert:
        ctx.load_cert_chain(str(pki.client / "client-cert.pem"), str(pki.client / "client-key.pem"))
    return ctx


def starttls(c: raw.RawClient, pki: Pki, with_cert: bool = False) -> None:
    c.send_option(OPT_STARTTLS)
    assert c.read_option_reply()[:2] == (OPT_STARTTLS, raw.REP_ACK)
    c.sock = client_context(pki, with_cert).wrap_socket(c.sock, server_hostname="localhost")


# -- real clients ------------------------------------------------------------------------------


def test_nbdinfo_over_tls(require_srv: Server, pki: Pki) -> None:
    import json

    out = run(["nbdinfo", "--json", nbds(require_srv, pki.client)]).stdout
    info = json.loads(out)
    assert info["TLS"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "zram0" and export["export-size"] == 64 * MiB
    assert "protocol error" not in require_srv.stderr()


def test_require_mode_refuses_plaintext_nbdinfo(require_srv: Server) -> None:
    proc = run(["nbdinfo", f"nbd://127.0.0.1:{require_srv.port}/zram0"], check=False, timeout=30)
    assert proc.returncode != 0, proc.stdout
    require_srv.assert_alive()


@pytest.mark.parametrize(
    "option,data",
    [
        (raw.OPT_LIST, b""),
        (raw.OPT_INFO, struct.pack(">I", 5) + b"zram0" + struct.pack(">H", 0)),
        (raw.OPT_GO, struct.pack(">I", 5) + b"zram0" + struct.pack(">H", 0)),
        (raw.OPT_STRUCTURED_REPLY, b""),
        (OPT_SET_META_CONTEXT, b"\0" * 8),
        (99, b"some data"),
    ],
)
def test_require_mode_options_get_tls_reqd(require_srv: Server, option: int, data: bytes) -> None:
    with raw.RawClient(require_srv.addr()) as c:
        c.greeting()
        c.send_option(option, data)
        assert c.read_option_reply()[:2] == (option, REP_ERR_TLS_REQD)
        c.send_option(raw.OPT_ABORT)  # ABORT is still honoured
        assert c.read_option_reply()[:2] == (raw.OPT_ABORT, raw.REP_ACK)
        assert c.wait_closed()


def test_require_mode_export_name_closes(require_srv: Server) -> None:
    with raw.RawClient(require_srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_EXPORT_NAME, b"zram0")
        assert c.wait_closed()
    require_srv.assert_alive()


def test_raw_client_through_tls_reads_what_it_wrote(require_srv: Server, pki: Pki) -> None:
    data = os.urandom(256 * 1024)
    with raw.RawClient(require_srv.addr()) as c:
        c.greeting()
        starttls(c, pki)
        c.send_option(OPT_STARTTLS)  # twice: ERR_INVALID, over TLS now
        assert c.read_option_reply()[:2] == (OPT_STARTTLS, raw.REP_ERR_INVALID)
        c.go("zram0")
        assert c.write(8 * MiB, data) == 0
        assert c.read(8 * MiB, len(data)) == data
        c.disconnect()


def test_qemu_io_over_tls(require_srv: Server, pki: Pki) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    opts = f"driver=nbd,host=127.0.0.1,port={require_srv.port},export=zram0,tls-creds=tls0"
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.client}"
    out = run(
        [
            "qemu-io",
            "--object",
            obj,
            "--image-opts",
            opts,
            "-c",
            "write -P 0xa5 1M 2M",
            "-c",
            "read -P 0xa5 1M 2M",
            "-c",
            "read -P 0 0 1M",
        ]
    ).stdout
    assert "wrote 2097152/2097152" in out and "read 2097152/2097152" in out, out
    assert "Pattern verification failed" not in out, out


def test_nbdcopy_round_trip_over_tls(require_srv: Server, pki: Pki, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    payload = os.urandom(4 * MiB) + bytes(4 * MiB) + os.urandom(MiB)
    src.write_bytes(payload)
    uri = nbds(require_srv, pki.client)
    run(["nbdcopy", str(src), uri])
    run(["nbdcopy", uri, str(back)])
    got = back.read_bytes()
    assert got[: len(payload)] == payload
    assert got[len(payload) :] == bytes(64 * MiB - len(payload))


# -- CVE-2021-3716 and injection --------------------------------------------------------------


def test_structured_reply_negotiated_in_plaintext_is_forgotten(on_srv: Server, pki: Pki) -> None:
    """nbdkit CVE-2021-3716: STRUCTURED_REPLY sent in plaintext, then STARTTLS, then GO + READ
    through TLS: the server must answer with a simple reply (structured replies forgotten)."""
    with raw.RawClient(on_srv.addr()) as c:
        c.greeting()
        c.send_option(raw.OPT_STRUCTURED_REPLY)
        assert c.read_option_reply()[:2] == (raw.OPT_STRUCTURED_REPLY, raw.REP_ACK)
        starttls(c, pki)
        c.go("zram0")
        assert not c.tflags & TFLAG_SEND_DF  # DF is only advertised with structured replies
        c.request(raw.CMD_READ, 0, 4096, cookie=77)
        assert c.read_simple_reply(77) == 0  # asserts the simple-reply magic
        assert c.recv_exact(4096) == bytes(4096)
        c.disconnect()


def test_structured_reply_negotiated_inside_tls_is_kept(on_srv: Server, pki: Pki) -> None:
    with raw.RawClient(on_srv.addr()) as c:
        c.greeting()
        starttls(c, pki)
        c.send_option(raw.OPT_STRUCTURED_REPLY)
        assert c.read_option_reply()[:2] == (raw.OPT_STRUCTURED_REPLY, raw.REP_ACK)
        c.go("zram0")
        assert c.tflags & TFLAG_SEND_DF
        c.request(raw.CMD_READ, 0, 4096, cookie=78)
        chunks = c.read_chunks(78)
        assert chunks and chunks[-1][0] & raw.REPLY_FLAG_DONE
        c.disconnect()


def test_plaintext_pipelined_after_starttls_is_refused(on_srv: Server) -> None:
    """Bytes sent behind STARTTLS before the TLS handshake would be injected into the TLS
    session (CVE-2011-0411 style): the server closes instead of processing them."""
    with raw.RawClient(on_srv.addr()) as c:
        c.greeting()
        c.send(
            struct.pack(">QII", raw.IHAVEOPT, OPT_STARTTLS, 0)
            + struct.pack(">QII", raw.IHAVEOPT, raw.OPT_STRUCTURED_REPLY, 0)
        )
        assert c.read_option_reply()[:2] == (OPT_STARTTLS, raw.REP_ACK)
        assert c.wait_closed()
    wait_for_log(on_srv, "after STARTTLS")
    on_srv.assert_alive()


def test_stalled_tls_handshake_is_dropped(on_srv: Server) -> None:
    """STARTTLS acknowledged, then no ClientHello: the handshake timeout (2 s here) applies."""
    with raw.RawClient(on_srv.addr()) as c:
        c.greeting()
        c.send_option(OPT_STARTTLS)
        assert c.read_option_reply()[:2] == (OPT_STARTTLS, raw.REP_ACK)
        assert c.wait_closed(timeout=8.0)
    on_srv.assert_alive()


def test_on_mode_serves_plaintext_and_tls(on_srv: Server, pki: Pki) -> None:
    run(["nbdinfo", f"nbd://127.0.0.1:{on_srv.port}/zram0"])
    out = run(["nbdinfo", "--json", nbds(on_srv, pki.client)]).stdout
    assert '"TLS": true' in out


# -- verify peer ---------------------------------------------------------------------------------


def test_verify_peer_refuses_client_without_certificate(verify_srv: Server, pki: Pki) -> None:
    proc = run(["nbdinfo", nbds(verify_srv, pki.anon)], check=False, timeout=30)
    assert proc.returncode != 0, proc.stdout
    wait_for_log(verify_srv, "TLS handshake failed")
    verify_srv.assert_alive()


def test_verify_peer_refuses_certificate_from_another_ca(verify_srv: Server, pki: Pki) -> None:
    proc = run(["nbdinfo", nbds(verify_srv, pki.rogue)], check=False, timeout=30)
    assert proc.returncode != 0, proc.stdout
    verify_srv.assert_alive()


def test_verify_peer_accepts_ca_signed_client(verify_srv: Server, pki: Pki) -> None:
    out = run(["nbdinfo", "--json", nbds(verify_srv, pki.client)]).stdout
    assert '"TLS": true' in out
    with raw.RawClient(verify_srv.addr()) as c:  # python ssl with the client certificate
        c.greeting()
        starttls(c, pki, with_cert=True)
        c.go("zram0")
        c.disconnect()


def test_verify_peer_raw_client_without_cert_cannot_negotiate(verify_srv: Server, pki: Pki) -> None:
    with raw.RawClient(verify_srv.addr()) as c:
        c.greeting()
        with pytest.raises((ssl.SSLError, raw.PeerClosed, ConnectionError, OSError)):
            starttls(c, pki)
            c.go("zram0")  # TLS 1.3 reports the missing certificate on the first read


# -- configuration errors ------------------------------------------------------------------------


def test_bad_certificates_dir_is_a_start_failure(tmp_path: Path, pki: Pki) -> None:
    from .conftest import zramd_argv

    proc = run(
        zramd_argv()
        + [
            "serve",
            "--port",
            "0",
            "--control",
            "",
            "--export",
            "zram0=4M",
            "--tls",
            "on",
            "--tls-certificates",
            str(pki.anon),
        ],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stderr
    assert "server-cert.pem is missing" in proc.stderr
    proc = run(
        zramd_argv() + ["serve", "--port", "0", "--control", "", "--tls", "require"],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 2 and "needs tls-certificates" in proc.stderr, proc.stderr


# -- stdio ----------------------------------------------------------------------------------------


def test_stdio_socket_mode_over_tls(pki: Pki, tmp_path: Path) -> None:
    """libnbd connect_command hands zramd a socketpair as stdin: STARTTLS works there too."""
    nbd = pytest.importorskip("nbd")
    from .conftest import zramd_argv

    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki.client))
    h.set_export_name("zram0")
    h.connect_command(
        zramd_argv()
        + [
            "serve",
            "--stdio",
            "--control",
            "",
            "--export",
            "zram0=16M",
            "--tls",
            "require",
            "--tls-certificates",
            str(pki.server),
        ]
    )
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == 16 * MiB
        data = os.urandom(64 * 1024)
        h.pwrite(data, 4096)
        assert h.pread(len(data), 4096) == data
    finally:
        h.shutdown()


def test_stdio_pipes_with_tls_is_a_start_failure(pki: Pki) -> None:
    from .conftest import zramd_argv

    proc = run(
        zramd_argv()
        + [
            "serve",
            "--stdio",
            "--control",
            "",
            "--export",
            "zram0=4M",
            "--tls",
            "on",
            "--tls-certificates",
            str(pki.server),
        ],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 1 and "needs stdin to be a socket" in proc.stderr, proc.stderr
