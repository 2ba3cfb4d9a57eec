"""The machine, the versions and the date a run is recorded with.

Theory of operation
-------------------
Everything here is best effort: a tool that is missing or prints something unexpected yields
"?" rather than failing the run. Nothing is cached; call once per run.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _first_line(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def git_rev() -> str:
    rev = _first_line(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    dirty = _first_line(["git", "status", "--porcelain", "--untracked-files=no", "zramd"], cwd=REPO)
    return rev + ("+dirty" if dirty not in ("?", "") else "")


def collect() -> dict[str, Any]:
    versions: dict[str, str] = {
        "zramd": git_rev(),
        "python": platform.python_version(),
        "nbdkit": _first_line(["nbdkit", "--version"]),
        "qemu-nbd": _first_line(["qemu-nbd", "--version"]),
        "fio": _first_line(["fio", "--version"]),
        "nbdcopy": _first_line(["nbdcopy", "--version"]),
        "kernel": platform.release(),
    }
    try:
        import lz4

        versions["lz4"] = f"python-lz4 {lz4.__version__}, liblz4 {lz4.library_version_string()}"
    except ImportError:
        pass
    try:
        import zstandard

        versions["zstd"] = f"zstandard {zstandard.__version__}, libzstd " + ".".join(
            map(str, zstandard.ZSTD_VERSION)
        )
    except ImportError:
        pass
    import uvloop

    versions["zramd event loop"] = f"uvloop {uvloop.__version__}"  # listener.install_uvloop
    load = os.getloadavg()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "ram_gib": round(ram_bytes() / (1 << 30), 1),
            "loadavg_at_start": [round(x, 2) for x in load],
        },
        "versions": versions,
    }
