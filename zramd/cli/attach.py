"""``zramd attach`` and ``zramd detach``: an export on a kernel NBD device, and back.

Theory of operation
-------------------
``attach NAME`` does what the configuration file says of export NAME (``--config FILE``, else
``/etc/zramd/zramd.toml`` when present), in zram-generator's words: ``fs-type`` swap (the
default) with ``swap-priority``, or mkfs of ``fs-type`` and a mount at ``mount-point``, with
``options``; and it reaches the daemon where the file says it listens (``unix``, else
``bind``/``port``). Flags override the file: any of ``--swap``, ``--mkfs``, ``--mount``,
``--priority``, ``--options`` replaces the file's attach settings as a whole, and
``--host``/``--port``/``--unix`` its listener. An export the file does not name (created with
``zramd create``) is attached as a bare block device unless flags say more.

It checks with the daemon (when its control socket answers) that the export exists and is
writable if it will be written, chooses the first free /dev/nbdN under a lock (unless DEVICE
is given), runs the command plan of ``control/attach.py`` (nbd-client, then mkswap + swapon or
mkfs + mount), rolling back on failure, and records the device (``control/attach.py``).
``detach`` takes the device or the export name (its recorded device) and runs the reverse
plan built from /proc/swaps and /proc/mounts. ``--dry-run`` prints the plan instead.
"""

from __future__ import annotations

import os
from typing import Any

import click

from zramd.cli.options import control_option, errors_one_line
from zramd.config import (
    DEFAULT_BIND,
    DEFAULT_PORT,
    DEFAULT_SWAP_PRIORITY,
    MKFS_TYPES,
    AttachConfig,
    FileConfig,
)
from zramd.configfile import DEFAULT_CONFIG_PATH, load_serve_file
from zramd.control.attach import (
    AttachError,
    Plan,
    attach_lock,
    attach_plan,
    attached_devices,
    detach_plan,
    find_free_nbd,
    forget_attached,
    read_text,
    record_attached,
    run_plan,
    state_dir,
)
from zramd.control.client import ControlClient
from zramd.control.protocol import ControlError


@click.command()
@click.argument("name")
@click.argument("device", required=False)
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    default=None,
    help=f"Configuration with the export's attach settings [{DEFAULT_CONFIG_PATH} if present].",
)
@click.option("--host", default=None, help=f"zramd TCP address [file's bind; {DEFAULT_BIND}].")
@click.option("--port", type=int, default=None, help=f"zramd TCP port [file's; {DEFAULT_PORT}].")
@click.option("--unix", default=None, metavar="PATH", help="zramd NBD Unix socket [the file's].")
@click.option("-C", "--connections", type=int, default=1, show_default=True)
@click.option(
    "-t", "--timeout", type=int, default=0, help="Per-request timeout in seconds [0 = none]."
)
@click.option("--swap", is_flag=True, help="mkswap + swapon (the file's fs-type swap).")
@click.option(
    "--priority", type=int, default=None, help=f"Swap priority [{DEFAULT_SWAP_PRIORITY}]."
)
@click.option("--mkfs", type=click.Choice(MKFS_TYPES), default=None, help="Make a filesystem.")
@click.option("--mount", default=None, metavar="DIR", help="Mount it on DIR.")
@click.option(
    "-o", "--options", default=None, help="swapon or mount options [discard]."
)
@click.option("--read-only", is_flag=True, help="Attach read-only.")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@control_option
@errors_one_line
def attach(
    name: str,
    device: str | None,
    config_path: str | None,
    host: str | None,
    port: int | None,
    unix: str | None,
    connections: int,
    timeout: int,
    swap: bool,
    priority: int | None,
    mkfs: str | None,
    mount: str | None,
    options: str | None,
    read_only: bool,
    dry_run: bool,
    control: str,
) -> None:
    """Attach export NAME to a kernel NBD device (default: the first free /dev/nbdN), as the
    configuration file says unless flags say otherwise."""
    file = load_serve_file(config_path)
    flags_say = swap or mkfs or mount or priority is not None or options is not None
    settings = None if flags_say else file_attach_settings(file, name)
    if settings is not None:  # validated with the file
        swap = settings.kind == "swap"
        mkfs = None if swap else settings.kind
        priority, mount, options = settings.swap_priority, settings.mount_point, settings.options
    if unix is None and host is None and port is None and file is not None:
        unix = file.server.unix
        host, port = file.server.bind, file.server.port
    check_export_for_attach(control, name, writable=swap or bool(mkfs) or not read_only)

    def plan_for(dev: str) -> Plan:
        return attach_plan(
            name, dev, host=host or DEFAULT_BIND, port=port or DEFAULT_PORT, unix=unix,
            connections=connections, timeout=timeout, swap=swap, priority=priority, mkfs=mkfs,
            mount=mount, options=options, read_only=read_only,
        )

    if dry_run:
        for argv in plan_for(device or "/dev/nbd0").commands():
            click.echo(" ".join(argv))
        return
    records = state_dir(control)
    with attach_lock(records):
        device = device or find_free_nbd()
        plan = plan_for(device)
        if not os.path.exists(device):
            raise AttachError(
                f"{device} does not exist: load the kernel module with `modprobe nbd`"
            )
        run_plan(plan)
        record_attached(records, device, name)
    what = "swap" if swap else (f"mounted on {mount}" if mount else "block device")
    click.echo(f"{name} attached to {device} ({what})")


def file_attach_settings(file: FileConfig | None, name: str) -> AttachConfig | None:
    """The attach settings the file gives export ``name`` (None: the file does not name it)."""
    if file is None:
        return None
    exp = next((e for e in file.server.exports if e.name == name), None)
    return exp.attach if exp is not None else None


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
@click.argument("target", metavar="DEVICE|NAME")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@control_option
@errors_one_line
def detach(target: str, dry_run: bool, control: str) -> None:
    """swapoff / umount DEVICE (or the device export NAME is attached to), then disconnect it
    (nbd-client -d)."""
    records = state_dir(control)
    device = target
    if not target.startswith("/dev/"):
        found = attached_devices(records).get(target)
        if found is None:
            raise AttachError(
                f"export {target!r} is not attached (no connected record in {records})"
            )
        device = found
    plan = detach_plan(device, read_text("/proc/swaps"), read_text("/proc/mounts"))
    if dry_run:
        for argv in plan.commands():
            click.echo(" ".join(argv))
        return
    run_plan(plan, rollback=False)
    forget_attached(records, device)
    click.echo(f"{device} detached")


COMMANDS = (attach, detach)
