"""Bulk data through real clients: nbdcopy round trips and fio with crc32c verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from .conftest import MiB, Server, run

COPY_BYTES = 64 * MiB
FIO_SIZE = "32M"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def random_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "random.bin"
    with open(path, "wb") as f:
        for _ in range(COPY_BYTES // MiB):
            f.write(os.urandom(MiB))
    return path


@pytest.mark.slow
def test_nbdcopy_round_trip_64mib(
    fresh_server: Server, random_image: Path, transport: bool, tmp_path: Path
) -> None:
    """64 MiB of random data in with nbdcopy, out again, sha256 equal (TCP and Unix socket)."""
    uri = fresh_server.uri("zram0", unix=transport)
    assert fresh_server.size("zram0") >= COPY_BYTES
    run(["nbdcopy", "--flush", str(random_image), uri], timeout=120)
    out = tmp_path / "back.bin"
    # Copy the exact byte range we wrote: the export may be larger than the image.
    run(["nbdcopy", uri, str(out)], timeout=120)
    with open(out, "rb") as f:
        head = f.read(COPY_BYTES)
        rest = f.read()
    assert hashlib.sha256(head).hexdigest() == sha256_file(random_image)
    assert rest == bytes(len(rest)), "bytes past the copied image must still be zero"


@pytest.mark.slow
def test_nbdcopy_multi_connection(
    fresh_server: Server, random_image: Path, tmp_path: Path
) -> None:
    """nbdcopy with 4 connections and many requests in flight, both ways."""
    uri = fresh_server.uri("zram0")
    run(["nbdcopy", "--flush", "--connections=4", "--requests=64", "--request-size=262144",
         str(random_image), uri], timeout=120)
    out = tmp_path / "back.bin"
    run(["nbdcopy", "--connections=4", "--requests=64", uri, str(out)], timeout=120)
    with open(out, "rb") as f:
        assert hashlib.sha256(f.read(COPY_BYTES)).hexdigest() == sha256_file(random_image)


def _fio(uri: str, out: Path, *extra: str) -> list[dict]:
    run([
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        f"--size={FIO_SIZE}", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=json", f"--output={out}",
        *extra,
    ], timeout=180)
    jobs: list[dict] = json.loads(out.read_text())["jobs"]
    return jobs


@pytest.mark.slow
def test_fio_randwrite_verify_crc32c(server: Server, tmp_path: Path, transport: bool) -> None:
    jobs = _fio(server.uri("zram0", unix=transport), tmp_path / "fio.json")
    (job,) = jobs
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB
    assert job["read"]["io_bytes"] == 32 * MiB, "the verify phase must read everything back"


@pytest.mark.slow
def test_fio_two_connections(server: Server, tmp_path: Path) -> None:
    """Two fio jobs, each with its own NBD connection, on disjoint halves of one export."""
    assert server.size("zram0") >= 64 * MiB
    jobs = _fio(server.uri("zram0"), tmp_path / "fio2.json", "--numjobs=2",
                "--offset_increment=32M")
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 32 * MiB
        assert job["read"]["io_bytes"] == 32 * MiB
