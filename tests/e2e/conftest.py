"""End-to-end fixtures: a real NBD server process per test module, real clients against it.

Theory of operation
-------------------
`start_server()` launches the server under test on a free 127.0.0.1 TCP port *and* on a Unix
socket in a private temporary directory, waits until both accept connections, and returns a
`Server` that knows its URIs. `Server.stop()` sends SIGTERM and asserts exit status 0.

The server under test is chosen by the environment variable ZRAMD_E2E_SERVER:

* `zramd` (default): `.venv/bin/python -m zramd serve --bind 127.0.0.1 --port P --unix SOCK
  --export SPEC...`, one process serving every export on both transports.
* `nbdkit`: `nbdkit memory SIZE`, used as a reference peer to prove the tests themselves right.
  nbdkit cannot listen on TCP and on a Unix socket at once, so two independent processes are
  started (one per transport); tests therefore never write over one transport and read over the
  other. nbdkit accepts any export name but has no per-export sizes, descriptions or read-only
  exports: tests that need those call `server.require_multi_export()`, which skips on nbdkit.
* `qemu-nbd`: a contrast, not a reference. qemu-nbd 7.2 deviates from what zramd promises
  (32 MiB request cap, EINVAL for writes past the end, TRIM not zeroing a file), and about 15
  tests fail against it: proof that the suite notices such deviations.

Invariants: every process started here is stopped here (even when a test fails); servers listen
only on 127.0.0.1 or a Unix socket; the server's stderr is kept in a file and attached to the
report of any failing test that used it (see tests/conftest.py).
"""

from __future__ import annotations

import faulthandler
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_KIND = os.environ.get("ZRAMD_E2E_SERVER", "zramd")
START_TIMEOUT_S = 15.0
# A test that runs longer than this is hung (a client blocked on a server that never answers):
# the watchdog kills every live server so that the blocked client sees EOF and the test fails.
TEST_TIMEOUT_S = float(os.environ.get("ZRAMD_E2E_TEST_TIMEOUT", "150"))
_LIVE: list[Server] = []
STOP_TIMEOUT_S = 15.0
MiB = 1024 * 1024

