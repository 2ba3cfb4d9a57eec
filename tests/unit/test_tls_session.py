"""STARTTLS and the allow-list in the asyncio shell, in process (stdlib event loop; the e2e tests
run the same paths under uvloop): TLS round trip, verify-peer refusal without leaking the session,
the handshake timeout covering a stalled TLS handshake, allow-list refusal at accept, config and
flag handling, and the SSLContext policy."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import ssl
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.devices import PlainDevice
from zramd.config import (
    ConfigError,
    ExportConfig,
    FileConfig,
    ServeFlags,
    ServerConfig,
    parse_network,
    serve_config,
)
from zramd.configfile import ConfigFileError, parse_config_text
from zramd.server.access import AllowList
from zramd.server.exports import ExportRegistry
from zramd.server.listener import Server
from zramd.server.tls import MIN_TLS_VERSION, server_context

_spec = importlib.util.spec_from_file_location(
    "zramd_test_tls_certs", Path(__file__).resolve().parents[1] / "e2e" / "tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
tls_certs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tls_certs
_spec.loader.exec_module(tls_certs)

SIZE = 16 << 20
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_STARTTLS, OPT_GO = 5, 7
REP_ACK = 1
REQ = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
READ, WRITE, DISC = 0, 1, 2


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tls_certs.make_pki(tmp_path_factory.mktemp("pki"))


async def start(tmp: Path, **cfg_kw: Any) -> Server:
    reg = ExportRegistry()
    reg.add(ExportConfig("t", SIZE), device=PlainDevice(SIZE))
    cfg = ServerConfig(
        bind="127.0.0.1",
        port=0,
        unix=str(tmp / "s.sock"),
        exports=[ExportConfig("t", SIZE)],
        **cfg_kw,
    )
    cfg.validate()
    srv = Server(cfg, registry=reg)
    await srv.start()
    return srv


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        await s.shutdown()


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


async def read_reply(r: asyncio.StreamReader) -> tuple[int, int, bytes]:
    magic, opt, typ, n = struct.unpack(">QIII", await r.readexactly(20))
    assert magic == OPT_REPLY_MAGIC
    return opt, typ, await r.readexactly(n)


async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readexactly(18)
    w.write(struct.pack(">I", 3))


async def go(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(option(OPT_GO, struct.pack(">I", 1) + b"t" + struct.pack(">H", 0)))
    while True:
        _, typ, _ = await read_reply(r)
        assert typ < 1 << 31, hex(typ)
        if typ == REP_ACK:
            return


def client_ctx(pki: Any, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    if cert:
        ctx.load_cert_chain(str(pki.client / "client-cert.pem"), str(pki.client / "client-key.pem"))
    return ctx


async def starttls(r: asyncio.StreamReader, w: asyncio.StreamWriter, ctx: ssl.SSLContext) -> None:
    w.write(option(OPT_STARTTLS))
    assert (await read_reply(r))[:2] == (OPT_STARTTLS, REP_ACK)
    await w.start_tls(ctx, server_hostname="localhost")


async def test_tls_round_trip_stdlib_loop(servers: list[Server], pki: Any, tmp_path: Path) -> None:
    srv = await start(tmp_path, tls="require", tls_certificates=str(pki.server))
    servers.append(srv)
    assert srv.tcp_port
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    await greet(r, w)
    await starttls(r, w, client_ctx(pki))
    await go(r, w)
    data = os.urandom(1 << 20)
    w.write(REQ.pack(0x25609513, 0, WRITE, 1, 4096, len(data)) + data)
    w.write(REQ.pack(0x25609513, 0, READ, 2, 4096, len(data)))
    assert SIMPLE.unpack(await r.readexactly(16))[1:] == (0, 1)
    assert SIMPLE.unpack(await r.readexactly(16))[1:] == (0, 2)
    assert await r.readexactly(len(data)) == data
    sslobj = w.get_extra_info("ssl_object")
    assert sslobj is not None and sslobj.version() in ("TLSv1.2", "TLSv1.3")
    w.write(REQ.pack(0x25609513, 0, DISC, 3, 0, 0))
    await r.read()  # server closes
    w.close()
    await asyncio.sleep(0.05)
    assert not srv.ctx.sessions


async def test_verify_peer_failure_closes_without_leaking(
    servers: list[Server], pki: Any, tmp_path: Path
) -> None:
    srv = await start(
        tmp_path, tls="require", tls_certificates=str(pki.server), tls_verify_peer=True
    )
    servers.append(srv)
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    await greet(r, w)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await starttls(r, w, client_ctx(pki))
        await go(r, w)  # TLS 1.3: the refusal arrives with the first read
    w.close()
    for _ in range(100):
        if not srv.ctx.sessions:
            break
        await asyncio.sleep(0.02)
    assert not srv.ctx.sessions
    # with the CA-signed client certificate it works
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    await greet(r, w)
    await starttls(r, w, client_ctx(pki, cert=True))
    await go(r, w)
    w.close()


async def test_stalled_tls_handshake_hits_the_handshake_timeout(
    servers: list[Server], pki: Any, tmp_path: Path
) -> None:
    srv = await start(tmp_path, tls="on", tls_certificates=str(pki.server), handshake_timeout=0.3)
    servers.append(srv)
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    await greet(r, w)
    w.write(option(OPT_STARTTLS))
    assert (await read_reply(r))[:2] == (OPT_STARTTLS, REP_ACK)
    # never send a ClientHello: the server must drop us
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    await asyncio.sleep(0.05)
    assert not srv.ctx.sessions


async def test_allow_list_refuses_tcp_but_not_unix(servers: list[Server], tmp_path: Path) -> None:
    srv = await start(tmp_path, allow=["10.0.0.0/8"])
    servers.append(srv)
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed before the greeting
    w.close()
    assert srv.admission.refused == 1
    r, w = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
    await greet(r, w)
    await go(r, w)
    w.close()
    (tmp_path / "b").mkdir()
    srv2 = await start(tmp_path / "b", allow=["127.0.0.1/32", "::1"])
    servers.append(srv2)
    r, w = await asyncio.open_connection("127.0.0.1", srv2.tcp_port)
    await greet(r, w)
    await go(r, w)
    w.close()
    assert srv2.admission.refused == 0


def test_allow_list_matching() -> None:
    a = AllowList(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    assert a.allows(("10.1.2.3", 5)) and a.allows(("127.0.0.1", 1))
    assert not a.allows(("127.0.0.2", 1)) and not a.allows(("192.168.0.1", 1))
    assert a.allows(("::ffff:10.9.9.9", 1, 0, 0))  # IPv4-mapped on a dual-stack socket
    assert a.allows(("fd12::1", 1, 0, 0)) and not a.allows(("::1", 1, 0, 0))
    assert a.allows("") and a.allows("/run/x.sock") and a.allows("stdio")  # local peers
    assert AllowList().allows(("8.8.8.8", 1)) and not AllowList()
    with pytest.raises(ConfigError):
        parse_network("10.0.0.0/33")
    with pytest.raises(ConfigError):
        AllowList(["localhost"])


def test_server_context_policy(pki: Any, tmp_path: Path) -> None:
    ctx = server_context(str(pki.server))
    assert ctx.minimum_version == MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert server_context(str(pki.server), verify_peer=True).verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="server-cert.pem is missing"):
        server_context(str(pki.anon))
    with pytest.raises(ConfigError, match="not a directory"):
        server_context(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "server-cert.pem").write_text("junk")
    (bad / "server-key.pem").write_text("junk")
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(str(bad))


def test_config_validation_and_flags() -> None:
    cfg = ServerConfig(exports=[ExportConfig("t", SIZE)])
    cfg.validate()
    assert cfg.tls == "off" and cfg.allow == [] and cfg.bind == "127.0.0.1"
    with pytest.raises(ConfigError, match="needs tls-certificates"):
        serve_config(ServeFlags(tls="require"), FileConfig("<test>", cfg))
    cfg = serve_config(
        ServeFlags(tls="on", tls_certificates="/x", tls_verify_peer=True, allow=["::1"]),
        FileConfig("<test>", cfg),
    ).server
    assert (cfg.tls, cfg.tls_certificates, cfg.tls_verify_peer, cfg.allow) == (
        "on",
        "/x",
        True,
        ["::1"],
    )
    cfg2 = ServerConfig(exports=[ExportConfig("t", SIZE)], tls="maybe")
    with pytest.raises(ConfigError, match="bad tls mode"):
        cfg2.validate()
    cfg3 = ServerConfig(exports=[ExportConfig("t", SIZE)], tls_verify_peer=True)
    with pytest.raises(ConfigError, match="verify-peer needs"):
        cfg3.validate()


def test_config_file_keys() -> None:
    text = (
        'tls = "require"\ntls-certificates = "/etc/zramd/tls"\ntls-verify-peer = true\n'
        'allow = ["127.0.0.1/32", "10.0.0.0/8"]\n[export.a]\nsize = "4M"\n'
    )
    s = parse_config_text(text).server
    assert (s.tls, s.tls_certificates, s.tls_verify_peer) == ("require", "/etc/zramd/tls", True)
    assert s.allow == ["127.0.0.1/32", "10.0.0.0/8"]
    for bad, key in (
        ('tls = "maybe"', "tls"),
        ('allow = ["x"]', "allow"),
        ("allow = 3", "allow"),
        ('tls-verify-peer = "yes"', "tls-verify-peer"),
    ):
        with pytest.raises(ConfigFileError, match=key):
            parse_config_text(bad + '\n[export.a]\nsize = "4M"\n')
