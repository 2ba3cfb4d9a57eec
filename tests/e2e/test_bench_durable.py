"""The durable benchmark end to end on a tiny working set: real servers on files, real fio."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from zramd.bench import durable

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "qemu-nbd")), reason="needs fio and qemu-nbd"
)
SIZE = 16 << 20


@pytest.fixture
def base() -> Iterator[Path]:
    """A short directory (pytest's tmp_path makes the Unix socket paths too long) on a disk."""
    with tempfile.TemporaryDirectory(prefix="zbd-") as d:
        try:
            durable.disk_of(Path(d))
        except ValueError as exc:
            pytest.skip(str(exc))
        yield Path(d)


@pytest.mark.parametrize("name", [durable.ZRAMD, durable.QEMU])
def test_phases_on_files(base: Path, name: str) -> None:
    """Every phase runs; the flush phases send one FLUSH per 32 writes (zramd counts them, each
    a sync of its journal); the server's files are in the given directory and gone after."""
    (spec,) = [s for s in durable.servers(str(base)) if s.name == name]
    block = durable.disk_of(base)["block"]
    srv = spec.start(SIZE)
    try:
        assert srv.workdir.parent == base
        files = durable.data_files(srv)
        assert files and all(f.parent == srv.workdir for f in files)
        res = {r["phase"]: r for r in durable.run_phases(srv, SIZE, 0.5, block)}
    finally:
        rc = srv.stop()
    assert rc == 0 and not srv.workdir.exists()
    assert list(res) == [p.name for p in durable.PHASES]
    assert all(r["iops"] > 0 for r in res.values())
    assert res["seq-write"]["wchar"] > 0
    for phase in ("rand-write-qd1", "rand-write-qd16"):
        r = res[phase]
        assert r["fio_syncs"] > 0 and r["sync_lat_us"].get("p50", 0) > 0
        per_flush = r["fio_writes"] / r["fio_syncs"]
        assert 28 <= per_flush <= 40, (phase, r["fio_writes"], r["fio_syncs"])
        if name == durable.ZRAMD:
            z = r["zramd"]
            assert z["flush_requests"] == z["journal_syncs"] >= r["fio_syncs"]
            assert 28 <= z["write_requests"] / z["flush_requests"] <= 40
