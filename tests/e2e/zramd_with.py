"""Start a zramd server with extra ``serve`` flags (TLS, allow-list) for e2e tests.

Theory of operation
-------------------
:func:`start_zramd` is ``conftest.start_server`` for zramd only, plus arbitrary extra flags: it
launches ``zramd serve --bind 127.0.0.1 --port P --unix SOCK`` with a private control socket and
the given flags, waits until the log says ``listening on``, and returns a ``conftest.Server``
(stop it with ``Server.stop()``, which asserts exit 0 on SIGTERM). Readiness is read from the log,
not by connecting, so servers with an allow-list or TLS never see a probe connection.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import (
    REPO_ROOT,
    SERVER_KIND,
    START_TIMEOUT_S,
    MiB,
    Server,
    export_args,
    free_port,
    private_args,
    zramd_argv,
)

EXPORTS: list[tuple[str, int, str]] = [("zram0", 64 * MiB, "")]


def start_zramd(
    workdir: Path,
    *flags: str,
    exports: list[tuple[str, int, str]] | None = None,
    bind: bool = True,
) -> Server:
    if SERVER_KIND != "zramd":
        pytest.skip("zramd-only flags")
    exports = EXPORTS if exports is None else exports
    workdir.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "nbd.sock")
    port = free_port()
    listen = ["--bind", "127.0.0.1"] if bind else []
    cmd = (
        zramd_argv()
        + ["serve", *listen, "--port", str(port), "--unix", sock]
        + private_args(workdir)
        + export_args(exports)
        + list(flags)
    )
    server = Server(
        kind="zramd", port=port, sock=sock, exports={n: s for n, s, _ in exports}, workdir=workdir
    )
    errpath = workdir / "server0.stderr"
    server.stderr_paths.append(errpath)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(errpath, "wb") as errf:
        server.procs.append(
            subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd=REPO_ROOT, env=env
            )
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while "listening on" not in server.stderr():
        proc = server.procs[0]
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}\n{server.stderr()}")
        if time.monotonic() > deadline:
            server.stop_quietly()
            raise AssertionError(
                f"server not listening after {START_TIMEOUT_S}s\n{server.stderr()}"
            )
        time.sleep(0.05)
    return server


def wait_for_log(server: Server, text: str, timeout: float = 5.0) -> str:
    """The server's stderr once it contains ``text`` (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.stderr()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the server log:\n{log}")
        time.sleep(0.05)
