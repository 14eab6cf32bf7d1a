"""Coarse deadlines for the request path: one periodic sweep instead of a timer per wait.

Why not ``asyncio.timeout``: a request waits several times (its body, the backend's status
line, every chunk of the answer), and each ``asyncio.timeout`` block schedules a timer in
the loop's heap, cancels it, and runs a small state machine in Python on entry and exit.
At thousands of requests per second that was about a twentieth of the gateway's CPU. Here
a wait is a ``Watch`` in a set: entering adds it, moving the deadline is an attribute
assignment, leaving removes it; one callback every :data:`TICK` seconds expires the
watches whose deadline has passed. The price is precision: a deadline fires up to one tick
late, which is nothing beside timeouts measured in seconds.

Expiry works like ``asyncio.timeout``: the waiting task is cancelled, and when that
cancellation reaches the end of the ``with`` block it is turned into ``TimeoutError``
(``Task.uncancel`` keeps any other cancellation, such as shutdown's, intact).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from sluicegate.loops import running_loop

#: Seconds between sweeps: how late a deadline may fire at most.
TICK = 0.05


class Watch:
    """One wait under a deadline (loop time, seconds). Use it as a ``with`` block, inside
    a task; ``deadline`` may be moved while the block runs (e.g. per chunk read)."""

    __slots__ = ("_owner", "_task", "deadline", "expired")

    def __init__(self, owner: Deadlines, task: asyncio.Task[object], deadline: float) -> None:
        self._owner = owner
        self._task = task
        self.deadline = deadline
        self.expired = False

    def __enter__(self) -> Watch:
        self._owner._enter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._owner._active.discard(self)
        if self.expired and self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()


class Deadlines:
    """The watches of one event loop and the sweep that expires them. Not thread-safe:
    use it from the loop's thread only (as the request path does)."""

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._active: set[Watch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"Deadlines(active={len(self._active)}, tick={self.tick})"

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, remembered (``sluicegate.loops.running_loop``)."""
        loop = running_loop(self._loop)
        if loop is not self._loop:
            if self._handle is not None:
                self._handle.cancel()  # the sweep of the loop that stopped
                self._handle = None
            self._loop = loop
        return loop

    def now(self) -> float:
        """The running loop's clock (``loop.time()``), in which deadlines are given."""
        return self.loop().time()

    def at(self, deadline: float) -> Watch:
        """A watch of the current task expiring at ``deadline`` (``loop.time()`` seconds)."""
        task = asyncio.current_task(self.loop())
        if task is None:
            raise RuntimeError("Deadlines.at() must be called from a task")
        return Watch(self, task, deadline)

    def after(self, seconds: float) -> Watch:
        """A watch of the current task expiring ``seconds`` from now."""
        return self.at(self.loop().time() + seconds)

    def _enter(self, watch: Watch) -> None:
        self._active.add(watch)
        if self._handle is None:
            # First use, or after an idle spell, or on another loop (a restarted server).
            self._handle = self.loop().call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        if not self._active:
            self._handle = None  # idle: the next watch starts the sweep again
            return
        now = loop.time()
        expired = [w for w in self._active if not w.expired and w.deadline <= now]
        for watch in expired:
            watch._expire()
        self._handle = loop.call_later(self.tick, self._sweep)

    def close(self) -> None:
        """Stop sweeping (the watches still active simply never expire)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
