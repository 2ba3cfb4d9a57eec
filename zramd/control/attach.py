"""Building the commands that attach an export to a kernel NBD device, and detach it.

Theory of operation
-------------------
``attach`` is nbd-client (export name ``-N``, block size 4096 so the kernel sends
whole pages, optional connections ``-C`` and request timeout ``-t``), then either
mkswap + ``swapon --discard`` (so freed swap slots are trimmed and their memory
returned), or an optional mkfs and a ``mount -o discard``. ``detach`` is the reverse:
swapoff and/or umount of whatever uses the device, then ``nbd-client -d``.

The plans are pure functions of their arguments (and, for detach, of the text of
/proc/swaps and /proc/mounts), so they are unit-tested without a kernel nbd module.
Each step carries an optional undo command used to roll back a failed attach.
Running them (:func:`run_plan`) is separate.

What is attached where is recorded next to the daemon's control socket, in
``<its directory>/attached/nbdN`` holding the export name (:func:`record_attached`, written
after a successful attach, removed by detach). A record counts only while the kernel shows
the device connected (``/sys/block/nbdN/pid``), so a device disconnected behind zramd's back
is not reported. ``zramd list`` shows it (NBD, MOUNTPOINT), ``zramd detach NAME`` finds the
device by it. :func:`attach_lock` serialises choosing a free device and connecting it, so
attach units started together at boot do not pick the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from zramd.config import (
    DEFAULT_BIND,
    DEFAULT_PORT,
    DEFAULT_SWAP_PRIORITY,
    MKFS_TYPES,
    SWAP_PRIORITY_RANGE,
)

#: nbd-client -b: the kernel then only sends whole 4 KiB pages
NBD_BLOCK_SIZE = 4096
#: Where the kernel shows NBD devices (``nbdN/pid``: the nbd-client holding it connected).
SYS_BLOCK = "/sys/block"
#: Seconds a step may take before it is considered hung
STEP_TIMEOUT = 120


class AttachError(Exception):
    """A bad attach/detach request or a failed step; the message is one line."""


@dataclass
class Step:
    argv: list[str]
    undo: list[str] | None = None
    what: str = ""


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def commands(self) -> list[list[str]]:
        return [s.argv for s in self.steps]


def attach_plan(
    name: str,
    device: str,
    *,
    host: str = DEFAULT_BIND,
    port: int = DEFAULT_PORT,
    unix: str | None = None,
    connections: int = 1,
    timeout: int = 0,
    swap: bool = False,
    priority: int | None = None,
    mkfs: str | None = None,
    mount: str | None = None,
    read_only: bool = False,
    options: str | None = None,
) -> Plan:
    """The commands attaching export ``name`` to ``device`` (e.g. /dev/nbd0); ``options`` are
    swapon's or mount's (``-o``), else ``discard`` (``ro`` for a read-only mount)."""
    if not name:
        raise AttachError("export name must not be empty")
    if not device.startswith("/dev/nbd") or not device[len("/dev/nbd") :].isdigit():
        raise AttachError(f"bad device {device!r}: expected /dev/nbdN")
    if swap and (mkfs or mount):
        raise AttachError("--swap cannot be combined with --mkfs or --mount")
    if priority is not None and not swap:
        raise AttachError("--priority needs --swap")
    if mkfs and not mount:
        raise AttachError("--mkfs needs --mount DIR")
    if mkfs and mkfs not in MKFS_TYPES:
        raise AttachError(f"unsupported --mkfs {mkfs!r} (choose one of {', '.join(MKFS_TYPES)})")
    if swap and read_only:
        raise AttachError("swap cannot be read-only")
    if connections < 1:
        raise AttachError(f"--connections must be >= 1, got {connections}")
    if timeout < 0:
        raise AttachError(f"--timeout must be >= 0, got {timeout}")
    if priority is not None and not SWAP_PRIORITY_RANGE[0] <= priority <= SWAP_PRIORITY_RANGE[1]:
        raise AttachError(f"--priority must be in -1..32767, got {priority}")
    if mount is not None and not os.path.isabs(mount):
        raise AttachError(f"--mount needs an absolute directory, got {mount!r}")

    nbd = ["nbd-client", "-N", name]
    if unix:
        nbd += ["-u", unix, device]
    else:
        nbd += [host, str(port), device]
    nbd += ["-b", str(NBD_BLOCK_SIZE)]
    if connections > 1:
        nbd += ["-C", str(connections)]
    if timeout:
        nbd += ["-t", str(timeout)]
    if swap:
        nbd += ["-swap"]
    if read_only:
        nbd += ["-readonly"]
    plan = Plan([Step(nbd, ["nbd-client", "-d", device], "connect")])
    if swap:
        plan.steps.append(Step(["mkswap", device], None, "mkswap"))
        on = ["swapon", "-o", options] if options else ["swapon", "--discard"]
        on += ["--priority", str(priority if priority is not None else DEFAULT_SWAP_PRIORITY)]
        plan.steps.append(Step([*on, device], ["swapoff", device], "swapon"))
    else:
        if mkfs:
            plan.steps.append(Step([f"mkfs.{mkfs}", "-q", device], None, "mkfs"))
        if mount:
            opts = options or ("ro" if read_only else "discard")
            plan.steps.append(Step(["mkdir", "-p", mount], None, "mkdir"))
            mnt = ["mount", "-o", opts, device, mount]
            plan.steps.append(Step(mnt, ["umount", mount], "mount"))
    return plan


def _unescape_mount(field_: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    out = field_
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        out = out.replace(esc, ch)
    return out


def detach_plan(device: str, swaps_text: str, mounts_text: str) -> Plan:
    """swapoff / umount everything using ``device``, then disconnect it."""
    if not device.startswith("/dev/nbd") or not device[len("/dev/nbd") :].isdigit():
        raise AttachError(f"bad device {device!r}: expected /dev/nbdN")
    plan = Plan()
    for line in swaps_text.splitlines()[1:]:
        parts = line.split()
        if parts and _unescape_mount(parts[0]) == device:
            plan.steps.append(Step(["swapoff", device], None, "swapoff"))
    mps: list[str] = []
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and _unescape_mount(parts[0]) == device:
            mps.append(_unescape_mount(parts[1]))
    for mp in reversed(mps):  # innermost (latest) first
        plan.steps.append(Step(["umount", mp], None, "umount"))
    plan.steps.append(Step(["nbd-client", "-d", device], None, "disconnect"))
    return plan


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def find_free_nbd(sys_block: str = SYS_BLOCK) -> str:
    """The first /dev/nbdN not connected (no ``pid`` file, size 0)."""
    try:
        names = sorted(
            (n for n in os.listdir(sys_block) if n.startswith("nbd") and n[3:].isdigit()),
            key=lambda n: int(n[3:]),
        )
    except OSError:
        names = []
    if not names:
        raise AttachError("no /dev/nbdN devices: load the kernel module with `modprobe nbd`")
    for n in names:
        base = os.path.join(sys_block, n)
        if os.path.exists(os.path.join(base, "pid")):
            continue
        if read_text(os.path.join(base, "size")).strip() not in ("", "0"):
            continue
        return f"/dev/{n}"
    raise AttachError("every /dev/nbdN is in use")


def run_plan(plan: Plan, *, rollback: bool = True) -> None:
    """Run the steps in order; on failure undo the completed ones and raise AttachError."""
    done: list[Step] = []
    for step in plan.steps:
        exe = step.argv[0]
        if shutil.which(exe) is None:
            _undo(done, rollback)
            raise AttachError(f"{exe} not found (install the package that provides it)")
        try:
            r = subprocess.run(
                step.argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            _undo(done, rollback)
            raise AttachError(f"`{' '.join(step.argv)}` timed out") from None
        if r.returncode != 0:
            _undo(done, rollback)
            msg = (r.stderr or r.stdout).strip().splitlines()
            why = msg[-1] if msg else f"exit status {r.returncode}"
            raise AttachError(f"`{' '.join(step.argv)}` failed: {why}")
        done.append(step)


def _undo(done: list[Step], rollback: bool) -> None:
    if not rollback:
        return
    for step in reversed(done):
        if step.undo:
            subprocess.run(step.undo, capture_output=True, timeout=STEP_TIMEOUT, check=False)


def state_dir(control: str) -> str:
    """The directory of the attach records: ``attached`` next to the control socket."""
    return os.path.join(os.path.dirname(os.path.abspath(control)), "attached")


def _connected(device: str, sys_block: str) -> bool:
    return os.path.exists(os.path.join(sys_block, os.path.basename(device), "pid"))


def record_attached(directory: str, device: str, name: str) -> None:
    """Remember that export ``name`` is attached to ``device``."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, os.path.basename(device))
    with open(path + ".tmp", "w") as f:
        f.write(name + "\n")
    os.replace(path + ".tmp", path)


