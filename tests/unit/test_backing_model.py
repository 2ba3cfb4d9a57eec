"""The backing store against a dict model (hypothesis state machine): writes, frees, cleaning
(with the caller freeing some old objects during the move), the store filling up, and reopening
from the live locators, interleaved; every object reads back as written and the counters agree
with the model."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zramd.backing import BackingFull, BackingStore, Cleaning
from zramd.backing import format as fmt
from zramd.backing import store as store_mod

SEG = 64 << 10
#: a small store, so that it fills up and cleaning matters
SEGMENTS = 6


class BackingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="zramd-backing-model-")
        self.path = os.path.join(self.dir, "b.img")
        self.store = BackingStore.create(
            self.path, size=fmt.DEFAULT_DATA_OFFSET + SEGMENTS * SEG, segment_size=SEG
        )
        self.model: dict[int, bytes] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(sizes=st.lists(st.integers(1, 12000), min_size=1, max_size=32), seed=st.integers(0, 99))
    def write(self, sizes: list[int], seed: int) -> None:
        rng = random.Random(seed)
        data = [rng.randbytes(n) for n in sizes]
        before = self.store.stat()
        try:
            locs = self.store.write_many_sync(data)
        except BackingFull:
            event("store full")
            after = self.store.stat()
            assert after["bd_count"] == before["bd_count"]
            assert after["live_bytes"] == before["live_bytes"]
            return
        for loc, d in zip(locs, data, strict=True):
            assert loc not in self.model
            self.model[loc] = d

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        keys = sorted(self.model)
        picked = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
        self.store.free_sync(picked)
        for k in picked:
            del self.model[k]

    @rule(max_segments=st.integers(1, 4), threshold=st.sampled_from([0.3, 0.5, 0.9]),
          dropped=st.integers(0, 3))
    def clean(self, max_segments: int, threshold: float, dropped: int) -> None:
        got = self.store.clean_sync(max_segments=max_segments, threshold=threshold)
        assert not got.corrupt
        if got.relocations:
            event("objects moved")
        for i, (old, new) in enumerate(got.relocations):
            assert self.store.read_sync(new) == self.model[old]
            if i < dropped:  # freed by the caller while the move ran: the new copy goes too
                self.store.free_sync([old, new])
                del self.model[old]
            else:
                self.model[new] = self.model.pop(old)
                self.store.free_sync([old])

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = BackingStore.open(self.path, live=list(self.model))

    @rule(n=st.integers(1, 40), seed=st.integers(0, 99))
    def read_some(self, n: int, seed: int) -> None:
        keys = sorted(self.model)
        rng = random.Random(seed)
        pick = [rng.choice(keys) for _ in range(n)] if keys else []
        assert self.store.read_many_sync(pick) == [self.model[k] for k in pick]

    @invariant()
    def counters_match(self) -> None:
        s = self.store
        stat = s.stat()
        assert stat["bd_count"] == len(self.model)
        assert stat["live_bytes"] == sum(map(len, self.model.values()))
        assert stat["used_bytes"] <= SEGMENTS * SEG
        assert sum(s._live_count) == len(self.model)
        assert sum(s._live_bytes) == sum(fmt.record_bytes(len(v)) for v in self.model.values())
        dead = 0
        for seg, state in enumerate(s._state):
            if state == store_mod.FREE:
                assert s._live_count[seg] == 0 and s._pending[seg] == 0
            if state == store_mod.SEALED:
                dead += s._fill[seg] - fmt.SEGMENT_HEADER_BYTES - s._live_bytes[seg]
        assert s.cleanable_bytes() == dead
        # the file holds at most the segments in use (freed ones are punched)
        assert os.stat(self.path).st_blocks * 512 <= (
            fmt.DEFAULT_DATA_OFFSET + stat["used_bytes"] + SEG
        )

    @invariant()
    def everything_reads_back(self) -> None:
        keys = list(self.model)
        assert self.store.read_many_sync(keys) == [self.model[k] for k in keys]


BackingModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBackingModel = BackingModel.TestCase


async def test_concurrent_operations_against_a_model(tmp_path: object) -> None:
    """Rounds of concurrent async writes, reads, frees and a cleaning (the frees on objects no
    read is using, as the device orders them); relocations applied the caller's way."""
    path = os.path.join(str(tmp_path), "c.img")
    s = BackingStore.create(path, size=fmt.DEFAULT_DATA_OFFSET + 24 * SEG, segment_size=SEG)
    rng = random.Random(11)
    model: dict[int, bytes] = {}
    fulls = 0

    async def write(batch: list[bytes]) -> None:
        nonlocal fulls
        try:
            locs = await s.write_many(batch)
        except BackingFull:
            fulls += 1
            return
        model.update(zip(locs, batch, strict=True))

    async def read(keys: list[int]) -> None:
        assert await s.read_many(keys) == [model[k] for k in keys]

    try:
        for _ in range(80):
            keys = list(model)
            rng.shuffle(keys)
            reading, freeing = keys[:20], keys[20 : 20 + rng.randrange(0, 12)]
            for k in freeing:
                del model[k]
            batches = [[rng.randbytes(rng.randint(1, 6000)) for _ in range(rng.randint(1, 12))]
                       for _ in range(rng.randint(1, 3))]
            results = await asyncio.gather(
                *(write(b) for b in batches),
                read(reading),
                s.free(freeing),
                s.clean(max_segments=2, threshold=rng.choice([0.5, 0.9])),
            )
            cleaning = results[-1]
            assert isinstance(cleaning, Cleaning)
            for old, new in cleaning.relocations:
                if old in model:
                    model[new] = model.pop(old)
                    await s.free([old])
                else:
                    await s.free([new])
            stat = s.stat()
            assert s.cleanable_bytes() == sum(
                s._fill[g] - fmt.SEGMENT_HEADER_BYTES - s._live_bytes[g]
                for g, st in enumerate(s._state) if st == store_mod.SEALED
            )
            assert stat["bd_count"] == len(model)
            assert stat["live_bytes"] == sum(map(len, model.values()))
        assert await s.read_many(list(model)) == list(model.values())
        assert fulls and s.stat()["moved_objects"]
    finally:
        await s.aclose()
