#!/usr/bin/env python3
"""The kernel's own NBD client against zramd, in a qemu guest: the harness.

Theory of operation
-------------------
A *group* is one boot: a host server (zramd, or nbdkit/nbd-server-free ``nbdkit memory`` for
developing the guest) started on a free 127.0.0.1 port with the exports the group's scenarios
need, and a qemu guest (``scripts/vm/build.py`` makes the kernel and initramfs; ``init.sh`` runs
the scenarios named on the kernel command line). The guest's only network path is qemu's
restricted user network with one guestfwd, 10.0.2.100:10809, whose ``cmd:`` is
``scripts/vm/relay.py PORT``: the host side only ever connects to loopback.

The serial console is the guest's voice (see init.sh for the ``@@`` line protocol). The harness
keeps the whole console in ``.cache/vm/logs/``, answers ``@@SYNC`` lines by reading the server's
stats (:func:`host_stats`, the one place that knows how; checks that need it are SKIPped, never
PASSed, when the ``zramd stat`` command is not available) and then writing a line to the guest's
console, and turns ``@@RESULT`` lines into :class:`Outcome` records. A scenario that never
reported (guest hang, timeout, crash) is a FAIL with the console tail as its reason.

Groups: ``storage`` (fs, multiconn, discard, reconnect, memlimit), ``swap`` (a 256 MiB guest
swapping to an export) and ``negative`` (scenario fs against a server whose reads are corrupted:
it must FAIL, and the harness reports PASS for the group only if it does).

Accelerator: KVM only if a short probe boot succeeds (cached per host kernel), else TCG; under
TCG the swap scenario is sized down (see SWAP_HOG_MIB_TCG). ZRAMD_VM_ACCEL=tcg|kvm forces one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VM_SCRIPTS = REPO / "scripts" / "vm"
CACHE = REPO / ".cache" / "vm"
LOGS = CACHE / "logs"
QEMU = "qemu-system-x86_64"
GUEST_ADDR = "10.0.2.100"  # inside qemu's user network only; never a host-side target
GUEST_PORT = 10809

SERVER_START_TIMEOUT_S = 30.0
KVM_PROBE_TIMEOUT_S = 25.0
STORAGE_MEM_MIB = 512
SWAP_MEM_MIB = 256
#: the memory hog writes this much in a 256 MiB guest: 2x RAM with KVM, sized down under TCG
SWAP_HOG_MIB_KVM = 512
SWAP_HOG_MIB_TCG = 384
#: wall-clock limits per boot (TCG); a boot that overruns is killed and its scenarios FAIL
BOOT_TIMEOUT_S = {"storage": 600.0, "swap": 600.0, "negative": 240.0}
LOGS_KEPT = 60
PAGE = 4096
#: memhog makes 1/4 of its pages zero or same-filled; the server must see at least this share
SAME_PAGES_MIN_SHARE = 0.10
COMMON_APPEND = "console=ttyS0 loglevel=4 panic=-1 zswap.enabled=0 zramd.timeout=60"


@dataclass
class Group:
    name: str
    scenarios: list[str]
    exports: list[str]  # zramd --export SPECs
    mem_mib: int
    expect_fail: set[str] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)
    #: a tests/support device behind every export: the server is tests.support.serve_device
    device: str = ""


GROUPS: dict[str, Group] = {
    "storage": Group(
        "storage",
        ["fs", "multiconn", "discard", "reconnect", "memlimit"],
        ["fs=256M", "mc=256M", "dc=16M", "lim=64M,mem-limit=8M"],
        STORAGE_MEM_MIB,
    ),
    "swap": Group("swap", ["swap"], ["swap=1G"], SWAP_MEM_MIB),
    "negative": Group(
        "negative", ["fs"], ["fs=256M"], STORAGE_MEM_MIB,
        expect_fail={"fs"}, device="corrupt-read",
    ),
}


@dataclass
class Outcome:
    name: str
    status: str  # PASS | FAIL | SKIP
    secs: float = 0.0
    figures: str = ""
    reason: str = ""

    def line(self) -> str:
        extra = f" reason: {self.reason}" if self.reason else ""
        figs = f" {self.figures}" if self.figures else ""
        return f"{self.status} {self.name} ({self.secs:.1f}s){figs}{extra}"


@dataclass
class BootReport:
    group: str
    outcomes: list[Outcome]
    console_log: Path
    wall_s: float
    accel: str

    @property
    def ok(self) -> bool:
        return all(o.status != "FAIL" for o in self.outcomes)


# ---------------------------------------------------------------------------------------------
# host servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zramd_bin() -> str:
    cand = REPO / ".venv" / "bin" / "zramd"
    return str(cand) if cand.exists() else (shutil.which("zramd") or str(cand))


class HostServer:
    """zramd (or ``nbdkit memory`` for development) on a free loopback port; stop() ends it."""

    def __init__(self, kind: str, exports: list[str], log_path: Path, env: dict[str, str],
                 device: str = "") -> None:
        self.kind = kind
        self.exports = exports
        self.port = free_port()
        self.log_path = log_path
        self.control = str(log_path.with_suffix(".control.sock"))
        self.env = {**os.environ, **env, "ZRAMD_CONTROL": self.control}
        self.device = device
        if device:
            self.env["PYTHONPATH"] = str(REPO)  # python -m tests.support.serve_device
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.kind == "nbdkit":  # one memory disk for every export name: development only
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "memory", "1G"]
        if self.device:  # zramd's server with a test device (no control socket, no stats)
            return [sys.executable, "-m", "tests.support.serve_device", "--device", self.device,
                    "--bind", "127.0.0.1", "--port", str(self.port),
                    *(a for spec in self.exports for a in ("--export", spec))]
        cmd = [zramd_bin(), "serve", "--bind", "127.0.0.1", "--port", str(self.port)]
        if _serve_accepts("--control"):
            cmd += ["--control", self.control]
        for spec in self.exports:
            cmd += ["--export", spec]
        return cmd

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} did not listen on 127.0.0.1:{self.port}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


_SERVE_HELP: str | None = None


def _serve_accepts(flag: str) -> bool:
    global _SERVE_HELP
    if _SERVE_HELP is None:
        try:
            _SERVE_HELP = subprocess.run([zramd_bin(), "serve", "--help"], capture_output=True,
                                         text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            _SERVE_HELP = ""
    return flag in _SERVE_HELP


def _flatten(d: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, dict):
                _flatten(v, out)
            else:
                out.setdefault(str(k), v)
    return out


def host_stats(server: HostServer, export: str) -> tuple[dict[str, Any] | None, str]:
    """The server's stats for ``export`` as a flat dict (mm_stat / io_stat names), or
    (None, why) when they cannot be read (no ``zramd stat`` command yet, not zramd, error)."""
    if server.kind != "zramd":
        return None, f"host server is {server.kind}, not zramd"
    try:
        p = subprocess.run([zramd_bin(), "stat", export, "--json"], capture_output=True,
                           text=True, env=server.env, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"zramd stat unavailable: {e}"
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        return None, f"zramd stat {export} --json failed: {msg[-1] if msg else p.returncode}"
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        return None, f"zramd stat printed no JSON: {p.stdout[:200]!r}"
    flat = _flatten(data, {})
    if "mem_used_total" not in flat:
        return None, f"zramd stat JSON has no mem_used_total: {sorted(flat)[:20]}"
    return flat, ""


# ---------------------------------------------------------------------------------------------
# qemu


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def netdev_arg(port: int, relay_log: Path) -> str:
    relay = f"{sys.executable} {VM_SCRIPTS / 'relay.py'} {port} {relay_log}"
    if "," in relay:
        raise ValueError("qemu option values may not contain commas: " + relay)
    return f"user,id=n0,restrict=on,guestfwd=tcp:{GUEST_ADDR}:{GUEST_PORT}-cmd:{relay}"


def qemu_cmd(kernel: Path, initrd: Path, accel: str, mem_mib: int, append: str,
             netdev: str | None) -> list[str]:
    cmd = [QEMU, "-accel", accel, "-m", f"{mem_mib}M", "-smp", "2", "-display", "none",
           "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nodefaults",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    if netdev:
        cmd += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    else:
        cmd += ["-nic", "none"]
    return cmd


def choose_accel(kernel: Path, initrd: Path) -> str:
    forced = os.environ.get("ZRAMD_VM_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    stamp = CACHE / f"kvm-probe-{os.uname().release}"
    if stamp.exists():
        return stamp.read_text().strip()
    accel = "tcg"
    cmd = qemu_cmd(kernel, initrd, "kvm", 256, COMMON_APPEND + " zramd.run=", None)
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=KVM_PROBE_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
        if b"@@DONE" in p.stdout:
            accel = "kvm"
    except subprocess.TimeoutExpired:
        pass
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(accel + "\n")
    return accel


RESULT_RE = re.compile(r"@@RESULT (\S+) (PASS|FAIL) secs=([0-9.]+)(.*)$")
SYNC_RE = re.compile(r"@@SYNC (\S+)")


def run_boot(group: Group, kernel: Path, initrd: Path, accel: str, port: int, append_extra: str,
             on_sync: Callable[[str], None], log_path: Path, timeout_s: float) -> tuple[
                 dict[str, Outcome], bool, str]:
    """Boot once; return (outcomes by scenario from @@RESULT lines, saw @@DONE, console tail)."""
    relay_log = log_path.with_suffix(".relay.log")
    relay_log.unlink(missing_ok=True)
    append = f"{COMMON_APPEND} zramd.run={','.join(group.scenarios)} {append_extra}".strip()
    cmd = qemu_cmd(kernel, initrd, accel, group.mem_mib, append, netdev_arg(port, relay_log))
    results: dict[str, Outcome] = {}
    done = False
    lines: list[str] = []
    with open(log_path, "w") as log:
        log.write("# " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None and proc.stdin is not None
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                lines.append(line)
                m = RESULT_RE.search(line)
                if m:
                    figures, reason = m.group(4).strip(), ""
                    rm = re.search(r'reason="(.*)"', figures)
                    if rm:
                        reason, figures = rm.group(1), figures[: rm.start()].strip()
                    results[m.group(1)] = Outcome(m.group(1), m.group(2), float(m.group(3)),
                                                  figures, reason)
                    print(f"  [{group.name}] {results[m.group(1)].line()}", file=sys.stderr,
                          flush=True)
                    continue
                s = SYNC_RE.search(line)
                if s:
                    on_sync(s.group(1))
                    try:
                        proc.stdin.write(b"go\n")
                        proc.stdin.flush()
                    except OSError:
                        pass
                    continue
                if "@@DONE" in line:
                    done = True
        finally:
            timer.cancel()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if relay_log.exists():
            log.write("# relay log (one line per guest connection):\n" + relay_log.read_text())
            relay_log.unlink()
    return results, done, "\n".join(lines[-25:])


# ---------------------------------------------------------------------------------------------
# host-side checks


class HostChecks:
    """Stats taken at the guest's @@SYNC points, and the host-side verdicts drawn from them."""

    def __init__(self, server: HostServer) -> None:
        self.server = server
        self.snaps: dict[str, tuple[dict[str, Any] | None, str]] = {}

    def on_sync(self, tag: str) -> None:
        export = {"discard-before": "fs", "discard-after": "fs", "swap-mid": "swap"}.get(tag)
        if export:
            self.snaps[tag] = host_stats(self.server, export)

    def discard(self) -> Outcome | None:
        if "discard-before" not in self.snaps:
            return None
        (before, why1), (after, why2) = self.snaps["discard-before"], self.snaps.get(
            "discard-after", (None, "guest never reached discard-after"))
        if before is None or after is None:
            return Outcome("discard-host-stats", "SKIP", reason=why1 or why2)
        b, a = int(before["mem_used_total"]), int(after["mem_used_total"])
        bo, ao = int(before.get("orig_data_size", 0)), int(after.get("orig_data_size", 0))
        figs = (f"mem_used_total={b / 2**20:.1f}->{a / 2**20:.1f}MiB "
                f"orig_data_size={bo / 2**20:.1f}->{ao / 2**20:.1f}MiB")
        ok = a < b and ao < bo
        return Outcome("discard-host-stats", "PASS" if ok else "FAIL", figures=figs,
                       reason="" if ok else "the server did not give memory back after fstrim")

    def swap(self) -> Outcome | None:
        if "swap-mid" not in self.snaps:
            return None
        st, why = self.snaps["swap-mid"]
        if st is None:
            return Outcome("swap-host-stats", "SKIP", reason=why)
        orig, total, same = (int(st.get("orig_data_size", 0)), int(st["mem_used_total"]),
                             int(st.get("same_pages", 0)))
        ratio = orig / total if total else 0.0
        figs = (f"orig_data_size={orig / 2**20:.1f}MiB "
                f"compr_data_size={int(st.get('compr_data_size', 0)) / 2**20:.1f}MiB "
                f"mem_used_total={total / 2**20:.1f}MiB ratio={ratio:.2f} same_pages={same} "
                f"huge_pages={st.get('huge_pages', '?')}")
        # a quarter of the hog's pages are zero or same-filled: the swapped ones must show up
        ok = same * PAGE >= SAME_PAGES_MIN_SHARE * orig and ratio > 1.0
        return Outcome("swap-host-stats", "PASS" if ok else "FAIL", figures=figs,
                       reason="" if ok else f"expected same_pages >= {SAME_PAGES_MIN_SHARE:.0%} "
                       "of the stored pages and a compression ratio > 1")


