#!/usr/bin/env python3
"""Byte-stream fuzzing of the real process: ``zramd serve --stdio``, one connection per input.

Theory of operation
-------------------
Each execution starts ``zramd serve --stdio`` (the exports of :data:`harness.EXPORTS`,
``--handshake-timeout`` :data:`HANDSHAKE_TIMEOUT_S`), writes one input to its stdin, closes stdin
and reads stdout to EOF, the way nbdkit's AFL setup fuzzes ``nbdkit -s``. Inputs are recorded
transcripts from ``corpus/`` mutated here (bit flips, interesting 8/16/32/64-bit values at random
or field-aligned offsets, byte runs inserted, deleted, duplicated, truncation, splices of two
transcripts). Coverage-guided mutation is the in-process target's job (``fuzz_core.py``); this one
proves the whole process (asyncio shell, pipes, logging, shutdown) survives the same streams.

Findings for each execution: exit status not 0, a ``Traceback`` in stderr, wall time past
:data:`HANG_S` (a hang past the timeouts), peak RSS (``VmHWM``, polled every 10 ms while it runs)
above :data:`RSS_LIMIT_KB`.
A failing input is saved to ``OUTDIR/stdio-crash-<n>.bin``.

    .venv/bin/python tests/fuzz/fuzz_stdio.py [SECONDS] [OUTDIR]
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from harness import EXPORTS  # noqa: E402

#: The server's handshake timeout during fuzzing (seconds).
HANDSHAKE_TIMEOUT_S = 2
#: An execution taking longer than this is a hang (startup + handshake timeout + slack).
HANG_S = 20.0
#: Peak RSS ceiling of one server process (KiB); an idle zramd is about 40 MiB.
RSS_LIMIT_KB = 128 * 1024
#: Executions run side by side.
PARALLEL = 2
#: Largest mutated input (bytes).
MAX_INPUT = 64 * 1024
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 4096, 1 << 25,
               1 << 26, (1 << 26) + 1, 0x25609513, 0x49484156454F5054, (1 << 64) - 1]


@dataclass
class Result:
    executions: int = 0
    findings: list[str] = field(default_factory=list)
    max_rss_kb: int = 0
    max_wall_s: float = 0.0


def seeds() -> list[bytes]:
    return [f.read_bytes() for f in sorted((HERE / "corpus").glob("*.bin"))]


def mutate(rng: random.Random, pool: list[bytes]) -> bytes:
    data = bytearray(rng.choice(pool))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        n = len(data)
        if op == 0 and n:  # bit flip
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n >= 8:  # interesting value, maybe aligned to a 4-byte field
            width = rng.choice([1, 2, 4, 8])
            i = rng.randrange(n - width + 1)
            if rng.random() < 0.5:
                i &= ~3
            v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            data[i : i + width] = v.to_bytes(width, "big")
        elif op == 2:  # insert random bytes
            i = rng.randrange(n + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 64))
        elif op == 3 and n:  # delete a run
            i = rng.randrange(n)
            del data[i : i + rng.randint(1, 64)]
        elif op == 4 and n:  # duplicate a run (repeated options / requests)
            i = rng.randrange(n)
            run = data[i : i + rng.randint(1, 256)]
            data[i:i] = run * rng.randint(1, 8)
        elif op == 5 and n:  # truncate
            del data[rng.randrange(n) :]
        elif op == 6:  # splice with another transcript
            other = rng.choice(pool)
            data = data[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
        elif op == 7:  # a request header with hostile fields appended
            data += struct.pack(
                ">IHHQQI", 0x25609513, rng.choice([0, 1, 4, 0xFFFF]), rng.randrange(10),
                rng.getrandbits(64), rng.choice([0, 4096, 1 << 20, (1 << 64) - 1]),
                rng.choice([0, 1, 4096, 1 << 25, 0xFFFFFFFF]),
            )
    return bytes(data[:MAX_INPUT])


def command() -> list[str]:
    exe = REPO / ".venv" / "bin" / "zramd"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "zramd"]
    argv += ["serve", "--stdio", "--control", "", "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S)]
    for name, size, opts in EXPORTS:
        argv += ["--export", f"{name}={size // 1024}K" + (f",{opts}" if opts else "")]
    return argv


def _hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM, KiB) of the running process ``pid``; 0 once it is gone. (wait4's
    ru_maxrss is not used: it also counts the parent's memory the child had before exec.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def execute(data: bytes) -> tuple[str | None, int, float]:
    """Run one input; (finding or None, peak RSS KiB, wall seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=REPO,
    )
    out: list[bytes] = []
    err: list[bytes] = []

    def pump(src: object, dst: list[bytes]) -> None:
        dst.append(src.read())  # type: ignore[attr-defined]

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err), daemon=True),
    ]
    for t in readers:
        t.start()
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
    except BrokenPipeError:
        pass  # the server hung up early (a framing error): allowed
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    finding = None
    deadline = t0 + HANG_S
    status = None
    rss = 0
    while status is None:
        rss = max(rss, _hwm_kb(proc.pid))
        pid, st = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            status = st
            proc.returncode = os.waitstatus_to_exitcode(st)
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            finding = f"hang: no exit within {HANG_S} s"
            break
        time.sleep(0.01)
    for t in readers:
        t.join(5)
    wall = time.monotonic() - t0
    stderr = b"".join(err).decode(errors="replace")
    if finding is None:
        if proc.returncode != 0:
            finding = f"exit status {proc.returncode}: {stderr[-2000:]}"
        elif "Traceback" in stderr:
            finding = f"traceback: {stderr[-2000:]}"
        elif rss > RSS_LIMIT_KB:
            finding = f"peak RSS {rss} KiB > {RSS_LIMIT_KB} KiB"
    return finding, rss, wall


def fuzz(seconds: float, outdir: Path | None = None, seed: int | None = None) -> Result:
    rng_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    pool = seeds()
    res = Result()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        rng = random.Random(rng_seed * 31 + k)
        replay = list(pool) if k == 0 else []  # the seeds themselves go first, unmutated
        while time.monotonic() < stop:
            data = replay.pop(0) if replay else mutate(rng, pool)
            finding, rss, wall = execute(data)
            with lock:
                res.executions += 1
                res.max_rss_kb = max(res.max_rss_kb, rss)
                res.max_wall_s = max(res.max_wall_s, wall)
                if finding is not None:
                    res.findings.append(finding)
                    if outdir is not None:
                        outdir.mkdir(parents=True, exist_ok=True)
                        (outdir / f"stdio-crash-{len(res.findings)}.bin").write_bytes(data)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        f"fuzz_stdio: {res.executions} executions (seed {rng_seed}), {len(res.findings)} findings, "
        f"max RSS {res.max_rss_kb // 1024} MiB, max wall {res.max_wall_s:.2f} s"
    )
    return res


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    outdir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path.cwd()
    res = fuzz(seconds, outdir)
    for f in res.findings:
        print(f"FINDING: {f}", file=sys.stderr)
    return 1 if res.findings else 0


if __name__ == "__main__":
    sys.exit(main())
