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

The fs and swap exports run the background policy of issue 11 (:data:`POLICY`). At the
scenario's first sync point after its writes (``discard-before``, ``swap-mid``) the harness
waits, bounded by :data:`POLICY_WAIT_S`, until the policy has grouped or recompressed pages, so
the guest's later reads (the file checks, fsck; the hog's verify pass) go through what it did;
the ``fs-policy-host-stats`` and ``swap-policy-host-stats`` outcomes show its work
(:class:`HostChecks`).

``writeback`` (issue 12): a 256 MiB guest swaps a hog of twice its memory onto an export whose
memory limit is 64 MiB with a 1 GiB backing file (a sparse file in a temporary directory):
the hog must complete with its data verified and the server must have written pages back and
read them again (:class:`WritebackChecks`); then the same hog on an export with the same limit
and no backing store must FAIL with swap I/O errors in the guest.

md groups (issue 16) boot with two servers, A and B, each on its own port and guestfwd
(10.0.2.100:10809 and :10810): ``raid`` (raid0 throughput against one server, ext2 on raid0,
swap striped over both, raid1 with a write-intent bitmap whose servers are SIGKILLed and
restarted at the guest's request, see :class:`RaidChecks`) and ``raid-negative`` (raid1 with A
restarted as a server whose reads are wrong past md's metadata: the md check and the reads
from A alone must both catch it).

Accelerator: KVM only if a short probe boot succeeds (cached per host kernel), else TCG; under
TCG the swap scenario is sized down (see SWAP_HOG_MIB_TCG). ZRAMD_VM_ACCEL=tcg|kvm forces one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
RAID_MEM_MIB = 256
#: each of the two md servers: raid0 members, one server alone (the throughput baseline),
#: striped swap members, raid1 members
RAID_EXPORTS = ["r0=128M", "one=128M", "sw=128M", "r1=128M"]
#: the memory hog writes this much in a 256 MiB guest: 2x RAM with KVM, sized down under TCG
SWAP_HOG_MIB_KVM = 512
SWAP_HOG_MIB_TCG = 384
#: wall-clock limits per boot (TCG); a boot that overruns is killed and its scenarios FAIL
BOOT_TIMEOUT_S = {"storage": 600.0, "swap": 600.0, "negative": 240.0, "raid": 600.0,
                  "raid-negative": 300.0, "writeback": 600.0}
#: the background policy on the fs export, aggressive enough to act within a
#: scenario: every 2 s, pages not accessed for 16 s (the access clock's step) are marked idle,
#: packed into groups of up to 16 pages, and the idle pages left are recompressed with zstd
POLICY = "algorithm=lz4 zstd(level=3),recompress-after=16s,recompress-interval=2s,group-pages=16"
#: how long a sync point waits for the policy to have grouped or recompressed pages
POLICY_WAIT_S = 90.0
#: the writeback group's backing file (the memory limit is 64 MiB, the hog twice the guest)
WB_BACKING_BYTES = 1 << 30
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
    servers: int = 1  # server i (each with all exports) is the guest's 10.0.2.100:GUEST_PORT+i
    #: the md negative check: server A restarts (raid1) as a CorruptDataServer with this device
    restart_device: str = ""
    #: a negative run must also show a figure matching this pattern (the check that must
    #: have bitten)
    expect_figure: str = ""
    #: a negative run's outcome is SCENARIO-SUFFIX
    negative_suffix: str = "detects-corruption"
    #: export name -> size of its backing file (sparse, in a temporary directory of the run)
    backing: dict[str, int] = field(default_factory=dict)


