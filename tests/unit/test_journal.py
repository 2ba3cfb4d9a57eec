"""The durable export's journal: its file format (whole frames or nothing: a tail cut at any
byte, a flipped byte, a torn header), and a model test of durable mode through the real
dispatcher and device: hypothesis drives writes, trims, zeroes, FUA writes, FLUSHes, checkpoints
and the journal's own checkpoint trigger, then a power loss (every journal file cut at a random
point after what its last sync covered) and a restart from the files; every page must hold the
data of the last FLUSH before the crash, or a later write."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zramd.config import ConfigError, ExportConfig
from zramd.persist import journal as jfile
from zramd.persist.journal import (
    HEADER,
    TRIM,
    WRITE,
    ZERO,
    JournalError,
    JournalFile,
    journal_files,
    read_journal,
)
from zramd.protocol import wire
from zramd.protocol.events import Request
from zramd.server import persistence
from zramd.server.dispatch import Dispatcher
from zramd.server.exports import ExportRegistry

PAGE = 4096
NPAGES = 32
SIZE = NPAGES * PAGE


def _write_file(tmp: Path, frames: list[list[jfile.Record]]) -> str:
    f = JournalFile(str(tmp / "s.snap"), 7, SIZE, PAGE)
    for records in frames:
        f.append(records)
    f.sync()
    f.close()
    return f.path


def test_roundtrip_and_names(tmp_path: Path) -> None:
    frames = [
        [(WRITE, 0, PAGE, b"a" * PAGE), (TRIM, PAGE, 2 * PAGE, b"")],
        [(ZERO, 3 * PAGE, PAGE, b""), (WRITE, 8 * PAGE, 2 * PAGE, os.urandom(2 * PAGE))],
    ]
    path = _write_file(tmp_path, frames)
    assert journal_files(str(tmp_path / "s.snap")) == [(7, path)]
    got = read_journal(path)
    assert got.header is not None and (got.header.size, got.header.generation) == (SIZE, 7)
    assert got.frames == 2 and not got.torn
    assert [(k, o, n, bytes(d)) for k, o, n, d in got.records] == [
        (k, o, n, bytes(d)) for fr in frames for k, o, n, d in fr
    ]


def test_a_cut_anywhere_keeps_the_whole_frames_before_it(tmp_path: Path) -> None:
    frames = [[(WRITE, i * PAGE, PAGE, bytes([i]) * PAGE)] for i in range(3)]
    path = _write_file(tmp_path, frames)
    full = Path(path).read_bytes()
    ends = [HEADER.size]
    for i in range(3):
        ends.append(ends[-1] + len(jfile.encode_frame(i, frames[i])))
    assert ends[-1] == len(full)
    for cut in range(0, len(full), 97):
        Path(path).write_bytes(full[:cut])
        got = read_journal(path)
        if cut < HEADER.size:
            assert got.header is None and got.records == []
            continue
        whole = max(i for i, e in enumerate(ends) if e <= cut)
        assert got.frames == whole and got.good_bytes == ends[whole]
        assert got.torn == (cut != ends[whole])


def test_a_damaged_frame_ends_the_journal_there(tmp_path: Path) -> None:
    frames = [[(WRITE, i * PAGE, PAGE, os.urandom(PAGE))] for i in range(3)]
    path = _write_file(tmp_path, frames)
    raw = bytearray(Path(path).read_bytes())
    second = HEADER.size + len(jfile.encode_frame(0, frames[0]))
    raw[second + 100] ^= 0x40
    Path(path).write_bytes(bytes(raw))
    got = read_journal(path)
    assert got.frames == 1 and got.torn and got.good_bytes == second


def test_not_a_journal_or_another_version_is_refused(tmp_path: Path) -> None:
    path = _write_file(tmp_path, [])
    raw = bytearray(Path(path).read_bytes())
    Path(path).write_bytes(b"X" + bytes(raw[1:]))
    with pytest.raises(JournalError, match="not a zramd journal"):
        read_journal(path)
    raw[8] = 9  # version
    fields = bytes(raw[: HEADER.size - 4])
    import zlib

    raw[HEADER.size - 4 :] = zlib.crc32(fields).to_bytes(4, "little")
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(JournalError, match="format version 9"):
        read_journal(path)


def test_sync_flush_needs_a_persist_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sync=flush needs a persist file"):
        ExportConfig(name="a", size=SIZE, sync="flush").validate()
    with pytest.raises(ConfigError, match="sync 'often' must be one of stop, flush"):
        ExportConfig(name="a", size=SIZE, persist=str(tmp_path / "s"), sync="often").validate()


# -- the model test ----------------------------------------------------------------------------

_range = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 6))
_op = st.one_of(
    st.tuples(st.just("write"), _range, st.integers(1, 255)),
    st.tuples(st.just("fua"), _range, st.integers(1, 255)),
    st.tuples(st.just("trim"), _range),
    st.tuples(st.just("zero"), _range),
    st.tuples(st.just("flush")),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("small-checkpoint-bytes")),
)


def _data(tag: int, n: int) -> bytes:
    return b"".join(bytes([tag]) * (PAGE - 8) + i.to_bytes(8, "little") for i in range(n))


async def _run(workdir: Path, ops: list[tuple], cuts: list[float]) -> None:
    snap = workdir / "s.snap"
    cfg = ExportConfig(name="a", size=SIZE, persist=str(snap), sync="flush")
    reg = ExportRegistry()
    reg.add(cfg)
    await persistence.restore_all(reg)
    exp = reg.get("a")
    assert exp is not None and exp.journal is not None
    d = Dispatcher(exp, structured=False, max_payload=1 << 20)
    durable: dict[int, bytes | None] = {}
    since: dict[int, list[bytes | None]] = {}
    for op in ops:
        kind = op[0]
        if kind in ("write", "fua", "trim", "zero"):
            (first, n) = op[1]
            n = min(n, NPAGES - first)
            off, length = first * PAGE, n * PAGE
            if kind in ("write", "fua"):
                data = _data(op[2], n)
                flags = wire.CMD_FLAG_FUA if kind == "fua" else 0
                req = Request(wire.CMD_WRITE, flags, 1, off, length, data)
                reply = d.run_now(req) or await d.execute(req)
                pages: list[bytes | None] = [data[i * PAGE : (i + 1) * PAGE] for i in range(n)]
            else:
                cmd = wire.CMD_TRIM if kind == "trim" else wire.CMD_WRITE_ZEROES
                reply = await d.execute(Request(cmd, 0, 1, off, length))
                pages = [None] * n
            assert reply is not None and not hasattr(reply, "errno"), reply
            for i, p in enumerate(pages):
                if kind == "fua":
                    durable[first + i] = p
                    since.pop(first + i, None)
                else:
                    since.setdefault(first + i, []).append(p)
        elif kind == "flush":
            reply = await d.execute(Request(wire.CMD_FLUSH, 0, 1, 0, 0))
            assert not hasattr(reply, "errno"), reply
            for page, writes in since.items():
                durable[page] = writes[-1]
            since.clear()
        elif kind == "checkpoint":
            await persistence.save(exp)
        else:
            exp.journal.checkpoint_bytes = 1  # the next frame written asks for a checkpoint
    await asyncio.sleep(0.01)
    # power loss: each journal file keeps what its last sync covered, and maybe some more
    synced = exp.journal.synced()
    crashed = workdir / "crashed"
    crashed.mkdir()
    files = [(g, p) for g, p in journal_files(str(snap))]
    for (g, path), frac in zip(files, cuts + [1.0] * len(files), strict=False):
        raw = Path(path).read_bytes()
        keep = synced.get(g, len(raw))
        keep += int((len(raw) - keep) * frac)
        (crashed / Path(path).name).write_bytes(raw[:keep])
    if snap.exists():
        shutil.copy(snap, crashed / snap.name)
    await persistence.checkpoints_done()
    reg.close()
    reg2 = ExportRegistry()
    reg2.add(ExportConfig(name="a", size=SIZE, persist=str(crashed / snap.name), sync="flush"))
    await persistence.restore_all(reg2)
    exp2 = reg2.get("a")
    assert exp2 is not None
    got = await exp2.device.read(0, SIZE)
    for page in range(NPAGES):
        data = bytes(got[page * PAGE : (page + 1) * PAGE])
        have = None if data == bytes(PAGE) else data
        allowed = [durable.get(page), *since.get(page, [])]
        assert have in allowed, (page, have and have[0], [a and a[0] for a in allowed])
    reg2.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, min_size=1, max_size=40),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=4),
)
def test_a_power_loss_keeps_every_flushed_page(ops: list[tuple], cuts: list[float]) -> None:
    workdir = Path(tempfile.mkdtemp())
    try:
        asyncio.run(_run(workdir, ops, cuts))
    finally:
        shutil.rmtree(workdir)


async def test_the_journal_asks_for_a_checkpoint_when_it_has_grown(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    reg = ExportRegistry()
    reg.add(ExportConfig(name="a", size=SIZE, persist=str(snap), sync="flush"))
    await persistence.restore_all(reg)
    exp = reg.get("a")
    assert exp is not None and exp.journal is not None
    journal = exp.journal
    journal.checkpoint_bytes = 64 << 10
    d = Dispatcher(exp, structured=False, max_payload=1 << 20)
    for i in range(NPAGES):  # incompressible: the journal's frames are as large
        page = bytes([i + 1]) + os.urandom(PAGE - 1)
        await d.execute(Request(wire.CMD_WRITE, 0, 1, i * PAGE, PAGE, page))
    reply = await d.execute(Request(wire.CMD_FLUSH, 0, 1, 0, 0))
    assert not hasattr(reply, "errno")
    for _ in range(200):
        if journal.checkpoints:
            break
        await asyncio.sleep(0.01)
    await persistence.checkpoints_done()
    st = journal.as_dict()
    assert st["checkpoints"] == 1 and st["last_checkpoint_seconds"] > 0
    assert st["checkpoint_running_seconds"] == 0.0
    assert snap.exists() and st["generation"] == 2
    for _ in range(500):  # the older generation is deleted by the journal's thread
        if [g for g, _ in journal_files(str(snap))] == [2]:
            break
        await asyncio.sleep(0.01)
    assert [g for g, _ in journal_files(str(snap))] == [2]
    assert exp.snapshot is not None and exp.snapshot.saves == 1
    reg.close()
    reg2 = ExportRegistry()
    reg2.add(ExportConfig(name="a", size=SIZE, persist=str(snap), sync="flush"))
    await persistence.restore_all(reg2)
    exp2 = reg2.get("a")
    assert exp2 is not None
    got = await exp2.device.read(0, SIZE)
    assert all(got[i * PAGE] == i + 1 for i in range(NPAGES))
    reg2.close()


async def test_a_stop_mode_start_takes_over_the_journal_once(tmp_path: Path) -> None:
    """An export that ran durable and now runs with sync=stop replays the journal it finds,
    snapshots at once and deletes it; the next start finds no journal and writes nothing."""
    snap = tmp_path / "s.snap"
    reg = ExportRegistry()
    reg.add(ExportConfig(name="a", size=SIZE, persist=str(snap), sync="flush"))
    await persistence.restore_all(reg)
    exp = reg.get("a")
    assert exp is not None
    d = Dispatcher(exp, structured=False, max_payload=1 << 20)
    await d.execute(Request(wire.CMD_WRITE, 0, 1, 0, PAGE, _data(7, 1)))
    await d.execute(Request(wire.CMD_FLUSH, 0, 1, 0, 0))
    assert exp.journal is not None
    exp.journal.close()  # a crash: no snapshot at stop
    exp.journal = None
    reg.close()
    for round_ in range(2):
        reg2 = ExportRegistry()
        reg2.add(ExportConfig(name="a", size=SIZE, persist=str(snap)))
        await persistence.restore_all(reg2)
        exp2 = reg2.get("a")
        assert exp2 is not None and exp2.journal is None
        assert (await exp2.device.read(0, PAGE)) == _data(7, 1)
        assert journal_files(str(snap)) == []
        assert exp2.snapshot is not None and exp2.snapshot.saves == (1 if round_ == 0 else 0)
        reg2.close()
