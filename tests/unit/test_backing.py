"""The backing store (zramd.backing): format, space map, cleaning, reopen, faults on real files
(a tiny tmpfs for ENOSPC, truncation, corrupt bytes, a loop device), the async API."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from zramd.backing import (
    BackingCorrupt,
    BackingFull,
    BackingIOError,
    BackingOpenError,
    BackingStore,
    BudgetSpent,
    Cleaning,
)
from zramd.backing import format as fmt
from zramd.backing import store as store_mod

SEG = 64 << 10


def objs(n: int, seed: int = 1, lo: int = 1, hi: int = 4096) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(lo, hi)) for _ in range(n)]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "backing.img")


@pytest.fixture
def store(path: str) -> Iterator[BackingStore]:
    s = BackingStore.create(path, size=16 << 20, segment_size=SEG)
    yield s
    s.close()


def apply(cleaning: Cleaning, live: dict[int, bytes], s: BackingStore) -> None:
    """Switch the model to the relocated locators, then free the old ones (the caller's part)."""
    for old, new in cleaning.relocations:
        live[new] = live.pop(old)
    s.free_sync([old for old, _ in cleaning.relocations])


# --- format ---------------------------------------------------------------------------------


def test_header_round_trip_and_refusals() -> None:
    h = fmt.Header(flags=0, segment_size=SEG, uuid=bytes(range(16)), created=5, meta_offset=4096,
                   meta_length=fmt.DEFAULT_DATA_OFFSET - 4096,
                   data_offset=fmt.DEFAULT_DATA_OFFSET, capacity=10 * SEG, seq_limit=77)
    block = fmt.encode_header(h)
    assert len(block) == fmt.HEADER_BYTES
    assert fmt.decode_header(block) == h
    with pytest.raises(fmt.FormatError, match="bad magic"):
        fmt.decode_header(b"X" + block[1:])
    with pytest.raises(fmt.FormatError, match="checksum"):
        fmt.decode_header(block[:40] + bytes([block[40] ^ 1]) + block[41:])
    newer = bytearray(block)
    newer[8] = 9
    with pytest.raises(fmt.FormatError, match="version 9"):
        fmt.decode_header(bytes(newer))


def test_locator_packs_offset_and_length() -> None:
    loc = fmt.make_locator(fmt.MAX_OFFSET, fmt.LEN_MASK)
    assert fmt.locator_offset(loc) == fmt.MAX_OFFSET
    assert fmt.locator_length(loc) == fmt.LEN_MASK
    assert loc < 1 << 64
    assert fmt.record_bytes(1) == 16 and fmt.record_bytes(8) == 16 and fmt.record_bytes(9) == 24


def test_segment_size_is_checked(path: str) -> None:
    for bad in (32 << 10, 96 << 10, 8 << 20):
        with pytest.raises(ValueError, match="segment size"):
            BackingStore.create(path, segment_size=bad)


# --- the sync API ---------------------------------------------------------------------------


def test_write_read_round_trip_packs_densely(store: BackingStore) -> None:
    data = objs(500)
    locs = store.write_many_sync(data)
    assert len(set(locs)) == len(locs)
    assert store.read_many_sync(locs) == data
    assert store.read_sync(locs[7]) == data[7]
    rev = locs[::-1]
    assert store.read_many_sync(rev) == data[::-1]
    payload = sum(map(len, data))
    st = store.stat()
    assert st["bd_count"] == 500 and st["bd_writes"] == 500 and st["live_bytes"] == payload
    # dense: the segments in use hold the payload with little slack (not 4 KiB per object)
    assert st["used_bytes"] < payload * 1.1 + SEG
    assert st["used_bytes"] < 500 * 4096 * 0.6


def test_objects_of_every_size_up_to_the_maximum(store: BackingStore) -> None:
    sizes = [1, 7, 8, 9, 4095, 4096, 4097, 65536 - 48, store.max_object]
    data = [os.urandom(n) for n in sizes]
    locs = store.write_many_sync(data)
    assert store.read_many_sync(locs) == data
    with pytest.raises(ValueError):
        store.write_many_sync([os.urandom(store.max_object + 1)])
    with pytest.raises(ValueError):
        store.write_many_sync([b""])
    assert store.write_many_sync([]) == []
    assert store.stat()["bd_count"] == len(sizes)


def test_buffers_of_any_kind_are_stored(store: BackingStore) -> None:
    raw = os.urandom(3000)
    locs = store.write_many_sync([bytearray(raw), memoryview(raw)[100:900]])
    assert store.read_many_sync(locs) == [raw, raw[100:900]]


def test_free_validates_every_locator_first(store: BackingStore) -> None:
    locs = store.write_many_sync(objs(10))
    store.free_sync(locs[:2])
    with pytest.raises(ValueError, match="not live"):
        store.read_sync(locs[0])  # freed: never read back, though its bytes are still there
    with pytest.raises(ValueError, match="not live"):
        store.free_sync([locs[2], locs[0]])  # locs[0] already freed: nothing is freed
    with pytest.raises(ValueError, match="twice"):
        store.free_sync([locs[3], locs[3]])
    with pytest.raises(ValueError, match="outside"):
        store.free_sync([fmt.make_locator(10, 10)])
    assert store.stat()["bd_count"] == 8
    store.free_sync(locs[2:])
    assert store.stat()["bd_count"] == 0 and store.stat()["live_bytes"] == 0


def test_an_emptied_segment_is_punched_and_reused(path: str, store: BackingStore) -> None:
    first = store.write_many_sync(objs(200, lo=2000, hi=3000))  # several segments
    store.write_many_sync(objs(5))  # another open segment, so the first ones are sealed
    before = os.stat(path).st_blocks
    used = store.stat()["used_bytes"]
    store.free_sync(first)
    st = store.stat()
    assert st["punched_bytes"] >= 4 * SEG
    assert os.stat(path).st_blocks * 512 <= before * 512 - 4 * SEG
    store.write_many_sync(objs(100, seed=2, lo=2000, hi=3000))
    assert store.stat()["used_bytes"] <= used  # the freed segments were reused


def test_full_store_refuses_and_stays_usable(path: str) -> None:
    s = BackingStore.create(path, size=fmt.DEFAULT_DATA_OFFSET + 6 * SEG, segment_size=SEG)
    try:
        locs: list[int] = []
        data: list[bytes] = []
        with pytest.raises(BackingFull):
            while True:
                batch = objs(8, seed=len(locs), lo=3000, hi=4000)
                locs += s.write_many_sync(batch)
                data += batch
        used = s.stat()["used_bytes"]
        assert used == 5 * SEG  # one segment is the cleaning reserve
        assert s.stat()["full_refusals"] == 1
        assert s.read_many_sync(locs) == data
        s.free_sync(locs[::2])
        got = s.clean_sync(max_segments=5, threshold=0.6)  # moves into the reserve
        live = dict(zip(locs[1::2], data[1::2], strict=True))
        apply(got, live, s)
        assert got.segments >= 1
        more = objs(10, seed=99, lo=3000, hi=4000)
        live.update(zip(s.write_many_sync(more), more, strict=True))
        assert s.read_many_sync(list(live)) == list(live.values())
    finally:
        s.close()


def test_cleaning_moves_live_objects_and_frees_whole_segments(store: BackingStore) -> None:
    data = objs(400, lo=500, hi=3000)
    locs = store.write_many_sync(data)
    live = dict(zip(locs, data, strict=True))
    rng = random.Random(3)
    gone = [loc for loc in locs if rng.random() < 0.7]
    store.free_sync(gone)
    for loc in gone:
        del live[loc]
    used = store.stat()["used_bytes"]
    assert store.cleanable_bytes() > 0
    got = store.clean_sync(max_segments=100)
    assert got.segments > 0 and not got.corrupt
    olds = {old for old, _ in got.relocations}
    assert olds <= set(live)
    apply(got, live, store)
    st = store.stat()
    assert st["used_bytes"] < used
    assert st["moved_objects"] == len(got.relocations)
    assert st["cleaned_segments"] == got.segments
    assert store.read_many_sync(list(live)) == list(live.values())
    assert store.clean_sync(max_segments=100, threshold=0.5).segments <= 1


def test_a_relocation_whose_old_object_was_freed_meanwhile(store: BackingStore) -> None:
    """The caller frees the new copy when it freed the old one during the cleaning."""
    locs = store.write_many_sync(objs(200, lo=2000, hi=3000))
    store.free_sync(locs[1::2])
    got = store.clean_sync(max_segments=3)
    old, new = got.relocations[0]
    store.free_sync([old])  # the caller's page was trimmed while the move was in flight
    store.free_sync([new])
    rest = [(o, n) for o, n in got.relocations[1:]]
    store.free_sync([o for o, _ in rest])
    keep = [n for _, n in rest] + [x for x in locs[::2] if x not in {o for o, _ in got.relocations}]
    assert len(store.read_many_sync(keep)) == len(keep)


def test_write_budget(store: BackingStore) -> None:
    store.set_write_limit(20_000)
    locs = store.write_many_sync(objs(4, lo=1000, hi=1000))  # 4 x 1008 + a segment header
    assert store.write_limit == 20_000 - 4 * 1008 - fmt.SEGMENT_HEADER_BYTES
    with pytest.raises(BudgetSpent):
        store.write_many_sync(objs(20, lo=1000, hi=1000))
    assert store.stat()["bd_count"] == 4  # refused before anything was written
    store.set_write_limit(None)
    store.write_many_sync(objs(20, lo=1000, hi=1000))
    store.set_write_limit(0)
    with pytest.raises(BudgetSpent):
        store.write_many_sync(objs(1))
    assert store.read_many_sync(locs) == objs(4, lo=1000, hi=1000)
    assert store.stat()["budget_refusals"] == 2
    with pytest.raises(ValueError):
        store.set_write_limit(-1)


# --- open, create, reopen -------------------------------------------------------------------


def test_reopen_with_the_live_locators(path: str) -> None:
    s = BackingStore.create(path, segment_size=SEG)
    data = objs(300, lo=100, hi=4000)
    locs = s.write_many_sync(data)
    s.free_sync(locs[::3])
    keep = {loc: d for i, (loc, d) in enumerate(zip(locs, data, strict=True)) if i % 3}
    uid = s.header.uuid
    seq_limit = s.header.seq_limit
    s.close()
    r = BackingStore.open(path, live=keep)
    try:
        assert r.header.uuid == uid and r.header.seq_limit > seq_limit
        assert r.read_many_sync(list(keep)) == list(keep.values())
        assert r.stat()["bd_count"] == len(keep)
        assert r.stat()["live_bytes"] == sum(map(len, keep.values()))
        new = objs(50, seed=7)
        nlocs = r.write_many_sync(new)
        assert not set(nlocs) & set(keep)
        assert r.read_many_sync(nlocs) == new
        r.free_sync(list(keep))  # the rebuilt map frees the old objects too
        assert r.stat()["bd_count"] == 50
    finally:
        r.close()


def test_reopen_gives_back_what_is_not_live(path: str) -> None:
    s = BackingStore.create(path, segment_size=SEG)
    locs = s.write_many_sync(objs(200, lo=3000, hi=4000))  # about 12 segments
    s.close()
    first = [x for x in locs if fmt.locator_offset(x) < fmt.DEFAULT_DATA_OFFSET + SEG]
    r = BackingStore.open(path, live=first)
    try:
        assert os.stat(path).st_blocks * 512 <= fmt.DEFAULT_DATA_OFFSET + SEG
        assert r.stat()["used_bytes"] == SEG
        assert len(r.read_many_sync(first)) == len(first)
    finally:
        r.close()


def test_reopen_by_walking_stops_at_a_torn_record(path: str) -> None:
    s = BackingStore.create(path, segment_size=SEG)
    data = objs(20, lo=1000, hi=2000)
    locs = s.write_many_sync(data)
    s.close()
    with open(path, "r+b") as f:  # tear the 11th record: its second half never reached disk
        off = fmt.locator_offset(locs[10]) + 8 + fmt.locator_length(locs[10]) // 2
        f.seek(off)
        f.write(bytes(fmt.locator_length(locs[10])))
    r = BackingStore.open(path)
    try:
        assert r.stat()["bd_count"] == 10
        assert r.read_many_sync(locs[:10]) == data[:10]
        with pytest.raises(ValueError, match="not live"):
            r.free_sync([locs[12]])
    finally:
        r.close()


def test_open_refuses_damaged_foreign_and_busy_paths(path: str, tmp_path: Path) -> None:
    with pytest.raises(BackingOpenError, match="No such file"):
        BackingStore.open(str(tmp_path / "missing"))
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"ext2 or whatever" * 100)
    with pytest.raises(BackingOpenError, match="something else"):
        BackingStore.create(str(foreign))
    with pytest.raises(BackingOpenError, match="bad magic"):
        BackingStore.open(str(foreign))
    assert foreign.read_bytes() == b"ext2 or whatever" * 100
    with pytest.raises(BackingOpenError, match="too small"):
        BackingStore.create(path, size=(2 << 20) - 1, segment_size=SEG * 4)
    with pytest.raises(BackingOpenError, match="neither"):
        BackingStore.create(str(tmp_path))
    s = BackingStore.create(path, segment_size=SEG)
    locs = s.write_many_sync(objs(30))
    with pytest.raises(BackingOpenError, match="in use"):
        BackingStore.create(path)
    with pytest.raises(BackingOpenError, match="in use"):
        BackingStore.open(path)
    s.close()
    with open(path, "r+b") as f:
        f.seek(fmt.DEFAULT_DATA_OFFSET)
        f.write(bytes(64))  # the segment header is gone
    with pytest.raises(BackingOpenError, match="no valid segment header"):
        BackingStore.open(path, live=locs)
    with open(path, "r+b") as f:
        f.seek(50)
        f.write(b"\xff")
    with pytest.raises(BackingOpenError, match=f"{path}: header checksum"):
        BackingStore.open(path)


