#!/usr/bin/env python3
"""atheris target: arbitrary client byte streams through a real ``Session`` (the asyncio shell).

Theory of operation
-------------------
Same inputs, corpus and dictionary as ``fuzz_core.py``; each input is one connection played by
:class:`session_harness.SessionHarness` (fake transport with water marks, client that sometimes
stops reading, varying loop interleavings; oracles: no ERROR logged, no hang, clean teardown).
``zramd.protocol``, ``zramd.server`` and ``zramd.device`` are instrumented for coverage feedback.

    .venv/bin/python tests/fuzz/fuzz_session.py [libFuzzer flags] NEW_CORPUS_DIR tests/fuzz/corpus
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
    import session_harness  # noqa: E402

_h = session_harness.SessionHarness()


def test_one_input(data: bytes) -> None:
    _h.run(data)


def main() -> None:
    atheris.Setup(harness.libfuzzer_argv(sys.argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
