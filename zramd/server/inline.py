"""Start a coroutine on the caller's stack; only one that really waits gets a Task.

Theory of operation
-------------------
A request that misses the dispatcher's fast path (``Dispatcher.run_now``) is handled by a
coroutine, and most of those still finish without ever waiting (the device completes at once).
``loop.create_task`` for each would cost a Task, a trip through the loop's ready queue before the
handler even starts, and a reply that misses the session's batch of the current pump.

:func:`start_inline` steps the coroutine by hand instead: ``coro.send(None)`` runs it right here
up to its first suspension. If it returns (``StopIteration``) it is done, and no Task ever
existed. If it suspends, ``send`` hands back what it waits on (a future, or ``None`` for a bare
yield), exactly what it would have handed a Task. A Task is then created around
:class:`_Resume`, which passes that same object up to the Task (so the Task waits on the
coroutine's future) and from then on keeps stepping the coroutine as a Task would: ``send(None)``
when woken, ``throw(exc)`` when the Task is cancelled or a future failed. (Python 3.12's eager
task factory does the same; 3.11 has none.)

Invariants: exactly one driver steps the coroutine at a time (the caller until the first
suspension, the Task after it); an exception raised before the first suspension reaches the
caller of :func:`start_inline`, so the coroutine should catch its own.

This module knows nothing of NBD, sessions or devices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_inline(coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
    """Run ``coro`` until it first suspends; if it does, a Task (kept in ``tasks`` until done)
    finishes it."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return
    task = asyncio.get_running_loop().create_task(resume(coro, yielded))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Finish ``coro``, started by hand and suspended on ``yielded``, in the running Task."""
    await _Resume(coro, yielded)


class _Resume:
    """The awaitable that lets a Task take over a coroutine suspended on ``yielded``."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        coro = self.coro
        yielded = self.yielded
        while True:
            try:
                yield yielded  # the Task waits on it, then resumes us (or throws into us)
            except BaseException as e:  # noqa: BLE001 - delivered to the coroutine
                try:
                    yielded = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    return
