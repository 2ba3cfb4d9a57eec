"""Faults: clients dying mid-request, SIGTERM with requests in flight, the memory limit.

Theory of operation
-------------------
Real ``zramd serve`` processes (:func:`test_load.launch`) and raw asyncio clients
(:class:`test_load.Nbd`, simple replies). Each test asserts counts:

* a client that dies (FIN or RST) in the middle of a WRITE payload: nothing of that request is
  applied (another client still reads the old data), for 4 KiB and 1 MiB writes;
* clients that vanish with many replies pending (READs and WRITEs, FIN and RST): a bystander
  client running verified write/read pairs the whole time sees no error, the server logs no
  traceback and keeps serving;
* SIGTERM while a slow WRITE (zstd level 19, incompressible, multi-MiB) is in flight and another
  client keeps sending: the WRITE gets its reply (success), the other client's requests get
  success or ESHUTDOWN (each a complete reply), at most the last one goes unanswered, then the
  connection ends and the server exits 0;
* concurrent writers of incompressible data on ``x=64M,mem-limit=2M``: every failing write gets
  ENOSPC (never another error), every acknowledged write reads back intact, every failed one left
  its range as it was (zero).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from .test_load import (
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    ENOSPC,
    ESHUTDOWN,
    KiB,
    MiB,
    Nbd,
    Zramd,
    start,
    wait_for_log,
    zramd_factory,  # noqa: F401 - fixture
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Vanishing clients in the "replies pending" test, and requests each leaves behind.
VANISHING_CLIENTS = 24
PENDING_PER_CLIENT = 64
#: Concurrent writers against the memory limit, and their write size.
LIMIT_WRITERS = 8
LIMIT_WRITE = 64 * KiB
#: The slow in-flight WRITE at SIGTERM.
SLOW_WRITE = 64 * MiB  # = the default max_payload


@pytest.mark.parametrize("size", [4 * KiB, 1 * MiB])
@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_dies_mid_write_payload(
    zramd_factory: list[Zramd], tmp_path: Path, size: int, how: str  # noqa: F811
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=16M"])
    old = os.urandom(size)
    a = await Nbd.connect(srv)
    assert await a.write(MiB, old) == 0
    b = await Nbd.connect(srv, unix=how == "fin")
    b.send(CMD_WRITE, MiB, size, 99, os.urandom(size // 2))  # half the payload, then die
    await b.w.drain()
    await asyncio.sleep(0.2)
    if how == "rst":
        b.abort()
    else:
        b.w.close()
    await asyncio.sleep(0.3)
    c = await Nbd.connect(srv)
    assert await c.read(MiB, size) == old, "a partial WRITE payload was applied"
    assert await a.read(MiB, size) == old
    if how == "fin":  # a FIN mid-payload is a protocol error the server logs; a RST is a loss
        await wait_for_log(srv, "EOF inside a WRITE payload")
    await a.close()
    await c.close()
    assert "Traceback" not in srv.stderr()
    assert srv.stop() == 0


async def test_clients_vanishing_with_replies_pending(
    zramd_factory: list[Zramd], tmp_path: Path  # noqa: F811
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=64M"])
    blob = os.urandom(256 * KiB)
    seed = await Nbd.connect(srv)
    for k in range(8):
        assert await seed.write(k * 256 * KiB, blob, cookie=k) == 0
    await seed.close()
    stop = asyncio.Event()
    bystander_pairs = 0

    async def bystander() -> None:
        nonlocal bystander_pairs
        c = await Nbd.connect(srv, unix=True)
        while not stop.is_set():
            data = os.urandom(4096)
            off = 32 * MiB + (bystander_pairs % 256) * 4096
            assert await c.write(off, data, cookie=bystander_pairs) == 0
            assert await c.read(off, 4096, cookie=bystander_pairs) == data
            bystander_pairs += 1
        await c.close()

    async def vanish(i: int) -> None:
        c = await Nbd.connect(srv, unix=bool(i % 3 == 0))
        for k in range(PENDING_PER_CLIENT):
            if k % 4 == 3:
                c.send(CMD_WRITE, 40 * MiB + (i * 64 + k) * 4096, 4096, k, os.urandom(4096))
            else:
                c.send(CMD_READ, (k % 8) * 256 * KiB, 256 * KiB, k)
        await c.w.drain()
        await asyncio.sleep(0.01 * (i % 5))
        if i % 2:
            c.abort()
        else:
            c.w.close()

    task = asyncio.create_task(bystander())
    for _ in range(2):
        await asyncio.gather(*(vanish(i) for i in range(VANISHING_CLIENTS)))
    await asyncio.sleep(0.5)
    stop.set()
    await task
    print(f"{2 * VANISHING_CLIENTS} clients vanished with {PENDING_PER_CLIENT} requests pending "
          f"each; bystander completed {bystander_pairs} verified write+read pairs")
    assert bystander_pairs >= 20
    after = await Nbd.connect(srv)
    for k in range(8):
        assert await after.read(k * 256 * KiB, 256 * KiB, cookie=k) == blob
    await after.close()
    assert srv.alive()
    err = srv.stderr()
    assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
    assert srv.stop() == 0


async def test_sigterm_with_requests_in_flight(
    zramd_factory: list[Zramd], tmp_path: Path  # noqa: F811
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "zram0=64M,algorithm=zstd,level=19"])
    slow = await Nbd.connect(srv)
    busy = await Nbd.connect(srv, unix=True)
    data = os.urandom(SLOW_WRITE)
    slow.send(CMD_WRITE, 0, SLOW_WRITE, 1, data)
    await slow.w.drain()
    counts = {"ok": 0, "eshutdown": 0, "sent": 0}

    async def keep_sending() -> None:
        """One request at a time until the server hangs up; every reply must be whole."""
        while True:
            cookie = counts["sent"]
            try:
                busy.send(CMD_READ, 32 * MiB, 4096, cookie)
                await busy.w.drain()
            except (ConnectionError, OSError):
                return
            counts["sent"] += 1
            try:
                ck, err = await busy.reply()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # hung up before answering this one
            assert ck == cookie
            if err == 0:
                assert await busy.r.readexactly(4096) == bytes(4096)
                counts["ok"] += 1
            else:
                assert err == ESHUTDOWN, err
                counts["eshutdown"] += 1

    sender = asyncio.create_task(keep_sending())
    await asyncio.sleep(0.2)  # the slow WRITE is received and compressing
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    ck, err = await asyncio.wait_for(slow.reply(), 60)
    assert (ck, err) == (1, 0), "the in-flight WRITE must complete"
    await asyncio.wait_for(sender, 60)
    assert await asyncio.wait_for(slow.r.read(1), 10) == b""  # then the connection ends
    code = await asyncio.to_thread(srv.proc.wait, 60)
    took = time.monotonic() - t0
    unanswered = counts["sent"] - counts["ok"] - counts["eshutdown"]
    print(f"SIGTERM: in-flight {SLOW_WRITE // MiB} MiB WRITE answered OK; other client: "
          f"{counts['ok']} OK, {counts['eshutdown']} ESHUTDOWN, {unanswered} unanswered; "
          f"exit {code} after {took:.2f} s")
    assert code == 0
    assert counts["eshutdown"] >= 1
    assert unanswered <= 1
    assert "Traceback" not in srv.stderr()


async def test_concurrent_writers_hit_the_memory_limit(
    zramd_factory: list[Zramd], tmp_path: Path  # noqa: F811
) -> None:
    srv = start(zramd_factory, tmp_path, ["--export", "x=64M,mem-limit=2M"])
    acked: dict[int, bytes] = {}
    failed: list[int] = []
    errors: list[int] = []
    per_writer = 64  # 8 writers x 64 x 64 KiB = 32 MiB offered to a 2 MiB pool

    async def writer(i: int) -> None:
        c = await Nbd.connect(srv, "x", unix=bool(i % 2))
        for k in range(per_writer):
            off = (i * per_writer + k) * LIMIT_WRITE
            data = os.urandom(LIMIT_WRITE)
            err = await c.write(off, data, cookie=k)
            if err == 0:
                acked[off] = data
            else:
                failed.append(off)
                errors.append(err)
        await c.close()

    await asyncio.gather(*(writer(i) for i in range(LIMIT_WRITERS)))
    print(f"memory limit 2 MiB: {len(acked)} writes of {LIMIT_WRITE // KiB} KiB acknowledged "
          f"({len(acked) * LIMIT_WRITE // KiB} KiB), {len(failed)} failed with "
          f"{sorted(set(errors))}")
    assert failed, "the limit was never hit"
    assert set(errors) == {ENOSPC}
    assert 0 < len(acked) * LIMIT_WRITE <= 2 * MiB
    check = await Nbd.connect(srv, "x")
    for off, data in acked.items():
        assert await check.read(off, LIMIT_WRITE, cookie=off) == data, f"acked write at {off} lost"
    for off in failed:
        assert await check.read(off, LIMIT_WRITE, cookie=off) == bytes(LIMIT_WRITE), (
            f"failed write at {off} changed data"
        )
    # a full pool keeps serving: TRIM frees an acknowledged range, then a new write fits there
    # (an in-place overwrite of a full pool is ENOSPC: the new copy is stored before the old one
    # is freed, so a failed write changes nothing)
    off = next(iter(acked))
    check.send(CMD_TRIM, off, LIMIT_WRITE, 5)
    assert await check.reply() == (5, 0)
    assert await check.write(off, acked[off][::-1]) == 0
    assert await check.read(off, LIMIT_WRITE) == acked[off][::-1]
    await check.close()
    assert srv.stop() == 0
