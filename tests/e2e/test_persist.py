"""Persistent exports with real clients: an image copied in with nbdcopy survives SIGTERM and a
restart (same sha256 copied out); ``zramd snapshot`` on a running daemon is the data at that
moment, not later writes; SIGKILL while a snapshot is being written leaves the previous one
whole; a snapshot of another size, or a damaged one, stops the start with one line naming the
file, and ``--discard-snapshot`` starts it empty with the file renamed aside; a second daemon
naming a file in use is refused with one line naming the file and the holder; pages written
back to a backing file stay there across a restart (the snapshot references them), also from a
live snapshot followed by SIGKILL, and another backing file is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .conftest import MiB, Server, run, zramd_argv
from .test_groups import _real_files_image
from .zramd_with import start_zramd

EXPORT = "zram0"
SIZE = 64 * MiB


def _start(workdir: Path, snap: Path, size: int = SIZE, extra: str = "") -> Server:
    opts = f"persist={snap}" + (f",{extra}" if extra else "")
    return start_zramd(workdir, exports=[(EXPORT, size, opts)])


def _copy_out(server: Server, dest: Path, n: int) -> str:
    run(["nbdcopy", server.uri(EXPORT, unix=True), str(dest)], timeout=120)
    with open(dest, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(server: Server, *args: str) -> str:
    control = str(Path(server.workdir) / "control.sock")
    return run(zramd_argv() + [*args, "--control", control], timeout=120).stdout


def _kill(server: Server) -> None:
    server.stop_quietly()


def test_sigterm_and_restart_keep_the_data(tmp_path: Path) -> None:
    image = _real_files_image(tmp_path / "files.img", 24 * MiB)
    with open(image, "ab") as f:
        f.write(os.urandom(4 * MiB))  # incompressible pages too
    size = image.stat().st_size
    snap = tmp_path / "zram0.snap"
    server = _start(tmp_path / "srv", snap, extra="algorithm=lz4 zstd(level=3)")
    assert "no snapshot" in server.stderr()
    run(["nbdcopy", "--flush", str(image), server.uri(EXPORT, unix=True)], timeout=120)
    _cli(server, "idle", EXPORT, "--all")
    _cli(server, "recompress", EXPORT, "--group-pages", "8")  # groups and recompressed pages
    server.stop()
    assert "snapshot" in server.stderr() and snap.exists()
    server = _start(tmp_path / "srv2", snap, extra="algorithm=lz4 zstd(level=3)")
    try:
        assert "restored" in server.stderr()
        assert _copy_out(server, tmp_path / "out.img", size) == _sha(image)
    finally:
        server.stop()


def test_live_snapshot_is_the_moment_it_was_taken(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    first = tmp_path / "a.img"
    first.write_bytes(os.urandom(8 * MiB) + bytes(8 * MiB) + b"zram" * (4 * MiB))
    server = _start(tmp_path / "srv", snap)
    run(["nbdcopy", "--flush", str(first), server.uri(EXPORT, unix=True)], timeout=120)
    out = _cli(server, "snapshot", EXPORT)
    assert "longest pause" in out, out
    later = tmp_path / "b.img"
    later.write_bytes(os.urandom(2 * MiB))
    run(["nbdcopy", "--flush", str(later), server.uri(EXPORT, unix=True)], timeout=120)
    other = tmp_path / "other.snap"
    _cli(server, "snapshot", EXPORT, str(other))
    _kill(server)  # no snapshot at stop: the live one is what is left
    server = _start(tmp_path / "srv2", snap)
    try:
        assert _copy_out(server, tmp_path / "out.img", first.stat().st_size) == _sha(first)
    finally:
        _kill(server)
    server = _start(tmp_path / "srv3", other)
    try:
        got = _copy_out(server, tmp_path / "out2.img", SIZE)
        expect = later.read_bytes() + first.read_bytes()[len(later.read_bytes()) :]
        expect += bytes(SIZE - len(expect))
        assert got == hashlib.sha256(expect).hexdigest()
    finally:
        server.stop()


def test_sigkill_during_a_snapshot_keeps_the_previous_one(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    size = 160 * MiB
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(4 * MiB))
    server = _start(tmp_path / "srv", snap, size=size)
    run(["nbdcopy", "--flush", str(small), server.uri(EXPORT, unix=True)], timeout=120)
    server.stop()
    before = _sha(snap)
    server = _start(tmp_path / "srv2", snap, size=size)
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(size))
    run(["nbdcopy", "--flush", str(big), server.uri(EXPORT, unix=True)], timeout=180)
    tmp = tmp_path / ".s.snap.tmp"
    control = str(Path(server.workdir) / "control.sock")
    cli = subprocess.Popen(
        zramd_argv() + ["snapshot", EXPORT, "--control", control],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not tmp.exists() or tmp.stat().st_size < 16 * MiB:
        assert time.monotonic() < deadline, "the snapshot never started"
        time.sleep(0.001)
    server.procs[0].send_signal(signal.SIGKILL)
    _kill(server)
    cli.wait(timeout=30)
    assert _sha(snap) == before
    server = _start(tmp_path / "srv3", snap, size=size)
    try:
        assert _copy_out(server, tmp_path / "out.img", 4 * MiB) == _sha(small)
    finally:
        server.stop()


def _refused(tmp_path: Path, snap: Path, size: int) -> str:
    proc = _serve_once(tmp_path / "bad", snap, size)
    assert proc.returncode == 1, proc.stderr
    return proc.stderr


def _serve_once(
    workdir: Path, snap: Path, size: int, extra: str = ""
) -> subprocess.CompletedProcess[str]:
    """A daemon that must exit at start (it is refused)."""
    workdir.mkdir(exist_ok=True)
    cmd = zramd_argv() + [
        "serve",
        "--unix",
        str(workdir / "nbd.sock"),
        "--port",
        "0",
        "--control",
        str(workdir / "control.sock"),
        "--export",
        f"{EXPORT}={size // 1024}K,persist={snap}" + (f",{extra}" if extra else ""),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_other_size_or_damaged_snapshot_stops_the_start(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    data = tmp_path / "d.img"
    data.write_bytes(os.urandom(2 * MiB))
    run(["nbdcopy", "--flush", str(data), server.uri(EXPORT, unix=True)], timeout=120)
    server.stop()
    err = _refused(tmp_path, snap, 2 * SIZE)
    assert str(snap) in err and str(SIZE) in err and str(2 * SIZE) in err, err
    raw = snap.read_bytes()
    snap.write_bytes(raw[: len(raw) - 100])
    err = _refused(tmp_path, snap, SIZE)
    assert str(snap) in err and "truncated" in err, err


def test_destroy_writes_the_snapshot(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    data = tmp_path / "d.img"
    data.write_bytes(os.urandom(3 * MiB) + b"persist " * (MiB // 8))
    run(["nbdcopy", "--flush", str(data), server.uri(EXPORT, unix=True)], timeout=120)
    assert "destroyed zram0" in _cli(server, "destroy", EXPORT)
    assert snap.exists()
    _kill(server)  # the destroyed export is not written again at stop
    server = _start(tmp_path / "srv2", snap)
    try:
        assert _copy_out(server, tmp_path / "out.img", data.stat().st_size) == _sha(data)
    finally:
        server.stop()


def test_a_second_daemon_on_the_same_file_is_refused(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    data = tmp_path / "d.img"
    data.write_bytes(os.urandom(2 * MiB))
    server = _start(tmp_path / "srv", snap)
    try:
        run(["nbdcopy", "--flush", str(data), server.uri(EXPORT, unix=True)], timeout=120)
        proc = _serve_once(tmp_path / "second", snap, SIZE)
        assert proc.returncode == 1, proc.stderr
        pid = server.procs[0].pid
        lines = [ln for ln in proc.stderr.splitlines() if "in use" in ln]
        assert len(lines) == 1, proc.stderr
        assert f"snapshot {snap} is in use by another export or daemon (process {pid}" in lines[0]
    finally:
        server.stop()
    assert not (tmp_path / "second" / "nbd.sock").exists()
    server = _start(tmp_path / "srv2", snap)  # the first one's lock went with it
    try:
        assert _copy_out(server, tmp_path / "out.img", data.stat().st_size) == _sha(data)
        out = _cli(server, "stat", EXPORT)
        assert f"snapshot: {snap}, taken " in out and "0 saves, 0 failed" in out, out
        row = json.loads(_cli(server, "list", "--json"))["exports"][0]
        assert row["persist"]["file_bytes"] == snap.stat().st_size
        assert row["persist"]["age_seconds"] >= 0
    finally:
        server.stop()


def test_discard_snapshot_starts_empty_and_keeps_the_bad_file(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    data = tmp_path / "d.img"
    data.write_bytes(os.urandom(2 * MiB))
    run(["nbdcopy", "--flush", str(data), server.uri(EXPORT, unix=True)], timeout=120)
    server.stop()
    raw = bytearray(snap.read_bytes())
    raw[len(raw) - 300] ^= 0x10  # a flipped bit in the last chunk
    snap.write_bytes(bytes(raw))
    err = _refused(tmp_path, snap, SIZE)
    assert str(snap) in err and "checksum mismatch" in err, err
    server = start_zramd(
        tmp_path / "srv2", "--discard-snapshot", exports=[(EXPORT, SIZE, f"persist={snap}")]
    )
    try:
        warn = [ln for ln in server.stderr().splitlines() if "discarded" in ln]
        assert len(warn) == 1 and "checksum mismatch" in warn[0], warn
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("s.snap.bad-")]
        assert len(aside) == 1 and aside[0].read_bytes() == bytes(raw)
        assert str(aside[0]) in warn[0]
        assert (
            _copy_out(server, tmp_path / "out.img", SIZE) == hashlib.sha256(bytes(SIZE)).hexdigest()
        )
        run(["nbdcopy", "--flush", str(data), server.uri(EXPORT, unix=True)], timeout=120)
    finally:
        server.stop()
    server = _start(tmp_path / "srv3", snap)  # a good snapshot again
    try:
        assert "restored" in server.stderr()
        assert _copy_out(server, tmp_path / "out2.img", data.stat().st_size) == _sha(data)
    finally:
        server.stop()


def test_pages_written_back_survive_a_restart(tmp_path: Path) -> None:
    image = _real_files_image(tmp_path / "files.img", 24 * MiB)
    with open(image, "ab") as f:
        f.write(os.urandom(4 * MiB))  # incompressible pages: written back raw
    size = image.stat().st_size
    snap, backing = tmp_path / "zram0.snap", tmp_path / "zram0.backing"
    extra = f"backing={backing}"
    server = _start(tmp_path / "srv", snap, extra=extra)
    run(["nbdcopy", "--flush", str(image), server.uri(EXPORT, unix=True)], timeout=120)
    _cli(server, "idle", EXPORT, "--all")
    _cli(server, "writeback", EXPORT, "--type", "idle", "--pages", "0-3999")
    st = json.loads(_cli(server, "stat", EXPORT, "--json"))
    written = st["backing"]["bd_count"]
    assert written > 1000, st["backing"]
    server.stop()
    assert "snapshot" in server.stderr() and snap.exists()
    server = _start(tmp_path / "srv2", snap, extra=extra)
    try:
        assert "restored" in server.stderr()
        st = json.loads(_cli(server, "stat", EXPORT, "--json"))
        assert st["backing"]["bd_count"] == written  # still in the backing file
        assert _copy_out(server, tmp_path / "out.img", size) == _sha(image)
    finally:
        server.stop()
    # restarted once more: what was promoted by the copy-out and what stayed out
    server = _start(tmp_path / "srv3", snap, extra=extra)
    try:
        assert _copy_out(server, tmp_path / "out2.img", size) == _sha(image)
    finally:
        server.stop()
    # another backing file: refused with one line, the snapshot kept
    backing.unlink()
    server = _start(tmp_path / "srv4", snap, extra=extra)
    run(["nbdcopy", "--flush", str(image), server.uri(EXPORT, unix=True)], timeout=120)
    _cli(server, "idle", EXPORT, "--all")
    _cli(server, "writeback", EXPORT, "--type", "idle")
    server.stop()
    other = tmp_path / "other.backing"
    proc = _serve_once(tmp_path / "bad", snap, SIZE, f"backing={other}")
    assert proc.returncode == 1 and f"cannot be read from backing {other}" in proc.stderr


def test_live_snapshot_of_pages_written_back_then_sigkill(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(6 * MiB) + b"written back " * (MiB // 2))
    snap, backing = tmp_path / "s.snap", tmp_path / "s.backing"
    extra = f"backing={backing}"
    server = _start(tmp_path / "srv", snap, extra=extra)
    run(["nbdcopy", "--flush", str(image), server.uri(EXPORT, unix=True)], timeout=120)
    _cli(server, "idle", EXPORT, "--all")
    _cli(server, "writeback", EXPORT, "--type", "idle")
    assert "longest pause" in _cli(server, "snapshot", EXPORT)
    server.procs[0].send_signal(signal.SIGKILL)  # no snapshot at stop: the live one is left
    _kill(server)
    server = _start(tmp_path / "srv2", snap, extra=extra)
    try:
        st = json.loads(_cli(server, "stat", EXPORT, "--json"))
        assert st["backing"]["bd_count"] > 0
        n = image.stat().st_size
        assert _copy_out(server, tmp_path / "out.img", n) == _sha(image)
    finally:
        server.stop()
