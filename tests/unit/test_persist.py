"""Snapshots of a device: the image written to a file and restored into a new device reads back
as a bytearray model (writes of every kind, same-filled and zero pages, mixed codecs, recompressed
pages, multi-page groups); a live snapshot is the point in time of its capture while writes,
trims, groups and compaction go on between its slices; the restored counters and registry are
consistent; a truncated, torn, corrupt or foreign file is refused (a bad header, footer or meta
before anything is restored, a damaged chunk when it is read: the device is then thrown away);
an interrupted write leaves the previous snapshot in place; two saves of one export run one
after the other (pages written back to a backing store: tests/unit/test_persist_backed.py)."""

from __future__ import annotations

import asyncio
import os
import random
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_groups import _payload, check, mark_idle
from zramd.config import ExportConfig
from zramd.device.blockdev import ZramDevice
from zramd.device.image import Capture
from zramd.device.interface import DeviceError
from zramd.device.table import GROUPED, HUGE, RECOMPRESSED, SAME, STORED
from zramd.persist import SnapshotError, SnapshotReader, SnapshotWriter
from zramd.server import persistence
from zramd.server.exports import ExportRegistry

PAGE = 4096
NPAGES = 256
SIZE = NPAGES * PAGE


def save(d: ZramDevice, path: Path, during: list | None = None) -> int:  # type: ignore[type-arg]
    """Snapshot ``d`` to ``path`` in small slices, running ``during`` callables between them;
    returns the bytes the capture copied aside."""
    meta, src = d.snapshot_image()
    w = SnapshotWriter(str(path))
    try:
        w.write_meta(meta)
        steps = list(during or [])
        while True:
            objs = src.take(8192)
            if not objs:
                break
            w.write_chunk(objs)
            if steps:
                steps.pop(0)()
        w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        src.close()
    assert isinstance(src, Capture)
    return src.saved_bytes


def load(path: Path, batch: int = 0, **kw: object) -> ZramDevice:
    r = SnapshotReader(str(path))
    d = ZramDevice(r.meta.size, **kw)  # type: ignore[arg-type]
    try:
        sink = d.restore_image(r.meta)
        for lengths, data in r.chunks(batch):
            sink.put(lengths, data)()
        sink.finish()
    except BaseException:
        d.close()
        raise
    finally:
        r.close()
    return d


def fill(d: ZramDevice, model: bytearray, rnd: random.Random, n: int) -> None:
    for _ in range(n):
        p = rnd.randrange(NPAGES)
        k = rnd.randint(1, 8)
        off = p * PAGE + rnd.choice([0, 0, 0, 512, 17])
        length = min(SIZE - off, k * PAGE - rnd.choice([0, 0, 100]))
        data = _payload(rnd.choice([0, 1, 2, 2, 2, 3]), length, rnd.randrange(1 << 30))
        d.write_sync(off, data)
        model[off : off + length] = data


