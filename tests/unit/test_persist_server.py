"""The server's side of persistent exports: one export at a time holds a snapshot file (its lock,
taken by the registry, released when the export closes; ``zramd snapshot`` to another export's
file is refused); a bad or foreign file stops the start unless ``discard``, which renames it aside
and starts the export empty in its place; the snapshot status (age, bytes, last save's seconds
and error) in ``stat``, ``list`` rows and the metrics; at stop, systemd is asked for each save's
worst-case time."""

from __future__ import annotations

import os
import socket
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from zramd.config import ConfigError, ExportConfig
from zramd.control.metrics import render
from zramd.control.server import export_row, export_stat
from zramd.device import image
from zramd.persist import SnapshotBusy, SnapshotLock, SnapshotReader
from zramd.server import persistence
from zramd.server.exports import ExportRegistry

PAGE = 4096
SIZE = 64 * PAGE


def _config(path: Path, name: str = "a", size: int = SIZE) -> ExportConfig:
    return ExportConfig(name=name, size=size, persist=str(path))


def test_lock_is_held_while_the_export_exists(tmp_path: Path) -> None:
    snap = tmp_path / "a.snap"
    one, two = ExportRegistry(), ExportRegistry()
    one.add(_config(snap))
    with pytest.raises(
        ConfigError,
        match=f"export 'b': snapshot {snap} is in use .*process {os.getpid()} holds {snap}.lock",
    ):
        two.add(_config(snap, "b"))
    assert len(two) == 0
    one.remove("a")
    two.add(_config(snap, "b"))  # free again
    two.close()
    lock = SnapshotLock(str(snap))  # and after close
    with pytest.raises(SnapshotBusy):
        SnapshotLock(str(snap))
    lock.release()
    lock.release()
    assert not lock.held and (tmp_path / "a.snap.lock").exists()


async def test_snapshot_to_another_exports_file_is_refused(tmp_path: Path) -> None:
    reg = ExportRegistry()
    a = reg.add(_config(tmp_path / "a.snap"))
    reg.add(_config(tmp_path / "b.snap", "b"))
    await a.device.write(0, b"x" * PAGE)
    with pytest.raises(ConfigError, match="in use"):
        await persistence.save(a, str(tmp_path / "b.snap"))
    assert not (tmp_path / "b.snap").exists()
    info = await persistence.save(a, str(tmp_path / "c.snap"))  # a free file: locked for it
    assert info.pages == 1
    SnapshotLock(str(tmp_path / "c.snap")).release()
    reg.close()


async def _saved(tmp_path: Path, data: bytes) -> Path:
    snap = tmp_path / "a.snap"
    reg = ExportRegistry()
    exp = reg.add(_config(snap))
    await exp.device.write(0, data)
    await persistence.save(exp)
    reg.close()
    return snap


