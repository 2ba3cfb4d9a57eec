"""Operator surface end to end: a real `zramd serve` process driven by the real CLI.

Each test starts its own daemon on a Unix socket (and 127.0.0.1 on a free port where
useful) with a control socket in a tmp dir, writes data through python3-libnbd, and
checks what `zramd list/stat/compact/reset/destroy/reload` report. Every process
started here is stopped here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zramd import system

nbd = pytest.importorskip("nbd")

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
START_TIMEOUT = 20.0

if os.environ.get("ZRAMD_E2E_SERVER", "zramd") != "zramd":
    pytest.skip("operator tests need zramd itself", allow_module_level=True)


def zramd_argv() -> list[str]:
    exe = REPO / ".venv" / "bin" / "zramd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zramd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.sock = str(workdir / "nbd.sock")
        self.control = str(workdir / "c.sock")
        self.errpath = workdir / f"serve-{time.monotonic_ns()}.stderr"
        self.procs: list[subprocess.Popen[bytes]] = []
        with open(self.errpath, "wb") as errf:
            self.proc = subprocess.Popen(
                [*zramd_argv(), "serve", "--unix", self.sock, "--control", self.control, *args],
                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.procs.append(self.proc)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.stderr()}"
            if os.path.exists(self.sock) and os.path.exists(self.control):
                try:
                    self.cli("list", check=True)
                    return
                except AssertionError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.stderr()}")

    def stderr(self) -> str:
        return self.errpath.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*zramd_argv(), *args, "--control", self.control],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        if check:
            assert r.returncode == 0, f"zramd {' '.join(args)}: {r.stderr}"
        return r

    def rows(self) -> dict[str, dict[str, Any]]:
        out = json.loads(self.cli("list", "--json").stdout)
        return {r["name"]: r for r in out["exports"]}

    def client(self, name: str) -> Any:
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(self.sock)
        return h

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    assert len(str(tmp_path / "nbd.sock")) < 100, "tmp path too long for AF_UNIX"
    return tmp_path


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    # systemd's notification socket, to see READY=1
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    npath = str(workdir / "notify")
    notify.bind(npath)
    notify.settimeout(START_TIMEOUT)
    d = Daemon(workdir, ["--export", "a=64M"], env={"NOTIFY_SOCKET": npath})
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.splitlines(), msg
        d.wait_ready()
        yield d
    finally:
        notify.close()
        d.stop()


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def compressible(n: int) -> bytes:
    line = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(4096))
    return (line * (n // len(line) + 1))[:n]


def test_create_write_list_stat_compact_reset_destroy(daemon: Daemon) -> None:
    d = daemon
    r = d.cli("create", "b", "--size", "32M", "-a", "zstd", "--level", "3", "--mem-limit", "16M")
    assert r.stdout.strip() == "created b: 32M zstd"
    h = d.client("b")
    h.pwrite(compressible(8 * MiB), 0)
    h.pwrite(bytes(1 * MiB), 8 * MiB)
    h.flush()
    rows = d.rows()
    assert set(rows) == {"a", "b"}
    b = rows["b"]
    assert b["disksize"] == 32 * MiB and b["algorithm"] == "zstd" and b["mem_limit"] == 16 * MiB
    assert b["data"] == 9 * MiB  # zero pages are stored data (as same-filled pages), as zram
    assert b["zero_pages"] == 256
    assert 0 < b["compr"] < 2 * MiB and b["total"] < 4 * MiB
    assert b["comp_ratio"] > 3 and b["mem_used"] >= b["total"]
    assert b["clients"] == 1
    assert rows["a"]["data"] == 0 and rows["a"]["algorithm"] == "lz4"

    table = d.cli("list").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "DISKSIZE", "DATA", "COMPR", "ALGORITHM", "ZERO-PAGES", "TOTAL", "MEM-LIMIT",
        "MEM-USED", "COMP-RATIO", "CLIENTS",
    ]
    cells = {line.split()[0]: line.split() for line in table[1:]}
    assert cells["b"][1:3] == ["32M", "9M"] and cells["b"][4:6] == ["zstd", "256"]
    assert cells["b"][7] == "16M" and cells["b"][10] == "1"
    assert d.cli("list", "-n", "-b", "-o", "name,data", "b").stdout.split() == ["b", str(9 * MiB)]

    st = json.loads(d.cli("stat", "b", "--json").stdout)
    assert st["mm_stat"]["orig_data_size"] == 9 * MiB
    assert st["mm_stat"]["same_pages"] == 256 and st["mm_stat"]["mem_limit"] == 16 * MiB
    assert st["io_stat"] == {"failed_reads": 0, "failed_writes": 0, "invalid_io": 0,
                             "notify_free": 0}
    text = d.cli("stat", "b").stdout
    assert text.splitlines()[1].startswith(f"mm_stat: {9 * MiB} ")

    # free half, then compact: the pool gives pages back
    h.trim(4 * MiB, 0)
    h.flush()
    before = d.rows()["b"]["total"]
    out = d.cli("compact", "b").stdout
    assert out.startswith("b: ") and "pages compacted" in out
    after = d.rows()["b"]["total"]
    assert after <= before
    assert h.pread(4096, 4 * MiB + 4096) == compressible(8 * MiB)[4 * MiB + 4096 : 4 * MiB + 8192]

    # busy: destroy and reset refused while the client is connected
    r = d.cli("destroy", "b", check=False)
    assert r.returncode == 1
    assert r.stderr == (
        "zramd: error: export 'b' has 1 client(s) connected; disconnect them or use --force\n"
    )
    r = d.cli("reset", "b", check=False)
    assert r.returncode == 1 and "in use" in r.stderr
    h.shutdown()
    del h
    wait_for(lambda: d.rows()["b"]["clients"] == 0)
    d.cli("reset", "b")
    assert d.rows()["b"]["data"] == 0 and d.rows()["b"]["total"] == 0
    h = d.client("b")
    assert h.pread(4096, 0) == bytes(4096)
    d.cli("destroy", "b", "--force")
    assert set(d.rows()) == {"a"}
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    r = d.cli("stat", "b", check=False)
    assert r.returncode == 1 and r.stderr == "zramd: error: no export named 'b'\n"
    # set: algorithm for new pages and the memory limit
    r = d.cli("set", "a", "--mem-limit", "1M", "-a", "zstd")
    assert r.stdout.strip() == "a: algorithm zstd, mem-limit 1M"
    ha = d.client("a")
    with pytest.raises(nbd.Error):  # ENOSPC once the 1M limit is reached
        ha.pwrite(os.urandom(4 * MiB), 0)
    del ha
    assert json.loads(d.cli("stat", "a", "--json").stdout)["io_stat"]["failed_writes"] > 0
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not os.path.exists(d.control)  # removed on exit


def test_second_serve_on_same_control_socket_fails(daemon: Daemon, workdir: Path) -> None:
    r = subprocess.run(
        [*zramd_argv(), "serve", "--unix", str(workdir / "other.sock"), "--control",
         daemon.control, "--export", "x=4M"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 1
    assert f"another zramd is already running on control socket {daemon.control}" in r.stderr
    assert not os.path.exists(workdir / "other.sock")
    assert set(daemon.rows()) == {"a"}  # the first daemon is untouched


def test_sighup_reload(workdir: Path) -> None:
    cfg = workdir / "zramd.toml"
    cfg.write_text('[export.one]\nsize = "8M"\n[export.keep]\nsize = 16\n')
    d = Daemon(workdir, ["--config", str(cfg), "--bind", ""])
    try:
        d.wait_ready()
        rows = d.rows()
        assert set(rows) == {"one", "keep"} and rows["keep"]["disksize"] == 16 * MiB
        h = d.client("one")
        h.pwrite(b"x" * 4096, 0)
        cfg.write_text(
            '[export.keep]\nsize = 16\n[export.two]\nsize = "min(ram, 4)"\n'
            'compression-algorithm = "zstd(level=1)"\n'
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "two" in d.rows())
        rows = d.rows()
        assert set(rows) == {"one", "keep", "two"}  # one is busy: kept
        assert rows["two"]["disksize"] == 4 * MiB and rows["two"]["algorithm"] == "zstd"
        assert "export one removed from the configuration but kept: 1 client(s)" in d.stderr()
        assert h.pread(4096, 0) == b"x" * 4096
        h.shutdown()
        del h
        wait_for(lambda: d.rows()["one"]["clients"] == 0)
        lines = d.cli("reload").stdout  # same as SIGHUP, through the control socket
        assert "export one removed" in lines
        assert set(d.rows()) == {"keep", "two"}
        cfg.write_text("[export.keep]\nsize = 'ram +'\n")
        r = d.cli("reload", check=False)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("zramd: error: reload failed, configuration unchanged: ")
        assert r.stderr.count("\n") == 1
        assert set(d.rows()) == {"keep", "two"}
    finally:
        d.stop()


def test_serve_swap_safety_messages(workdir: Path) -> None:
    full = system.has_capability(system.CAP_IPC_LOCK) and system.has_capability(
        system.CAP_SYS_RESOURCE
    )
    d = Daemon(workdir, ["--swap", "--export", "s=4M"])
    try:
        d.wait_ready()
        err = d.stderr()
        if full:
            assert "swap safety:" in err and "failed" not in err
        else:
            assert "CAP_" in err and "swap safety:" in err
        pid = d.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        vmlck = int(next(x for x in status.splitlines() if x.startswith("VmLck:")).split()[1])
        if system.has_capability(system.CAP_IPC_LOCK):
            assert vmlck > 0
    finally:
        d.stop()
    if full:
        return
    r = subprocess.run(
        [*zramd_argv(), "serve", "--swap=require", "--unix", str(workdir / "r.sock"),
         "--control", "", "--export", "s=4M"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("zramd: error: swap safety required but:")
    assert "CAP_SYS_RESOURCE" in lines[-1]


def test_metrics_scraped_and_parsed(workdir: Path) -> None:
    import urllib.request

    port = free_port()
    d = Daemon(workdir, ["--export", "m=16M,algorithm=zstd", "--metrics", f"127.0.0.1:{port}"])
    try:
        d.wait_ready()
        h = d.client("m")
        h.pwrite(compressible(2 * MiB), 0)
        h.flush()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                assert line.split()[1] in ("HELP", "TYPE")
                continue
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
        assert samples["zramd_exports"] == 1
        assert samples['zramd_disksize_bytes{export="m"}'] == 16 * MiB
        assert samples['zramd_orig_data_size_bytes{export="m"}'] == 2 * MiB
        assert samples['zramd_clients{export="m"}'] == 1
        comp = samples['zramd_compr_data_size_bytes{export="m"}']
        assert 0 < comp < MiB
        assert samples['zramd_mem_used_total_bytes{export="m"}'] >= comp
        # the block layer's counters, from a real client's requests
        assert samples['zramd_io_bytes_total{export="m",command="write"}'] == 2 * MiB
        hist = "zramd_request_duration_seconds"
        writes = samples[f'{hist}_count{{export="m",command="write"}}']
        assert writes >= 1
        assert samples[f'{hist}_bucket{{export="m",command="write",le="+Inf"}}'] == writes
        assert samples[f'{hist}_count{{export="m",command="flush"}}'] == 1
        assert samples['zramd_requests_in_flight{export="m"}'] == 0
        assert samples['zramd_memory_budget_bytes'] == 0
        del h
    finally:
        d.stop()


def test_sighup_without_config_file_keeps_serving(daemon: Daemon) -> None:
    h = daemon.client("a")
    h.pwrite(b"k" * 4096, 0)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: no configuration file" in daemon.stderr())
    assert daemon.proc.poll() is None
    assert h.pread(4096, 0) == b"k" * 4096
    assert "SIGHUP: no configuration file to reload" in daemon.stderr()
    del h


def test_trim_and_compact_under_swap_mode(workdir: Path) -> None:
    """swapon --discard sends TRIMs: with --swap (mlockall) they must work and free memory."""
    if not system.has_capability(system.CAP_IPC_LOCK):
        pytest.skip("mlockall needs CAP_IPC_LOCK")
    d = Daemon(workdir, ["--swap", "--export", "s=32M"])
    try:
        d.wait_ready()
        h = d.client("s")
        h.pwrite(os.urandom(MiB) * 8, 0)
        h.flush()
        before = d.rows()["s"]["total"]
        h.trim(8 * MiB, 0)
        h.flush()
        d.cli("compact", "s")
        assert d.rows()["s"]["total"] < before // 4
        assert h.pread(4096, 0) == bytes(4096)
        del h
    finally:
        d.stop()


def tcp_listeners(pid: int) -> list[str]:
    """The local addresses (hex, as in /proc/net/tcp) of the TCP sockets ``pid`` listens on."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        try:
            inodes.add(os.readlink(fd))
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f"socket:[{f[9]}]" in inodes:  # 0A = LISTEN
                found.append(f[1])
    return found


