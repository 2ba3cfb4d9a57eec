"""systemd units in systemd/: `systemd-analyze verify` must pass with no warning.

verify insists that ExecStart binaries exist, so the units are verified from a copy in
which /usr/bin/zramd is replaced by this checkout's venv entry point (or python -m zramd).
The template is verified through an instance symlink, as systemd loads it.

verify also starts a job for each unit it is given, in a transaction with everything that
job pulls in, the system's own units included; a target that wants what a boot wants
(local-fs.target, swap.target, multi-user.target, zramd and zramd-attach@swap) shows the
ordering cycles a boot would hit.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ["zramd.service", "zramd.socket", "zramd-attach@.service"]
ANALYZE = shutil.which("systemd-analyze")


def _zramd_exe() -> str:
    exe = Path(sys.executable).parent / "zramd"
    return str(exe) if exe.exists() else (shutil.which("zramd") or "")


def _copy_units(dst: Path, *, edit: dict[str, tuple[str, str]] | None = None) -> list[str]:
    exe = _zramd_exe()
    if not exe:
        pytest.skip("no zramd entry point installed")
    for name in UNITS:
        text = (UNITS_DIR / name).read_text().replace("/usr/bin/zramd", exe)
        if edit and name in edit:
            text = text.replace(*edit[name])
        (dst / name).write_text(text)
    os.symlink("zramd-attach@.service", dst / "zramd-attach@zram0.service")
    return [str(dst / "zramd.service"), str(dst / "zramd.socket"),
            str(dst / "zramd-attach@zram0.service")]


def _verify(paths: list[str]) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *paths],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_units_verify_clean(tmp_path: Path) -> None:
    r = _verify(_copy_units(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr + r.stdout


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_can_fail(tmp_path: Path) -> None:
    """The check is real: a unit with an unknown key or a missing binary is reported."""
    bogus = {"zramd.service": ("Restart=no", "Restart=no\nBogus=1")}
    r = _verify(_copy_units(tmp_path, edit=bogus))
    assert "Unknown key" in r.stderr
    d2 = tmp_path / "two"
    d2.mkdir()
    paths = _copy_units(d2, edit={"zramd.service": ("ExecStart=", "ExecStart=/nonexistent/x ")})
    r = _verify(paths)
    assert r.returncode != 0 and "not executable" in r.stderr


BOOT_TARGET = """[Unit]
Description=What a boot with zramd-attach@swap enabled pulls in
Wants=sysinit.target local-fs.target swap.target multi-user.target
Wants=zramd.socket zramd.service zramd-attach@swap.service zramd-attach@scratch.service
"""

# A mount instance, as docs/install.md configures one: ordered after the file system that
# holds its mount point and before local-fs.target.
MOUNT_DROPIN = """[Unit]
RequiresMountsFor=/var/cache
Before=local-fs.target
"""


def _verify_boot(tmp_path: Path, *, edit: dict[str, tuple[str, str]] | None = None) -> str:
    _copy_units(tmp_path, edit=edit)
    dropins = tmp_path / "zramd-attach@scratch.service.d"
    dropins.mkdir()
    (dropins / "mount.conf").write_text(MOUNT_DROPIN)
    (tmp_path / "zramd-boot.target").write_text(BOOT_TARGET)
    r = _verify([str(tmp_path / "zramd-boot.target")])
    return r.stderr + r.stdout


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_boot_transaction_has_no_ordering_cycle(tmp_path: Path) -> None:
    out = _verify_boot(tmp_path)
    assert "ordering cycle" not in out, out
    assert "deleted" not in out, out


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_boot_transaction_check_can_fail(tmp_path: Path) -> None:
    """The check is real: zramd.service ordered after local-fs.target is the issue-14 cycle."""
    edit = {"zramd.service": ("[Service]", "[Unit]\nAfter=local-fs.target\n[Service]")}
    out = _verify_boot(tmp_path, edit=edit)
    assert "Found ordering cycle" in out, out
    assert "deleted to break ordering cycle" in out, out


def _parse(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    text = (UNITS_DIR / name).read_text()
    # systemd allows repeated keys; keep the last of each, enough for these checks
    cp.read_string(text)
    return cp


def test_service_contract() -> None:
    svc = _parse("zramd.service")
    s = svc["Service"]
    assert s["Type"] == "notify"
    assert s["LimitMEMLOCK"] == "infinity"
    assert s["OOMScoreAdjust"] == "-1000"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateDevices"):
        assert s[key] == "yes"
    # PrivateTmp= orders the service after systemd-tmpfiles-setup.service, itself after
    # local-fs.target: too late for swap
    assert "PrivateTmp" not in s
    assert "local-fs.target" not in svc["Unit"]["After"]
    assert s["ProtectSystem"] == "strict"
    assert s["RuntimeDirectory"] == "zramd"
    assert "CAP_IPC_LOCK" in s["CapabilityBoundingSet"]
    assert "CAP_SYS_RESOURCE" in s["CapabilityBoundingSet"]
    assert s["ExecReload"].endswith("-HUP $MAINPID")
    # the drain before the first snapshot (zramd extends the timeout for each save)
    assert int(s["TimeoutStopSec"]) >= 40
    assert svc["Unit"]["DefaultDependencies"] == "no"


def test_attach_ordering() -> None:
    text = (UNITS_DIR / "zramd-attach@.service").read_text()
    assert "After=zramd.service" in text
    assert "Before=swap.target\n" in text
    assert "Requires=zramd.service" in text
    assert "ExecStop=/usr/bin/zramd detach" in text
    assert "RemainAfterExit=yes" in text


def test_attach_unit_takes_its_settings_from_the_config() -> None:
    """One source of truth: the export's table in zramd.toml, no environment file."""
    text = (UNITS_DIR / "zramd-attach@.service").read_text()
    assert "ExecStart=/usr/bin/zramd attach %i\n" in text
    assert "ExecStop=/usr/bin/zramd detach %i\n" in text
    assert "EnvironmentFile" not in text and "ZRAMD_" not in text


def test_socket_paths_match_defaults() -> None:
    from zramd.config import DEFAULT_CONTROL_PATH

    text = (UNITS_DIR / "zramd.socket").read_text()
    assert "ListenStream=/run/zramd/nbd.sock" in text
    assert "ListenStream=127.0.0.1:10809" in text
    assert DEFAULT_CONTROL_PATH.startswith("/run/zramd/")
