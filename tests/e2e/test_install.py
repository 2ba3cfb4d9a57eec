"""scripts/install-system into a temporary root, as docs/install.md runs it against /.

The root first gets a stand-in for the base system: the host's systemd units (so that a
boot transaction can be built in it) and stubs of the commands the units run besides zramd
(systemd-analyze verify checks that they are executable). Then: install; the installed
command runs; `systemd-analyze verify --root` passes on the installed units and on the boot
transaction with zramd-attach@swap enabled; a reinstall keeps the operator's config;
uninstall leaves exactly the base system plus that config, and --purge removes the config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-system"
ANALYZE = shutil.which("systemd-analyze")
SYSTEMCTL = shutil.which("systemctl")
HOST_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)
UNITS = ["zramd.service", "zramd.socket", "zramd-attach@.service"]
BIN = "/usr/local/bin/zramd"
LIBDIR = "/usr/local/lib/zramd"
UNITDIR = "/usr/local/lib/systemd/system"
CONFIG = "/etc/zramd/zramd.toml"
EXAMPLE = REPO / "systemd" / "zramd.toml.example"

if ANALYZE is None or SYSTEMCTL is None or HOST_UNITS is None:
    pytest.skip("systemd (systemd-analyze, systemctl, unit files) not installed",
                allow_module_level=True)


def _exec_commands(text: str) -> list[str]:
    """The programs of a unit's Exec*= lines, without systemd's prefixes (-, @, +, !)."""
    return [m.group(1) for m in re.finditer(r"^Exec\w+=[-@+!:]*(/\S+)", text, re.M)]


def _install_system(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900
    )


def _files(root: Path) -> set[str]:
    """Files and symlinks under root (directories left empty do not count)."""
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink() or p.is_file()
    }


def _verify(root: Path, *units: str) -> str:
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", *units],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )
    out = r.stderr + r.stdout
    assert r.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    assert HOST_UNITS is not None
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS:
        for cmd in _exec_commands((REPO / "systemd" / unit).read_text()):
            if cmd != "/usr/bin/zramd":
                stub = root / cmd.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def base_system(root: Path) -> set[str]:
    return _files(root)


@pytest.fixture(scope="module")
def installed(root: Path, base_system: set[str]) -> Path:
    r = _install_system("--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_installed_command_runs(installed: Path) -> None:
    exe = installed / BIN.lstrip("/")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                       cwd=installed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("zramd, version ")
    assert (installed / CONFIG.lstrip("/")).read_text() == EXAMPLE.read_text()
    if os.environ.get("ZRAMD_REQUIRE_NATIVE") == "1":
        native = list((installed / LIBDIR.lstrip("/") / "zramd").glob("_native*.so"))
        assert native, "the C accelerator was not built into the installed tree"


def test_installed_units_verify(installed: Path) -> None:
    for unit in ("zramd.service", "zramd-attach@.service"):
        text = (installed / UNITDIR.lstrip("/") / unit).read_text()
        assert {c for c in _exec_commands(text) if c.endswith("/zramd")} == {BIN}, text
    out = _verify(installed, "zramd.service", "zramd.socket", "zramd-attach@swap.service")
    assert out.strip() == "", out


def test_enabled_swap_boots_without_ordering_cycle(installed: Path) -> None:
    assert SYSTEMCTL is not None
    subprocess.run(
        [SYSTEMCTL, f"--root={installed}", "enable", "zramd.socket", "zramd-attach@swap.service"],
        check=True, capture_output=True, timeout=60,
    )
    wants = installed / "etc/systemd/system/swap.target.wants/zramd-attach@swap.service"
    assert os.readlink(wants) == f"{UNITDIR}/zramd-attach@.service"
    out = _verify(installed, "default.target")
    assert "ordering cycle" not in out and "deleted" not in out, out


def test_reinstall_keeps_config(installed: Path) -> None:
    config = installed / CONFIG.lstrip("/")
    config.write_text("# the operator's\n[export.swap]\nsize = \"1G\"\n")
    r = _install_system("--root", str(installed))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"kept the existing {config}" in r.stdout
    assert config.read_text().startswith("# the operator's")


def test_uninstall_keeps_config_then_purge(installed: Path, base_system: set[str]) -> None:
    r = _install_system("--root", str(installed), "--uninstall")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _files(installed) == base_system | {CONFIG.lstrip("/")}
    r = _install_system("--root", str(installed), "--uninstall", "--purge")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _files(installed) == base_system
    assert not (installed / "etc/zramd").exists()
