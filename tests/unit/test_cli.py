"""Operator CLI: attach/detach command plans, list formatting, serve config merging, and the
commands through click's CliRunner against a real ControlServer running in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from zramd.cli import main
from zramd.cli.table import format_table, parse_columns
from zramd.config import ConfigError, ServeConfig, ServeFlags, serve_config
from zramd.configfile import load_file, load_serve_file
from zramd.control.attach import AttachError, attach_plan, detach_plan, find_free_nbd
from zramd.control.server import ControlServer
from zramd.server.exports import ExportRegistry

MIB = 1 << 20

# --- attach / detach plans ---------------------------------------------------------------------


def test_attach_swap_plan() -> None:
    p = attach_plan("zram0", "/dev/nbd0", swap=True)
    assert p.commands() == [
        ["nbd-client", "-N", "zram0", "127.0.0.1", "10809", "/dev/nbd0", "-b", "4096", "-swap"],
        ["mkswap", "/dev/nbd0"],
        ["swapon", "--discard", "--priority", "100", "/dev/nbd0"],
    ]
    assert p.steps[0].undo == ["nbd-client", "-d", "/dev/nbd0"]
    assert p.steps[2].undo == ["swapoff", "/dev/nbd0"]


def test_attach_options_plan() -> None:
    p = attach_plan(
        "data", "/dev/nbd7", unix="/run/zramd/nbd.sock", connections=4, timeout=30,
        mkfs="ext2", mount="/mnt/z",
    )
    assert p.commands() == [
        ["nbd-client", "-N", "data", "-u", "/run/zramd/nbd.sock", "/dev/nbd7", "-b", "4096",
         "-C", "4", "-t", "30"],
        ["mkfs.ext2", "-q", "/dev/nbd7"],
        ["mkdir", "-p", "/mnt/z"],
        ["mount", "-o", "discard", "/dev/nbd7", "/mnt/z"],
    ]
    p = attach_plan("x", "/dev/nbd1", swap=True, priority=-1, host="::1", port=1234)
    assert p.commands()[0][3:5] == ["::1", "1234"]
    assert p.commands()[2] == ["swapon", "--discard", "--priority", "-1", "/dev/nbd1"]
    p = attach_plan("x", "/dev/nbd1", read_only=True, mount="/m")
    assert "-readonly" in p.commands()[0] and p.commands()[-1][:3] == ["mount", "-o", "ro"]


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"device": "/dev/sda"}, "expected /dev/nbdN"),
        ({"swap": True, "mount": "/m"}, "cannot be combined"),
        ({"priority": 3}, "--priority needs --swap"),
        ({"mkfs": "ext2"}, "--mkfs needs --mount"),
        ({"mkfs": "ntfs", "mount": "/m"}, "unsupported --mkfs"),
        ({"swap": True, "read_only": True}, "read-only"),
        ({"connections": 0}, "--connections"),
        ({"swap": True, "priority": 40000}, "-1..32767"),
        ({"mount": "rel/dir"}, "absolute"),
        ({"name": ""}, "must not be empty"),
    ],
)
def test_attach_plan_errors(kwargs: dict[str, Any], msg: str) -> None:
    args = {"name": "a", "device": "/dev/nbd0", **kwargs}
    with pytest.raises(AttachError, match=msg):
        attach_plan(args.pop("name"), args.pop("device"), **args)


SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/nbd0                               partition\t1048572\t\t0\t\t100
/dev/zram0                              partition\t8388604\t\t0\t\t100
"""
MOUNTS = """/dev/sda1 / ext4 rw 0 0
/dev/nbd1 /mnt/a\\040b ext2 rw,discard 0 0
/dev/nbd1 /srv/bind ext2 rw 0 0
"""


def test_detach_plans() -> None:
    assert detach_plan("/dev/nbd0", SWAPS, MOUNTS).commands() == [
        ["swapoff", "/dev/nbd0"],
        ["nbd-client", "-d", "/dev/nbd0"],
    ]
    assert detach_plan("/dev/nbd1", SWAPS, MOUNTS).commands() == [
        ["umount", "/srv/bind"],
        ["umount", "/mnt/a b"],
        ["nbd-client", "-d", "/dev/nbd1"],
    ]
    assert detach_plan("/dev/nbd2", SWAPS, MOUNTS).commands() == [["nbd-client", "-d", "/dev/nbd2"]]
    with pytest.raises(AttachError):
        detach_plan("/dev/nbd", "", "")


