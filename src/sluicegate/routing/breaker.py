"""A circuit breaker per backend deployment: closed → open → half-open → closed.

Semantics (APIM's backend circuit breaker, plus a half-open probe):

* **closed**: traffic flows. Failures (5xx, timeouts, connection errors) and throttles (429)
  are counted separately in a sliding ``interval``; reaching ``failures`` or ``throttles``
  trips the breaker. A failure that carries the backend's ``retry-after`` (a 503 "service
  busy", say) trips it at once when ``honour_retry_after`` is on: the backend has said when
  to come back, as a 429 does (APIM's ``acceptRetryAfter`` honours it whatever the status).
* **open until T**: no traffic. T is now + the backend's ``retry-after`` when it sent one and
  ``honour_retry_after`` is on (429 or failure alike), else now + the trip duration
  (``trip_seconds``, doubled after each failed probe); never more than ``max_trip_seconds``.
* **half-open** (after T): one request at a time is let through as a probe. Success closes
  the breaker; failure opens it again. A probe's stream closes it with its first event
  (``success_so_far``), on probation: if that stream breaks off afterwards (a reset, a torn
  event) the probe failed after all, and the breaker opens again at once for twice as long,
  as for any failed probe (``failure`` with the ``probation`` token), unless something else
  opened it meanwhile.

A broken body (a stream or JSON answer cut off by the backend) is a failure like a 5xx: APIM
counts status codes only, because it does not see streams break, but a backend that resets
every stream after its first event is failing, and a breaker that never trips on it would
keep sending it everything. (A client that leaves is no verdict at all: ``abandon``.)

Verdicts say something about the backend only if the request was sent after the trip: a
request sent before it (``begun`` < ``open_until``) may end seconds later, and its success or
failure describes the backend as it was then. While the breaker is open or half-open such
verdicts are ignored; only the probe, or a request begun at or after ``open_until``, closes or
re-opens it. (A late 429 or failure with a ``retry-after`` may still push an open breaker's
end out: its ``retry-after`` is the backend's word about the future, whenever the request was
sent.)

Each breaker follows its backend's rule (``BreakerSettings``: the global
``routing.circuit_breaker``, or the backend's own merged over it), resolved when the router is
built. A rule that is not ``enabled`` never opens.

Pure state: time comes from the caller (``now``, epoch seconds of the injected clock — wall
time because trips are shared between instances in cluster mode). Not thread-safe; used from
one event loop.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """One backend's rule (``routing.circuit_breaker``, or the backend's own merged over it).
    ``enabled`` False: the breaker never opens — failures are not counted, and trips other
    instances share are not applied (their rule may differ during a configuration change)."""

    enabled: bool = True
    failures: int = 3
    throttles: int = 1
    interval: float = 10.0
    trip: float = 10.0
    max_trip: float = 60.0
    honour_retry_after: bool = True

    def as_config(self) -> dict[str, bool | int | float]:
        """The rule under ``routing.circuit_breaker``'s field names (the admin views)."""
        return {
            "enabled": self.enabled,
            "failures": self.failures,
            "throttles": self.throttles,
            "interval_seconds": self.interval,
            "trip_seconds": self.trip,
            "max_trip_seconds": self.max_trip,
            "honour_retry_after": self.honour_retry_after,
        }


