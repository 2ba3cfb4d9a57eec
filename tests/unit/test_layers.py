"""The layer order of DESIGN.md, enforced: import-linter checks the contracts in pyproject.toml
(each package imports only the layers below it; no import cycle anywhere in zramd), and a copy
of the tree with one upward import and one cycle shows the check bites."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layer_contracts_hold() -> None:
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "zramd", tmp_path / "zramd", ignore=shutil.ignore_patterns("*.so"))
    with open(tmp_path / "zramd" / "device" / "table.py", "a") as f:
        f.write("\nfrom zramd import server as _upward  # noqa: E402,F401\n")
    with open(tmp_path / "zramd" / "config.py", "a") as f:
        f.write("\nfrom zramd import configfile as _cycle  # noqa: E402,F401\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "zramd.device.table -> zramd.server" in r.stdout
    assert "zramd.config -> zramd.configfile" in r.stdout
    assert "No import cycles anywhere in zramd BROKEN" in r.stdout
