"""Sharing backend state between gateway instances: the ``BackendStateStore`` seam.

What is shared per target (``backend/deployment``): its trips (open until when, and why) and
its latest headroom report. Each instance keeps its own breakers and trackers and applies
what others publish — a later trip end, a newer report — so one instance's 429 spares the
others, and no request ever waits for the store:

* ``publish_*`` never blocks (it queues or applies in memory);
* listeners are called with what others (and this instance) published, either at once
  (memory) or from the store's background exchange (Redis, every ``sync_seconds``).

The memory store is the embedded mode's (and a test double for a cluster in one process: two
routers subscribed to one ``MemoryStateStore`` see each other). Listeners must be idempotent:
they also receive their own publications.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sluicegate.routing.headroom import Report


@dataclass(frozen=True, slots=True)
class SharedTrip:
    """A target is out until ``open_until`` (epoch seconds)."""

    open_until: float
    reason: str
    throttled: bool


@dataclass(frozen=True, slots=True)
class SharedHeadroom:
    """A target's rate-limit report as of ``reported_at`` (epoch seconds)."""

    report: Report
    reported_at: float


@dataclass(frozen=True, slots=True)
class SharedUpdate:
    key: str
    trip: SharedTrip | None = None
    headroom: SharedHeadroom | None = None


Listener = Callable[[SharedUpdate], None]


class BackendStateStore(Protocol):
    """Where instances exchange target state (see the module docstring)."""

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every update from now on (including one's own)."""

    def publish_trip(self, key: str, trip: SharedTrip) -> None:
        """Announce a trip. Never blocks."""

    def publish_headroom(self, key: str, headroom: SharedHeadroom) -> None:
        """Announce a report (only the latest per target is kept). Never blocks."""

    async def start(self) -> None:
        """Begin exchanging (a background task, where the store needs one)."""

    async def sync(self) -> None:
        """Exchange now: push what is pending, pull and notify what is new."""

    async def aclose(self) -> None:
        """Stop exchanging (pending publications are pushed first where possible)."""


class MemoryStateStore:
    """In-process store: publications reach every subscriber at once."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.trips: dict[str, SharedTrip] = {}
        self.headroom: dict[str, SharedHeadroom] = {}

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish_trip(self, key: str, trip: SharedTrip) -> None:
        held = self.trips.get(key)
        if held is not None and held.open_until >= trip.open_until:
            return
        self.trips[key] = trip
        self._notify(SharedUpdate(key, trip=trip))

    def publish_headroom(self, key: str, headroom: SharedHeadroom) -> None:
        held = self.headroom.get(key)
        if held is not None and held.reported_at >= headroom.reported_at:
            return
        self.headroom[key] = headroom
        self._notify(SharedUpdate(key, headroom=headroom))

    def _notify(self, update: SharedUpdate) -> None:
        for listener in self._listeners:
            listener(update)

    async def start(self) -> None:
        return None

    async def sync(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return (
            f"MemoryStateStore(listeners={len(self._listeners)}, trips={len(self.trips)}, "
            f"reports={len(self.headroom)})"
        )
