"""Starting a coroutine inline and handing it to a Task (zramd/server/inline.py)."""

from __future__ import annotations

import asyncio

import pytest

from zramd.server.inline import resume, start_inline


async def test_inline_start_then_task_resume_forwards_results_and_cancellation() -> None:
    log: list[str] = []

    async def handler(fut: asyncio.Future[int]) -> None:
        try:
            log.append(f"got {await fut}")
            await asyncio.sleep(0)
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    coro = handler(fut)
    yielded = coro.send(None)  # runs inline until it waits on fut
    task = loop.create_task(resume(coro, yielded))
    await asyncio.sleep(0)
    fut.set_result(5)
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["got 5", "cancelled"]


async def test_a_coroutine_that_never_waits_runs_to_the_end_without_a_task() -> None:
    log: list[str] = []

    async def handler() -> None:
        log.append("ran")

    tasks: set[asyncio.Task[None]] = set()
    start_inline(handler(), tasks)
    assert log == ["ran"] and not tasks  # done before start_inline returned


async def test_a_coroutine_that_waits_is_finished_by_a_task_that_forgets_itself() -> None:
    log: list[str] = []
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        log.append("started")
        log.append(await fut)
        await asyncio.sleep(0)
        log.append("done")

    tasks: set[asyncio.Task[None]] = set()
    start_inline(handler(), tasks)
    assert log == ["started"]  # ran inline up to its first wait
    (task,) = tasks
    fut.set_result("woken")
    await task
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert log == ["started", "woken", "done"] and not tasks


async def test_a_failed_future_is_raised_inside_the_coroutine() -> None:
    log: list[str] = []
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        try:
            await fut
        except OSError as e:
            log.append(f"caught {e}")

    tasks: set[asyncio.Task[None]] = set()
    start_inline(handler(), tasks)
    fut.set_exception(OSError("boom"))
    await asyncio.gather(*tasks)
    assert log == ["caught boom"]
