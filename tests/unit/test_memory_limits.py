"""Memory limits that explain themselves (issue 14 item 5): a mem-limit above the export's size
is refused everywhere with one line; the limit in force (the export's own, or the server-wide
budget when that binds) shows in ``list``/``stat``; an ENOSPC names its cause in a rate-limited
warning and in per-cause counters."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_cli import LoopThread, cli
from zramd.allocator import CAUSE_BUDGET, CAUSE_LIMIT, MemoryBudget, Pool, PoolFull
from zramd.config import ConfigError, ExportConfig, parse_export_spec
from zramd.configfile import parse_config_text
from zramd.control.server import ControlServer
from zramd.protocol.events import Request
from zramd.protocol.wire import CMD_WRITE, ENOSPC
from zramd.server.dispatch import OK, Dispatcher, ErrorReply
from zramd.server.exports import ExportRegistry

PAGE = 4096
MIB = 1 << 20
TOO_BIG = (
    "export 'a': mem-limit 2G is larger than the export (1G); "
    "a limit binds only below the size (0 = none)"
)


def test_mem_limit_above_the_size_is_refused_in_the_flag_spec_and_the_toml() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_export_spec("a=1G,mem-limit=2G")
    assert str(ei.value) == TOO_BIG
    assert parse_export_spec("a=1G,mem-limit=1G").mem_limit == 1 << 30  # equal is fine
    with pytest.raises(ConfigError) as ei:
        parse_config_text('[export.a]\nsize = "1G"\nmem-limit = "2G"\n', "z.toml", ram=8192)
    assert TOO_BIG in str(ei.value) and "\n" not in str(ei.value)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[LoopThread, str]]:
    path = str(tmp_path / "c.sock")
    lt = LoopThread(path)
    yield lt, path
    lt.stop()


def test_mem_limit_above_the_size_is_refused_by_create_and_set(
    daemon: tuple[LoopThread, str],
) -> None:
    lt, path = daemon
    c = ("--control", path)
    r = cli("create", "a", "--size", "1G", "--mem-limit", "2G", *c)
    assert (r.exit_code, r.stderr) == (1, f"zramd: error: {TOO_BIG}\n")
    assert lt.registry.get("a") is None
    assert cli("create", "a", "--size", "1G", "--mem-limit", "512M", *c).exit_code == 0
    r = cli("set", "a", "--mem-limit", "2G", *c)
    assert (r.exit_code, r.stderr) == (1, f"zramd: error: {TOO_BIG}\n")
    assert lt.registry.get("a").device.mem_limit == 512 * MIB  # unchanged


def test_pool_full_names_its_cause() -> None:
    budget = MemoryBudget(64 * 1024)
    with Pool(budget=budget) as p, Pool(limit=64 * 1024) as q:
        for pool, cause in ((p, CAUSE_BUDGET), (q, CAUSE_LIMIT)):
            with pytest.raises(PoolFull) as ei:
                for _ in range(1000):
                    pool.store(random.randbytes(PAGE))
            assert ei.value.cause == cause
        assert budget.refusals == 1
        assert ei.value.budget is None


def w(offset: int, length: int = PAGE) -> Request:
    """A write of incompressible bytes (stored as huge pages: 4 KiB of pool each)."""
    return Request(CMD_WRITE, 0, 1, offset, length, random.Random(offset).randbytes(length))


async def test_budget_enospc_is_visible(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = MemoryBudget(MIB)
    reg = ExportRegistry(budget=budget)
    try:
        exp = reg.add(ExportConfig("swap", 8 * MIB))
        reg.add(ExportConfig("own", 8 * MIB, mem_limit=4 * MIB))
        srv = ControlServer(reg, str(tmp_path / "c.sock"))
        rows = {r["name"]: r for r in await srv.handle({"op": "list"})}
        # nothing held yet: the budget binds the export without a limit, not the one above it
        assert (rows["swap"]["mem_limit"], rows["swap"]["limited_by"]) == (MIB, "budget")
        assert (rows["own"]["mem_limit"], rows["own"]["limited_by"]) == (MIB, "budget")
        d = Dispatcher(exp, structured=False, max_payload=8 * MIB)
        caplog.set_level(logging.WARNING, logger="zramd.server")
        replies = []
        for i in range(2 * MIB // PAGE):
            reply = d.run_now(w(i * PAGE)) or await d.execute(w(i * PAGE))
            replies.append(reply)
        refused = [r for r in replies if isinstance(r, ErrorReply)]
        assert replies[0] is OK and refused and all(r.errno == ENOSPC for r in refused)
        lines = [r.getMessage() for r in caplog.records if "ENOSPC" in r.getMessage()]
        assert len(lines) == 1  # rate-limited: one line for hundreds of refusals
        assert lines[0].startswith(
            "export swap: write refused with ENOSPC: the server's memory budget 1M is reached ("
        )
        assert lines[0].endswith("its own mem-limit: none)")
        st = await srv.handle({"op": "stat", "name": "swap"})
        m = st["memory"]
        assert m["limited_by"] == "budget" and m["mem_limit"] == 0
        assert m["budget_limit"] == MIB and 0 < m["budget_used"] <= MIB
        assert m["effective_mem_limit"] == st["mm_stat"]["mem_used_total"] + MIB - budget.used
        assert m["enospc"] == {"limit": 0, "budget": len(refused), "system": 0}
        assert st["io_stat"]["failed_writes"] == len(refused)
        row = (await srv.handle({"op": "list"}))[0]
        assert row["mem_limit"] == m["effective_mem_limit"] > 0
    finally:
        reg.close()


async def test_own_limit_enospc_names_the_export_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = ExportRegistry(budget=MemoryBudget(64 * MIB))
    try:
        exp = reg.add(ExportConfig("small", 8 * MIB, mem_limit=256 * 1024))
        d = Dispatcher(exp, structured=False, max_payload=8 * MIB)
        caplog.set_level(logging.WARNING, logger="zramd.server")
        for i in range(MIB // PAGE):
            d.run_now(w(i * PAGE)) or await d.execute(w(i * PAGE))
        lines = [r.getMessage() for r in caplog.records if "ENOSPC" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].startswith(
            "export small: write refused with ENOSPC: its mem-limit 256K is reached (it holds "
        )
        srv = ControlServer(reg, "/nonexistent/c.sock")
        st = await srv.handle({"op": "stat", "name": "small"})
        assert st["memory"]["limited_by"] == "export"
        assert st["memory"]["effective_mem_limit"] == 256 * 1024
        assert st["memory"]["enospc"]["limit"] > 0 and st["memory"]["enospc"]["budget"] == 0
    finally:
        reg.close()


def test_cli_shows_the_budget(daemon: tuple[LoopThread, str]) -> None:
    lt, path = daemon
    c = ("--control", path)
    lt.registry.budget = MemoryBudget(64 * MIB)
    assert cli("create", "z", "--size", "1G", *c).exit_code == 0
    r = cli("list", "-o", "name,mem-limit,limit-by", *c)
    assert r.stdout.splitlines()[1].split() == ["z", "64M", "budget"]
    r = cli("set", "z", "--mem-limit", "128M", *c)
    assert r.stdout == "z: algorithm lz4, mem-limit 64M (the server's budget binds)\n"
    r = cli("stat", "z", *c)
    assert (
        "memory: limit in force 67108864 (the server's budget), own mem-limit 134217728, "
        "server budget 67108864 (0 used)"
    ) in r.stdout.splitlines()
    (row,) = json.loads(cli("list", "--json", *c).stdout)["exports"]
    assert row["mem_limit"] == 64 * MIB
