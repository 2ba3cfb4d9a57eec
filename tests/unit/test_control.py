"""Control socket: real ControlServer on a tmp Unix socket, real registry and devices."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from zramd.config import ExportConfig, merge_exports
from zramd.control.client import ControlClient, socket_is_live
from zramd.control.daemon import Operator
from zramd.control.protocol import ControlError
from zramd.control.reload import apply_exports
from zramd.control.server import ControlServer, ControlSocketBusy
from zramd.device.table import ENTRY_BYTES
from zramd.server.exports import ExportRegistry

MIB = 1 << 20


class FakeSession:
    def __init__(self) -> None:
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


def sock_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be long
    p = tmp_path / "c.sock"
    if len(str(p)) > 100:
        pytest.skip("tmp path too long for a Unix socket")
    return str(p)


async def call(path: str, op: str, **args: Any) -> Any:
    def _do() -> Any:
        with ControlClient(path, timeout=10) as c:
            return c.call(op, **args)

    return await asyncio.to_thread(_do)


@pytest.fixture
def registry() -> Any:
    reg = ExportRegistry()
    yield reg
    reg.close()


async def test_roundtrip_create_list_stat_destroy(tmp_path: Path, registry: Any) -> None:
    path = sock_path(tmp_path)
    srv = ControlServer(registry, path)
    await srv.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (await call(path, "ping"))["pid"] == os.getpid()
        row = await call(
            path, "create", name="a", size="16M", algorithm="zstd", level=3, mem_limit="8M",
            description="d",
        )
        assert row["name"] == "a" and row["disksize"] == 16 * MIB
        assert row["algorithm"] == "zstd" and row["mem_limit"] == 8 * MIB
        assert row["clients"] == 0 and row["data"] == 0
        exp = registry.get("a")
        text = b"".join(b"line %06d of some compressible text\n" % i for i in range(500))
        await exp.device.write(0, text[: 4096 * 4] + bytes(4096 * 2))
        rows = await call(path, "list")
        assert [r["name"] for r in rows] == ["a"]
        r = rows[0]
        assert r["data"] == 6 * 4096  # zero pages count as stored data, as in zram
        assert r["zero_pages"] >= 2
        assert 0 < r["compr"] < 4 * 4096
        assert r["total"] > 0 and r["mem_used"] >= r["total"]
        assert r["comp_ratio"] == round(r["data"] / r["total"], 2)
        s = await call(path, "stat", name="a")
        assert s["mm_stat"]["orig_data_size"] == 6 * 4096
        assert list(s["mm_stat"]) == [
            "orig_data_size", "compr_data_size", "mem_used_total", "mem_limit", "mem_used_max",
            "same_pages", "pages_compacted", "huge_pages", "huge_pages_since",
        ]
        assert set(s["io_stat"]) == {"failed_reads", "failed_writes", "invalid_io", "notify_free"}
        res = await call(path, "compact")
        assert res == [{"name": "a", "pages_compacted": res[0]["pages_compacted"]}]
        out = await call(path, "set", name="a", mem_limit="4M", algorithm="lz4")
        assert out["mem_limit"] == 4 * MIB and out["algorithm"] == "lz4"
        assert exp.device.mem_limit == 4 * MIB
        out = await call(path, "reset", name="a")
        assert out["data"] == 0
        assert await exp.device.read(0, 4096) == bytes(4096)
        assert (await call(path, "destroy", name="a")) == {"name": "a"}
        assert await call(path, "list") == []
    finally:
        await srv.close()
    assert not os.path.exists(path)


async def test_errors_are_one_line(tmp_path: Path, registry: Any) -> None:
    path = sock_path(tmp_path)
    srv = ControlServer(registry, path)
    await srv.start()
    try:
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("stat", {"name": "nope"}, "no export named 'nope'"),
            ("create", {"name": "x"}, "missing argument 'size'"),
            ("create", {"name": "x", "size": "12Q"}, "bad size '12Q'"),
            ("create", {"name": "x", "size": "1M", "algorithm": "nosuch"}, "nosuch"),
            ("create", {"name": "x", "size": 1000}, "multiple of 4096"),
            ("frobnicate", {}, "unknown operation 'frobnicate'"),
            ("set", {"name": "b"}, "nothing to set"),
            ("reload", {}, "no configuration file"),
        ]
        await call(path, "create", name="b", size="1M")
        with pytest.raises(ControlError, match="already exists"):
            await call(path, "create", name="b", size="1M")
        for op, args, msg in cases:
            with pytest.raises(ControlError, match=msg) as ei:
                await call(path, op, **args)
            assert "\n" not in str(ei.value)
    finally:
        await srv.close()


async def test_busy_export_refuses_destroy_and_reset(tmp_path: Path, registry: Any) -> None:
    path = sock_path(tmp_path)
    srv = ControlServer(registry, path)
    await srv.start()
    try:
        await call(path, "create", name="b", size="1M")
        sess = FakeSession()
        registry.get("b").sessions.add(sess)
        assert (await call(path, "list"))[0]["clients"] == 1
        with pytest.raises(ControlError, match="1 client\\(s\\) connected.*--force"):
            await call(path, "destroy", name="b")
        with pytest.raises(ControlError, match="cannot reset a device in use"):
            await call(path, "reset", name="b")
        assert await call(path, "destroy", name="b", force=True) == {"name": "b"}
        assert sess.closed is not None
    finally:
        await srv.close()


async def test_second_server_refused_and_stale_socket_replaced(
    tmp_path: Path, registry: Any
) -> None:
    path = sock_path(tmp_path)
    srv = ControlServer(registry, path)
    await srv.start()
    try:
        assert socket_is_live(path)
        with pytest.raises(ControlSocketBusy, match=f"already running on control socket {path}"):
            await ControlServer(registry, path).start()
        assert socket_is_live(path)  # the first one is untouched
    finally:
        await srv.close()
    # a stale socket file (nobody listening) is replaced
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    assert os.path.exists(path) and not socket_is_live(path)
    srv2 = ControlServer(registry, path)
    await srv2.start()
    assert socket_is_live(path)
    await srv2.close()
    # a regular file in the way is an error, not deleted
    Path(path).write_text("x")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await ControlServer(registry, path).start()
    assert Path(path).read_text() == "x"


async def test_long_and_malformed_lines(tmp_path: Path, registry: Any) -> None:
    path = sock_path(tmp_path)
    srv = ControlServer(registry, path)
    await srv.start()
    try:
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"not json\n[1]\n{\"op\": \"ping\"}\n")
        await w.drain()
        a1, a2, a3 = (await r.readline(), await r.readline(), await r.readline())
        assert b"malformed" in a1 and b"not a JSON object" in a2 and b'"ok":true' in a3
        w.write(b"{" + b" " * (2 << 20))
        try:
            await w.drain()
            ans = await asyncio.wait_for(r.readline(), 10)
        except ConnectionResetError:  # the server may close before we finished sending
            ans = r._buffer  # type: ignore[attr-defined]
            ans = bytes(ans)
        assert b"longer than" in ans
        w.close()
    finally:
        await srv.close()


def test_client_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot reach zramd at .*no such socket.*--control"):
        ControlClient(str(tmp_path / "none.sock")).call("list")


async def test_reload_apply(registry: Any) -> None:
    a = ExportConfig(name="a", size=MIB)
    registry.add(ExportConfig(name="a", size=MIB))
    registry.add(ExportConfig(name="b", size=MIB))
    registry.add(ExportConfig(name="manual", size=MIB))  # created over the control socket
    managed = {"a", "b"}
    registry.get("b").sessions.add(FakeSession())
    c = ExportConfig(name="c", size=2 * MIB)
    a2 = ExportConfig(name="a", size=2 * MIB, mem_limit=MIB, algorithm="zstd")
    managed, lines = apply_exports(registry, [a2, c], managed)
    text = "\n".join(lines)
    assert "export c 2M lz4 added" in text
    assert "export b removed from the configuration but kept: 1 client(s)" in text
    assert "a: mem-limit set to" in text and "compressed with zstd" in text
    assert "a: size changed" in text
    assert {e.name for e in registry} == {"a", "b", "c", "manual"}
    assert managed == {"a", "b", "c"}
    assert registry.get("a").device.size == MIB  # data kept, not replaced
    assert registry.get("a").device.mem_limit == MIB
    registry.get("b").sessions.clear()
    managed, lines = apply_exports(registry, [a, c], managed)
    assert "export b removed" in lines
    assert {e.name for e in registry} == {"a", "c", "manual"}


def test_merge_exports() -> None:
    f = [ExportConfig(name="a", size=MIB), ExportConfig(name="b", size=MIB)]
    g = [ExportConfig(name="b", size=2 * MIB)]
    m = merge_exports(f, g)
    assert [(e.name, e.size) for e in m] == [("a", MIB), ("b", 2 * MIB)]


async def test_operator_reload_via_control(tmp_path: Path, registry: Any) -> None:
    cfg = tmp_path / "z.toml"
    cfg.write_text('[export.one]\nsize = "1M"\n')
    registry.add(ExportConfig(name="one", size=MIB))
    path = sock_path(tmp_path)
    op = Operator(registry, control_path=path, config_path=str(cfg))
    await op.start()
    try:
        cfg.write_text('[export.one]\nsize = "1M"\n[export.two]\nsize = "2M"\n')
        lines = await call(path, "reload")
        assert any("two 2M lz4 added" in x for x in lines)
        cfg.write_text("[export.two]\nsize = 'bad expr +'\n")
        answer = await op.control.handle_line(b'{"op": "reload"}\n')  # type: ignore[union-attr]
        assert answer["ok"] is False and "result" not in answer
        assert answer["error"].startswith("reload failed, configuration unchanged:")
        assert f"{cfg}: export.two: size" in answer["error"]
        with pytest.raises(ControlError, match="^reload failed, configuration unchanged: "):
            await call(path, "reload")
        assert [e.name for e in registry] == ["one", "two"]
        cfg.write_text('[export.two]\nsize = "2M"\n')
        os.kill(os.getpid(), __import__("signal").SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "one" not in registry:
                break
        assert [e.name for e in registry] == ["two"]
    finally:
        await op.close()


async def test_hooks_optional_control_socket(tmp_path: Path, registry: Any) -> None:
    """The default control socket is optional: busy -> warn and serve without it; an explicit
    one is required: busy -> start fails."""
    from zramd.control.daemon import OperatorHooks

    class FakeServer:
        def __init__(self, reg: Any) -> None:
            self.registry = reg

    path = sock_path(tmp_path)
    first = ControlServer(registry, path)
    await first.start()
    try:
        import logging

        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger("zramd.control")
        logger.addHandler(handler)
        try:
            optional = OperatorHooks(control_path=path, control_required=False)
            await optional.start(FakeServer(registry))
        finally:
            logger.removeHandler(handler)
        assert any("running without a control socket" in r for r in records), records
        assert optional.operator is not None and optional.operator.control is None
        await optional.close()
        assert socket_is_live(path)  # the other daemon's socket is untouched
        required = OperatorHooks(control_path=path, control_required=True)
        with pytest.raises(ControlSocketBusy):
            await required.start(FakeServer(registry))
        await required.close()
        assert socket_is_live(path)
    finally:
        await first.close()


async def test_export_too_large_to_reserve_is_one_line(tmp_path: Path, registry: Any) -> None:
    """An export whose page table cannot be mapped is refused with what could not be reserved;
    the daemon keeps serving. 1024P: the table (2^48 pages) is beyond any address space."""
    path = sock_path(tmp_path)
    server = ControlServer(registry, path)
    await server.start()
    try:
        with pytest.raises(ControlError) as info:
            await call(path, "create", name="huge", size="1024P")
        msg = str(info.value)
        assert msg.startswith("export 'huge' (1E): cannot reserve its page table of ")
        assert f"of {(1 << 48) * ENTRY_BYTES} bytes: Cannot allocate memory" in msg
        assert "\n" not in msg and "internal error" not in msg
        assert "huge" not in registry
        await call(path, "create", name="ok", size="1M")
        assert [r["name"] for r in await call(path, "list")] == ["ok"]
    finally:
        await server.close()


async def test_reload_names_each_key_that_needs_a_restart(
    tmp_path: Path, registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from zramd.configfile import load_file

    cfg = tmp_path / "z.toml"
    cfg.write_text('port = 10809\nmax-connections = 5\n[export.one]\nsize = "1M"\n')
    registry.add(ExportConfig(name="one", size=MIB))
    op = Operator(registry, config_path=str(cfg), started=load_file(cfg))
    cfg.write_text(
        'port = 10900\nmax-connections = 5\ntls = "on"\ntls-certificates = "/x"\n'
        '[export.one]\nsize = "1M"\n[export.two]\nsize = "1M"\n'
    )
    with caplog.at_level("WARNING", logger="zramd.control"):
        lines = await op.reload()
    restart = ["port: needs a restart", "tls: needs a restart", "tls-certificates: needs a restart"]
    assert [x for x in lines if "restart" in x] == restart
    assert any("two 1M lz4 added" in x for x in lines)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == restart
    cfg.write_text('port = 10809\nmax-connections = 5\n[export.one]\nsize = "1M"\n')
    assert not [x for x in await op.reload() if "restart" in x]  # back as started


async def test_stopping_report(registry: Any) -> None:
    from zramd.control.daemon import stopping_report

    registry.add(ExportConfig(name="idle", size=MIB))
    registry.add(ExportConfig(name="busy", size=MIB))
    registry.add(ExportConfig(name="data", size=MIB))
    await registry.get("data").device.write(0, b"x" * 8192)
    s = FakeSession()
    s.label = "#3 127.0.0.1:40000"  # type: ignore[attr-defined]
    registry.get("busy").sessions.add(s)
    assert stopping_report(registry) == [
        "stopping: export busy loses 0B of data (0 bytes stored); clients: #3 127.0.0.1:40000",
        "stopping: export data loses 8K of data (8192 bytes stored); clients: none",
    ]
