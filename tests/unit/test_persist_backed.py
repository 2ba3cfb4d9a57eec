"""Snapshots of a device whose pages are partly written back to a backing store: those pages are
referenced by locator (the image names the store's UUID and each locator's segment generation);
the last snapshot keeps the store pinned until the device closes, and the next start opens the
store with those locators live and reads them back; a live snapshot pins the store only while it
is written (frees wait, then happen), and once its segments were given back and written again
its restore is refused, never other data; a snapshot names its store, so another backing file
is refused (or, discarding, formatted with the snapshot set aside)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_groups import _payload
from zramd.backing import BackingStore
from zramd.config import ConfigError, ExportConfig
from zramd.device.blockdev import ZramDevice
from zramd.device.table import BACKED, HUGE, RAW, STORED
from zramd.persist import SnapshotReader, SnapshotWriter
from zramd.server import persistence
from zramd.server.exports import ExportRegistry

PAGE = 4096
NPAGES = 128
SIZE = NPAGES * PAGE


def _save(d: ZramDevice, path: Path, final: bool = False) -> None:
    meta, src = d.snapshot_image(final)
    w = SnapshotWriter(str(path))
    try:
        w.write_meta(meta)
        while objs := src.take(1 << 16):
            w.write_chunk(objs)
        w.commit()
    finally:
        src.close()


def _load(path: Path, backing_path: Path) -> tuple[ZramDevice, BackingStore]:
    """A device restored from ``path`` over the backing file reopened with its locators."""
    r = SnapshotReader(str(path))
    state, handle = r.meta.table[0], r.meta.table[1]
    bs = BackingStore.open(str(backing_path), live=handle[state == BACKED].tolist())
    d = ZramDevice(r.meta.size, backing=bs)
    try:
        sink = d.restore_image(r.meta)
        for lengths, data in r.chunks():
            sink.put(lengths, data)()
        sink.finish()
    except BaseException:
        d.close()
        bs.close()
        raise
    finally:
        r.close()
    return d, bs


async def _freed(bs: BackingStore) -> None:
    """Let the loop run the frees (in the store's threads) until the store holds nothing."""
    for _ in range(200):
        if bs.stat()["bd_count"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{bs.stat()['bd_count']} objects still live")


async def _filled(bs: BackingStore, seed: int) -> tuple[ZramDevice, bytearray]:
    """A device with compressed and huge pages, half of them written back, and same-filled
    pages and holes."""
    rnd = random.Random(seed)
    d = ZramDevice(SIZE, backing=bs)
    model = bytearray(SIZE)
    for p in range(0, NPAGES - 8):
        data = _payload(rnd.choice([1, 2, 2, 3]), PAGE, rnd.randrange(1 << 30))
        await d.write(p * PAGE, data)
        model[p * PAGE : (p + 1) * PAGE] = data
    d.mark_idle(first=0, stop=NPAGES // 2)
    res = await d.writeback(kind="idle")
    assert res.written > 0
    t = d.table
    assert (t.state == BACKED).any() and (t.state == STORED).any()
    assert ((t.state == BACKED) & ((t.flags & RAW) != 0)).any()  # huge pages written back
    assert (t.state == HUGE).any()
    return d, model


async def test_written_back_pages_are_referenced_and_read_back(tmp_path: Path) -> None:
    bpath = tmp_path / "backing"
    bs = BackingStore.create(str(bpath))
    d, model = await _filled(bs, 1)
    nbacked = int(np.count_nonzero(d.table.state == BACKED))
    snap = tmp_path / "snap"
    _save(d, snap, final=True)
    # the device closes after the last snapshot: nothing it referenced is freed meanwhile
    await d.write(0, bytes(range(256)) * 16)
    await d.trim(PAGE, 8 * PAGE)
    assert bs.stat()["bd_count"] == nbacked
    d.close()
    bs.close()
    d, bs = _load(snap, bpath)
    assert int(np.count_nonzero(d.table.state == BACKED)) == nbacked
    assert d.stats.bd_count == nbacked
    assert bytes(await d.read(0, SIZE)) == bytes(model)
    # the store goes on: new writebacks, promotions, and a second round trip
    await d.write(0, bytes(PAGE))
    model[:PAGE] = bytes(PAGE)
    d.mark_idle()
    await d.writeback(kind="idle")
    _save(d, snap, final=True)
    d.close()
    bs.close()
    d, bs = _load(snap, bpath)
    assert bytes(await d.read(0, SIZE)) == bytes(model)
    d.close()
    bs.close()


async def test_a_live_snapshot_pins_the_store_while_it_is_written(tmp_path: Path) -> None:
    bpath = tmp_path / "backing"
    bs = BackingStore.create(str(bpath))
    d, model = await _filled(bs, 2)
    backed = np.flatnonzero(d.table.state == BACKED)
    live = bs.stat()["bd_count"]
    meta, src = d.snapshot_image()
    w = SnapshotWriter(str(tmp_path / "snap"))
    w.write_meta(meta)
    for p in backed.tolist():  # every page written back is rewritten: its locator dropped
        await d.write(p * PAGE, bytes([7]) * PAGE)
    assert bs.stat()["bd_count"] == live  # pinned: none freed
    while objs := src.take(1 << 16):
        w.write_chunk(objs)
    w.commit()
    src.close()
    await _freed(bs)
    d.close()
    bs.close()
    # nothing reused the segments yet: the snapshot reads back as it was taken
    d2, bs2 = _load(tmp_path / "snap", bpath)
    assert bytes(await d2.read(0, SIZE)) == bytes(model)
    d2.close()
    bs2.close()


async def test_a_checkpoint_holds_what_it_references_until_the_next(tmp_path: Path) -> None:
    """Durable mode: the pages written back that a committed checkpoint references stay in the
    store until the next checkpoint, also those rewritten while it was written, and cleaning
    or stale-segment reuse cannot take them; then they are freed."""
    bpath = tmp_path / "backing"
    bs = BackingStore.create(str(bpath), segment_size=64 << 10)
    d, model = await _filled(bs, 5)
    backed = np.flatnonzero(d.table.state == BACKED).tolist()
    live = bs.stat()["bd_count"]
    meta, src = d.snapshot_image()
    w = SnapshotWriter(str(tmp_path / "snap"))
    w.write_meta(meta)
    half = backed[: len(backed) // 2]
    for p in half:  # rewritten while the checkpoint is written
        await d.write(p * PAGE, bytes([7]) * PAGE)
    while objs := src.take(1 << 16):
        w.write_chunk(objs)
    w.commit()
    d.hold_image(meta)  # committed: before the capture ends, as the server does
    src.close()
    for p in backed[len(backed) // 2 :]:  # rewritten after it
        await d.write(p * PAGE, bytes([8]) * PAGE)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert bs.stat()["bd_count"] == live  # none freed: the checkpoint references them all
    # more data written back reuses nothing the checkpoint needs
    rnd = random.Random(6)
    for p in range(NPAGES // 2, NPAGES - 8):
        await d.write(p * PAGE, _payload(rnd.choice([2, 3]), PAGE, rnd.randrange(1 << 30)))
    d.mark_idle()
    await d.writeback(kind="idle")
    d.close()
    bs.close()
    # a crash now restarts from that checkpoint: everything it references is there
    d2, bs2 = _load(tmp_path / "snap", bpath)
    assert bytes(await d2.read(0, SIZE)) == bytes(model)
    r = SnapshotReader(str(tmp_path / "snap"))
    d2.hold_image(r.meta)  # as the server's restore does in durable mode
    r.close()
    back = np.flatnonzero(d2.table.state == BACKED).tolist()
    count = bs2.stat()["bd_count"]
    for p in back:
        await d2.write(p * PAGE, bytes([9]) * PAGE)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert bs2.stat()["bd_count"] == count  # held
    # the next checkpoint references none of them: they go
    meta2, src2 = d2.snapshot_image()
    d2.hold_image(meta2)
    src2.close()
    await _freed(bs2)
    d2.close()
    bs2.close()


async def test_a_stale_live_snapshot_is_refused(tmp_path: Path) -> None:
    bpath = tmp_path / "backing"
    bs = BackingStore.create(str(bpath), segment_size=64 << 10)  # sealed and given back
    d, _model = await _filled(bs, 3)
    _save(d, tmp_path / "snap")  # live: unpinned once written
    for p in np.flatnonzero(d.table.state == BACKED).tolist():
        await d.write(p * PAGE, bytes([9]) * PAGE)
    await _freed(bs)
    # other data written back into the segments given back
    rnd = random.Random(4)
    for p in range(NPAGES // 2):
        await d.write(p * PAGE, _payload(rnd.choice([2, 3]), PAGE, rnd.randrange(1 << 30)))
    d.mark_idle()
    await d.writeback(kind="idle")
    d.close()
    bs.close()
    with pytest.raises(ValueError, match="no longer in .* given back and written again"):
        _load(tmp_path / "snap", bpath)


async def test_the_server_restores_through_the_backing_file(tmp_path: Path) -> None:
    bpath, snap = tmp_path / "backing", tmp_path / "a.snap"
    cfg = ExportConfig(name="a", size=SIZE, persist=str(snap), backing=str(bpath))
    reg = ExportRegistry()
    exp = reg.add(cfg)
    data = np.random.default_rng(5).bytes(SIZE // 2) + bytes(SIZE // 4) + b"zramd" * (SIZE // 20)
    data += bytes(SIZE - len(data))
    await exp.device.write(0, data)
    exp.device.mark_idle()
    assert (await exp.device.writeback(kind="idle")).written
    await persistence.save_all(reg)
    reg.close()
    reg = ExportRegistry()
    exp = reg.add(cfg)
    await persistence.restore_all(reg)
    assert exp.device.stats.bd_count > 0
    assert bytes(await exp.device.read(0, SIZE)) == data  # read back, promoted to RAM
    exp.device.mark_idle()
    assert (await exp.device.writeback(kind="idle")).written
    await persistence.save_all(reg)
    reg.close()
    # another backing file in its place: refused, or, discarding, formatted and set aside
    BackingStore.create(str(bpath)).close()
    with pytest.raises(ConfigError, match=f"cannot be read from backing {bpath}: it is the "):
        ExportRegistry().add(cfg)
    reg = ExportRegistry(discard_snapshot=True)
    exp = reg.add(cfg)
    await persistence.restore_all(reg, discard=True)
    exp = reg.get("a")  # type: ignore[assignment]
    assert exp is not None and bytes(await exp.device.read(0, SIZE)) == bytes(SIZE)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("a.snap.bad-")]
    reg.close()


async def test_no_backing_store_for_pages_written_back_is_refused(tmp_path: Path) -> None:
    bpath, snap = tmp_path / "backing", tmp_path / "a.snap"
    reg = ExportRegistry()
    exp = reg.add(ExportConfig(name="a", size=SIZE, persist=str(snap), backing=str(bpath)))
    await exp.device.write(0, np.random.default_rng(6).bytes(SIZE))
    exp.device.mark_idle()
    await exp.device.writeback(kind="idle")
    await persistence.save_all(reg)
    reg.close()
    reg = ExportRegistry()
    reg.add(ExportConfig(name="a", size=SIZE, persist=str(snap)))
    with pytest.raises(persistence.SnapshotRefused, match="the export has none"):
        await persistence.restore_all(reg)
    reg.close()