# ---------------------------------------------------------------------------------------------
# groups


def run_group(name: str, server_kind: str = "zramd", hog_mib: int | None = None,
              files: int | None = None, scenarios: list[str] | None = None) -> BootReport:
    sys.path.insert(0, str(VM_SCRIPTS))
    import build

    group = GROUPS[name]
    if scenarios:  # development: a subset, in the given order
        group = Group(group.name, scenarios, group.exports, group.mem_mib, group.expect_fail,
                      group.env, group.device)
    kernel, initrd = build.build()
    accel = choose_accel(kernel, initrd)
    LOGS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    log_path = LOGS / f"{stamp}-{name}.console.log"
    server = HostServer(server_kind, group.exports, LOGS / f"{stamp}-{name}.server.log",
                        group.env, group.device)
    extra = []
    if "swap" in group.scenarios:
        mib = hog_mib or (SWAP_HOG_MIB_KVM if accel == "kvm" else SWAP_HOG_MIB_TCG)
        extra.append(f"zramd.hog_mib={mib}")
    if files:
        extra.append(f"zramd.files={files}")
    t0 = time.monotonic()
    server.start()
    checks = HostChecks(server)
    try:
        results, done, tail = run_boot(group, kernel, initrd, accel, server.port, " ".join(extra),
                                       checks.on_sync, log_path, BOOT_TIMEOUT_S[name])
    finally:
        rc = server.stop()
    wall = time.monotonic() - t0
    outcomes: list[Outcome] = []
    for scen in group.scenarios:
        o = results.get(scen) or Outcome(
            scen, "FAIL", reason=f"no result from the guest ({'done' if done else 'no @@DONE'}); "
            f"console tail:\n{tail}")
        if scen in group.expect_fail:  # the negative check: the scenario must detect corruption
            o = negative_outcome(scen, o)
        outcomes.append(o)
    for host in (checks.discard(), checks.swap()):
        if host is not None:
            outcomes.append(host)
    if server_kind == "zramd" and rc not in (0, None):
        outcomes.append(Outcome("server-exit", "FAIL", reason=f"zramd exited {rc} on SIGTERM"))
    prune_logs()
    return BootReport(name, outcomes, log_path, wall, accel)


