"""Fuzzing in the test suite: the seed corpus, a regression, and bounded fuzz runs.

Theory of operation
-------------------
The fast tests replay the recorded transcripts (``corpus/``) through the in-process harness with
every oracle on (core + dispatch, and a real Session), and pin the first finding (a declared
WRITE length was allocated up front). The slow tests are the bounded CI runs: ``fuzz_core.py``
(atheris, coverage-guided, in-process) for ``ZRAMD_FUZZ_SECONDS`` (default 60),
``fuzz_session.py`` (the asyncio shell) for ``ZRAMD_FUZZ_SESSION_SECONDS`` (default 20) and
``fuzz_stdio.py`` (the real ``zramd serve --stdio`` process) for ``ZRAMD_FUZZ_STDIO_SECONDS``
(default 20). Each asserts an execution count and no
finding; the core run also asserts the libFuzzer edge coverage and, replaying what it found under
``coverage``, the line coverage of ``zramd/protocol`` + ``zramd/server/dispatch.py``. The longer
run is ``scripts/fuzz [SECONDS]``.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import fuzz_stdio  # noqa: E402
import harness  # noqa: E402
import session_harness  # noqa: E402

CORE_SECONDS = int(os.environ.get("ZRAMD_FUZZ_SECONDS", "60"))
SESSION_SECONDS = int(os.environ.get("ZRAMD_FUZZ_SESSION_SECONDS", "20"))
STDIO_SECONDS = int(os.environ.get("ZRAMD_FUZZ_STDIO_SECONDS", "20"))
#: Executions per second the core target must sustain (measured ~4500/s alone on 2 shared cores).
MIN_CORE_EXECS_PER_S = 300
#: libFuzzer edges the core target must reach (the seed corpus alone reaches ~640).
MIN_CORE_EDGES = 500
#: The session target: executions per second (measured ~3500/s) and edges (~870 after 40 s).
MIN_SESSION_EXECS_PER_S = 200
MIN_SESSION_EDGES = 650
#: Line coverage of zramd/protocol + dispatch reached by the seeds + what the run found (~89%).
MIN_LINE_COVERAGE = 80.0
#: stdio executions per second (each is a process start, about 0.4-0.6 s, two in parallel).
MIN_STDIO_EXECS_PER_S = 0.5
SEEDS = sorted((HERE / "corpus").glob("*.bin"))
REQUEST_MAGIC = 0x25609513


def test_corpus_is_recorded_from_every_client() -> None:
    labels = {p.name.rsplit("-", 1)[0] for p in SEEDS}
    for client in ("nbdinfo", "nbdinfo-list", "qemu-io", "nbdcopy-in", "nbdcopy-out", "kernel"):
        assert client in labels
    assert all(0 < p.stat().st_size <= 16 * 1024 for p in SEEDS)


def test_corpus_replays_clean() -> None:
    h = harness.CoreHarness(check_memory=True)
    try:
        results = {p.name: h.run(p.read_bytes()) for p in SEEDS}
    finally:
        h.close()
    # every transcript but LIST reaches transmission; requests of every kind were recorded
    assert sum(r.handshakes for r in results.values()) == len(SEEDS) - 1
    commands = set().union(*(r.commands for r in results.values()))
    assert {0, 1, 2, 3, 4, 6, 7} <= commands  # READ WRITE DISC FLUSH TRIM WRITE_ZEROES BLOCK_STATUS
    assert not any(r.closed_by_error for r in results.values())
    # the kernel-like transcript negotiated no structured replies; qemu-io and nbdinfo did
    assert results["kernel-0.bin"].requests >= 7
    assert not results["kernel-0.bin"].structured
    assert results["qemu-io-0.bin"].structured and results["nbdinfo-map-0.bin"].structured


def test_corpus_replays_clean_through_a_session() -> None:
    h = session_harness.SessionHarness()
    try:
        written = {p.name: h.run(p.read_bytes()) for p in SEEDS}
    finally:
        h.close()
    assert written["kernel-0.bin"] > 12 * 1024  # the READ replies really went out
    assert all(n >= 18 for n in written.values())  # at least the greeting


def test_declared_write_length_is_not_allocated() -> None:
    """Finding 1: a 28-byte header declaring a 64 MiB WRITE cost 64 MiB before any payload."""
    kernel = (HERE / "corpus" / "kernel-0.bin").read_bytes()
    handshake = kernel[: kernel.find(struct.pack(">I", REQUEST_MAGIC))]
    evil = handshake + struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, 64 << 20) + b"x" * 100
    h = harness.CoreHarness(check_memory=True)
    try:
        stats = h.run(evil)
    finally:
        h.close()
    assert stats.closed_by_error  # EOF inside the payload
    assert stats.peak_bytes < 1 << 20, stats.peak_bytes


def _last_int(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    assert found, f"no {pattern!r} in fuzzer output:\n{text[-3000:]}"
    return int(found[-1])


def _atheris(target: str, seconds: int, tmp_path: Path) -> tuple[Path, int, int]:
    """Run an atheris target for ``seconds``; (grown corpus dir, executions, edges)."""
    work = tmp_path / "corpus"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable, str(HERE / target),
            f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=2048",
            "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
            str(work), str(HERE / "corpus"),
        ],
        capture_output=True, text=True, timeout=seconds + 120, cwd=REPO,
    )
    out = proc.stderr + proc.stdout
    assert proc.returncode == 0, f"fuzzer finding (artifacts in {tmp_path}):\n{out[-5000:]}"
    runs = _last_int(r"Done (\d+) runs", out)
    edges = _last_int(r"cov: (\d+)", out)
    print(f"{target}: {runs} executions in {seconds} s, {edges} edges")
    return work, runs, edges


@pytest.mark.slow
def test_fuzz_session_bounded(tmp_path: Path) -> None:
    _, runs, edges = _atheris("fuzz_session.py", SESSION_SECONDS, tmp_path)
    assert runs >= MIN_SESSION_EXECS_PER_S * SESSION_SECONDS
    assert edges >= MIN_SESSION_EDGES


@pytest.mark.slow
def test_fuzz_core_bounded(tmp_path: Path) -> None:
    work, runs, edges = _atheris("fuzz_core.py", CORE_SECONDS, tmp_path)
    assert runs >= MIN_CORE_EXECS_PER_S * CORE_SECONDS
    assert edges >= MIN_CORE_EDGES
    pytest.importorskip("coverage")
    cov = subprocess.run(
        [
            sys.executable, "-m", "coverage", "run", f"--data-file={tmp_path}/.coverage",
            "--include=zramd/protocol/*,zramd/server/dispatch.py",
            str(HERE / "replay.py"), str(work), str(HERE / "corpus"),
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert cov.returncode == 0, cov.stderr[-5000:]
    report = subprocess.run(
        [sys.executable, "-m", "coverage", "report", f"--data-file={tmp_path}/.coverage"],
        capture_output=True, text=True, cwd=REPO,
    )
    percent = float(re.findall(r"TOTAL.*?(\d+(?:\.\d+)?)%", report.stdout)[-1])
    print(report.stdout)
    assert percent >= MIN_LINE_COVERAGE


@pytest.mark.slow
def test_fuzz_stdio_bounded(tmp_path: Path) -> None:
    res = fuzz_stdio.fuzz(STDIO_SECONDS, tmp_path)
    assert not res.findings, res.findings[:3]
    assert res.executions >= MIN_STDIO_EXECS_PER_S * STDIO_SECONDS
    assert res.max_wall_s < fuzz_stdio.HANG_S
    assert res.max_rss_kb < fuzz_stdio.RSS_LIMIT_KB
