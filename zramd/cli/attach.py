"""``zramd attach`` and ``zramd detach``: an export on a kernel NBD device, and back.

Theory of operation
-------------------
``attach`` checks with the daemon (when its control socket answers) that the export exists and
is writable if it will be written, then runs the command plan of ``control/attach.py``
(nbd-client, then mkswap + swapon or mkfs + mount), rolling back on failure; ``detach`` runs the
reverse plan built from /proc/swaps and /proc/mounts. ``--dry-run`` prints the plan instead.
The plans themselves are built in ``control/attach.py``; this module only collects the flags.
"""

from __future__ import annotations

import os
from typing import Any

import click

from zramd.cli.options import control_option, errors_one_line
from zramd.config import DEFAULT_BIND, DEFAULT_PORT
from zramd.control.attach import (
    DEFAULT_SWAP_PRIORITY,
    MKFS_TYPES,
    AttachError,
    attach_plan,
    detach_plan,
    find_free_nbd,
    read_text,
    run_plan,
)
from zramd.control.client import ControlClient
from zramd.control.protocol import ControlError


@click.command()
@click.argument("name")
@click.argument("device", required=False)
@click.option("--host", default=DEFAULT_BIND, show_default=True, help="zramd TCP address.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="zramd TCP port.")
@click.option("--unix", default=None, metavar="PATH", help="zramd NBD Unix socket instead.")
@click.option("-C", "--connections", type=int, default=1, show_default=True)
@click.option(
    "-t", "--timeout", type=int, default=0, help="Per-request timeout in seconds [0 = none]."
)
@click.option("--swap", is_flag=True, help="mkswap + swapon --discard.")
@click.option(
    "--priority", type=int, default=None, help=f"Swap priority [{DEFAULT_SWAP_PRIORITY}]."
)
@click.option("--mkfs", type=click.Choice(MKFS_TYPES), default=None, help="Make a filesystem.")
@click.option("--mount", default=None, metavar="DIR", help="Mount it on DIR (-o discard).")
@click.option("--read-only", is_flag=True, help="Attach read-only.")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@control_option
@errors_one_line
def attach(
    name: str,
    device: str | None,
    host: str,
    port: int,
    unix: str | None,
    connections: int,
    timeout: int,
    swap: bool,
    priority: int | None,
    mkfs: str | None,
    mount: str | None,
    read_only: bool,
    dry_run: bool,
    control: str,
) -> None:
    """Attach export NAME to a kernel NBD device (default: the first free /dev/nbdN)."""
    check_export_for_attach(control, name, writable=swap or bool(mkfs) or not read_only)
    if device is None:
        device = "/dev/nbd0" if dry_run else find_free_nbd()
    plan = attach_plan(
        name, device, host=host, port=port, unix=unix, connections=connections,
        timeout=timeout, swap=swap, priority=priority, mkfs=mkfs, mount=mount,
        read_only=read_only,
    )
    if dry_run:
        for argv in plan.commands():
            click.echo(" ".join(argv))
        return
    if not os.path.exists(device):
        raise AttachError(f"{device} does not exist: load the kernel module with `modprobe nbd`")
    run_plan(plan)
    what = "swap" if swap else (f"mounted on {mount}" if mount else "block device")
    click.echo(f"{name} attached to {device} ({what})")


def check_export_for_attach(control: str, name: str, *, writable: bool) -> None:
    """If the daemon's control socket answers, make sure the export exists (and is writable
    when it will be written). An unreachable daemon is not an error here: the NBD server
    may be another zramd, or reachable only over the network; nbd-client will tell."""
    if not os.path.exists(control):
        return
    try:
        with ControlClient(control, timeout=10) as c:
            rows: list[dict[str, Any]] = c.call("list")
    except ControlError as e:
        if str(e).startswith("cannot reach"):
            return
        raise
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        known = ", ".join(r["name"] for r in rows) or "none"
        raise ControlError(f"no export named {name!r} (exports: {known})")
    if writable and row.get("read_only"):
        raise AttachError(f"export {name!r} is read-only: use --read-only (not swap or mkfs)")


@click.command()
@click.argument("device")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@errors_one_line
def detach(device: str, dry_run: bool) -> None:
    """swapoff / umount DEVICE, then disconnect it (nbd-client -d)."""
    plan = detach_plan(device, read_text("/proc/swaps"), read_text("/proc/mounts"))
    if dry_run:
        for argv in plan.commands():
            click.echo(" ".join(argv))
        return
    run_plan(plan, rollback=False)
    click.echo(f"{device} detached")


COMMANDS = (attach, detach)
