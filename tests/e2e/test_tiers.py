"""Cold pages end to end: a real `zramd serve` driven by the real CLI (idle, pages, recompress,
stat, list, metrics) with data written and read by real clients (python3-libnbd, nbdcopy),
and the background policy configured in the export spec. Every process started here is
stopped here."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_operator import Daemon, MiB, compressible, free_port, wait_for

nbd = pytest.importorskip("nbd")

SPEC = "t=64M,algorithm=lz4 zstd(level=3) deflate"


def words_image(n: int, seed: int = 1) -> bytes:
    """Text-like data that lz4 compresses a little and zstd much better."""
    import random

    rnd = random.Random(seed)
    vocab = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"epsilon ", b"zeta ", b"eta "]
    parts = [rnd.choice(vocab) + rnd.randbytes(rnd.randint(0, 3)) for _ in range(n // 6)]
    return b"".join(parts)[:n].ljust(n, b"\0")


@pytest.fixture
def tdaemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, ["--export", SPEC])
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def stat(d: Daemon, name: str = "t") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(d.cli("stat", name, "--json").stdout)
    return out


def test_idle_pages_recompress_stat_list(tdaemon: Daemon) -> None:
    d = tdaemon
    h = d.client("t")
    data = words_image(4 * MiB) + compressible(2 * MiB)
    h.pwrite(data, 0)
    h.pwrite(bytes(1 * MiB), 8 * MiB)  # same-filled pages: never idle, never recompressed
    h.flush()
    npages = len(data) // 4096

    r = d.cli("idle", "t", check=False)
    assert r.returncode == 1 and "give either --all or --age" in r.stderr
    assert d.cli("idle", "t", "--age", "10m").stdout == "t: 0 pages marked idle, 0 idle\n"
    assert d.cli("idle", "t", "--all").stdout == f"t: {npages} pages marked idle, {npages} idle\n"
    h.pread(4096, 0)  # a read clears the mark of the page it reads
    assert stat(d)["tiers"]["idle_pages"] == npages - 1

    rows = json.loads(d.cli("pages", "t", "--range", "0-2", "--json").stdout)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["flags"] == [] and rows[1]["flags"] == ["idle"]
    assert rows[1]["state"] == "stored" and rows[1]["algorithm"] == "lz4"
    text = d.cli("pages", "t", "--range", "2048-2048").stdout.split()
    assert text[0] == "2048" and text[2] == "s......"  # the first zero page: same-filled
    assert d.cli("pages", "t", "--range", "3000-3001").stdout == ""  # holes are not listed

    r = d.cli("recompress", "t", "--type", "idle", "--max-pages", "100")
    assert r.stdout.startswith("t: 100 pages tried, ")
    out = d.cli("recompress", "t", "--type", "idle").stdout
    tried = int(out.split()[1])
    assert tried == npages - 1 - 100
    st = stat(d)
    tiers = st["tiers"]
    assert tiers["recompression_algorithms"] == ["zstd(level=3)", "deflate(level=6)"]
    assert tiers["recompressed_pages"] > npages // 2
    assert tiers["recompressed_pages"] + tiers["incompressible_pages"] <= npages - 1
    assert tiers["recompress_saved_bytes"] > 0 and tiers["policy"] is None
    rows = json.loads(d.cli("pages", "t", "--range", "1-1", "--json").stdout)
    assert rows[0]["algorithm"] in ("zstd", "deflate") and "recompressed" in rows[0]["flags"]
    assert h.pread(len(data), 0) == data

    tiers = stat(d)["tiers"]
    assert tiers["idle_pages"] == 0  # the read took every mark
    listed = json.loads(d.cli("list", "--json").stdout)["exports"][0]["tiers"]
    assert listed == {k: tiers[k] for k in listed}
    table = d.cli("list", "-o", "name,idle,recompressed,incompressible").stdout.splitlines()
    assert table[0].split() == ["NAME", "IDLE", "RECOMPRESSED", "INCOMPRESSIBLE"]
    assert table[1].split()[2] == str(tiers["recompressed_pages"])
    assert "recompression algorithms zstd(level=3) deflate(level=6)" in d.cli("stat", "t").stdout

    r = d.cli("recompress", "t", "--group-pages", "4", "--type", "huge", check=False)
    assert r.returncode == 1 and "--group-pages packs idle pages" in r.stderr
    r = d.cli("recompress", "t", "--algorithm", "zstd lz4", check=False)
    assert r.returncode == 1 and "one algorithm expected" in r.stderr
    h.shutdown()


def test_recompress_needs_algorithms_unless_given(tmp_path: Path) -> None:
    d = Daemon(tmp_path, ["--export", "p=16M"])
    try:
        d.wait_ready()
        h = d.client("p")
        h.pwrite(words_image(1 * MiB), 0)
        h.flush()
        r = d.cli("recompress", "p", check=False)
        assert r.returncode == 1 and "no recompression algorithm" in r.stderr
        out = d.cli("recompress", "p", "--algorithm", "zstd(level=9)").stdout
        assert out.startswith("p: 256 pages tried, ") and " 0 recompressed" not in out
        h.shutdown()
    finally:
        d.stop()


def test_metrics_show_the_tier_counters(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, ["--export", SPEC, "--metrics", f"127.0.0.1:{port}"])
    try:
        d.wait_ready()
        h = d.client("t")
        h.pwrite(words_image(1 * MiB), 0)
        h.flush()
        d.cli("idle", "t", "--all")
        d.cli("recompress", "t")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        st = stat(d)["tiers"]
        for name, key in (
            ("zramd_idle_pages", "idle_pages"),
            ("zramd_recompressed_pages", "recompressed_pages"),
            ("zramd_incompressible_pages", "incompressible_pages"),
            ("zramd_recompress_saved_bytes_total", "recompress_saved_bytes"),
        ):
            assert f'{name}{{export="t"}} {st[key]}' in text, name
        h.shutdown()
    finally:
        d.stop()


def test_policy_recompresses_cold_pages_by_itself(tmp_path: Path) -> None:
    spec = SPEC + ",recompress-after=1s,recompress-interval=1s"
    d = Daemon(tmp_path, ["--export", spec])
    try:
        d.wait_ready()
        h = d.client("t")
        data = words_image(2 * MiB)
        h.pwrite(data, 0)
        h.flush()
        wait_for(lambda: stat(d)["tiers"]["recompressed_pages"] >= 256, timeout=40)
        policy = stat(d)["tiers"]["policy"]
        assert policy["running"] and policy["passes"] >= 1
        assert policy["max_slice_us"] > 0
        assert h.pread(len(data), 0) == data
        h.shutdown()
    finally:
        d.stop()
    assert "Traceback" not in d.stderr()


def python_image(path: Path, size: int) -> None:
    """``size`` bytes of real files (this Python's library sources), zero-padded."""
    with open(path, "wb") as f:
        n = 0
        for p in sorted(Path("/usr/lib/python3.11").rglob("*.py")):
            if p.is_file():
                chunk = p.read_bytes()
                f.write(chunk)
                n += len(chunk)
                if n >= size:
                    break
        f.truncate(size)


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy")
@pytest.mark.parametrize("group_pages", [1, 16])
def test_nbdcopy_image_idle_recompress_read_back(
    tdaemon: Daemon, tmp_path: Path, group_pages: int
) -> None:
    d = tdaemon
    image = tmp_path / "image"
    python_image(image, 16 * MiB)
    url = f"nbd+unix:///t?socket={d.sock}"
    subprocess.run(["nbdcopy", str(image), url], check=True, timeout=120)
    before = stat(d)["mm_stat"]["compr_data_size"]
    d.cli("idle", "t", "--all")
    out = d.cli("recompress", "t", "--group-pages", str(group_pages)).stdout
    assert int(out.split(", ")[1].split()[0]) > 1000  # pages recompressed or grouped
    assert stat(d)["mm_stat"]["compr_data_size"] < before
    back = tmp_path / "back"
    subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=120)
    with open(back, "rb") as f:
        got = f.read(16 * MiB)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(image.read_bytes()).hexdigest()


def test_policy_under_client_writes_keeps_every_write(tmp_path: Path) -> None:
    import random

    spec = "w=16M,algorithm=lz4 zstd(level=3),recompress-after=1s,recompress-interval=1s"
    d = Daemon(tmp_path, ["--export", spec])
    try:
        d.wait_ready()
        h = d.client("w")
        model = bytearray(words_image(16 * MiB, seed=2))
        h.pwrite(bytes(model), 0)
        h.flush()
        rnd = random.Random(3)
        wait_for(lambda: stat(d, "w")["tiers"]["recompressed_pages"] > 0, timeout=40)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # writes land while the policy works
            off = rnd.randrange(0, 16 * MiB - 3 * 4096)
            n = rnd.randrange(1, 3 * 4096)
            data = words_image(n, seed=rnd.randrange(1 << 30))
            h.pwrite(data, off)
            model[off : off + n] = data
            time.sleep(0.002)
        h.flush()
        assert h.pread(16 * MiB, 0) == bytes(model)
        assert stat(d, "w")["tiers"]["policy"]["passes"] >= 1
        h.shutdown()
    finally:
        d.stop()
    assert "Traceback" not in d.stderr()
