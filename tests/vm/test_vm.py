"""The Linux kernel's NBD client against zramd, in a qemu guest (issue 5).

Theory of operation
-------------------
Each group of vm_harness.GROUPS is one boot with its own zramd on a free 127.0.0.1 port; a
group runs once per session (cached) and each of its outcomes is one test here, so a failure
names the scenario and carries the guest's reason and the console log's path. Host-side stat
checks that could not be made (no ``zramd stat``) are skipped with the reason, never passed.
The only skip of the whole module: qemu is not installed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vm_harness  # noqa: E402

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(not vm_harness.qemu_available(),
                       reason=f"{vm_harness.QEMU} not installed (scripts/install-deps.sh)"),
]

CASES = [
    ("storage", "fs"),
    ("storage", "multiconn"),
    ("storage", "discard"),
    ("storage", "discard-host-stats"),
    ("storage", "reconnect"),
    ("storage", "memlimit"),
    ("storage", "fs-policy-host-stats"),
    ("swap", "swap"),
    ("swap", "swap-host-stats"),
    ("swap", "swap-policy-host-stats"),
    ("writeback", "swapwb"),
    ("writeback", "swapwb-host-stats"),
    ("writeback", "swapnobd-fails"),
    ("writeback", "swapnobd-host-stats"),
    ("negative", "fs-detects-corruption"),
    ("raid", "raid0"),
    ("raid", "raid0-host-stats"),
    ("raid", "raid0swap"),
    ("raid", "raid0swap-host-stats"),
    ("raid", "raid1"),
    ("raid", "raid1-host-stats"),
    ("raid-negative", "raid1-detects-corruption"),
]


@functools.cache
def group_report(name: str) -> vm_harness.BootReport:
    report = vm_harness.run_group(name)
    print("\n" + vm_harness.format_report(report), flush=True)
    return report


@pytest.mark.parametrize(("group", "outcome"), CASES, ids=[f"{g}-{o}" for g, o in CASES])
def test_vm_scenario(group: str, outcome: str) -> None:
    report = group_report(group)
    found = {o.name: o for o in report.outcomes}
    o = found.get(outcome)
    assert o is not None, f"{outcome} missing from {group}: {[x.line() for x in report.outcomes]}"
    if o.status == "SKIP":
        pytest.skip(o.reason)
    assert o.status == "PASS", f"{o.line()}\nconsole log: {report.console_log}"


@pytest.mark.parametrize("group", ["storage", "swap", "writeback", "negative", "raid",
                                   "raid-negative"])
def test_vm_server_exit(group: str) -> None:
    """Every zramd served the whole boot (or until the guest asked for its SIGKILL) and
    exited 0 on SIGTERM."""
    report = group_report(group)
    bad = [o.line() for o in report.outcomes if o.name == "server-exit"]
    assert not bad, bad
