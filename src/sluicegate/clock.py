"""Clocks, injected wherever time matters so that tests never sleep."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of time.

    ``now()`` is wall-clock time in seconds since the epoch (UTC), used for windows that are
    aligned to the calendar and for timestamps in records; ``monotonic()`` never goes back and
    is used for durations and timeouts.
    """

    def now(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to; both readings advance together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        self._mono += seconds

    def set(self, epoch_seconds: float) -> None:
        """Jump the wall clock (the monotonic reading moves by the same amount if forward)."""
        delta = epoch_seconds - self._now
        self._now = epoch_seconds
        if delta > 0:
            self._mono += delta

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"