GROUPS: dict[str, Group] = {
    "storage": Group(
        "storage",
        ["fs", "multiconn", "discard", "reconnect", "memlimit"],
        ["fs=256M," + POLICY, "mc=256M", "dc=16M", "lim=64M,mem-limit=8M"],
        STORAGE_MEM_MIB,
    ),
    "swap": Group("swap", ["swap"], ["swap=1G," + POLICY], SWAP_MEM_MIB),
    "writeback": Group(
        "writeback", ["swapwb", "swapnobd"], ["wb=1G,mem-limit=64M", "nobd=1G,mem-limit=64M"],
        SWAP_MEM_MIB, expect_fail={"swapnobd"}, expect_figure=r"swap_io_errors=[1-9]\d*",
        negative_suffix="fails",
        backing={"wb": WB_BACKING_BYTES},
    ),
    "raid": Group("raid", ["raid0", "raid0swap", "raid1"], RAID_EXPORTS, RAID_MEM_MIB, servers=2),
    "raid-negative": Group(
        "raid-negative", ["raid1"], RAID_EXPORTS, RAID_MEM_MIB, expect_fail={"raid1"},
        servers=2, restart_device="corrupt-data", expect_figure="survivor_a_verify=bad",
    ),
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
        self.killed = False  # the current process was SIGKILLed on purpose (kill())

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
        logf = open(self.log_path, "ab")  # a restart appends to the same log
        self.killed = False
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

    def kill(self) -> None:
        """SIGKILL: the server dies without closing its connections cleanly (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.killed = True

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


class CorruptDataServer(HostServer):
    """``serve_corrupt_data.py`` beside this file: tests.support.serve_device plus the
    ``corrupt-data`` device (reads wrong past md's metadata), for the md negative check."""

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve().parent / "serve_corrupt_data.py"),
                "--device", self.device, "--bind", "127.0.0.1", "--port", str(self.port),
                *(a for spec in self.exports for a in ("--export", spec))]


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


def netdev_arg(ports: list[int], relay_log: Path) -> str:
    """qemu's restricted user network with one guestfwd per host server: the guest's
    GUEST_ADDR:GUEST_PORT+i reaches 127.0.0.1:ports[i] through relay.py."""
    fwds = []
    for i, port in enumerate(ports):
        relay = f"{sys.executable} {VM_SCRIPTS / 'relay.py'} {port} {relay_log}"
        if "," in relay:
            raise ValueError("qemu option values may not contain commas: " + relay)
        fwds.append(f"guestfwd=tcp:{GUEST_ADDR}:{GUEST_PORT + i}-cmd:{relay}")
    return ",".join(["user,id=n0,restrict=on", *fwds])


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


def run_boot(group: Group, kernel: Path, initrd: Path, accel: str, ports: list[int],
             append_extra: str, on_sync: Callable[[str], None], log_path: Path,
             timeout_s: float) -> tuple[dict[str, Outcome], bool, str]:
    """Boot once; return (outcomes by scenario from @@RESULT lines, saw @@DONE, console tail)."""
    relay_log = log_path.with_suffix(".relay.log")
    relay_log.unlink(missing_ok=True)
    append = f"{COMMON_APPEND} zramd.run={','.join(group.scenarios)} {append_extra}".strip()
    cmd = qemu_cmd(kernel, initrd, accel, group.mem_mib, append, netdev_arg(ports, relay_log))
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


def policy_acted(st: dict[str, Any]) -> bool:
    """The export's background policy has grouped or recompressed pages (``tiers.policy``)."""
    return int(st.get("grouped") or 0) + int(st.get("recompressed") or 0) > 0


def wait_for_policy(server: HostServer, export: str) -> tuple[dict[str, Any] | None, str, float]:
    """Read ``export``'s stats every second until its policy acted or POLICY_WAIT_S passed:
    (the last stats or None, why not, seconds waited)."""
    t0 = time.monotonic()
    while True:
        st, why = host_stats(server, export)
        waited = time.monotonic() - t0
        if st is None or policy_acted(st) or waited >= POLICY_WAIT_S:
            return st, why, waited
        time.sleep(1.0)