def test_find_free_nbd(tmp_path: Path) -> None:
    with pytest.raises(AttachError, match="modprobe nbd"):
        find_free_nbd(str(tmp_path))
    for i, (pid, size) in enumerate([(True, "0"), (False, "2048"), (False, "0")]):
        d = tmp_path / f"nbd{i}"
        d.mkdir()
        (d / "size").write_text(size + "\n")
        if pid:
            (d / "pid").write_text("1\n")
    (tmp_path / "sda").mkdir()
    assert find_free_nbd(str(tmp_path)) == "/dev/nbd2"
    (tmp_path / "nbd2" / "pid").write_text("2\n")
    with pytest.raises(AttachError, match="in use"):
        find_free_nbd(str(tmp_path))


def test_cli_attach_dry_run_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZRAMD_CONTROL", str(tmp_path / "no-daemon.sock"))
    r = CliRunner().invoke(
        main, ["attach", "zram0", "/dev/nbd3", "--swap", "--priority", "5", "--dry-run"]
    )
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "nbd-client -N zram0 127.0.0.1 10809 /dev/nbd3 -b 4096 -swap",
        "mkswap /dev/nbd3",
        "swapon --discard --priority 5 /dev/nbd3",
    ]
    r = CliRunner().invoke(main, ["attach", "zram0", "/dev/nbd3", "--swap", "--mount", "/x"])
    assert r.exit_code == 1
    assert r.output == "zramd: error: --swap cannot be combined with --mkfs or --mount\n"
    r = CliRunner().invoke(main, ["detach", "/dev/nbd9", "--dry-run"])
    assert r.exit_code == 0 and r.output.strip().endswith("nbd-client -d /dev/nbd9")


# --- formatting ---------------------------------------------------------------------------------


def test_columns() -> None:
    assert parse_columns(None)[0] == "NAME" and parse_columns(None)[-1] == "CLIENTS"
    assert parse_columns("name,data") == ["NAME", "DATA"]
    assert parse_columns("+ro")[-1] == "RO"
    with pytest.raises(ConfigError, match="unknown column 'BOGUS'"):
        parse_columns("name,bogus")


def test_format_table_alignment() -> None:
    rows = [
        {"name": "zram0", "disksize": 4 << 30, "data": 5000, "algorithm": "lz4", "clients": 2},
        {"name": "x", "disksize": 1 << 20, "data": 0, "algorithm": "zstd", "clients": 0},
    ]
    out = format_table(rows, ["NAME", "DISKSIZE", "DATA", "ALGORITHM", "CLIENTS"],
                       raw_bytes=False, headings=True)
    assert out.splitlines() == [
        "NAME  DISKSIZE DATA ALGORITHM CLIENTS",
        "zram0       4G 4.9K lz4             2",
        "x           1M   0B zstd            0",
    ]
    out = format_table(rows, ["NAME", "DISKSIZE"], raw_bytes=True, headings=False)
    assert out.splitlines() == ["zram0 4294967296", "x        1048576"]


# --- serve configuration ------------------------------------------------------------------------


def merge_serve_config(file: Any, **flags: Any) -> Any:
    """The served ServerConfig: the file's configuration with ``flags`` on top."""
    return serve_config(ServeFlags(**flags), file).server


def serve_setup(
    config_path: str, swap: str | None, control: str | None, *, stdio: bool = False
) -> ServeConfig:
    """What serve resolves from ``--config``, ``--swap`` and ``--control``."""
    return serve_config(
        ServeFlags(swap=swap, control=control, stdio=stdio), load_serve_file(config_path)
    )


