"""nbdinfo (libnbd-bin) against the server: --json, --list, --map, --can, --is."""

from __future__ import annotations

import json

import pytest

from .conftest import MiB, Server, run

# Every capability the server must advertise on a writable export (issue 2).
CAN_FLAGS = [
    "connect",
    "read",
    "write",
    "flush",
    "fua",
    "trim",
    "zero",
    "fast-zero",
    "df",
    "multi-conn",
    "cache",
    "structured-reply",
]


def nbdinfo_json(uri: str, *extra: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", *extra, uri], timeout=30).stdout)


def test_json_describes_export(server: Server, transport: bool) -> None:
    info = nbdinfo_json(server.uri("zram0", unix=transport))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-name"] == "zram0"
    assert exp["export-size"] == server.size("zram0")
    assert exp["is_read_only"] is False
    assert exp["is_rotational"] is False
    for flag in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
                 "can_multi_conn", "can_trim", "can_zero"):
        assert exp[flag] is True, flag
    assert "base:allocation" in exp["contexts"]
    if not server.is_nbdkit:  # nbdkit's memory plugin sends no INFO_BLOCK_SIZE
        assert exp["block_size_minimum"] == 1
        assert exp["block_size_preferred"] == 4096
        assert exp["block_size_maximum"] == 32 * MiB
        assert exp["description"] == "first test export"


def test_json_other_exports_sizes(server: Server) -> None:
    server.require_multi_export()
    for name in ("other", "ro"):
        (exp,) = nbdinfo_json(server.uri(name))["exports"]
        assert exp["export-name"] == name
        assert exp["export-size"] == server.size(name)


def test_list_shows_every_export_with_description(server: Server, transport: bool) -> None:
    server.require_multi_export()
    uri = server.uri("", unix=transport)
    info = nbdinfo_json(uri, "--list")
    got = {e["export-name"]: e for e in info["exports"]}
    assert set(got) == {"zram0", "other", "ro"}
    assert got["zram0"]["description"] == "first test export"
    assert got["other"]["description"] == "second test export"
    assert got["ro"]["description"] == "read-only test export"
    assert got["ro"]["is_read_only"] is True
    assert got["other"]["export-size"] == server.size("other")
    # The human-readable listing too.
    text = run(["nbdinfo", "--list", uri], timeout=30).stdout
    for name in ("zram0", "other", "ro"):
        assert name in text


@pytest.mark.parametrize("flag", CAN_FLAGS)
def test_can_flags(server: Server, flag: str) -> None:
    proc = run(["nbdinfo", "--can", flag, server.uri("zram0")], check=False, timeout=30)
    assert proc.returncode == 0, f"--can {flag}: exit {proc.returncode} {proc.stderr}"


def test_is_read_only(server: Server) -> None:
    server.require_multi_export()
    assert run(["nbdinfo", "--is", "read-only", server.uri("ro")], check=False).returncode == 0
    # ... and a writable export is not.
    assert run(["nbdinfo", "--is", "read-only", server.uri("zram0")], check=False).returncode == 2
    assert run(["nbdinfo", "--can", "write", server.uri("ro")], check=False).returncode == 2


def test_size(server: Server) -> None:
    out = run(["nbdinfo", "--size", server.uri("zram0")]).stdout.strip()
    assert int(out) == server.size("zram0")


def _map(uri: str) -> list[tuple[int, int, int]]:
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri], timeout=30).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in entries]


def _state_at(extents: list[tuple[int, int, int]], offset: int) -> int:
    for off, length, typ in extents:
        if off <= offset < off + length:
            return typ
    raise AssertionError(f"offset {offset} not covered by map {extents}")


def test_map_fresh_writes_zeroes_and_discard(fresh_server: Server) -> None:
    uri = fresh_server.uri("zram0")
    size = fresh_server.size("zram0")
    extents = _map(uri)
    # A fresh export is all hole|zero and the extents cover it exactly.
    assert all(typ == 3 for _, _, typ in extents), extents
    assert extents[0][0] == 0 and sum(length for _, length, _ in extents) == size
    run([
        "qemu-io", "-f", "raw", uri,
        "-c", "write -P 0x5a 1M 1M",          # data
        "-c", "write -P 0x00 4M 1M",          # data that is all zeroes
        "-c", "write -P 0x77 8M 1M",          # data, then discarded
        "-c", "discard 8M 1M",
        "-c", "write -P 0x33 12M 1M",
        "-c", "write -z 12M 1M",              # zeroed by WRITE_ZEROES
    ])
    extents = _map(uri)
    assert _state_at(extents, 0) == 3
    assert _state_at(extents, 1 * MiB) == 0 and _state_at(extents, 2 * MiB - 1) == 0
    assert _state_at(extents, 2 * MiB) == 3
    if not fresh_server.is_nbdkit:
        # zram's same-fill detection: a zero-filled page reads as zero (it may or may not be a
        # hole, but must be "zero").
        assert _state_at(extents, 4 * MiB) & 2 == 2
    assert _state_at(extents, 8 * MiB) == 3, "discarded range must be hole,zero"
    assert _state_at(extents, 12 * MiB) & 2 == 2, "write-zeroed range must read as zero"
    # Text form names the ranges too.
    text = run(["nbdinfo", "--map", uri]).stdout
    assert "hole,zero" in text and "data" in text