class HostChecks:
    """Stats taken at the guest's @@SYNC points, and the host-side verdicts drawn from them.
    At the first sync point of an export with the background policy it waits for the policy
    (:func:`wait_for_policy`) before the guest goes on."""

    POLICY_SYNCS = {"discard-before": "fs", "swap-mid": "swap"}

    def __init__(self, server: HostServer) -> None:
        self.server = server
        self.snaps: dict[str, tuple[dict[str, Any] | None, str]] = {}
        self.policy_waits: dict[str, float] = {}

    def on_sync(self, tag: str) -> None:
        if tag in self.POLICY_SYNCS:
            st, why, self.policy_waits[tag] = wait_for_policy(self.server,
                                                              self.POLICY_SYNCS[tag])
            self.snaps[tag] = (st, why)
            return
        export = {"discard-after": "fs"}.get(tag)
        if export:
            self.snaps[tag] = host_stats(self.server, export)

    def policy(self, scenario: str, tag: str) -> Outcome | None:
        """``SCENARIO-policy-host-stats``: at ``tag`` the policy had made passes, marked pages
        idle and grouped or recompressed some of them."""
        if tag not in self.snaps:
            return None
        name = f"{scenario}-policy-host-stats"
        st, why = self.snaps[tag]
        if st is None:
            return Outcome(name, "SKIP", reason=why)
        if st.get("passes") is None:
            return Outcome(name, "FAIL", reason="the export has no background policy")
        keys = ("passes", "marked_idle", "grouped", "recompressed", "grouped_pages", "groups",
                "group_saved_bytes", "recompressed_pages", "incompressible_pages",
                "recompress_saved_bytes", "backoffs", "max_slice_us")
        figs = f"policy_wait_s={self.policy_waits[tag]:.0f} " + " ".join(
            f"{k}={st.get(k)}" for k in keys)
        ok = int(st["passes"]) > 0 and int(st.get("marked_idle") or 0) > 0 and policy_acted(st)
        return Outcome(name, "PASS" if ok else "FAIL", figures=figs, reason="" if ok else
                       f"the policy grouped and recompressed nothing in {POLICY_WAIT_S:.0f}s")

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


Snap = tuple[dict[str, Any] | None, str]


def _mib(st: dict[str, Any], key: str) -> float:
    return int(st.get(key, 0)) / 2**20