#: a negative run must fail on a data check, not because it could not even connect
UNRELATED_FAILURES = ("nbd-client", "nbd0 has no size", "no result from the guest")


def negative_outcome(scen: str, o: Outcome) -> Outcome:
    name = f"{scen}-detects-corruption"
    if o.status == "PASS":
        return Outcome(name, "FAIL", o.secs, o.figures,
                       "scenario passed against a corrupting server")
    if o.reason.startswith(UNRELATED_FAILURES):
        return Outcome(name, "FAIL", o.secs, o.figures, f"failed for another reason: {o.reason}")
    return Outcome(name, "PASS", o.secs, o.figures, f"guest detected it: {o.reason}")


def prune_logs(keep: int = LOGS_KEPT) -> None:
    """Keep the newest ``keep`` files of .cache/vm/logs (every run's console log is kept)."""
    files = sorted(LOGS.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)


def format_report(r: BootReport) -> str:
    head = f"== {r.group}: {r.wall_s:.0f}s wall, accel={r.accel}, console: {r.console_log}"
    return "\n".join([head, *(o.line() for o in r.outcomes)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="zramd kernel-client VM test")
    ap.add_argument("--groups", default="storage,swap,negative")
    ap.add_argument("--server", choices=["zramd", "nbdkit"], default="zramd")
    ap.add_argument("--hog-mib", type=int, default=None)
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--scenarios", default=None, help="development: run only these (one group)")
    args = ap.parse_args(argv)
    if not qemu_available():
        print(f"SKIP: {QEMU} not installed (scripts/install-deps.sh installs it)")
        return 0
    ok = True
    for name in args.groups.split(","):
        only = args.scenarios.split(",") if args.scenarios else None
        r = run_group(name, args.server, args.hog_mib, args.files, only)
        print(format_report(r), flush=True)
        ok = ok and r.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
