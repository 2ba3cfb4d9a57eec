"""The NBD servers under test: how to start, probe and stop each one.

Theory of operation
-------------------
A :class:`ServerSpec` names one configuration (``zramd-lz4``, ``nbdkit-zstd``, ...) and knows the
command line that serves an export of a given size on a Unix socket. :meth:`ServerSpec.start`
makes a private temp dir, starts the process there (stderr to a log file in that dir), and waits
until the socket accepts a connection; the returned :class:`RunningServer` gives the NBD URI, the
process's CPU time and RSS from /proc, and the bytes of its backing tmpfs file (qemu-nbd keeps the
data in a /dev/shm file, not in its RSS, so memory comparisons add the two). ``stop`` sends
SIGTERM, waits, kills only if it must, and removes the temp dir and backing file.

A zramd server gets a control socket in its temp dir (``RunningServer.control``), so that
:meth:`RunningServer.zramd` can drive it (``idle``, ``recompress``); a spec's ``stages`` are
such commands, run by the density benchmark after the copy-in, each stage measured apart
(:data:`COLD`).

Nothing here knows about workloads or reports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: how long a server may take to accept its first connection
START_TIMEOUT_S = 20.0
#: how long a server may take to exit after SIGTERM before it is killed
STOP_TIMEOUT_S = 10.0
#: polling interval while waiting for the socket
POLL_S = 0.02
#: how long one zramd control command (a recompress pass over an image) may take
ZRAMD_COMMAND_TIMEOUT_S = 600.0
#: the directory of tmpfs backing files (qemu-nbd)
TMPFS_DIR = "/dev/shm"
#: export name used by servers that take one (nbdkit serves the default export "")
EXPORT_NAME = "bench"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def zramd_command() -> list[str]:
    """The zramd console script of the running interpreter's venv, else ``python -m zramd``."""
    script = Path(sys.executable).parent / "zramd"
    if script.exists():
        return [str(script)]
    found = shutil.which("zramd")
    if found:
        return [found]
    return [sys.executable, "-m", "zramd"]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2 :].split()
    # fields 14 and 15 of proc(5); rest[0] is field 3 (state)
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of the process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    workdir: Path
    socket_path: Path
    backing_file: Path | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.spec.export_name}?socket={self.socket_path}"

    @property
    def control(self) -> Path:
        """The control socket of a zramd server."""
        return self.workdir / "control.sock"

    def zramd(self, *args: str) -> str:
        """Run ``zramd ARGS --control SOCKET`` against this server; its output."""
        proc = subprocess.run(
            [*zramd_command(), *args, "--control", str(self.control)],
            capture_output=True, text=True, timeout=ZRAMD_COMMAND_TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"zramd {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def stat(self) -> dict[str, Any]:
        """``zramd stat --json`` of this zramd server's export."""
        st: dict[str, Any] = json.loads(self.zramd("stat", "--json", self.spec.export_name))
        return st

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return proc_rss_bytes(self.pid)

    def backing_bytes(self) -> int:
        """Bytes the backing tmpfs file really holds (0 without one)."""
        if self.backing_file is None:
            return 0
        try:
            return os.stat(self.backing_file).st_blocks * 512
        except FileNotFoundError:
            return 0

    def memory_bytes(self) -> int:
        """RSS plus backing tmpfs bytes: the RAM the server's data costs."""
        return self.rss_bytes() + self.backing_bytes()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]

    def stop(self) -> int | None:
        """SIGTERM, wait, kill if needed; clean up. Returns the exit code."""
        rc: int | None = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        if self.backing_file is not None:
            self.backing_file.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return rc

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ServerSpec:
    """One server configuration under test."""

    name: str
    kind: str  # "zramd" | "nbdkit" | "qemu-nbd"
    option: str  # algorithm for zramd, allocator for nbdkit, "" for qemu-nbd
    export_name: str = EXPORT_NAME
    extra: list[str] = field(default_factory=list)
    #: zramd commands the density benchmark runs after the copy-in: per stage, its name and
    #: its commands (the export name and the control socket are added)
    stages: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = ()
    #: the directory the server's private temp dir is made in (None: the system's temp dir)
    parent_dir: str | None = None

    def command(self, sock: Path, size: int, backing: Path | None) -> list[str]:
        if self.kind == "zramd":
            spec = f"{self.export_name}={size}B,algorithm={self.option}"
            control = ["--control", str(sock.parent / "control.sock")]
            return [*zramd_command(), "serve", "--unix", str(sock), *control, "--export", spec,
                    *self.extra]  # fmt: skip
        if self.kind == "nbdkit":
            return [
                "nbdkit", "-f", "-U", str(sock), "memory", str(size),
                f"allocator={self.option}", *self.extra,
            ]  # fmt: skip
        if self.kind == "qemu-nbd":
            assert backing is not None
            return [
                "qemu-nbd", "-f", "raw", "-x", self.export_name, "-k", str(sock), "-t",
                "-e", "8", "--cache=writeback", *self.extra, str(backing),
            ]  # fmt: skip
        raise ValueError(f"unknown server kind {self.kind!r}")

    def start(self, size: int) -> RunningServer:
        workdir = Path(tempfile.mkdtemp(prefix=f"zbench-{self.name}-", dir=self.parent_dir))
        sock = workdir / "nbd.sock"
        backing: Path | None = None
        if self.kind == "qemu-nbd":
            fd, name = tempfile.mkstemp(prefix="zbench-qemu-", suffix=".img", dir=TMPFS_DIR)
            os.ftruncate(fd, size)
            os.close(fd)
            backing = Path(name)
        log = workdir / "server.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                self.command(sock, size, backing),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        srv = RunningServer(self, proc, workdir, sock, backing, log)
        try:
            _wait_ready(srv)
        except BaseException:
            srv.stop()
            raise
        return srv