def listening_line(d: Daemon) -> str:
    return next(x for x in d.stderr().splitlines() if "listening on" in x)


def test_unix_flag_alone_is_unix_only_with_and_without_config_file(workdir: Path) -> None:
    """`serve --unix PATH` opens only that socket, whether or not a config file is given; TCP
    comes back only when asked for (here by the file's `port`, on a free ephemeral port)."""
    files = {
        "no-file": None,
        "file": '[export.a]\nsize = "4M"\n',
        "file-with-tcp": 'bind = "127.0.0.1"\nport = 0\n[export.a]\nsize = "4M"\n',
    }
    seen: dict[str, tuple[str, int]] = {}
    for name, text in files.items():
        run = workdir / name
        run.mkdir()
        args = ["--export", "a=4M"]
        if text is not None:
            (run / "zramd.toml").write_text(text)
            args = ["--config", str(run / "zramd.toml")]
        d = Daemon(run, args)
        try:
            d.wait_ready()
            h = d.client("a")
            h.pwrite(b"u" * 4096, 0)
            assert h.pread(4096, 0) == b"u" * 4096
            del h
            line = listening_line(d)
            seen[name] = (line.split("listening on ", 1)[1].split(" (exports")[0],
                          len(tcp_listeners(d.proc.pid)))
        finally:
            d.stop()
    assert seen["no-file"] == (f"unix:{workdir / 'no-file' / 'nbd.sock'}", 0)
    assert seen["file"] == (f"unix:{workdir / 'file' / 'nbd.sock'}", 0)
    addresses, tcp = seen["file-with-tcp"]
    assert addresses.startswith(f"unix:{workdir / 'file-with-tcp' / 'nbd.sock'}, 127.0.0.1:")
    assert tcp == 1


def test_sigterm_with_clients_says_what_is_lost(daemon: Daemon) -> None:
    """SIGTERM at the default log level: a warning per export with clients or data."""
    h = daemon.client("a")
    h.pwrite(b"k" * 8192, 0)
    h.flush()
    daemon.stop()
    assert daemon.proc.returncode == 0
    err = daemon.stderr()
    lines = [x for x in err.splitlines() if "stopping:" in x]
    assert len(lines) == 1, err
    assert lines[0].endswith(
        "zramd: stopping: export a loses 8K of data (8192 bytes stored); clients: #1 local"
    )  # the connection's label: its number and its (unnamed) Unix peer
    del h