class CircuitBreaker:
    """One target's breaker (see the module docstring)."""

    __slots__ = (
        "_closes",
        "_failures",
        "_probation",
        "_probation_trips",
        "_probe_in_flight",
        "_throttles",
        "_trips_in_a_row",
        "open_until",
        "reason",
        "settings",
        "throttled",
        "trips",
    )

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._failures: deque[float] = deque()
        self._throttles: deque[float] = deque()
        #: Epoch seconds until which the target is out (0: never tripped / closed).
        self.open_until = 0.0
        #: Why it last tripped ("429", "500", "timeout", "connection", "remote").
        self.reason: str | None = None
        #: The last trip was a throttle (429), not a failure.
        self.throttled = False
        self.trips = 0
        self._trips_in_a_row = 0
        self._probe_in_flight = False
        #: Closes so far: tokens for ``success_so_far``.
        self._closes = 0
        #: The token of the probe whose stream closed the breaker and may still break off
        #: (0: none), and the failed probes in a row before that close.
        self._probation = 0
        self._probation_trips = 0

    def state(self, now: float) -> BreakerState:
        if self.open_until == 0.0:
            return BreakerState.CLOSED
        if now < self.open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def available(self, now: float) -> bool:
        """May a request go there now? (Half-open: only while no probe is in flight.)"""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probe_in_flight

    def out_for(self, now: float) -> float:
        """Seconds until the breaker lets a request through again: 0 unless it is open.
        (Half-open with a probe in flight is not "out for" a known time: 0 as well.)"""
        return self.open_until - now if now < self.open_until else 0.0

    def begin(self, now: float) -> bool:
        """A request is sent; returns True if it is the half-open probe (which the caller
        must end with ``success``/``failure``/``abandon``)."""
        if self.state(now) is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def abandon(self, probe: bool) -> None:
        """The request ended without telling anything about the backend (client gone)."""
        if probe:
            self._probe_in_flight = False

    def success(self, now: float, probe: bool, begun: float = -math.inf) -> bool:
        """The backend answered (any status that is not a failure) a request sent at
        ``begun`` (the ``now`` of its ``begin``; by default: before any trip). Returns True if
        this closed the breaker: only the probe, or a request begun at or after
        ``open_until``, may close it (module docstring)."""
        if probe:
            self._probe_in_flight = False
        open_until = self.open_until
        if open_until == 0.0 or now < open_until:
            # Closed: nothing to close. Open: the request was sent before this trip (none is
            # sent while it is open) or a peer's trip came while it was out; the end stands.
            return False
        if not probe and begun < open_until:
            # Half-open, and the request was sent before the trip: it describes the backend
            # as it was then. Closing on it would let the real probe's failure count as a
            # closed breaker's first failure of several.
            return False
        self._close()
        return True

    def success_so_far(self, now: float, begun: float) -> int:
        """The probe's answer is a stream that relayed its first whole event and goes on:
        close the breaker now (as ``success``; the slot is free) but on probation, since the
        stream may still break off. Returns the probation's token (0 if this did not close
        the breaker): the stream's end passes it to ``failure`` if it broke off, which then
        opens the breaker again as a failed probe would — at once, for twice as long —
        provided nothing has opened it since. A stream that ends whole, or that its client
        left, needs no call: the close stands."""
        trips = self._trips_in_a_row
        if not self.success(now, True, begun):
            return 0
        self._closes += 1
        self._probation = self._closes
        self._probation_trips = trips
        return self._probation

    def failure(
        self,
        now: float,
        reason: str,
        *,
        throttle: bool,
        retry_after: float | None,
        probe: bool,
        begun: float = -math.inf,
        probation: int = 0,
    ) -> bool:
        """Count a failure (``throttle``: a 429) of a request sent at ``begun`` (as for
        ``success``); ``retry_after``: the wait the backend asked for, if any. Returns True
        if this tripped the breaker. While it is closed, a failure with a ``retry-after``
        trips it at once (with ``honour_retry_after``; a 429 counts against ``throttles``),
        and so does the failure of the probe whose stream closed it (``probation``: the
        token ``success_so_far`` returned), which trips it as a failed probe does (twice
        the last trip). While it is half-open only the probe, or a request begun at or after
        ``open_until``, re-opens it; while it is open, a ``retry-after`` may push its end
        out, never in."""
        if probe:
            self._probe_in_flight = False
        if not self.settings.enabled:
            return False
        state = self.state(now)
        asked = retry_after if self.settings.honour_retry_after else None
        if state is BreakerState.OPEN:
            # Already out; a late answer's retry-after may still push the end out (never
            # pull it in).
            if asked is not None:
                self.open_until = max(self.open_until, now + min(asked, self._cap()))
            return False
        if state is BreakerState.HALF_OPEN:
            if not probe and begun < self.open_until:
                return False  # sent before the trip: the probe will tell
            self._trip(now, reason, throttle, retry_after)
            return True
        if probation and probation == self._probation:
            # The probe that closed the breaker with its stream's first event failed after
            # all (its stream broke off). Any trip or close since voids the token.
            self._trips_in_a_row = self._probation_trips
            self._trip(now, reason, throttle, retry_after)
            return True
        window = self._throttles if throttle else self._failures
        window.append(now)
        cutoff = now - self.settings.interval
        while window and window[0] <= cutoff:
            window.popleft()
        threshold = self.settings.throttles if throttle else self.settings.failures
        # A failure that says when to come back (a 503 with retry-after) trips at once:
        # counting it as one of ``failures`` would keep sending requests to a backend that
        # asked to be left alone, and a pool's refusal could not pass its wait on.
        if len(window) >= threshold or (asked is not None and not throttle):
            self._trip(now, reason, throttle, retry_after)
            return True
        return False

    def force_open(self, until: float, reason: str, throttled: bool, now: float) -> bool:
        """Another instance tripped this target (cluster mode) until ``until``; ``now``: the
        time it arrived. The end adopted is capped at ``now`` + this breaker's own
        ``max_trip``: the peer computed it by its rule, which may be longer during a
        configuration change, and this instance's rule says no trip (a backend's
        ``retry-after`` included) keeps the backend out longer. It is not capped at this
        rule's ``trip``: a peer's end may be a ``retry-after`` the backend gave, or a
        failed probe's doubled trip, both of which this rule would honour too. Returns True
        if it changed anything (a later end than the one held; never for a breaker that is
        not enabled)."""
        until = min(until, now + self.settings.max_trip)
        if until <= self.open_until or not self.settings.enabled:
            return False
        self.open_until = until
        self.reason = reason
        self.throttled = throttled
        self.trips += 1
        self._probation = 0  # the peer's trip stands whatever the probe's stream does
        return True

    def _cap(self) -> float:
        return self.settings.max_trip

    def _trip(self, now: float, reason: str, throttle: bool, retry_after: float | None) -> None:
        if retry_after is not None and self.settings.honour_retry_after:
            duration = retry_after
        else:
            duration = self.settings.trip * (2 ** min(self._trips_in_a_row, 16))
        self.open_until = now + max(0.0, min(duration, self._cap()))
        if self.open_until <= now:
            self.open_until = now + 1e-3  # "retry-after: 0" still counts as one trip
        self.reason = reason
        self.throttled = throttle
        self.trips += 1
        self._trips_in_a_row += 1
        self._probation = 0
        self._failures.clear()
        self._throttles.clear()

    def _close(self) -> None:
        self.open_until = 0.0
        self._trips_in_a_row = 0
        self._probation = 0
        self._failures.clear()
        self._throttles.clear()

    def describe(self, now: float) -> str:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return f"open for {self.open_until - now:.1f}s ({self.reason})"
        if state is BreakerState.HALF_OPEN:
            return "half-open (probing)" if self._probe_in_flight else "half-open"
        return f"closed (failures={len(self._failures)}, throttles={len(self._throttles)})"

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(open_until={self.open_until:.3f}, reason={self.reason!r}, "
            f"trips={self.trips}, failures={len(self._failures)}, "
            f"throttles={len(self._throttles)}, probing={self._probe_in_flight}, "
            f"probation={self._probation})"
        )