class RaidChecks:
    """The host's part of the md scenarios (init.sh: PORT is server A, PORT_B server B).

    At the guest's raid1 sync points it SIGKILLs server A, restarts it empty on the same port
    (as a :class:`CorruptDataServer` for the negative check, replacing ``servers[0]``), and later
    SIGKILLs server B; at the others it reads both servers' stats of one export. The verdicts:
    raid0 stripes put data on both servers and fstrim gives memory back on both; striped swap
    lands on both; the restarted A is empty, holds about what B holds after the resync (the
    zero pages the resync writes cost nothing) and both give memory back after fstrim on the
    mirror."""

    SNAPS = {"raid0-written": "r0", "raid0-trimmed": "r0", "raid0swap-mid": "sw",
             "raid1-restart-a": "r1", "raid1-resynced": "r1", "raid1-trimmed": "r1"}
    #: after the resync, A's memory must be within this factor of B's
    RESYNC_MEM_FACTOR = 1.3
    #: raid0 and striped swap: each server holds at least this share of the stored data
    STRIPE_SHARE_MIN = 0.25

    def __init__(self, servers: list[HostServer], restart_device: str = "") -> None:
        self.servers = servers
        self.restart_device = restart_device
        self.snaps: dict[str, list[Snap]] = {}

    def on_sync(self, tag: str) -> None:
        if len(self.servers) < 2:
            return
        a, b = self.servers[0], self.servers[1]
        if tag == "raid1-kill-a":
            a.kill()
        elif tag == "raid1-restart-a":
            if self.restart_device:
                a = CorruptDataServer(a.kind, a.exports, a.log_path, {}, self.restart_device)
                a.port = self.servers[0].port
                self.servers[0] = a
            a.start()
        elif tag == "raid1-kill-b":
            b.kill()
        export = self.SNAPS.get(tag)
        if export:
            self.snaps[tag] = [host_stats(s, export) for s in (a, b)]

    def _pair(self, tag: str) -> tuple[list[dict[str, Any]] | None, str]:
        snaps = self.snaps.get(tag)
        if snaps is None:
            return None, f"guest never reached {tag}"
        stats = [st for st, _ in snaps if st is not None]
        if len(stats) < len(snaps):
            return None, "; ".join(why for st, why in snaps if st is None)
        return stats, ""

    def _striped(self, name: str, tag: str) -> tuple[Outcome | None, list[dict[str, Any]]]:
        """(an outcome if the data is not on both servers, else None; both servers' stats)"""
        stats, why = self._pair(tag)
        if stats is None:
            return Outcome(name, "SKIP", reason=why), []
        orig = [int(st.get("orig_data_size", 0)) for st in stats]
        share = min(orig) / sum(orig) if sum(orig) else 0.0
        if share < self.STRIPE_SHARE_MIN:
            return Outcome(name, "FAIL", figures=f"orig_data_size_mib={orig[0] / 2**20:.1f}/"
                           f"{orig[1] / 2**20:.1f}", reason=f"one server holds {share:.0%} of "
                           f"the data (< {self.STRIPE_SHARE_MIN:.0%}): not striped"), stats
        return None, stats

    def raid0(self) -> Outcome | None:
        if "raid0-written" not in self.snaps:
            return None
        name = "raid0-host-stats"
        bad, before = self._striped(name, "raid0-written")
        if bad:
            return bad
        after, why = self._pair("raid0-trimmed")
        if after is None:
            return Outcome(name, "SKIP", reason=why)
        figs = " ".join(f"{s}_mem_used_total_mib={_mib(x, 'mem_used_total'):.1f}->"
                        f"{_mib(y, 'mem_used_total'):.1f}"
                        for s, x, y in zip("AB", before, after, strict=True))
        ok = all(int(y["mem_used_total"]) < int(x["mem_used_total"])
                 for x, y in zip(before, after, strict=True))
        return Outcome(name, "PASS" if ok else "FAIL", figures=figs,
                       reason="" if ok else "fstrim on the stripe did not free memory on both")

    def raid0swap(self) -> Outcome | None:
        if "raid0swap-mid" not in self.snaps:
            return None
        name = "raid0swap-host-stats"
        bad, stats = self._striped(name, "raid0swap-mid")
        if bad:
            return bad
        figs = " ".join(f"{s}_orig_data_size_mib={_mib(x, 'orig_data_size'):.1f} "
                        f"{s}_mem_used_total_mib={_mib(x, 'mem_used_total'):.1f}"
                        for s, x in zip("AB", stats, strict=True))
        return Outcome(name, "PASS", figures=figs)

    def raid1(self) -> Outcome | None:
        if "raid1-restart-a" not in self.snaps:
            return None
        name = "raid1-host-stats"
        restarted, why = self.snaps["raid1-restart-a"][0]
        if restarted is None:
            return Outcome(name, "SKIP", reason=why)
        if int(restarted.get("orig_data_size", 0)) != 0:
            return Outcome(name, "FAIL", reason="the restarted server A is not empty")
        synced, why1 = self._pair("raid1-resynced")
        trimmed, why2 = self._pair("raid1-trimmed")
        if synced is None or trimmed is None:
            return Outcome(name, "SKIP", reason=why1 or why2)
        mem = [int(st["mem_used_total"]) for st in synced]
        figs = " ".join(
            f"{s}_mem_used_total_mib={_mib(x, 'mem_used_total'):.1f}->"
            f"{_mib(y, 'mem_used_total'):.1f} {s}_orig_data_size_mib="
            f"{_mib(x, 'orig_data_size'):.1f}->{_mib(y, 'orig_data_size'):.1f}"
            for s, x, y in zip("AB", synced, trimmed, strict=True))
        if not mem[1] / self.RESYNC_MEM_FACTOR <= mem[0] <= mem[1] * self.RESYNC_MEM_FACTOR:
            return Outcome(name, "FAIL", figures=figs, reason="after the resync A's memory is "
                           f"not within {self.RESYNC_MEM_FACTOR}x of B's")
        freed = all(int(y["mem_used_total"]) < int(x["mem_used_total"])
                    for x, y in zip(synced, trimmed, strict=True))
        return Outcome(name, "PASS" if freed else "FAIL", figures=figs,
                       reason="" if freed else "fstrim on the mirror did not free memory on both")


