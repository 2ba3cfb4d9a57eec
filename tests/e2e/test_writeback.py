"""Writeback end to end: a real `zramd serve` with a backing file under a memory limit, real
clients (nbdcopy, fio, python3-libnbd) and the real CLI (writeback, set --writeback-limit,
stat, list --json) and metrics. An image twice the memory limit goes in and comes back with the
same sha256 when the export has a backing file, and fails with ENOSPC without one; grouped pages
go to the store whole and come back the same; fio's crc32c verification holds across writeback;
the pressure writeback's settings show in stat and list --json. Every process started here is
stopped here."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_operator import Daemon, MiB, free_port

nbd = pytest.importorskip("nbd")

LIMIT = 8 * MiB
#: 16 MiB of pages that compress about 2:1 (half random, half a repeated pattern): twice the
#: memory limit once compressed
IMAGE = 32 * MiB


def half_random_image(path: Path, n: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(
        rnd.randbytes(2048) + (rnd.randbytes(16) * 128) for _ in range(n // 4096)
    )
    path.write_bytes(data)
    return data


def stat(d: Daemon, name: str = "w") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(d.cli("stat", name, "--json").stdout)
    return out


def _daemon(tmp_path: Path, backing: bool, *extra: str) -> Daemon:
    spec = f"w=64M,mem-limit={LIMIT // MiB}M"
    if backing:
        spec += f",backing={tmp_path / 'backing'}"
    d = Daemon(tmp_path, ["--export", spec, *extra])
    d.wait_ready()
    return d


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy")
def test_nbdcopy_twice_the_limit_in_and_out(tmp_path: Path) -> None:
    d = _daemon(tmp_path, True)
    try:
        image = tmp_path / "image"
        data = half_random_image(image, IMAGE)
        url = f"nbd+unix:///w?socket={d.sock}"
        subprocess.run(["nbdcopy", str(image), url], check=True, timeout=180)
        st = stat(d)
        b = st["backing"]
        assert b["bd_count"] > 0 and b["bd_writes"] >= b["bd_count"]
        assert st["mm_stat"]["mem_used_max"] <= LIMIT
        assert st["mm_stat"]["compr_data_size"] + b["store"]["live_bytes"] > 2 * LIMIT
        back = tmp_path / "back"
        subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=180)
        assert _sha(back.read_bytes()[:IMAGE]) == _sha(data)
        b = stat(d)["backing"]
        assert b["bd_reads"] > 0 and b["bd_errors"] == 0
        row = json.loads(d.cli("list", "--json").stdout)["exports"][0]
        assert row["backing"]["bd_count"] == b["bd_count"]
        text = d.cli("stat", "w").stdout
        assert f"backing: {tmp_path / 'backing'}, writeback-limit none" in text
        assert "bd_stat: " in text
        assert "pressure writeback from 90% down to 80% of the limit in force; a write waits " \
            "up to 2s for room" in text
    finally:
        d.stop()


def test_writeback_settings_in_stat_and_list(tmp_path: Path) -> None:
    d = _daemon(tmp_path, False, "--export", f"s=64M,mem-limit=8M,backing={tmp_path / 'b'},"
                "writeback-high=70%,writeback-low=0.5,writeback-wait=500")
    try:
        want = {"writeback_high": 0.7, "writeback_low": 0.5, "writeback_wait": 500.0}
        b = stat(d, "s")["backing"]
        assert {k: b[k] for k in want} == want
        assert {k: stat(d)["backing"][k] for k in want} == dict.fromkeys(want)
        rows = {r["name"]: r for r in json.loads(d.cli("list", "--json").stdout)["exports"]}
        assert {k: rows["s"]["backing"][k] for k in want} == want
        assert "pressure writeback from 70% down to 50% of the limit in force; a write waits " \
            "up to 500s for room" in d.cli("stat", "s").stdout
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy")
def test_grouped_pages_go_to_the_store_and_come_back(tmp_path: Path) -> None:
    """nbdcopy in, every page idle and packed into groups, `zramd writeback --type idle`: the
    groups go whole (none left, every grouped page in the store), nbdcopy out is the same."""
    d = _daemon(tmp_path, True)
    try:
        image = tmp_path / "image"
        data = half_random_image(image, 8 * MiB)
        url = f"nbd+unix:///w?socket={d.sock}"
        subprocess.run(["nbdcopy", str(image), url], check=True, timeout=180)
        d.cli("idle", "w", "--all")
        d.cli("recompress", "w", "--group-pages", "16")
        grouped = stat(d)["tiers"]["grouped_pages"]
        assert grouped > 1000
        out = d.cli("writeback", "w", "--type", "idle").stdout
        assert out.startswith("w: 2048 pages tried, 2048 written back"), out
        st = stat(d)
        assert st["tiers"]["groups"] == 0 and st["tiers"]["grouped_pages"] == 0
        assert st["backing"]["bd_count"] == 2048 and st["backing"]["bd_errors"] == 0
        back = tmp_path / "back"
        subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=180)
        assert _sha(back.read_bytes()[: len(data)]) == _sha(data)
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy")
def test_without_backing_file_nbdcopy_gets_enospc(tmp_path: Path) -> None:
    d = _daemon(tmp_path, False)
    try:
        image = tmp_path / "image"
        half_random_image(image, IMAGE)
        url = f"nbd+unix:///w?socket={d.sock}"
        r = subprocess.run(["nbdcopy", str(image), url], capture_output=True, timeout=180)
        assert r.returncode != 0
        assert b"No space left on device" in r.stderr or b"ENOSPC" in r.stderr, r.stderr
        assert stat(d)["memory"]["enospc"]["limit"] > 0
    finally:
        d.stop()


def test_writeback_command_limit_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    d = _daemon(tmp_path, True, "--metrics", f"127.0.0.1:{port}")
    try:
        h = d.client("w")
        pages = [random.Random(i).randbytes(1024) * 4 for i in range(256)]  # 4 KiB, compressible
        huge = random.Random(99).randbytes(64 * 4096)
        h.pwrite(b"".join(pages), 0)
        h.pwrite(huge, 1 * MiB)
        h.flush()
        r = d.cli("writeback", "w", "--type", "idle", check=False)
        assert r.returncode == 0 and r.stdout.startswith("w: 0 pages tried")
        out = d.cli("writeback", "w", "--type", "huge").stdout
        assert out.startswith("w: 64 pages tried, 64 written back, 262144 bytes")
        d.cli("idle", "w", "--all")
        d.cli("set", "w", "--writeback-limit", "100K")
        r = d.cli("writeback", "w", "--type", "idle", "--pages", "0-99", check=False)
        assert r.returncode == 1 and "writeback limit is spent" in r.stderr
        written = int(r.stdout.split(", ")[1].split()[0])
        assert 0 < written < 100
        d.cli("set", "w", "--writeback-limit", "none")
        out = d.cli("writeback", "w", "--type", "idle", "--max-pages", "10").stdout
        assert out.startswith("w: 10 pages tried, 10 written back")
        b = stat(d)["backing"]
        assert b["bd_count"] == 64 + written + 10 and b["writeback_limit"] == -1
        assert h.pread(len(huge), 1 * MiB) == huge
        assert h.pread(256 * 4096, 0) == b"".join(pages)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        assert 'zramd_bd_writes_total{export="w"} ' in text
        assert 'zramd_bd_reads_total{export="w"} ' in text
        h.shutdown()
        r = d.cli("writeback", "w", "--type", "cold", check=False)
        assert r.returncode == 2
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_crc32c_verify_across_writeback(tmp_path: Path) -> None:
    d = _daemon(tmp_path, True)
    try:
        uri = f"nbd+unix:///w?socket={d.sock}"

        def fio(out: str, *extra: str) -> dict[str, Any]:
            subprocess.run([
                "fio", "--name=wb", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--size=32M",
                "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
                "--buffer_compress_percentage=50", "--refill_buffers", "--randseed=11",
                "--output-format=json", f"--output={tmp_path / out}", *extra,
            ], check=True, timeout=300)  # fmt: skip
            (job,) = json.loads((tmp_path / out).read_text())["jobs"]
            assert job["error"] == 0
            return job  # type: ignore[no-any-return]

        # 32 MiB at 2:1 into an 8 MiB limit: pressure writeback during the writes
        job = fio("w.json", "--rw=randwrite", "--do_verify=0")
        assert job["write"]["io_bytes"] == 32 * MiB
        d.cli("idle", "w", "--all")
        d.cli("writeback", "w", "--type", "idle")
        assert stat(d)["backing"]["bd_count"] > 0
        job = fio("v.json", "--rw=randwrite", "--verify_only")
        assert job["read"]["io_bytes"] == 32 * MiB, "every block verified"
        job = fio("o.json", "--rw=randwrite", "--randseed=12", "--do_verify=1", "--size=16M")
        assert job["read"]["io_bytes"] == 16 * MiB
        assert stat(d)["backing"]["bd_errors"] == 0
    finally:
        d.stop()