async def build(seed: int) -> tuple[ZramDevice, bytearray]:
    """A device with every kind of page: lz4 and zstd pages, recompressed ones, huge, same-fill,
    zero, holes and groups (some with dead pages)."""
    rnd = random.Random(seed)
    d = ZramDevice(SIZE, algorithm="lz4", recompression=[("zstd", 5)])
    model = bytearray(SIZE)
    fill(d, model, rnd, 60)
    d.set_algorithm("zstd", level=1)
    fill(d, model, rnd, 30)
    d.set_algorithm("deflate")
    fill(d, model, rnd, 20)
    mark_idle(d, 0, NPAGES - 1)
    d.group_sync(0, NPAGES // 2 - 1, group_pages=8)
    await d.recompress(first=NPAGES // 2, stop=NPAGES)
    d.set_algorithm("lz4")
    fill(d, model, rnd, 15)  # kills some group members
    d.trim_sync(7 * PAGE, 5 * PAGE)
    model[7 * PAGE : 12 * PAGE] = bytes(5 * PAGE)
    t = d.table
    for state in (SAME, STORED, HUGE, GROUPED):
        assert (t.state == state).any(), state
    assert (t.flags & RECOMPRESSED).any()
    assert len(set(t.codec[t.state == STORED].tolist())) >= 3
    return d, model


@pytest.mark.parametrize(("seed", "batch"), [(0, 0), (1, 0), (2, 20000), (3, 100)])
async def test_snapshot_restore_matches_the_model(tmp_path: Path, seed: int, batch: int) -> None:
    d, model = await build(seed)
    before = d.stats
    path = tmp_path / "snap"
    save(d, path)
    d.close()
    r = load(path, batch)
    assert bytes(r.read_sync(0, SIZE)) == bytes(model)
    check(r)
    s = r.stats
    for f in (
        "pages_stored",
        "same_pages",
        "huge_pages",
        "compr_data_size",
        "groups",
        "grouped_pages",
        "recompressed_pages",
    ):
        assert getattr(s, f) == getattr(before, f), f
    # the restored device goes on like any other
    rnd = random.Random(seed + 100)
    fill(r, model, rnd, 20)
    mark_idle(r, 0, NPAGES - 1)
    r.group_sync(0, NPAGES - 1)
    assert bytes(r.read_sync(0, SIZE)) == bytes(model)
    check(r)
    r.close()


async def test_live_snapshot_is_its_point_in_time(tmp_path: Path) -> None:
    d, model = await build(7)
    at_capture = bytes(model)
    rnd = random.Random(8)

    def churn() -> None:
        fill(d, model, rnd, 6)
        p = rnd.randrange(NPAGES - 4)
        d.trim_sync(p * PAGE, 4 * PAGE)
        model[p * PAGE : (p + 4) * PAGE] = bytes(4 * PAGE)
        mark_idle(d, 0, NPAGES - 1)
        d.group_sync(0, NPAGES - 1, group_pages=4)
        d.compact()

    assert save(d, tmp_path / "snap", during=[churn] * 200) > 0  # copies on free happened
    assert d.pool.on_free is None  # the capture let go of the pool
    assert bytes(d.read_sync(0, SIZE)) == bytes(model)
    check(d)
    r = load(tmp_path / "snap")
    assert bytes(r.read_sync(0, SIZE)) == at_capture
    check(r)
    r.close()
    d.close()


async def test_chunks_joined_in_two_buffers(tmp_path: Path) -> None:
    """Read in batches, a snapshot gives the objects of its chunks in order, consecutive chunks
    joined up to the batch (a larger chunk alone), and an item's bytes are still there while
    the next one is taken: how a restore reads one item ahead."""
    d, _model = await build(4)
    path = tmp_path / "snap"
    save(d, path)
    d.close()
    with closing(SnapshotReader(str(path))) as r:
        single = [(lengths.copy(), bytes(data)) for lengths, data in r.chunks()]
    sizes = [len(data) for _, data in single]
    assert len(single) > 4 and max(sizes) > 30000 > 2 * min(sizes)
    joining, alone = 30000, min(sizes) - 1
    for batch in (joining, alone):
        with closing(SnapshotReader(str(path))) as r:
            items = r.chunks(batch)
            got: list[tuple[np.ndarray, bytes]] = []
            held = next(items)
            for item in items:  # the one before is read only now
                got.append((held[0].copy(), bytes(held[1])))
                held = item
            got.append((held[0].copy(), bytes(held[1])))
        assert np.array_equal(
            np.concatenate([g[0] for g in got]), np.concatenate([s[0] for s in single])
        )
        assert b"".join(g[1] for g in got) == b"".join(s[1] for s in single)
        if batch == alone:  # every chunk is larger than the batch: one per item
            assert len(got) == len(single)
        else:  # chunks joined up to the batch, a larger one alone
            assert 1 < len(got) < len(single)
            assert all(len(data) <= batch or len(data) in sizes for _, data in got)


def test_empty_device_and_geometry(tmp_path: Path) -> None:
    d = ZramDevice(SIZE)
    save(d, tmp_path / "s")
    d.close()
    meta = SnapshotReader(str(tmp_path / "s")).meta
    assert (meta.size, meta.objects) == (SIZE, 0)
    other = ZramDevice(2 * SIZE)
    with pytest.raises(ValueError, match=f"export of {SIZE} bytes, the export has {2 * SIZE}"):
        other.restore_image(meta)
    other.close()
    r = load(tmp_path / "s")
    assert r.stats.pages_stored == 0
    r.close()


async def test_bad_files_are_refused(tmp_path: Path) -> None:
    d, _model = await build(3)
    good = tmp_path / "good"
    save(d, good)
    d.close()
    raw = good.read_bytes()

    def refused(data: bytes, match: str) -> None:
        bad = tmp_path / "bad"
        bad.write_bytes(data)
        for batch in (0, 20000):
            with pytest.raises(SnapshotError, match=match) as e:
                load(bad, batch)
            assert str(bad) in str(e.value)

    refused(raw[: len(raw) // 2], "truncated or torn")
    refused(raw[:-1], "truncated or torn")
    refused(raw[:100], "truncated")
    refused(b"X" + raw[1:], "not a zramd snapshot")
    # a flipped bit in the header, the meta section, an object
    for pos, what in ((20, "header checksum"), (150, "meta section checksum")):
        b = bytearray(raw)
        b[pos] ^= 1
        refused(bytes(b), what)
    b = bytearray(raw)
    b[len(raw) - 200] ^= 0x40
    refused(bytes(b), "checksum mismatch")
    # another format version (header re-checksummed)
    import struct
    import zlib

    from zramd.persist.format import _HEADER_FIELDS

    b = bytearray(raw)
    struct.pack_into("<H", b, 8, 99)
    struct.pack_into("<I", b, _HEADER_FIELDS.size, zlib.crc32(bytes(b[: _HEADER_FIELDS.size])))
    refused(bytes(b), "format version 99")
    with pytest.raises(FileNotFoundError):
        SnapshotReader(str(tmp_path / "missing"))


async def test_interrupted_write_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    d, model = await build(5)
    path = tmp_path / "snap"
    save(d, path)
    first = path.read_bytes()
    d.write_sync(0, os.urandom(SIZE))
    meta, src = d.snapshot_image()
    w = SnapshotWriter(str(path))
    w.write_meta(meta)
    w.write_chunk(src.take(1 << 20))
    src.close()  # crash here: no commit
    assert path.read_bytes() == first
    w.abort()
    assert not Path(w.tmp).exists()
    r = load(path)
    assert bytes(r.read_sync(0, SIZE)) == bytes(model)
    r.close()
    d.close()


def test_one_capture_at_a_time_and_reset_cancels(tmp_path: Path) -> None:
    d = ZramDevice(SIZE)
    d.write_sync(0, np.random.default_rng(1).bytes(SIZE))
    _meta, src = d.snapshot_image()
    with pytest.raises(DeviceError, match="already running"):
        d.snapshot_image()
    d.reset()
    with pytest.raises(DeviceError, match="reset or closed"):
        src.take(4096)
    _meta, src = d.snapshot_image()  # a new one may start
    src.close()
    d.close()


async def test_server_saves_of_one_export_wait_for_each_other(tmp_path: Path) -> None:
    registry = ExportRegistry()
    exp = registry.add(ExportConfig(name="a", size=SIZE, persist=str(tmp_path / "a.snap")))
    data = np.random.default_rng(2).bytes(SIZE)
    await exp.device.write(0, data)
    infos = await asyncio.gather(
        persistence.save(exp), persistence.save(exp, str(tmp_path / "b.snap"))
    )
    assert [i.pages for i in infos] == [NPAGES, NPAGES]
    for name in ("a.snap", "b.snap"):
        r = load(tmp_path / name)
        assert bytes(r.read_sync(0, SIZE)) == data
        r.close()
    registry.close()