class WritebackChecks:
    """The host's part of the writeback group (init.sh: scenarios swapwb on export wb, with a
    backing file, and swapnobd on export nobd, without). Export wb must have written pages
    back while the hog's pages were in swap, never failed a write, kept its pool within the
    memory limit and read written-back pages again for the hog's verify pass; export nobd must
    have refused writes (ENOSPC), the cause of the guest's swap I/O errors."""

    SNAPS = {"swapwb-mid": "wb", "swapwb-after": "wb", "swapnobd-after": "nobd"}

    def __init__(self, server: HostServer) -> None:
        self.server = server
        self.snaps: dict[str, Snap] = {}

    def on_sync(self, tag: str) -> None:
        export = self.SNAPS.get(tag)
        if export:
            self.snaps[tag] = host_stats(self.server, export)

    def swapwb(self) -> Outcome | None:
        if "swapwb-after" not in self.snaps:
            return None
        name = "swapwb-host-stats"
        (mid, why1), (after, why2) = self.snaps.get(
            "swapwb-mid", (None, "guest never reached swapwb-mid")), self.snaps["swapwb-after"]
        if mid is None or after is None:
            return Outcome(name, "SKIP", reason=why1 or why2)
        limit = int(after["mem_limit"])
        figs = (f"mid_bd_count={mid['bd_count']} mid_mem_used_total_mib="
                f"{_mib(mid, 'mem_used_total'):.1f} mem_used_max_mib="
                f"{_mib(after, 'mem_used_max'):.1f} mem_limit_mib={limit / 2**20:.0f} "
                f"bd_writes={after['bd_writes']} bd_write_mib={_mib(after, 'bd_write_bytes'):.1f} "
                f"bd_reads={after['bd_reads']} bd_promoted={after['bd_promoted']} "
                f"bd_waits={after['bd_waits']} bd_wait_timeouts={after['bd_wait_timeouts']} "
                f"failed_writes={after['failed_writes']}")
        checks = [
            (int(mid["bd_count"]) > 0, "no page was in the backing store while the hog's "
             "pages were in swap"),
            (int(after["bd_reads"]) > 0, "no page was read back from the backing store"),
            (int(after["failed_writes"]) == 0, "the server failed writes"),
            (0 < limit and int(after["mem_used_max"]) <= limit,
             "the pool went past the memory limit"),
        ]
        bad = [why for ok, why in checks if not ok]
        return Outcome(name, "FAIL" if bad else "PASS", figures=figs, reason="; ".join(bad))

    def swapnobd(self) -> Outcome | None:
        if "swapnobd-after" not in self.snaps:
            return None
        name = "swapnobd-host-stats"
        st, why = self.snaps["swapnobd-after"]
        if st is None:
            return Outcome(name, "SKIP", reason=why)
        figs = (f"failed_writes={st['failed_writes']} mem_used_max_mib="
                f"{_mib(st, 'mem_used_max'):.1f} orig_data_size_mib="
                f"{_mib(st, 'orig_data_size'):.1f}")
        ok = int(st["failed_writes"]) > 0
        return Outcome(name, "PASS" if ok else "FAIL", figures=figs,
                       reason="" if ok else "the server refused no write: the limit never bit")


# ---------------------------------------------------------------------------------------------
# groups


