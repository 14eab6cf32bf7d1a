"""The router: which backend deployment an attempt goes to, and what every answer teaches.

It owns one ``Target`` per backend deployment (``backend/deployment``; pools that share one
share its breaker and headroom) and the pools over them. Per attempt the request path calls::

    choice = router.choose(pool, estimate, tried)     # None: every member is out
    ticket = router.begin(choice.target, estimate)
    router.report(ticket, response_headers)           # headroom, from any answer
    router.probe_head(ticket, status)                 # a probe's answer will be relayed
    router.probe_streaming(ticket, status)            # a probe's stream relays its events
    router.succeeded(ticket, status) | router.failed(ticket, outcome)
        | router.relayed_failure(ticket, status) | router.abandoned(ticket)

A one-member pool that waits and tries its backend again asks ``router.out_for(target)``
(how long its breaker still keeps it out) and, after the wait, ``router.retry_same(choice)``
(None: the breaker does not let it through now). When no attempt is left,
``router.refusal(pool, outcomes)`` says what the client gets (429 with the shortest wait if
every member is throttled, else 503, both with a wait).

A half-open breaker lets one request through as its probe. A head that passed the retry check
is the probe's verdict only if it is a failure (``probe_head``: 429/5xx). Any other head waits
for its body, which a backend can still fail to send: a stream's verdict comes with its first
whole event while more are coming (``probe_streaming``), so a probe that streams for a minute
does not keep the backend out for everyone else meanwhile; any other answer's (a JSON body,
read whole before it is relayed; a stream that came whole) with the ticket's end. A body that
broke off before the verdict is the probe's failure. The rest of a ticket whose verdict came
early (in-flight count, headroom) lasts until it ends; a stream's verdict is on probation
until then: if it breaks off after all (``failed``), the probe failed, and the breaker opens
again at once for twice as long (unless something else opened it meanwhile). A broken body
of any other request is one failure toward ``failures``; a client that left
(``abandoned``) is none.

Choosing: the best priority group with a member that is available (breaker closed, or
half-open with no probe in flight), not yet tried by this request and — with headroom
routing on — whose reported headroom fits the request's estimate; weighted round-robin
within the group. If no member fits, headroom is only a preference: the best available
member is used anyway (the backend's own answer is the truth).

All methods are synchronous and do no I/O (the store's ``publish_*`` only queue); the router
is used from one event loop. Time is the injected clock's wall time (``now()``), because
trips are shared between instances.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sluicegate.clock import Clock
from sluicegate.routing.affinity import ResponseAffinity
from sluicegate.routing.breaker import BreakerSettings, BreakerState, CircuitBreaker
from sluicegate.routing.headroom import Headroom, report_from_headers
from sluicegate.routing.pool import Member, Pool
from sluicegate.routing.retry import Outcome, RetryPolicy, is_backend_failure
from sluicegate.routing.retry_after import retry_after_from_headers
from sluicegate.routing.state import (
    BackendStateStore,
    SharedHeadroom,
    SharedTrip,
    SharedUpdate,
)

log = logging.getLogger("sluicegate.routing")

#: An attempt's ``Outcome.error`` when no pooled connection to the backend came free in time:
#: the request never reached the backend, whose health that says nothing about. Such an
#: attempt is ``abandoned`` (never a breaker's failure) and fails over to another member; a
#: pool with none left answers 503 ``BackendBusy`` (``refusal``).
BUSY = "busy"


@dataclass(frozen=True, slots=True)
class RouterSettings:
    headroom: bool = True
    stale_after: float = 10.0
    default_completion_tokens: int = 256
    #: The breaker rule of every backend not in ``breakers``.
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    #: Backends' own rules, by backend name (resolved once, when the router is built).
    breakers: Mapping[str, BreakerSettings] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class RoutingObserver(Protocol):
    """Where the router reports events worth a metric."""

    def spilled(self, pool: str, from_backend: str, to_backend: str, reason: str) -> None:
        """A request went to ``to_backend`` instead of ``from_backend`` (``reason``:
        ``headroom``, ``unavailable`` or ``failover``)."""

    def tripped(self, backend: str, deployment: str, reason: str) -> None:
        """A breaker opened on this instance (not when another instance's trip arrives)."""


class Target:
    """One backend deployment's state on this instance."""

    __slots__ = (
        "backend",
        "breaker",
        "deployment",
        "headroom",
        "in_flight",
        "key",
        "kind",
        "last_error",
        "last_error_at",
        "last_status",
        "pools",
    )

    def __init__(self, member: Member, breaker: BreakerSettings) -> None:
        self.key = member.key
        self.backend = member.backend
        self.deployment = member.deployment
        self.kind = member.kind
        self.breaker = CircuitBreaker(breaker)
        self.headroom = Headroom()
        self.in_flight = 0
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.pools: list[str] = []

    def __repr__(self) -> str:
        return (
            f"Target({self.key!r}, {self.breaker!r}, {self.headroom!r}, "
            f"in_flight={self.in_flight}, last_error={self.last_error!r})"
        )


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Choice:
    member: Member
    target: Target
    #: Why this member rather than the pool's first choice: ``preferred`` (it is the first
    #: choice), ``headroom``, ``unavailable`` (better ones are out) or ``failover``.
    reason: str


@dataclass(slots=True)
class Ticket:
    """One attempt in flight; end it exactly once."""

    target: Target
    #: It holds the half-open breaker's probe slot (until its verdict: ``probe_head`` for a
    #: failure, ``probe_streaming``, or the ticket's end).
    probe: bool
    marks: tuple[int, int]
    #: The clock's ``now()`` when it was sent: the breaker ignores the verdicts of requests
    #: sent before its trip.
    begun: float
    done: bool = False
    #: The breaker's probation token when this probe's stream closed it with its first
    #: event (``probe_streaming``; 0 otherwise): a failure at its end re-opens the breaker.
    probation: int = 0
    #: The answer's headers (from ``report``), read only for a failure's ``retry-after``.
    headers: Sequence[tuple[bytes, bytes]] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the client gets when no member can take the request."""

    status: int
    code: str
    message: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class TargetView:
    """A target as the CLI and the admin API show it."""

    key: str
    backend: str
    deployment: str
    kind: str
    pools: list[str]
    state: str
    open_until: float | None
    open_reason: str | None
    trips: int
    headroom_tokens: int | None
    headroom_requests: int | None
    headroom_age_seconds: float | None
    in_flight: int
    last_status: int | None
    last_error: str | None
    last_error_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Router:
    """See the module docstring."""

    def __init__(
        self,
        settings: RouterSettings,
        clock: Clock,
        store: BackendStateStore | None = None,
        observer: RoutingObserver | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.observer = observer
        self.targets: dict[str, Target] = {}
        self.pools: dict[str, Pool] = {}
        #: Responses affinity (``routing/affinity.py``; None: off). Set by whoever builds
        #: the router (``routing/build.py``), once its pools are known.
        self.affinity: ResponseAffinity | None = None
        if store is not None:
            store.subscribe(self.apply)

    # --- building -----------------------------------------------------------------------------

    def add_pool(self, name: str, members: Sequence[Member]) -> Pool:
        pool = Pool(name, members)
        for member in pool.members:
            target = self.targets.get(member.key)
            if target is None:
                breaker = self.settings.breakers.get(member.backend, self.settings.breaker)
                target = self.targets[member.key] = Target(member, breaker)
            target.pools.append(name)
        self.pools[name] = pool
        return pool

    # --- choosing -----------------------------------------------------------------------------

    def choose(self, pool: Pool, estimate: int, tried: Sequence[str] = ()) -> Choice | None:
        """The member for the next attempt, or None if every untried member is out."""
        now = self.clock.now()
        targets = self.targets
        stale = self.settings.stale_after

        def available(m: Member) -> bool:
            return m.key not in tried and targets[m.key].breaker.available(now)

        member: Member | None = None
        short_of_headroom = False
        if self.settings.headroom:

            def fits(m: Member) -> bool:
                return available(m) and targets[m.key].headroom.fits(estimate, now, stale)

            member = pool.pick(fits)
            if member is None or member.priority > pool.top_priority:
                short_of_headroom = any(available(m) for m in pool.groups[0])
        if member is None:
            member = pool.pick(available)
        if member is None:
            return None
        first = pool.groups[0][0]
        if tried:
            reason = "failover"
            origin = targets[tried[-1]].backend
        elif member.priority > pool.top_priority:
            reason = "headroom" if short_of_headroom else "unavailable"
            origin = first.backend
        else:
            reason, origin = "preferred", ""
        if reason != "preferred" and self.observer is not None and origin != member.backend:
            self.observer.spilled(pool.name, origin, member.backend, reason)
        return Choice(member, targets[member.key], reason)

    def retry_same(self, choice: Choice) -> Choice | None:
        """``choice`` again (a one-member pool's wait-and-retry) if its breaker lets a
        request through now — closed, or half-open with the probe slot free, which ``begin``
        then takes — as ``choose`` would for a new request; else None."""
        if choice.target.breaker.available(self.clock.now()):
            return choice
        return None

    def out_for(self, target: Target) -> float:
        """Seconds until the target's breaker, open now, lets a request through (0: it is
        not open)."""
        return target.breaker.out_for(self.clock.now())

    # --- attempts -----------------------------------------------------------------------------

    def begin(self, target: Target, estimate: int) -> Ticket:
        target.in_flight += 1
        now = self.clock.now()
        probe = target.breaker.begin(now)
        return Ticket(target, probe, target.headroom.dispatch(estimate), now)

    def report(self, ticket: Ticket, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Take the headroom report of an answer (any status), and keep the headers on the
        ticket for the case that its status turns out to be a failure."""
        ticket.headers = headers
        report = report_from_headers(headers)
        if report.empty:
            return
        now = self.clock.now()
        target = ticket.target
        if target.headroom.observe(report, ticket.marks, now) and self.store is not None:
            self.store.publish_headroom(target.key, SharedHeadroom(report, now))

    def probe_head(self, ticket: Ticket, status: int) -> None:
        """The answer's head arrived and passed the retry check (it will be relayed): if the
        ticket is the half-open probe and the status is a failure (429/5xx), give the
        breaker that verdict now (with the wait the headers ask for) and free the probe
        slot; the body cannot make such an answer a success. Any other status is no verdict
        yet: a backend that answers 200 can still break off in the body, so the probe keeps
        its slot until ``probe_streaming`` or its end. No-op for any other ticket."""
        if not ticket.probe or ticket.done or not is_backend_failure(status):
            return
        self._failure(ticket, Outcome(status, None, self._asked_wait(ticket)))
        ticket.probe = False  # its end must not free a slot a later probe may hold

    def probe_streaming(self, ticket: Ticket, status: int) -> None:
        """The probe's answer (``status``, not a failure) is a stream that relayed its first
        whole event and goes on: the backend answers, so the breaker closes now and the slot
        is free, instead of being held for the whole relay. The close is on probation until
        the ticket ends: a stream that breaks off afterwards (``failed``) is a failed probe
        after all, and opens the breaker again at once for twice as long, as a failed probe
        does (unless it opened meanwhile for another reason); a stream that ends whole or
        whose client left (``abandoned``) leaves it closed. No-op for any other ticket."""
        if not ticket.probe or ticket.done:
            return
        target = ticket.target
        target.last_status = status
        ticket.probation = target.breaker.success_so_far(self.clock.now(), ticket.begun)
        if ticket.probation:
            log.info("backend %s closed again (probe streams, %s)", target.key, status)
        ticket.probe = False  # its end must not free a slot a later probe may hold

    def succeeded(self, ticket: Ticket, status: int) -> None:
        """The backend answered with a status that is not its own failure (2xx, 4xx)."""
        if self._end(ticket):
            return
        target = ticket.target
        target.last_status = status
        if target.breaker.success(self.clock.now(), ticket.probe, ticket.begun):
            log.info("backend %s closed again (probe answered %s)", target.key, status)

    def relayed_failure(self, ticket: Ticket, status: int) -> None:
        """A relayed answer with a failure status (429, 5xx: not in the retry statuses)
        ended: ``failed``, with the wait its headers asked for (``retry-after-ms`` /
        ``retry-after``), so that the breaker stays out as long as the backend said."""
        self.failed(ticket, Outcome(status, None, self._asked_wait(ticket)))

    def failed(self, ticket: Ticket, outcome: Outcome) -> None:
        """The attempt failed (429, 5xx, timeout, connection error, broken body — a stream
        that broke off after its first events included). A probe's stream that closed the
        breaker (``probe_streaming``) and fails now opens it again at once."""
        if outcome.status is not None and not is_backend_failure(outcome.status):
            self.succeeded(ticket, outcome.status)
            return
        if self._end(ticket):
            return
        self._failure(ticket, outcome)

    def _failure(self, ticket: Ticket, outcome: Outcome) -> None:
        now = self.clock.now()
        target = ticket.target
        target.last_status = outcome.status
        target.last_error = outcome.reason
        target.last_error_at = now
        breaker = target.breaker
        tripped = breaker.failure(
            now,
            outcome.reason,
            throttle=outcome.throttled,
            retry_after=outcome.retry_after,
            probe=ticket.probe,
            begun=ticket.begun,
            probation=ticket.probation,
        )
        if not tripped:
            return
        target.headroom.forget()  # when it is probed again, its answer will say
        log.warning(
            "backend %s tripped (%s): out for %.1f s",
            target.key,
            outcome.reason,
            breaker.open_until - now,
        )
        if self.store is not None:
            self.store.publish_trip(
                target.key, SharedTrip(breaker.open_until, outcome.reason, outcome.throttled)
            )
        if self.observer is not None:
            self.observer.tripped(target.backend, target.deployment, outcome.reason)

    def abandoned(self, ticket: Ticket) -> None:
        """The attempt ended without a verdict on the backend (the client left)."""
        if self._end(ticket):
            return
        ticket.target.breaker.abandon(ticket.probe)

    def _asked_wait(self, ticket: Ticket) -> float | None:
        return retry_after_from_headers(ticket.headers, self.clock.now())

    def _end(self, ticket: Ticket) -> bool:
        """Mark the ticket ended; True if it already was."""
        if ticket.done:
            return True
        ticket.done = True
        target = ticket.target
        target.in_flight -= 1
        target.headroom.settle(ticket.marks)
        return False

    # --- when nothing is left -----------------------------------------------------------------

    def refusal(self, pool: Pool, outcomes: dict[str, Outcome]) -> Refusal:
        """429 with the shortest wait when every member is throttled (open after a 429,
        half-open after one while its probe is out, or answered 429 in this request), 503
        ``BackendBusy`` with a wait of 1 s when every member's connections were all in use
        (``BUSY``) and none is throttled or down, else 503 with the shortest wait until one
        may work (at least 1 s): an open member's end (a 5xx's ``retry-after`` sets it as a
        429's does), the ``retry-after`` a failure in this request asked for, 1 s for a
        failure that named none and for a busy member. A member half-open with its probe out
        counts as it did while open (a probe's verdict is the only thing that changes what
        its trip said) with a wait of 1 s: its probe has been sent, and the verdict comes
        with the probe's answer. No member's wait is longer than its breaker's ``max_trip``:
        the gateway would take the backend back by then whatever it said (Azure can say
        "retry after 86400 seconds")."""
        now = self.clock.now()
        throttled: list[float] = []
        down: list[float] = []
        busy = False
        for member in pool.members:
            breaker = self.targets[member.key].breaker
            cap = breaker.settings.max_trip
            state = breaker.state(now)
            outcome = outcomes.get(member.key)
            if state is BreakerState.OPEN:
                (throttled if breaker.throttled else down).append(breaker.open_until - now)
            elif outcome is not None and outcome.error == BUSY:
                busy = True
            elif outcome is not None and outcome.throttled:
                asked = outcome.retry_after
                throttled.append(min(asked, cap) if asked is not None else 1.0)
            elif outcome is None and state is BreakerState.HALF_OPEN:
                (throttled if breaker.throttled else down).append(1.0)
            elif outcome is not None and outcome.retry_after is not None:
                # A failure that said when to come back whose breaker is not open for it
                # (``honour_retry_after`` off, or the breaker taken back meanwhile).
                down.append(min(outcome.retry_after, cap))
            else:
                down.append(1.0)
        name = pool.name
        if busy and not throttled and not down:
            return Refusal(
                503,
                "BackendBusy",
                f"Every connection the gateway may open to the backends of deployment {name!r} "
                "is in use. Retry after 1 seconds.",
                1.0,
            )
        if busy:
            down.append(1.0)
        if throttled and not down:
            wait = max(min(throttled), 0.001)
            return Refusal(
                429,
                "429",
                f"Every backend of deployment {name!r} is at its rate limit. "
                f"Retry after {wait:.0f} seconds."
                if wait >= 1
                else f"Every backend of deployment {name!r} is at its rate limit. Retry shortly.",
                wait,
            )
        wait = max(min(throttled + down), 1.0)
        return Refusal(
            503,
            "BackendUnavailable",
            f"No backend of deployment {name!r} can take the request now (they failed or are "
            f"out after failures). Retry after {wait:.0f} seconds.",
            wait,
        )

    # --- sharing and visibility ---------------------------------------------------------------

    def apply(self, update: SharedUpdate) -> None:
        """Take what an instance published (idempotent; also gets our own)."""
        target = self.targets.get(update.key)
        if target is None:
            return
        now = self.clock.now()
        trip = update.trip
        if (
            trip is not None
            and trip.open_until > now
            and target.breaker.force_open(trip.open_until, trip.reason, trip.throttled, now)
        ):
            target.headroom.forget()
        if update.headroom is not None:
            target.headroom.adopt(update.headroom.report, update.headroom.reported_at)

    def views(self) -> list[TargetView]:
        now = self.clock.now()
        stale = self.settings.stale_after
        out: list[TargetView] = []
        for t in self.targets.values():
            state = t.breaker.state(now)
            current = t.headroom.current(now, stale)
            out.append(
                TargetView(
                    key=t.key,
                    backend=t.backend,
                    deployment=t.deployment,
                    kind=t.kind,
                    pools=list(t.pools),
                    state=state.value,
                    open_until=t.breaker.open_until if state is BreakerState.OPEN else None,
                    open_reason=t.breaker.reason if state is not BreakerState.CLOSED else None,
                    trips=t.breaker.trips,
                    headroom_tokens=current.remaining_tokens if current else None,
                    headroom_requests=current.remaining_requests if current else None,
                    headroom_age_seconds=round(now - t.headroom.reported_at, 3)
                    if current
                    else None,
                    in_flight=t.in_flight,
                    last_status=t.last_status,
                    last_error=t.last_error,
                    last_error_at=t.last_error_at,
                )
            )
        return out

    def breaker_rule(self, backend: str) -> dict[str, Any]:
        """The rule ``backend``'s breakers follow, as the admin views show it: the fields of
        ``routing.circuit_breaker`` and ``source``, ``"backend"`` for the backend's own rule
        merged over the global one, ``"routing"`` for the global one alone."""
        own = self.settings.breakers.get(backend)
        rule: dict[str, Any] = (own or self.settings.breaker).as_config()
        rule["source"] = "routing" if own is None else "backend"
        return rule

    def backend_state(self, backend: str) -> tuple[str | None, int | None]:
        """(the worst state of the backend's targets, their summed known headroom tokens);
        (None, None) for a backend no pool uses."""
        now = self.clock.now()
        order = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
        worst: BreakerState | None = None
        tokens: int | None = None
        for t in self.targets.values():
            if t.backend != backend:
                continue
            state = t.breaker.state(now)
            if worst is None or order[state] > order[worst]:
                worst = state
            current = t.headroom.current(now, self.settings.stale_after)
            if current is not None and current.remaining_tokens is not None:
                tokens = (tokens or 0) + current.remaining_tokens
        return (worst.value if worst is not None else None), tokens

    def __repr__(self) -> str:
        now = self.clock.now()
        parts = ", ".join(f"{t.key}: {t.breaker.describe(now)}" for t in self.targets.values())
        return f"Router({len(self.pools)} pools; {parts})"