class ServerStartError(RuntimeError):
    pass


def _wait_ready(srv: RunningServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not srv.alive():
            raise ServerStartError(
                f"{srv.spec.name} exited with {srv.proc.returncode}: {srv.log_tail()}"
            )
        if srv.socket_path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(srv.socket_path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(POLL_S)
    raise ServerStartError(f"{srv.spec.name} did not listen within {START_TIMEOUT_S}s")


#: every configuration the harness knows, in report order; nbdkit-zstd is the main reference
ALL_SERVERS: list[ServerSpec] = [
    ServerSpec("zramd-lz4", "zramd", "lz4"),
    ServerSpec("zramd-zstd", "zramd", "zstd"),
    ServerSpec("nbdkit-zstd", "nbdkit", "zstd", export_name=""),
    ServerSpec("nbdkit-sparse", "nbdkit", "sparse", export_name=""),
    ServerSpec("qemu-nbd-tmpfs", "qemu-nbd", ""),
]
REFERENCE = "nbdkit-zstd"
#: the density benchmark's cold-page runs, each on a fresh server after the copy-in: every page
#: marked idle, then recompressed page by page (lz4 for new pages, zstd to recompress), or
#: packed into groups of up to 16 pages with the export's group codec: the default (zstd level
#: 9), or zstd level 19 (the densest, at about a tenth of the packing speed)
RECOMPRESS = ServerSpec(
    "zramd-lz4+zstd",
    "zramd",
    "lz4 zstd(level=3)",
    stages=(("after recompress", (("idle", "--all"), ("recompress",))),),
)
_GROUP_STAGES = (("after grouping", (("idle", "--all"), ("recompress", "--group-pages", "16"))),)
GROUP = ServerSpec("zramd-lz4", "zramd", "lz4", stages=_GROUP_STAGES)
GROUP_19 = ServerSpec(
    "zramd-lz4-zstd19", "zramd", "lz4,group-algorithm=zstd(level=19)", stages=_GROUP_STAGES
)
COLD = (RECOMPRESS, GROUP, GROUP_19)
ZRAMD_NAMES = [s.name for s in ALL_SERVERS if s.kind == "zramd"]


def server_by_name(name: str) -> ServerSpec:
    for s in ALL_SERVERS:
        if s.name == name:
            return s
    raise KeyError(f"unknown server {name!r}; choose from {', '.join(s.name for s in ALL_SERVERS)}")