def run_group(name: str, server_kind: str = "zramd", hog_mib: int | None = None,
              files: int | None = None, scenarios: list[str] | None = None) -> BootReport:
    sys.path.insert(0, str(VM_SCRIPTS))
    import build

    group = GROUPS[name]
    if scenarios:  # development: a subset, in the given order
        group = dataclasses.replace(group, scenarios=scenarios)
    kernel, initrd = build.build()
    accel = choose_accel(kernel, initrd)
    LOGS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    log_path = LOGS / f"{stamp}-{name}.console.log"
    tmp = tempfile.TemporaryDirectory(prefix=f"zramd-vm-{name}-") if group.backing else None
    exports = list(group.exports)
    if tmp is not None:
        for i, spec in enumerate(exports):
            export = spec.split("=", 1)[0]
            size = group.backing.get(export)
            if size:
                path = Path(tmp.name) / f"{export}.backing"
                with open(path, "wb") as f:
                    f.truncate(size)
                exports[i] = f"{spec},backing={path}"
    servers = [HostServer(server_kind, exports,
                          LOGS / f"{stamp}-{name}.server{'-' + 'abc'[i] if i else ''}.log",
                          group.env, group.device) for i in range(group.servers)]
    server = servers[0]
    extra = []
    if "swap" in group.scenarios:
        mib = hog_mib or (SWAP_HOG_MIB_KVM if accel == "kvm" else SWAP_HOG_MIB_TCG)
        extra.append(f"zramd.hog_mib={mib}")
    if files:
        extra.append(f"zramd.files={files}")
    t0 = time.monotonic()
    checks, raid = HostChecks(server), RaidChecks(servers, group.restart_device)
    wb = WritebackChecks(server)

    def on_sync(tag: str) -> None:
        checks.on_sync(tag)
        raid.on_sync(tag)
        wb.on_sync(tag)

    try:
        for s in servers:
            s.start()
        results, done, tail = run_boot(group, kernel, initrd, accel, [s.port for s in servers],
                                       " ".join(extra), on_sync, log_path, BOOT_TIMEOUT_S[name])
    finally:
        rcs = [(s, s.stop()) for s in servers]
        if tmp is not None:
            tmp.cleanup()
    wall = time.monotonic() - t0
    outcomes: list[Outcome] = []
    for scen in group.scenarios:
        o = results.get(scen) or Outcome(
            scen, "FAIL", reason=f"no result from the guest ({'done' if done else 'no @@DONE'}); "
            f"console tail:\n{tail}")
        if scen in group.expect_fail:  # a negative check: the scenario must fail
            o = negative_outcome(scen, o, group.expect_figure, group.negative_suffix)
        outcomes.append(o)
    for host in (checks.discard(), checks.policy("fs", "discard-before"), checks.swap(),
                 checks.policy("swap", "swap-mid"),
                 raid.raid0(), raid.raid0swap(), raid.raid1(),
                 wb.swapwb(), wb.swapnobd()):
        if host is not None:
            outcomes.append(host)
    for s, rc in rcs:
        if server_kind == "zramd" and not s.killed and rc not in (0, None):
            outcomes.append(Outcome("server-exit", "FAIL",
                                    reason=f"zramd ({s.log_path.name}) exited {rc} on SIGTERM"))
    prune_logs()
    return BootReport(name, outcomes, log_path, wall, accel)


#: a negative run must fail on a data check, not because it could not even connect
#: (nbd-client or a device that never sized; md assembly or failover steps; a guest hang)
UNRELATED_FAILURES = ("nbd", "mdadm", "md1 ", "md did not", "no result from the guest")


def negative_outcome(scen: str, o: Outcome, expect_figure: str = "",
                     suffix: str = "detects-corruption") -> Outcome:
    name = f"{scen}-{suffix}"
    if expect_figure and not any(re.fullmatch(expect_figure, f) for f in o.figures.split()):
        return Outcome(name, "FAIL", o.secs, o.figures,
                       f"no {expect_figure} (that check did not bite); reason: {o.reason}")
    if o.status == "PASS":
        return Outcome(name, "FAIL", o.secs, o.figures,
                       "scenario passed where it must fail")
    if o.reason.startswith(UNRELATED_FAILURES):
        return Outcome(name, "FAIL", o.secs, o.figures, f"failed for another reason: {o.reason}")
    return Outcome(name, "PASS", o.secs, o.figures, f"failed as it must: {o.reason}")


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
