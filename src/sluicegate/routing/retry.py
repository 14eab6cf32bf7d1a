"""The retry policy: after an upstream attempt, relay it, try the next candidate, wait and try
the same backend again, or give up.

The policy is asked only while no byte has reached the client (the relay asks before it sends
anything); what happens after that is the relay's business (a broken stream ends with an
error event). Pure: the caller passes the attempt's outcome, the attempt number and the time
spent so far.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

#: Statuses that say something about the backend's health (they count for the breaker).
_FAILURE_STATUSES = frozenset({408, 500, 502, 503, 504})


class Action(enum.Enum):
    RELAY = "relay"  # not retryable: the answer goes to the client as it is
    NEXT = "next"  # try the next candidate at once
    WAIT_SAME = "wait"  # single-member pool: wait, then try the same backend again
    GIVE_UP = "give-up"  # retryable, but no attempt left: the gateway answers 429/503


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to before anything reached the client.

    ``status`` is the backend's HTTP status, or None when there was no usable answer
    (``error`` then says why: ``connection``, ``timeout`` or ``broken`` — a body that broke
    off before the first byte went out). ``retry_after`` is the wait the backend asked for.
    """

    status: int | None
    error: str | None = None
    retry_after: float | None = None

    @property
    def throttled(self) -> bool:
        return self.status == 429

    @property
    def reason(self) -> str:
        """A short label for breakers, records and metrics."""
        return str(self.status) if self.status is not None else (self.error or "error")


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    wait: float = 0.0


def is_backend_failure(status: int) -> bool:
    """Does this status count against the backend (breaker), as opposed to the client?"""
    return status == 429 or status in _FAILURE_STATUSES or status >= 500


class RetryPolicy:
    """``max_attempts`` attempts in all; ``statuses`` (and connection errors, timeouts and
    broken bodies) are retried; single-member pools wait (``wait_same``) up to
    ``max_wait`` and never longer than the backend asked; no attempt starts after
    ``budget`` seconds."""

    __slots__ = ("budget", "max_attempts", "max_wait", "statuses", "wait_same")

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        statuses: Iterable[int] = (408, 429, 500, 502, 503, 504),
        wait_same: bool = True,
        max_wait: float = 10.0,
        budget: float = 60.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.statuses = frozenset(statuses)
        self.wait_same = wait_same
        self.max_wait = max_wait
        self.budget = budget

    def retryable(self, outcome: Outcome) -> bool:
        return outcome.status is None or outcome.status in self.statuses

    def decide(
        self,
        outcome: Outcome,
        attempt: int,
        single: bool,
        elapsed: float,
        out_for: float = 0.0,
    ) -> Decision:
        """What to do after attempt number ``attempt`` (1-based) of a request that has been
        going for ``elapsed`` seconds; ``single``: the pool has one member; ``out_for``: how
        long the backend's circuit breaker still keeps it out (a one-member pool waits at
        least that long, and gives up if that is longer than ``max_wait``)."""
        if not self.retryable(outcome):
            return Decision(Action.RELAY)
        if attempt >= self.max_attempts or elapsed >= self.budget:
            return Decision(Action.GIVE_UP)
        if not single:
            return Decision(Action.NEXT)
        if not self.wait_same:
            return Decision(Action.GIVE_UP)
        asked = outcome.retry_after
        if asked is not None and asked > self.max_wait:
            return Decision(Action.GIVE_UP)  # the backend wants longer than we may hold on
        wait = asked if asked is not None else min(0.5 * 2 ** (attempt - 1), 4.0)
        wait = min(wait, self.max_wait)
        # Retrying into an open breaker would only meet a backend that asked to be left
        # alone (and its answers, not being the probe's, could not close the breaker).
        if out_for > wait:
            if out_for > self.max_wait:
                return Decision(Action.GIVE_UP)
            wait = out_for
        if elapsed + wait >= self.budget:
            return Decision(Action.GIVE_UP)
        return Decision(Action.WAIT_SAME, wait)

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, statuses={sorted(self.statuses)}, "
            f"wait_same={self.wait_same}, max_wait={self.max_wait}, budget={self.budget})"
        )
