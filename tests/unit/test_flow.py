"""The flow-control rules of zramd/server/flow.py, as pure bookkeeping (no sockets, no loop)."""

from __future__ import annotations

from zramd.server.flow import IN_FLIGHT_BYTES_HIGH, Flow, InFlight

MIB = 1 << 20


class Woken:
    """A ``wake`` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def flow(shared: InFlight, max_requests: int = 8, max_bytes: int = 16 * MIB) -> Flow:
    return Flow(shared, max_requests, Woken(), max_bytes=max_bytes)


def calls(f: Flow) -> int:
    assert isinstance(f.wake, Woken)
    return f.wake.calls


def test_request_cap_blocks_and_frees() -> None:
    f = flow(InFlight(64 * MIB), max_requests=2)
    f.start(4096)
    assert not f.blocked()
    f.start(4096)
    assert f.blocked()
    f.finish(4096)
    assert not f.blocked()
    assert (f.requests, f.bytes) == (1, 4096)


def test_byte_cap_blocks_a_session() -> None:
    f = flow(InFlight(64 * MIB), max_bytes=2 * MIB)
    f.start(MIB)
    assert not f.blocked()
    f.start(MIB)
    assert f.blocked()
    f.finish(MIB)
    assert not f.blocked()


def test_one_request_larger_than_the_byte_cap_is_taken_when_idle() -> None:
    f = flow(InFlight(64 * MIB), max_bytes=2 * MIB)
    assert not f.blocked()
    f.start(8 * MIB)  # the session took it: nothing was running
    assert f.blocked()
    f.finish(8 * MIB)
    assert not f.blocked()


def test_default_byte_cap() -> None:
    f = Flow(InFlight(1 << 40), 1 << 20, Woken())
    assert f.max_bytes == IN_FLIGHT_BYTES_HIGH
    f.start(IN_FLIGHT_BYTES_HIGH - 1)
    assert not f.blocked()
    f.start(1)
    assert f.blocked()


def test_write_buffer_pause_blocks() -> None:
    f = flow(InFlight(64 * MIB))
    f.writing_paused = True
    assert f.blocked()
    f.writing_paused = False
    assert not f.blocked()


def test_server_wide_bound_blocks_only_sessions_with_work() -> None:
    shared = InFlight(4 * MIB)
    a, b = flow(shared), flow(shared)
    a.start(4 * MIB)
    assert shared.held == 4 * MIB
    assert a.blocked()
    assert shared.waiting == {a}
    # b has nothing running: it may always take one request, so nobody waits forever
    assert not b.blocked()
    b.start(MIB)
    assert b.blocked()
    assert shared.waiting == {a, b}
    assert shared.peak == 5 * MIB  # over the bound by the one request b took


def test_wake_below_three_quarters_not_before() -> None:
    shared = InFlight(4 * MIB)
    assert shared.low == 3 * MIB
    a, b = flow(shared), flow(shared)
    a.start(2 * MIB)
    a.start(MIB)
    b.start(MIB)
    assert a.blocked() and b.blocked()
    b.start(MIB)  # over the bound
    b.finish(MIB)  # 4 MiB held: not below low
    assert calls(a) == 0 and shared.waiting == {a, b}
    a.finish(MIB)  # 3 MiB held: equal to low, still not below
    assert calls(b) == 0
    b.finish(MIB)  # 2 MiB: below low, every waiting session but the finishing one is woken
    assert calls(a) == 1 and calls(b) == 0
    assert not shared.waiting  # those still blocked register again when they look
    assert not a.blocked() and not shared.waiting


def test_finishing_session_is_not_woken_by_itself() -> None:
    shared = InFlight(2 * MIB)
    a = flow(shared)
    a.start(2 * MIB)
    a.start(MIB)
    assert a.blocked()
    a.finish(2 * MIB)
    assert calls(a) == 0 and not shared.waiting
    assert shared.held == MIB and shared.peak == 3 * MIB


def test_leave_forgets_a_waiting_session() -> None:
    shared = InFlight(MIB)
    a, b = flow(shared), flow(shared)
    a.start(MIB)
    b.start(MIB)
    assert a.blocked() and b.blocked()
    b.leave()
    a.finish(MIB)  # b's request still runs and still counts
    assert shared.held == MIB
    b.finish(MIB)
    assert calls(b) == 0 and shared.held == 0


def test_reading_switches_once_and_resumes_only_when_unblocked() -> None:
    f = flow(InFlight(64 * MIB), max_requests=1)
    f.start(0)
    assert f.blocked()
    assert f.pause_reading() is True
    assert f.pause_reading() is False  # already paused
    assert f.resume_reading() is False  # still blocked
    assert f.reading_paused
    f.finish(0)
    assert f.resume_reading() is True
    assert f.resume_reading() is False  # already reading
    assert not f.reading_paused
