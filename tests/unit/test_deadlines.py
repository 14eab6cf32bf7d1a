"""The request path's coarse deadlines (proxy/deadlines.py): they fire, at most a tick late,
they can be moved, and they never swallow a cancellation that is not theirs."""

from __future__ import annotations

import asyncio

import pytest

from sluicegate.proxy.deadlines import TICK, Deadlines


async def test_a_deadline_fires_at_most_a_tick_late() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), deadlines.after(0.1):
        await asyncio.sleep(10)
    waited = loop.time() - started
    assert 0.1 <= waited < 0.1 + TICK + 0.05


async def test_moving_the_deadline_keeps_a_wait_alive() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    with deadlines.after(0.1) as watch:
        for _ in range(4):  # 0.24 s in all, each step well within a deadline moved forward
            await asyncio.sleep(0.06)
            watch.deadline = loop.time() + 0.1
    assert not watch.expired


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    deadlines = Deadlines()
    with deadlines.after(0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05 + 3 * TICK)  # the deadline passes after the block ended
    assert asyncio.current_task() is not None  # still running: nothing was cancelled
    assert "active=0" in repr(deadlines)


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def waiter() -> None:
        with deadlines.after(0.05):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(waiter())
    await entered.wait()
    task.cancel()  # e.g. shutdown, before the deadline
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watches_of_different_tasks_are_independent() -> None:
    deadlines = Deadlines()

    async def wait(deadline: float, duration: float) -> str:
        try:
            with deadlines.after(deadline):
                await asyncio.sleep(duration)
        except TimeoutError:
            return "timed out"
        return "done"

    results = await asyncio.gather(wait(0.05, 1.0), wait(1.0, 0.1), wait(0.3, 0.05))
    # gather returns a list (typeshed says tuple): compare the values, not the container.
    assert list(results) == ["timed out", "done", "done"]


async def test_it_must_run_inside_a_task() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()

    def callback() -> None:  # a plain loop callback: no current task
        try:
            deadlines.at(0.0)
        except RuntimeError as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    loop.call_soon(callback)
    assert isinstance(await outcome, RuntimeError)
    deadlines.close()
