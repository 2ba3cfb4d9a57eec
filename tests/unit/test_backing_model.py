"""The backing store against a dict model (hypothesis state machine): writes, frees, cleaning
(with the caller freeing some old objects during the move), the store filling up, and reopening
from the live locators, interleaved; every object reads back as written and the counters agree
with the model."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zramd.backing import BackingFull, BackingStore
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
        for seg, state in enumerate(s._state):
            if state == store_mod.FREE:
                assert s._live_count[seg] == 0 and s._pending[seg] == 0
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