def forget_attached(directory: str, device: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, os.path.basename(device)))


def attached_devices(directory: str, sys_block: str | None = None) -> dict[str, str]:
    """Export name -> /dev/nbdN, for the records whose device the kernel shows connected
    (under ``sys_block``, default :data:`SYS_BLOCK`)."""
    sys_block = sys_block or SYS_BLOCK
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return {}
    out: dict[str, str] = {}
    for entry in entries:
        if not (entry.startswith("nbd") and entry[3:].isdigit()):
            continue
        device = f"/dev/{entry}"
        name = read_text(os.path.join(directory, entry)).strip()
        if name and _connected(device, sys_block):
            out.setdefault(name, device)
    return out


@contextlib.contextmanager
def attach_lock(directory: str) -> Iterator[None]:
    """Hold ``directory``'s lock (flock) while a free device is chosen and connected."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def mountpoint_of(device: str, swaps_text: str, mounts_text: str) -> str:
    """zramctl's MOUNTPOINT: ``[SWAP]``, the (first) mount directory, or ``""``."""
    for line in swaps_text.splitlines()[1:]:
        parts = line.split()
        if parts and _unescape_mount(parts[0]) == device:
            return "[SWAP]"
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and _unescape_mount(parts[0]) == device:
            return _unescape_mount(parts[1])
    return ""