@pytest.mark.parametrize("damage", ["truncated", "checksum", "size"])
async def test_discard_sets_a_bad_file_aside_and_starts_empty(tmp_path: Path, damage: str) -> None:
    data = np.random.default_rng(1).bytes(8 * PAGE)
    snap = await _saved(tmp_path, data)
    raw = snap.read_bytes()
    size = SIZE
    if damage == "truncated":
        snap.write_bytes(raw[:-10])
    elif damage == "checksum":
        b = bytearray(raw)
        b[len(raw) - 200] ^= 1
        snap.write_bytes(bytes(b))
    else:
        size = 2 * SIZE
    bad = snap.read_bytes()
    reg = ExportRegistry()
    reg.add(_config(snap, size=size))
    reg.add(ExportConfig(name="other", size=SIZE))
    with pytest.raises(persistence.SnapshotRefused, match=str(snap)):
        await persistence.restore_all(reg)
    await persistence.restore_all(reg, discard=True)
    exp = reg.get("a")
    assert exp is not None and [e.name for e in reg] == ["a", "other"]
    assert bytes(await exp.device.read(0, 8 * PAGE)) == bytes(8 * PAGE)
    assert exp.lock is not None and exp.lock.held
    with pytest.raises(SnapshotBusy):
        SnapshotLock(str(snap))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("a.snap.bad-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad and not snap.exists()
    await exp.device.write(0, data)
    await persistence.save(exp)  # the export goes on with a new file
    reg.close()
    reg = ExportRegistry()
    exp = reg.add(_config(snap, size=size))
    await persistence.restore_all(reg)
    assert bytes(await exp.device.read(0, 8 * PAGE)) == data
    reg.close()


async def test_a_file_that_does_not_fit_the_memory_limit_is_not_discarded(
    tmp_path: Path,
) -> None:
    snap = await _saved(tmp_path, np.random.default_rng(2).bytes(SIZE))
    reg = ExportRegistry()
    cfg = _config(snap)
    cfg.mem_limit = 16 * PAGE
    reg.add(cfg)
    with pytest.raises(ConfigError, match="memory limit") as e:
        await persistence.restore_all(reg, discard=True)
    assert not isinstance(e.value, persistence.SnapshotRefused) and snap.exists()
    reg.close()


async def test_restore_reads_stores_and_copies_batches_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore of many chunks in many batches (one read, one stored, one copied at a time,
    in three buffers) gives back every byte; one that meets the memory limit half way fails
    with nothing left running, and the export does not start."""
    monkeypatch.setattr(image, "TAKE_BATCH", 2)  # chunks of a few objects
    monkeypatch.setattr(persistence, "SLICE_BYTES", PAGE)
    monkeypatch.setattr(persistence, "CHUNK_BYTES", 2 * PAGE)
    monkeypatch.setattr(persistence, "RESTORE_BATCH_BYTES", 6 * PAGE)
    rng = np.random.default_rng(4)
    pages = [
        rng.bytes(PAGE) if i % 3 == 0 else (rng.bytes(700) * 6)[:PAGE] for i in range(SIZE // PAGE)
    ]
    data = b"".join(pages)
    snap = await _saved(tmp_path, data)
    with closing(SnapshotReader(str(snap))) as r:
        chunks = sum(1 for _ in r.chunks())
    with closing(SnapshotReader(str(snap))) as r:
        batches = sum(1 for _ in r.chunks(persistence.RESTORE_BATCH_BYTES))
    assert chunks > batches > 3
    reg = ExportRegistry()
    exp = reg.add(_config(snap))
    await persistence.restore_all(reg)
    assert bytes(await exp.device.read(0, SIZE)) == data
    reg.close()
    cfg = _config(snap)
    cfg.mem_limit = 24 * PAGE
    reg = ExportRegistry()
    reg.add(cfg)
    with pytest.raises(ConfigError, match="memory limit"):
        await persistence.restore_all(reg)
    reg.close()


async def test_status_in_stat_list_and_metrics(tmp_path: Path) -> None:
    snap = tmp_path / "a.snap"
    reg = ExportRegistry()
    exp = reg.add(_config(snap))
    reg.add(ExportConfig(name="plain", size=SIZE))
    st = export_stat(exp, None)["persist"]
    assert st["age_seconds"] == -1 and st["file_bytes"] == 0 and st["saves"] == 0
    await exp.device.write(0, np.random.default_rng(3).bytes(4 * PAGE))
    info = await persistence.save(exp)
    st = export_stat(exp, None)["persist"]
    assert 0 <= st["age_seconds"] < 5 and st["file_bytes"] == info.file_bytes == snap.stat().st_size
    assert st["saves"] == 1 and st["last_error"] == "" and st["path"] == str(snap)
    row = export_row(exp, None)["persist"]
    assert row == st | {"age_seconds": row["age_seconds"]}
    (tmp_path / ".a.snap.tmp").mkdir()  # where the next save would be written
    with pytest.raises(IsADirectoryError):
        await persistence.save(exp)
    (tmp_path / ".a.snap.tmp").rmdir()
    st = export_stat(exp, None)["persist"]
    assert st["failures"] == 1 and "Is a directory" in st["last_error"]
    assert st["file_bytes"] == info.file_bytes  # the previous snapshot is still there
    assert export_stat(reg.get("plain"), None)["persist"] is None  # type: ignore[arg-type]
    text = render(reg)
    assert f'zramd_snapshot_bytes{{export="a"}} {info.file_bytes}' in text
    assert 'zramd_snapshot_failures_total{export="a"} 1' in text
    assert 'zramd_snapshot_age_seconds{export="a"}' in text
    assert 'export="plain"' not in "".join(
        line for line in text.splitlines() if line.startswith("zramd_snapshot")
    )
    reg.close()
    reg = ExportRegistry()
    exp = reg.add(_config(snap))
    await persistence.restore_all(reg)
    st = export_stat(exp, None)["persist"]
    assert st["file_bytes"] == info.file_bytes and st["age_seconds"] >= 0 and st["saves"] == 0
    reg.close()


async def test_stop_asks_systemd_for_each_saves_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    reg = ExportRegistry()
    reg.add(_config(tmp_path / "a.snap", size=1 << 30))
    reg.add(ExportConfig(name="plain", size=SIZE))
    reg.add(_config(tmp_path / "b.snap", "b"))
    await persistence.save_all(reg)
    got = [sock.recv(256).decode() for _ in range(2)]
    assert got == [
        f"EXTEND_TIMEOUT_USEC={int((10 + (1 << 30) / 200e6) * 1e6)}",
        f"EXTEND_TIMEOUT_USEC={int((10 + SIZE / 200e6) * 1e6)}",
    ]
    assert (tmp_path / "a.snap").exists() and (tmp_path / "b.snap").exists()
    reg.close()
    sock.close()