def test_merge_serve_config_flags_override(tmp_path: Path) -> None:
    p = tmp_path / "z.toml"
    p.write_text(
        'bind = "127.0.0.1"\nport = 10999\nmax-connections = 5\n'
        '[export.a]\nsize = "8M"\n[export.b]\nsize = "8M"\n'
    )
    fc = load_file(p)
    cfg = merge_serve_config(fc, port=11000, exports=["b=16M,algorithm=zstd", "c=4M"])
    assert (cfg.bind, cfg.port, cfg.max_connections) == ("127.0.0.1", 11000, 5)
    assert [(e.name, e.size, e.algorithm) for e in cfg.exports] == [
        ("a", 8 * MIB, "lz4"), ("b", 16 * MIB, "zstd"), ("c", 4 * MIB, "lz4"),
    ]
    fc = load_file(p)
    cfg = merge_serve_config(fc, unix="/tmp/s", bind="")
    assert cfg.unix == "/tmp/s" and cfg.bind is None
    with pytest.raises(ConfigError, match="--stdio cannot"):
        merge_serve_config(load_file(p), stdio=True, port=1)


def test_serve_setup_precedence(tmp_path: Path) -> None:
    p = tmp_path / "z.toml"
    p.write_text('control = "/tmp/from-file.sock"\nswap = "on"\n[export.a]\nsize = "8M"\n')
    s = serve_setup(str(p), None, None)
    assert s.control == "/tmp/from-file.sock" and s.control_required and s.swap == "on"
    s = serve_setup(str(p), "require", "/tmp/flag.sock")
    assert s.control == "/tmp/flag.sock" and s.swap == "require"
    s = serve_setup(str(p), None, "")
    assert s.control is None
    s = serve_setup("", None, None)
    assert s.file is None and s.swap == "off"
    assert s.control == "/run/zramd/control.sock" and not s.control_required
    assert serve_setup("", None, None, stdio=True).control is None
    with pytest.raises(ConfigError, match="cannot read"):
        serve_setup(str(tmp_path / "missing.toml"), None, None)


def test_cli_serve_bad_config_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[export.a]\nsize = \"ram *\"\n")
    r = CliRunner().invoke(main, ["serve", "--config", str(p), "--control", ""])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zramd: error: {p}: export.a: size:")



def test_cli_serve_bad_poll_us_one_line() -> None:
    r = CliRunner().invoke(main, ["serve", "--poll-us", "-1", "--control", "", "--unix", "/x"])
    assert r.exit_code == 2
    assert r.output.strip() == "zramd: error: bad poll-us -1: must be 0..1000 microseconds"


# --- commands against a live ControlServer ------------------------------------------------------


class LoopThread:
    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.registry = ExportRegistry()
        self.server = ControlServer(self.registry, path)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.registry.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[LoopThread, str]]:
    path = str(tmp_path / "c.sock")
    lt = LoopThread(path)
    yield lt, path
    lt.stop()


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_cli_commands(daemon: tuple[LoopThread, str]) -> None:
    lt, path = daemon
    c = ("--control", path)
    r = cli("create", "z", "--size", "8M", "-a", "zstd", "--level", "5", "--mem-limit", "4M", *c)
    assert r.exit_code == 0 and r.stdout == "created z: 8M zstd\n"
    r = cli("create", "z", "--size", "8M", *c)
    assert r.exit_code == 1 and r.stderr == "zramd: error: export 'z' already exists\n"
    r = cli("create", "y", "--size", "8X", *c)
    assert r.exit_code == 1 and r.stderr.startswith("zramd: error: bad size '8X'")
    text = b"".join(b"record %08d some repeated text\n" % i for i in range(4096))
    lt.run(lt.registry.get("z").device.write(0, text[: 64 * 1024]))
    r = cli("list", *c)
    assert r.exit_code == 0
    head, row = r.stdout.splitlines()
    assert head.split() == [
        "NAME", "DISKSIZE", "DATA", "COMPR", "ALGORITHM", "ZERO-PAGES", "TOTAL", "MEM-LIMIT",
        "MEM-USED", "COMP-RATIO", "CLIENTS",
    ]
    cells = row.split()
    assert cells[0] == "z" and cells[1] == "8M" and cells[2] == "64K" and cells[4] == "zstd"
    assert cells[7] == "4M" and cells[10] == "0"
    r = cli("list", "--json", *c)
    (obj,) = json.loads(r.stdout)["exports"]
    assert obj["data"] == 65536 and obj["disksize"] == 8 * MIB and obj["mem_limit"] == 4 * MIB
    assert 0 < obj["compr"] < 65536 and obj["comp_ratio"] > 1
    r = cli("list", "-b", "-n", "-o", "name,disksize", *c)
    assert r.stdout == f"z {8 * MIB}\n"
    r = cli("list", "-o", "name,nope", *c)
    assert r.exit_code == 1 and "unknown column 'NOPE'" in r.stderr
    r = cli("stat", "z", "--json", *c)
    st = json.loads(r.stdout)
    assert st["mm_stat"]["orig_data_size"] == 65536 and st["io_stat"]["failed_writes"] == 0
    r = cli("stat", "z", *c)
    assert "mm_stat: 65536 " in r.stdout and "io_stat: 0 0 0 0" in r.stdout
    r = cli("set", "z", "--mem-limit", "0", "-a", "lz4", *c)
    assert r.exit_code == 0 and r.stdout == "z: algorithm lz4, mem-limit 0B\n"
    r = cli("compact", *c)
    assert r.exit_code == 0 and r.output.startswith("z: ") and "pages compacted" in r.stdout
    r = cli("reset", "z", *c)
    assert r.exit_code == 0
    assert json.loads(cli("list", "--json", *c).stdout)["exports"][0]["data"] == 0
    r = cli("destroy", "z", *c)
    assert r.exit_code == 0 and r.stdout == "destroyed z\n"
    r = cli("stat", "z", *c)
    assert r.exit_code == 1 and r.stderr == "zramd: error: no export named 'z'\n"
    r = cli("reload", *c)
    assert r.exit_code == 1 and "no configuration file" in r.stderr
    # attach checks the export with the daemon before running nbd-client
    cli("create", "ro", "--size", "1M", "--read-only", *c)
    r = cli("attach", "nope", "/dev/nbd0", "--swap", "--dry-run", *c)
    assert r.exit_code == 1 and r.stderr == "zramd: error: no export named 'nope' (exports: ro)\n"
    r = cli("attach", "ro", "/dev/nbd0", "--swap", "--dry-run", *c)
    assert r.exit_code == 1 and "is read-only" in r.stderr
    r = cli("attach", "ro", "/dev/nbd0", "--read-only", "--dry-run", *c)
    assert r.exit_code == 0 and "-readonly" in r.stdout


