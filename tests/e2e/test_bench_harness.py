"""The benchmark harness end to end on tiny sizes: real servers, real fio and nbdcopy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from zramd.bench import density
from zramd.bench.fio import run_sample, workload_by_name
from zramd.bench.servers import COLD, server_by_name

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "nbdkit", "nbdcopy")),
    reason="needs fio, nbdkit and nbdcopy",
)
SIZE = 16 << 20


@pytest.mark.parametrize("server", ["nbdkit-sparse", "zramd-lz4"])
def test_fio_sample(server: str) -> None:
    srv = server_by_name(server).start(SIZE)
    try:
        res = run_sample(srv, workload_by_name("rand-rw7030-qd16"), SIZE, 1.0)
        assert srv.alive()
    finally:
        rc = srv.stop()
    assert rc == 0
    assert res["iops"] > 100 and res["mbps"] > 0.4
    assert res["p99_us"] and res["p99_us"] > 0
    assert res["cpu_s"] > 0
    assert res["prefill"]["mbps"] > 0
    assert not srv.workdir.exists()


def test_density_roundtrip(tmp_path: Path) -> None:
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.write(bytes(1 << 20))
        f.write(os.urandom(1 << 20))
        f.write(b"hello world, " * 80000 + bytes(-(13 * 80000) % 4096))
    sha = density.sha256_file(img)
    res = density.run_density(server_by_name("nbdkit-sparse"), img, sha)
    assert res["sha256_ok"]
    assert res["copy_in_mbps"] > 0 and res["copy_out_mbps"] > 0
    assert res["bytes"] == os.path.getsize(img)


def test_density_cold_stages(tmp_path: Path) -> None:
    """The cold-page runs drive a real zramd through its control socket after the copy-in and
    the copy-out still reads the image back. The image is large enough (20 MiB) that the
    codecs' per-thread state (a few MiB of RSS) stays well inside the bound on RAM per byte."""
    img = tmp_path / "img"
    with open(img, "wb") as f:
        for i in range(1024):
            f.write((f"line {i % 7} of a compressible text page ".encode() * 200)[:16384])
        f.write(os.urandom(4 << 20))
    sha = density.sha256_file(img)
    for spec in COLD:
        res = density.run_density(spec, img, sha)
        assert res["sha256_ok"]
        ((stage, per_byte),) = res["stages"].items()
        assert stage == spec.stages[0][0] and 0 < per_byte < 2


def test_memory_image(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("reading /proc/PID/mem of a child needs root (or ptrace rights)")
    img = density.build_memory_image(tmp_path / "mem.img", 24 << 20, workers=2)
    size = os.path.getsize(img)
    assert size % 4096 == 0 and size >= 8 << 20
    facts = density.ideal_sizes(img)
    assert 0 < facts["ideal_bytes"]["zstd"] < size
