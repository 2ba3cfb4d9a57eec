#!/usr/bin/env python3
"""atheris target: arbitrary client byte streams through the sans-I/O core + dispatch + ZramDevice.

Theory of operation
-------------------
libFuzzer (via atheris) mutates inputs, starting from the recorded transcripts in ``corpus/``
(nbdinfo, qemu-io, nbdcopy, kernel-like libnbd) and the NBD dictionary ``nbd.dict``; each input is
one whole connection played by :class:`harness.CoreHarness` (see its oracles). zramd's protocol,
server and device packages are instrumented for coverage feedback. Findings are exceptions
(libFuzzer saves ``crash-*`` files), hangs (``-timeout``) and memory: every input is checked
against the precise tracemalloc bound of the harness (tracing stays on: it halves the execution
rate, but toggling it per input grew the process ~300 bytes per cycle, which a long run took for a
leak). libFuzzer's ``-rss_limit_mb`` catches a blow-up of the whole process.

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


_h = harness.CoreHarness(check_memory=True)


def test_one_input(data: bytes) -> None:
    _h.run(data)


def main() -> None:
    atheris.Setup(harness.libfuzzer_argv(sys.argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