def test_cli_unreachable_daemon(tmp_path: Path) -> None:
    r = cli("list", "--control", str(tmp_path / "none.sock"))
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "cannot reach zramd at" in r.stderr


def test_cli_serve_export_too_large_one_line(tmp_path: Path) -> None:
    r = cli("serve", "--export", "a=1024P", "--control", "", "--unix", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert r.stderr.startswith("zramd: error: export 'a' (1E): cannot reserve its page table")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def test_serve_verbose_after_the_command_and_timestamps_outside_systemd(tmp_path: Path) -> None:
    """``zramd serve -v`` logs debug lines; lines carry a timestamp unless systemd runs us."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    path = str(tmp_path / "s.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    for extra, stamp in (({}, STAMP + " "), ({"INVOCATION_ID": "0123abcd"}, "")):
        cmd = [sys.executable, "-m", "zramd", "serve", "-v", "--unix", path, "--export", "a=1M"]
        p = subprocess.Popen(
            [*cmd, "--control", ""], stderr=subprocess.PIPE, text=True, env={**env, **extra}
        )
        try:
            assert p.stderr is not None
            loop_line = p.stderr.readline()
            assert re.fullmatch(rf"{stamp}zramd: event loop: uvloop \S+\n", loop_line), loop_line
            malloc_line = p.stderr.readline()
            assert re.fullmatch(rf"{stamp}zramd: malloc: mmap threshold 4 MiB, .*\n", malloc_line)
            first = p.stderr.readline()
            assert re.fullmatch(
                rf"{stamp}zramd: listening on unix:\S+ \(exports: a 1M lz4\)\n", first
            )
            time.sleep(0.2)  # the SIGTERM handler is installed just after that line
            p.send_signal(signal.SIGTERM)
            rest = p.communicate(timeout=10)[1]
            assert p.returncode == 0
            assert re.fullmatch(rf"{stamp}zramd: stopped\n", rest), rest
        finally:
            if p.poll() is None:  # a failed check must not leave the server running
                p.kill()
                p.wait()


def test_under_systemd() -> None:
    from zramd.cli.options import under_systemd

    assert under_systemd({"JOURNAL_STREAM": "8:1234"}) and under_systemd({"INVOCATION_ID": "x"})
    assert not under_systemd({}) and not under_systemd({"INVOCATION_ID": ""})


def test_cli_sizes_bare_number_is_mib_and_expressions_work(daemon: tuple[LoopThread, str]) -> None:
    _, path = daemon
    c = ("--control", path)
    assert cli("create", "m", "-s", "64", "--mem-limit", "8", *c).stdout == "created m: 64M lz4\n"
    assert cli("create", "e", "-s", "min(ram, 8)", *c).stdout == "created e: 8M lz4\n"
    assert cli("create", "b", "-s", "8192B", *c).stdout == "created b: 8K lz4\n"
    rows = {r["name"]: r for r in json.loads(cli("list", "--json", *c).stdout)["exports"]}
    assert rows["m"]["mem_limit"] == 8 * MIB
    r = cli("set", "m", "--mem-limit", "ram / 1000000000", *c)  # rounds down to 0 pages: none
    assert r.exit_code == 0 and r.stdout == "m: algorithm lz4, mem-limit 0B\n"


# --- attach settings in the configuration file ---------------------------------------------------

ATTACH_TOML = """unix = "/run/zramd/nbd.sock"
[export.swap]
size = "64M"
swap-priority = 50
[export.scratch]
size = "64M"
fs-type = "ext4"
mount-point = "/var/cache/scratch"
options = "discard,noatime"
[export.plain]
size = "64M"
mount-point = "/mnt/p"
"""


def test_attach_does_what_the_config_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZRAMD_CONTROL", str(tmp_path / "no-daemon.sock"))
    cfg = tmp_path / "zramd.toml"
    cfg.write_text(ATTACH_TOML)
    nbd = ["-u", "/run/zramd/nbd.sock", "/dev/nbd0", "-b", "4096"]
    r = cli("attach", "swap", "--config", str(cfg), "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        " ".join(["nbd-client", "-N", "swap", *nbd, "-swap"]),
        "mkswap /dev/nbd0",
        "swapon --discard --priority 50 /dev/nbd0",
    ]
    r = cli("attach", "scratch", "/dev/nbd2", "--config", str(cfg), "--dry-run")
    assert r.stdout.splitlines()[1:] == [
        "mkfs.ext4 -q /dev/nbd2",
        "mkdir -p /var/cache/scratch",
        "mount -o discard,noatime /dev/nbd2 /var/cache/scratch",
    ]
    r = cli("attach", "plain", "--config", str(cfg), "--dry-run")  # mount-point: ext2
    assert r.stdout.splitlines()[1:3] == ["mkfs.ext2 -q /dev/nbd0", "mkdir -p /mnt/p"]
    # flags replace the file's attach settings; --host/--port its listener
    r = cli("attach", "swap", "--config", str(cfg), "--swap", "-o", "discard=once",
            "--host", "::1", "--dry-run")
    assert r.stdout.splitlines()[0].startswith("nbd-client -N swap ::1 10809 /dev/nbd0")
    assert r.stdout.splitlines()[2] == "swapon -o discard=once --priority 100 /dev/nbd0"
    # an export the file does not name: a bare block device
    r = cli("attach", "other", "--config", str(cfg), "--dry-run")
    assert r.stdout.splitlines() == [" ".join(["nbd-client", "-N", "other", *nbd])]


@pytest.mark.parametrize(
    ("table", "msg"),
    [
        ('fs-type = "ntfs"\nmount-point = "/m"', "fs-type 'ntfs' is not swap or one of"),
        ('fs-type = "ext4"', "fs-type ext4 needs a mount-point"),
        ('mount-point = "rel"', "mount-point must be an absolute path"),
        ('fs-type = "swap"\nmount-point = "/m"', "mount-point needs a file system fs-type"),
        ('mount-point = "/m"\nswap-priority = 3', "swap-priority needs fs-type swap"),
        ("swap-priority = 40000", r"swap-priority must be in -1\.\.32767"),
        ('swap-priority = "high"', "swap-priority: expected an integer"),
    ],
)
def test_attach_settings_errors_name_the_key(table: str, msg: str) -> None:
    from zramd.configfile import ConfigFileError, parse_config_text

    with pytest.raises(ConfigFileError, match=f"F.toml: export.a: .*{msg}"):
        parse_config_text(f'[export.a]\nsize = "4M"\n{table}\n', "F.toml")


def test_attach_records_and_detach_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zramd.control.attach import (
        attached_devices,
        forget_attached,
        mountpoint_of,
        record_attached,
        state_dir,
    )

    records = state_dir(str(tmp_path / "control.sock"))
    assert records == str(tmp_path / "attached")
    sys_block = tmp_path / "sys"
    (sys_block / "nbd3").mkdir(parents=True)
    (sys_block / "nbd3" / "pid").write_text("1234\n")
    record_attached(records, "/dev/nbd3", "swap")
    record_attached(records, "/dev/nbd4", "gone")  # disconnected behind zramd's back
    assert attached_devices(records, str(sys_block)) == {"swap": "/dev/nbd3"}
    c = ("--control", str(tmp_path / "control.sock"))
    monkeypatch.setattr("zramd.control.attach.SYS_BLOCK", str(sys_block))
    r = cli("detach", "swap", "--dry-run", *c)
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "nbd-client -d /dev/nbd3"
    r = cli("detach", "gone", "--dry-run", *c)
    assert r.exit_code == 1 and "export 'gone' is not attached" in r.stderr
    forget_attached(records, "/dev/nbd3")
    assert attached_devices(records, str(sys_block)) == {}
    swaps = "Filename Type Size Used Priority\n/dev/nbd3 partition 4 0 100\n"
    mounts = "/dev/nbd5 /var/cache/scr\\040atch ext4 rw 0 0\n"
    assert mountpoint_of("/dev/nbd3", swaps, mounts) == "[SWAP]"
    assert mountpoint_of("/dev/nbd5", swaps, mounts) == "/var/cache/scr atch"
    assert mountpoint_of("/dev/nbd6", swaps, mounts) == ""


def test_list_raw_and_zramctl_columns(
    daemon: tuple[LoopThread, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zramctl's --raw, --bytes, --noheadings, and its STREAMS, MIGRATED, MOUNTPOINT columns,
    plus NBD: the device ``zramd attach`` recorded, while the kernel shows it connected."""
    from zramd.control.attach import record_attached, state_dir
    from zramd.server.listener import CODEC_WORKERS

    _, path = daemon
    c = ("--control", path)
    cli("create", "a", "-s", "8M", "--description", "fast disk\\", *c)
    cli("create", "b", "-s", "4M", *c)
    sys_block = tmp_path / "sys"
    (sys_block / "nbd3").mkdir(parents=True)
    (sys_block / "nbd3" / "pid").write_text("1\n")
    monkeypatch.setattr("zramd.control.attach.SYS_BLOCK", str(sys_block))
    record_attached(state_dir(path), "/dev/nbd3", "a")
    swaps = "Filename Type Size Used Priority\n/dev/nbd3 partition 8188 0 100\n"
    monkeypatch.setattr(
        "zramd.cli.commands.read_text", lambda p: swaps if p == "/proc/swaps" else ""
    )
    cols = ("-o", "NAME,DISKSIZE,STREAMS,MIGRATED,MOUNTPOINT,NBD,DESCRIPTION")
    r = cli("list", "--raw", *cols, *c)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "NAME DISKSIZE STREAMS MIGRATED MOUNTPOINT NBD DESCRIPTION",
        f"a 8M {CODEC_WORKERS} 0 [SWAP] /dev/nbd3 fast\\x20disk\\x5c",
        f"b 4M {CODEC_WORKERS} 0   ",
    ]
    r = cli("list", "--raw", "--bytes", "--noheadings", "-o", "NAME,DISKSIZE,NBD", "b", *c)
    assert r.stdout == f"b {4 * MIB} \n"
    r = cli("list", "-o", "NAME,MOUNTPOINT,NBD", *c)
    assert r.stdout.splitlines() == [
        "NAME MOUNTPOINT NBD",
        "a    [SWAP]     /dev/nbd3",
        "b",
    ]
    rows = json.loads(cli("list", "--json", "-o", "NAME,NBD,MOUNTPOINT,STREAMS", *c).stdout)
    assert [(e["name"], e["nbd"], e["mountpoint"], e["streams"]) for e in rows["exports"]] == [
        ("a", "/dev/nbd3", "[SWAP]", CODEC_WORKERS), ("b", "", "", CODEC_WORKERS),
    ]