# The standard export set of a module server: (name, size, options).
DEFAULT_EXPORTS: list[tuple[str, int, str]] = [
    ("zram0", 128 * MiB, "description=first test export"),
    ("other", 64 * MiB, "description=second test export"),
    ("ro", 16 * MiB, "read-only,description=read-only test export"),
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(addr: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(addr)
        except OSError:
            return False
        # Read the greeting so the server sees a well-behaved (if short) visit.
        try:
            s.recv(18)
        except OSError:
            pass
        return True


@dataclass
class Server:
    """A running server under test."""

    kind: str
    port: int
    sock: str
    exports: dict[str, int]
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stderr_paths: list[Path] = field(default_factory=list)

    # -- addressing ---------------------------------------------------------------------------
    def uri(self, name: str = "zram0", unix: bool = False) -> str:
        if unix:
            return f"nbd+unix:///{name}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def addr(self, unix: bool = False) -> tuple[str, int] | str:
        return self.sock if unix else ("127.0.0.1", self.port)

    def size(self, name: str = "zram0") -> int:
        return self.exports[name]

    # -- capabilities of the server under test ---------------------------------------------
    @property
    def is_nbdkit(self) -> bool:
        return self.kind == "nbdkit"

    def require_multi_export(self) -> None:
        if self.kind != "zramd":
            pytest.skip(f"{self.kind}: no named exports, descriptions or read-only exports here")

    # -- health ---------------------------------------------------------------------------------
    def assert_alive(self) -> None:
        for p in self.procs:
            assert p.poll() is None, f"server exited with status {p.returncode}\n{self.stderr()}"

    def stderr(self) -> str:
        out = []
        for path in self.stderr_paths:
            try:
                out.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    def rss_kib(self) -> int:
        """Resident set size of the (first) server process, in KiB."""
        with open(f"/proc/{self.procs[0].pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop_quietly(self) -> None:
        """Kill without judging: used when start-up already failed."""
        if self in _LIVE:
            _LIVE.remove(self)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stop(self) -> None:
        """SIGTERM every process, wait, and assert each exited 0."""
        if self in _LIVE:
            _LIVE.remove(self)
        codes: list[int | None] = []
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        assert all(c == 0 for c in codes), (
            f"server did not exit 0 on SIGTERM: statuses {codes}\n{self.stderr()}"
        )


def _spec(name: str, size: int, opts: str) -> str:
    return f"{name}={size // 1024}K" + (f",{opts}" if opts else "")


def zramd_argv() -> list[str]:
    """How to run zramd: the venv's console script, else `python -m zramd`."""
    exe = REPO_ROOT / ".venv" / "bin" / "zramd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zramd"]


@functools.cache
def _serve_help() -> str:
    return subprocess.run(
        zramd_argv() + ["serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout


def private_args(workdir: Path) -> list[str]:
    """Options that keep a test server from touching machine-wide paths (its control socket
    defaults to /run/zramd/control.sock, which parallel servers would fight over)."""
    if "--control" in _serve_help():
        workdir.mkdir(parents=True, exist_ok=True)
        return ["--control", str(workdir / "control.sock")]
    return []


def export_args(exports: list[tuple[str, int, str]]) -> list[str]:
    args: list[str] = []
    for name, size, opts in exports:
        args += ["--export", _spec(name, size, opts)]
    return args


def _zramd_command(
    port: int, sock: str, exports: list[tuple[str, int, str]], workdir: Path
) -> list[str]:
    return zramd_argv() + [
        "serve", "--bind", "127.0.0.1", "--port", str(port), "--unix", sock,
    ] + private_args(workdir) + export_args(exports)


def start_server(
    workdir: Path, exports: list[tuple[str, int, str]] | None = None
) -> Server:
    exports = DEFAULT_EXPORTS if exports is None else exports
    workdir.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "nbd.sock")
    port = free_port()
    server = Server(
        kind=SERVER_KIND,
        port=port,
        sock=sock,
        exports={name: size for name, size, _ in exports},
        workdir=workdir,
    )
    if SERVER_KIND == "zramd":
        commands = [_zramd_command(port, sock, exports, workdir)]
    elif SERVER_KIND == "nbdkit":
        if shutil.which("nbdkit") is None:
            pytest.skip("nbdkit not installed")
        size = max(size for _, size, _ in exports)
        # One export size for every name: nbdkit serves the same disk under any name.
        server.exports = {name: size for name in server.exports}
        common = ["nbdkit", "-f", "--exit-with-parent"]
        commands = [
            common + ["-i", "127.0.0.1", "-p", str(port), "memory", str(size)],
            common + ["-U", sock, "memory", str(size)],
        ]
    elif SERVER_KIND == "qemu-nbd":
        # A contrast, not a reference: qemu-nbd 7.2 deviates (32 MiB cap, EINVAL for writes past
        # the end, ...), and the suite is expected to catch that.
        size = max(size for _, size, _ in exports)
        server.exports = {name: size for name in server.exports}
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(size)
        common = ["qemu-nbd", "-t", "-f", "raw", "-x", "zram0", "-e", "8", "--cache=none"]
        commands = [
            common + ["-b", "127.0.0.1", "-p", str(port), str(image)],
            common + ["-k", sock, str(image)],
        ]
    else:
        raise pytest.UsageError(f"ZRAMD_E2E_SERVER={SERVER_KIND!r}: expected zramd or nbdkit")

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, cmd in enumerate(commands):
        errpath = workdir / f"server{i}.stderr"
        server.stderr_paths.append(errpath)
        with open(errpath, "wb") as errf:
            server.procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd=REPO_ROOT, env=env
                )
            )
    _LIVE.append(server)
    deadline = time.monotonic() + START_TIMEOUT_S
    pending: list[tuple[str, int] | str] = [("127.0.0.1", port), sock]
    while pending:
        for p in server.procs:
            if p.poll() is not None:
                server.stop_quietly()
                raise AssertionError(
                    f"server {p.args!r} exited early with {p.returncode}\n{server.stderr()}"
                )
        pending = [a for a in pending if not _accepts(a)]
        if pending and time.monotonic() > deadline:
            server.stop_quietly()
            raise AssertionError(
                f"server not accepting on {pending} after {START_TIMEOUT_S}s\n{server.stderr()}"
            )
        if pending:
            time.sleep(0.05)
    return server


@pytest.fixture(autouse=True)
def _watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Unhang a hung test: after TEST_TIMEOUT_S dump every thread's stack, kill the servers."""

    def fire() -> None:
        sys.stderr.write(f"\n*** {request.node.nodeid}: still running after {TEST_TIMEOUT_S}s; "
                         "killing the servers under test\n")
        faulthandler.dump_traceback(all_threads=True)
        for srv in list(_LIVE):
            for p in srv.procs:
                if p.poll() is None:
                    p.kill()

    timer = threading.Timer(TEST_TIMEOUT_S, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with DEFAULT_EXPORTS shared by the tests of one module."""
    srv = start_server(tmp_path_factory.mktemp("srv"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fresh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own for a test that needs untouched (all-hole) exports."""
    srv = start_server(tmp_path_factory.mktemp("fresh"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[list[tuple[str, int, str]]], Server]]:
    """Start servers with custom export lists; all are stopped (and checked) at teardown."""
    started: list[Server] = []

    def make(exports: list[tuple[str, int, str]]) -> Server:
        srv = start_server(tmp_path_factory.mktemp("custom"), exports)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def run(
    cmd: list[str], timeout: float = 120.0, check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client; on failure the assertion message carries its full output."""
    proc = subprocess.run(
        cmd,
        input=input.decode() if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> bool:
    """Parametrise a test over TCP and the Unix socket; the value is `unix`."""
    return bool(request.param == "unix")
