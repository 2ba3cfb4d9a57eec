#!/usr/bin/env python3
"""Replay corpus files (or crash files) through the in-process harness, with every oracle on.

Theory of operation
-------------------
No atheris here: each file is one input to :class:`harness.CoreHarness` with the tracemalloc
memory check on. Used to reproduce a finding (``replay.py crash-...``) and, under ``coverage``,
to measure the line coverage the fuzzed corpus reaches (``scripts/fuzz`` does this). Prints
``replayed N inputs`` and exits non-zero on the first finding.

    .venv/bin/python tests/fuzz/replay.py [--session] FILE_OR_DIR...

``--session`` replays through :class:`session_harness.SessionHarness` (the asyncio shell) instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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
    args = sys.argv[1:]
    h: Any
    if args and args[0] == "--session":
        import session_harness

        args = args[1:]
        h = session_harness.SessionHarness()
    else:
        h = harness.CoreHarness(check_memory=True)
    files = inputs(args)
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
