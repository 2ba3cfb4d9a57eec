#!/usr/bin/env python3
"""Replay corpus files (or crash files) through the in-process harness, with every oracle on.

Theory of operation
-------------------
No atheris here: each file is one input to :class:`harness.CoreHarness` with the tracemalloc
memory check on. Used to reproduce a finding (``replay.py crash-...``) and, under ``coverage``,
to measure the line coverage the fuzzed corpus reaches (``scripts/fuzz`` does this). Prints
``replayed N inputs`` and exits non-zero on the first finding.

    .venv/bin/python tests/fuzz/replay.py FILE_OR_DIR...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import harness  # noqa: E402


def inputs(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return out


def main() -> int:
    h = harness.CoreHarness(check_memory=True)
    files = inputs(sys.argv[1:])
    for f in files:
        try:
            h.run(f.read_bytes())
        except Exception as e:
            print(f"{f}: {type(e).__name__}: {e}", file=sys.stderr)
            raise
    print(f"replayed {len(files)} inputs")
    h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
