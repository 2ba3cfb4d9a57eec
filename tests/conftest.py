"""Suite-wide pytest hooks.

Theory of operation: tests under tests/e2e are marked `e2e` (and tests under tests/vm `vm`)
automatically, so `-m "not e2e"` selects the fast unit suite. When a test that used a running
server (any fixture value with a `stderr()` method and a `procs` list, i.e. tests/e2e's Server)
fails, the server's stderr is attached to the failure report. Knows nothing of NBD.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if _HERE / "e2e" in path.parents:
            item.add_marker(pytest.mark.e2e)
        elif _HERE / "vm" in path.parents:
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {}) or {}
    seen: set[int] = set()
    for value in funcargs.values():
        if id(value) in seen or not hasattr(value, "procs") or not hasattr(value, "stderr"):
            continue
        seen.add(id(value))
        try:
            text = value.stderr()
        except Exception as exc:  # noqa: BLE001 - a report must never fail
            text = f"<could not read server stderr: {exc}>"
        report.sections.append((f"server stderr ({getattr(value, 'kind', '?')})", text[-20000:]))