def test_create_over_an_old_store_starts_empty(path: str) -> None:
    s = BackingStore.create(path, segment_size=SEG)
    locs = s.write_many_sync(objs(100))
    uid = s.header.uuid
    s.close()
    s = BackingStore.create(path, segment_size=SEG)
    try:
        assert s.header.uuid != uid
        assert os.stat(path).st_size == fmt.HEADER_BYTES
        assert s.stat()["bd_count"] == 0
        with pytest.raises(ValueError, match="not live"):
            s.read_sync(locs[0])
    finally:
        s.close()


def test_a_sized_file_bounds_the_store(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(4 << 20)  # the operator's "backing file of 4 MiB"
    s = BackingStore.create(path, segment_size=SEG)
    assert s.header.capacity == 3 << 20  # less the header and metadata region
    s.write_many_sync(objs(100))
    s.close()
    assert os.stat(path).st_size == 4 << 20
    s = BackingStore.create(path, segment_size=SEG)  # an old store keeps its capacity
    assert s.header.capacity == 3 << 20 and s.stat()["file_allocated_bytes"] <= 8192
    s.close()
    s = BackingStore.create(path, size=8 << 20, segment_size=SEG)
    assert s.header.capacity == 7 << 20 and os.stat(path).st_size == 8 << 20
    s.close()


def test_open_refuses_bad_live_locators(path: str) -> None:
    s = BackingStore.create(path, segment_size=SEG)
    locs = s.write_many_sync(objs(10, lo=100, hi=100))
    s.close()
    overlapping = fmt.make_locator(fmt.locator_offset(locs[3]) + 8, 100)
    with pytest.raises(BackingOpenError, match="overlap"):
        BackingStore.open(path, live=[locs[3], overlapping])
    with pytest.raises(BackingOpenError, match="outside"):
        BackingStore.open(path, live=[fmt.make_locator(4096, 10)])
    BackingStore.open(path, live=locs).close()


def test_a_failed_header_write_is_retried(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "SEQ_RESERVE", 2)
    s = BackingStore.create(path, segment_size=SEG)
    try:
        s.write_many_sync(objs(30, lo=3000, hi=4000))  # a few segments: the limit moved
        real = os.fdatasync
        monkeypatch.setattr(store_mod.os, "fdatasync", lambda fd: (_ for _ in ()).throw(
            OSError(errno.EIO, "Input/output error")))
        with pytest.raises(BackingIOError):
            while True:  # until a write carries a header rewrite
                s.write_many_sync(objs(20, lo=3000, hi=4000))
        assert s._header_dirty
        monkeypatch.setattr(store_mod.os, "fdatasync", real)
        s.write_many_sync(objs(1))  # carries the header
        assert not s._header_dirty
        with open(path, "rb") as f:
            assert fmt.decode_header(f.read(fmt.HEADER_BYTES)).seq_limit == s.header.seq_limit
    finally:
        s.close()


def test_sequence_limit_moves_forward_with_a_header_write(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "SEQ_RESERVE", 3)
    s = BackingStore.create(path, segment_size=SEG)
    data = objs(200, lo=3000, hi=4000)  # about 12 segments: the limit moves several times
    locs = s.write_many_sync(data)
    limit = s.header.seq_limit
    assert limit > 12
    s.close()
    with open(path, "rb") as f:
        assert fmt.decode_header(f.read(fmt.HEADER_BYTES)).seq_limit == limit
    r = BackingStore.open(path, live=locs)
    try:
        assert r._next_seq == limit  # never a sequence number used before
        assert r.read_many_sync(locs) == data
    finally:
        r.close()


# --- faults ---------------------------------------------------------------------------------


def test_corrupt_bytes_fail_that_object_only(path: str, store: BackingStore) -> None:
    data = objs(50)
    locs = store.write_many_sync(data)
    with open(path, "r+b") as f:
        off = fmt.locator_offset(locs[20]) + 8 + 5
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(BackingCorrupt) as ei:
        store.read_sync(locs[20])
    assert ei.value.locator == locs[20] and ei.value.errno == errno.EIO
    with pytest.raises(BackingCorrupt):
        store.read_many_sync(locs[18:23])
    others = locs[:20] + locs[21:]
    assert store.read_many_sync(others) == data[:20] + data[21:]
    assert store.stat()["corrupt"] == 2
    # cleaning leaves it where it is, reports it and moves the others
    store.write_many_sync(objs(3, seed=5))  # seal the segment
    store.free_sync([x for i, x in enumerate(locs) if i % 4 and i != 20])
    got = store.clean_sync(max_segments=10, threshold=0.9)
    assert got.corrupt == [locs[20]]
    assert locs[20] not in {o for o, _ in got.relocations}
    store.free_sync([o for o, _ in got.relocations])
    assert store.clean_sync(max_segments=10, threshold=0.9).corrupt == []  # pinned: skipped
    store.free_sync([locs[20]])  # the caller gives up on it: the segment empties


def test_a_misdirected_write_is_corrupt_not_garbage(path: str, store: BackingStore) -> None:
    """Object a's record, well formed, lands where b's should be (a misdirected write): b's read
    fails its check (the CRC covers the offset) instead of returning a's bytes."""
    a, b = store.write_many_sync([os.urandom(100), os.urandom(100)])
    with open(path, "r+b") as f:
        f.seek(fmt.locator_offset(a))
        rec = f.read(fmt.RECORD_HEADER_BYTES + 100)
        f.seek(fmt.locator_offset(b))
        f.write(rec)
    assert store.read_sync(a)
    with pytest.raises(BackingCorrupt):
        store.read_sync(b)
    with pytest.raises(ValueError, match="not live"):
        store.read_sync(fmt.make_locator(fmt.locator_offset(a), 99))  # no such object


def test_truncated_file_costs_only_the_lost_objects(path: str, store: BackingStore) -> None:
    data = objs(200, lo=2000, hi=4000)
    locs = store.write_many_sync(data)
    cut = fmt.locator_offset(locs[100])
    os.truncate(path, cut)
    with pytest.raises(BackingIOError, match="short read"):
        store.read_sync(locs[150])
    assert store.read_many_sync(locs[:100]) == data[:100]
    new = objs(20, seed=4)
    nlocs = store.write_many_sync(new)  # writes go on (the file grows again, sparse)
    assert store.read_many_sync(nlocs) == new
    assert store.stat()["io_errors"] >= 1


def test_a_file_removed_underneath_keeps_serving(path: str, store: BackingStore) -> None:
    data = objs(50)
    locs = store.write_many_sync(data)
    os.unlink(path)  # the open descriptor keeps the file: nothing is lost while it is open
    assert store.read_many_sync(locs) == data
    new = objs(20, seed=3)
    assert store.read_many_sync(store.write_many_sync(new)) == new


def test_write_eio_rolls_back(store: BackingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = objs(30)
    klocs = store.write_many_sync(keep)
    before = store.stat()
    store.set_write_limit(1 << 20)
    real = os.pwritev

    def fail(fd: int, bufs: list[bytes], off: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "pwritev", fail)
    with pytest.raises(BackingIOError) as ei:
        store.write_many_sync(objs(400, seed=2))
    assert ei.value.errno == errno.EIO
    after = store.stat()
    assert after["bd_count"] == before["bd_count"]
    assert after["live_bytes"] == before["live_bytes"]
    assert store.write_limit == 1 << 20  # refunded
    # the segments the failed write opened were given back: no leak
    assert after["used_bytes"] <= before["used_bytes"] + SEG
    monkeypatch.setattr(store_mod.os, "pwritev", real)
    assert store.read_many_sync(klocs) == keep
    new = objs(400, seed=2)
    nlocs = store.write_many_sync(new)
    assert store.read_many_sync(nlocs) == new


def test_short_writes_are_completed(store: BackingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def short(fd: int, bufs: list[bytes], off: int) -> int:
        return real(fd, bufs[:1], off)

    monkeypatch.setattr(store_mod.os, "pwritev", short)
    data = objs(50)
    locs = store.write_many_sync(data)
    monkeypatch.setattr(store_mod.os, "pwritev", real)
    assert store.read_many_sync(locs) == data


def test_read_eio(store: BackingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    locs = store.write_many_sync(objs(5))

    def fail(fd: int, n: int, off: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "pread", fail)
    with pytest.raises(BackingIOError) as ei:
        store.read_sync(locs[0])
    assert ei.value.errno == errno.EIO and ei.value.offset == fmt.locator_offset(locs[0])
    monkeypatch.undo()
    assert store.read_sync(locs[0]) == objs(5)[0]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_file_system_is_backing_full(tiny_fs: Path) -> None:
    s = BackingStore.create(str(tiny_fs / "b.img"), segment_size=SEG)
    try:
        live: dict[int, bytes] = {}
        with pytest.raises(BackingFull, match="No space left"):
            for i in range(100):
                batch = objs(10, seed=i, lo=2000, hi=4000)
                live.update(zip(s.write_many_sync(batch), batch, strict=True))
        assert live and s.stat()["io_errors"] >= 1
        assert s.read_many_sync(list(live)) == list(live.values())
        victims = list(live)[: len(live) // 2]
        s.free_sync(victims)
        for v in victims:
            del live[v]
        got = s.clean_sync(max_segments=20, threshold=0.9)
        apply(got, live, s)
        # the space given back (punched) takes new objects
        batch = objs(5, seed=1000, lo=2000, hi=4000)
        live.update(zip(s.write_many_sync(batch), batch, strict=True))
        assert s.read_many_sync(list(live)) == list(live.values())
    finally:
        s.close()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_block_device(loop_device: str) -> None:
    s = BackingStore.create(loop_device, segment_size=SEG)
    try:
        assert s.header.block_device
        assert s.nsegments == (8 << 20) // SEG - fmt.DEFAULT_DATA_OFFSET // SEG
        data = objs(300, lo=100, hi=3000)
        locs = s.write_many_sync(data)
        assert s.read_many_sync(locs) == data
        s.write_many_sync(objs(200, seed=9, lo=3000, hi=4000))
        s.free_sync(locs)  # discards the emptied segments
        assert s.stat()["punched_bytes"] + s.stat()["punch_unsupported"] * SEG > 0
        with pytest.raises(BackingOpenError, match="in use"):
            BackingStore.open(loop_device)
        kept = objs(40, seed=10)
        klocs = s.write_many_sync(kept)
    finally:
        s.close()
    r = BackingStore.open(loop_device, live=klocs)
    try:
        assert r.read_many_sync(klocs) == kept
    finally:
        r.close()


# --- the async API --------------------------------------------------------------------------


async def test_async_api_runs_io_in_the_store_threads(
    store: BackingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[str] = set()
    real_pwritev, real_pread = os.pwritev, os.pread

    def pwritev(fd: int, bufs: list[bytes], off: int) -> int:
        seen.add(threading.current_thread().name)
        return real_pwritev(fd, bufs, off)

    def pread(fd: int, n: int, off: int) -> bytes:
        seen.add(threading.current_thread().name)
        return real_pread(fd, n, off)

    monkeypatch.setattr(store_mod.os, "pwritev", pwritev)
    monkeypatch.setattr(store_mod.os, "pread", pread)
    batches = [objs(50, seed=i) for i in range(8)]
    results = await asyncio.gather(*(store.write_many(b) for b in batches))
    live: dict[int, bytes] = {}
    for b, locs in zip(batches, results, strict=True):
        live.update(zip(locs, b, strict=True))
    assert len(live) == 400
    got = await asyncio.gather(*(store.read(loc) for loc in list(live)[:50]))
    assert got == list(live.values())[:50]
    gone = list(live)[::2]
    await store.free(gone)
    for g in gone:
        del live[g]
    cleaning = await store.clean(max_segments=10)
    for old, new in cleaning.relocations:
        live[new] = live.pop(old)
    await store.free([o for o, _ in cleaning.relocations])
    assert await store.read_many(list(live)) == list(live.values())
    assert seen and all(name.startswith("zramd-backing") for name in seen)
    assert threading.current_thread().name not in seen


async def test_async_reads_of_cached_objects_take_no_thread(
    path: str, store: BackingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async read of a few objects the page cache holds is copied on the loop (RWF_NOWAIT),
    checked and counted as a thread's read; one the cache does not hold, a large one, or one
    on a file system that refuses RWF_NOWAIT goes to the threads; a corrupt object is corrupt
    either way, and a truncated file is met by the thread's read."""
    data = objs(40, lo=500, hi=3000)
    locs = store.write_many_sync(data)  # just written: in the page cache
    threads: list[str] = []
    nowait: list[str] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, off: int) -> bytes:
        threads.append(threading.current_thread().name)
        return real_pread(fd, n, off)

    def preadv(fd: int, bufs: list[bytearray], off: int, flags: int) -> int:
        nowait.append(threading.current_thread().name)
        assert flags == os.RWF_NOWAIT
        return real_preadv(fd, bufs, off, flags)

    monkeypatch.setattr(store_mod.os, "pread", pread)
    monkeypatch.setattr(store_mod.os, "preadv", preadv)
    before = store.stat()
    assert await store.read_many(locs[:5]) == data[:5]
    assert await store.read(locs[7]) == data[7]
    assert threads == [] and set(nowait) == {threading.current_thread().name}
    after = store.stat()
    assert after["bd_reads"] - before["bd_reads"] == 6
    assert after["read_bytes"] - before["read_bytes"] >= sum(map(len, data[:5])) + len(data[7])
    nowait.clear()
    assert await store.read_many(locs) == data  # more than CACHED_READ_MAX_OBJECTS: threads
    assert nowait == [] and threads and all(t.startswith("zramd-backing") for t in threads)

    def not_cached(fd: int, bufs: list[bytearray], off: int, flags: int) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    threads.clear()
    monkeypatch.setattr(store_mod.os, "preadv", not_cached)
    assert await store.read(locs[3]) == data[3]
    assert threads and threads[0].startswith("zramd-backing")

    def unsupported(fd: int, bufs: list[bytearray], off: int, flags: int) -> int:
        nowait.append("refused")
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(store_mod.os, "preadv", unsupported)
    assert await store.read(locs[4]) == data[4]
    assert await store.read(locs[5]) == data[5]
    assert nowait == ["refused"]  # asked once, then never again for this store
    monkeypatch.setattr(store_mod.os, "preadv", real_preadv)
    assert await store.read(locs[6]) == data[6]

    other = BackingStore.create(path + "2", size=16 << 20, segment_size=SEG)
    try:
        olocs = other.write_many_sync(objs(10, lo=2000, hi=3000))
        off = fmt.locator_offset(olocs[2]) + fmt.RECORD_HEADER_BYTES + 10
        with open(path + "2", "r+b") as f:  # through the page cache: the cached copy is bad
            f.seek(off)
            f.write(b"\xff" * 8)
        with pytest.raises(BackingCorrupt):
            await other.read(olocs[2])
        assert other.stat()["corrupt"] == 1
        os.truncate(path + "2", fmt.locator_offset(olocs[8]))
        with pytest.raises(BackingIOError, match="short read"):
            await other.read(olocs[9])
        assert await other.read_many(olocs[:2]) == objs(10, lo=2000, hi=3000)[:2]
    finally:
        other.close()


async def test_async_faults_cost_only_their_request(
    store: BackingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = objs(20)
    klocs = await store.write_many(keep)
    real = os.pwritev
    calls = 0

    def flaky(fd: int, bufs: list[bytes], off: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, off)

    monkeypatch.setattr(store_mod.os, "pwritev", flaky)
    a, b, c = objs(5, seed=1), objs(5, seed=2), objs(5, seed=3)
    res = await asyncio.gather(store.write_many(a), store.write_many(b), store.write_many(c),
                               return_exceptions=True)
    assert sum(isinstance(r, BackingIOError) for r in res) == 1
    for r, d in zip(res, (a, b, c), strict=True):
        if isinstance(r, list):
            assert await store.read_many(r) == d
    assert await store.read_many(klocs) == keep
    assert store.stat()["bd_count"] == 30


async def test_async_free_reuses_a_segment_only_after_its_punch(store: BackingStore) -> None:
    locs = await store.write_many(objs(100, lo=3000, hi=4000))
    await store.write_many(objs(1))
    await store.free(locs)
    assert store.stat()["punched_bytes"] > 0
    assert all(st in (store_mod.FREE, store_mod.OPEN) for st in store._state)
    await store.aclose()
    with pytest.raises(BackingIOError, match="closed"):
        await store.read(locs[0])


def _gated_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The store's writes wait in their thread: ``entered`` is set when one is there, and it
    goes on once ``go`` is set."""
    entered, go = threading.Event(), threading.Event()
    real = os.pwritev

    def slow(fd: int, bufs: list[bytes], off: int) -> int:
        entered.set()
        go.wait(10)
        return real(fd, bufs, off)

    monkeypatch.setattr(store_mod.os, "pwritev", slow)
    return entered, go


async def test_a_cancelled_write_finishes_and_frees_its_objects(
    store: BackingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = await store.write_many(objs(10))
    entered, go = _gated_writes(monkeypatch)
    task = asyncio.ensure_future(store.write_many(objs(100, seed=2)))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done()  # waits for its write
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.stat()["bd_count"] == 10
    assert not store._pending.tolist() or max(store._pending) == 0
    assert await store.read_many(keep) == objs(10)


async def test_closed_under_a_cancelled_write_the_rest_of_it_fails_cleanly(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device closing closes its store at once, while a cancelled write of its background
    work may still be in a thread: the write finishes, then its undo (the free, which gives a
    whole segment back) finds the store closed and fails with BackingIOError, not with the
    executor's RuntimeError."""
    store = BackingStore.create(path, size=16 << 20, segment_size=SEG)
    entered, go = _gated_writes(monkeypatch)
    task = asyncio.ensure_future(store.write_many(objs(60, seed=3, lo=3000, hi=4000)))  # > SEG
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    task.cancel()
    go.set()
    store.close()  # waits for the write in its thread
    with pytest.raises(BackingIOError, match="closed"):
        await task
