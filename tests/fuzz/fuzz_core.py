#!/usr/bin/env python3
"""atheris target: arbitrary client byte streams through the sans-I/O core + dispatch + ZramDevice.

Theory of operation
-------------------
libFuzzer (via atheris) mutates inputs, starting from the recorded transcripts in ``corpus/``
(nbdinfo, qemu-io, nbdcopy, kernel-like libnbd) and the NBD dictionary ``nbd.dict``; each input is
one whole connection played by :class:`harness.CoreHarness` (see its oracles). zramd's protocol,
server and device packages are instrumented for coverage feedback. Findings are exceptions
(libFuzzer saves ``crash-*`` files), hangs (``-timeout``) and memory: every :data:`TRACE_EVERY`
th input is checked against the precise tracemalloc bound of the harness and the process's peak
RSS against :data:`RSS_LIMIT_MB` (libFuzzer's ``-rss_limit_mb`` checks it too).

    .venv/bin/python tests/fuzz/fuzz_core.py [libFuzzer flags] NEW_CORPUS_DIR tests/fuzz/corpus

``scripts/fuzz`` and ``tests/fuzz/test_fuzz.py`` run it with the right flags and read libFuzzer's
``Done N runs`` and ``cov: E`` (edges reached) lines.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["zramd.protocol", "zramd.server", "zramd.device"]):
    import harness  # noqa: E402

#: Memory checks (tracemalloc bound, peak RSS) on every this many inputs.
TRACE_EVERY = 16
#: RSS ceiling of the fuzzing process (the harness itself needs about 100 MiB).
RSS_LIMIT_MB = 400

_h = harness.CoreHarness()
_n = 0


def _hwm_mb() -> int:
    """Peak RSS of this process (VmHWM; getrusage's ru_maxrss also counts the pre-exec parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def test_one_input(data: bytes) -> None:
    global _n
    _n += 1
    sample = _n % TRACE_EVERY == 0
    _h.check_memory = sample
    _h.run(data)
    if sample and (rss_mb := _hwm_mb()) > RSS_LIMIT_MB:
        raise harness.Finding(f"peak RSS {rss_mb} MiB after a {len(data)}-byte input")


def main() -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append(f"-max_len={harness.MAX_INPUT}")
    if not any(a.startswith("-dict=") for a in argv):
        argv.append(f"-dict={os.path.join(HERE, 'nbd.dict')}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
