"""The limiter: reserve on arrival, settle to the reported usage, release on failure.

Usage by the request pipeline::

    admission = await limiter.admit([LimitRequest("sub:abc", policy, tokens=estimate)])
    if not admission.allowed:
        ...  # error response: admission.status, .code, .reason, .headers()
    try:
        response = await forward(...)
    except BackendFailed:
        await limiter.release(admission.reservation)
    else:
        await limiter.settle(admission.reservation, usage.total_tokens)

Every limit of every :class:`LimitRequest` becomes one counter: ``{key}:tpm`` and
``{key}:rpm`` (sliding windows of 61 one-second buckets, see :data:`WINDOW_MS`) and
``{key}:quota:{period}:{start_ms}`` (the calendar period). All are checked and charged in one
atomic store call, all or none. Two requests naming the same counter (the same key used by
two policies) share it, as in APIM, and it is charged once, against the lower limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sluicegate.clock import Clock
from sluicegate.limits.admission import (
    ALLOWED_UNLIMITED,
    Admission,
    Charge,
    LimitKind,
    LimitStatus,
    Reservation,
    decide,
    unavailable,
)
from sluicegate.limits.periods import period_bounds
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.store import (
    Adjustment,
    Counter,
    CounterStore,
    StoreResult,
    StoreUnavailable,
    SyncCounterStore,
)

BUCKET_MS = 1_000
#: A charge made at any moment of bucket ``b`` stays counted until ``b`` is 61 buckets old,
#: i.e. at least a full 60 s after the request's true arrival. With exactly 60 buckets a
#: charge made late in a bucket would leave the window up to one bucket early, and an
#: arbitrary 60-s span of arrival times could hold up to a bucket's worth too much (clients
#: waking together when a bucket frees make that a whole limit). The price is at most 1/61 of
#: the limit left unused at the edge.
WINDOW_MS = 60_000 + BUCKET_MS


@dataclass(frozen=True, slots=True)
class LimitRequest:
    """Charge ``tokens`` (the estimate to reserve) and one request to the counters of
    ``key`` (a resolved counter key such as ``"sub:abc"``) under ``policy``. ``label`` names
    the key in messages (default: the key itself)."""

    key: str
    policy: LimitPolicy
    tokens: int
    label: str | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError("tokens to reserve cannot be negative")


@dataclass(frozen=True, slots=True)
class _Binding:
    kind: LimitKind
    request: LimitRequest
    index: int
    limit: int
    cost: int
    period_end_ms: int = 0


@dataclass(slots=True)
class Plan:
    """The distinct counters of an admission and which limit of which request uses which."""

    counters: list[Counter]
    bindings: list[_Binding]


def plan(requests: Sequence[LimitRequest], now: float) -> Plan:
    """Turn limit requests into store counters (pure; ``now`` is epoch seconds)."""
    counters: list[Counter] = []
    bindings: list[_Binding] = []
    by_name: dict[str, int] = {}

    def add(kind: LimitKind, request: LimitRequest, counter: Counter) -> None:
        index = by_name.get(counter.name)
        if index is None:
            index = by_name[counter.name] = len(counters)
            counters.append(counter)
        else:
            shared = counters[index]
            counters[index] = dataclasses.replace(
                shared, limit=min(shared.limit, counter.limit), cost=max(shared.cost, counter.cost)
            )
        bindings.append(_Binding(kind, request, index, counter.limit, counter.cost, counter.end_ms))

    for request in requests:
        policy, key = request.policy, request.key
        if policy.tokens_per_minute is not None:
            add(
                "tokens",
                request,
                Counter(
                    f"{key}:tpm",
                    "sliding",
                    policy.tokens_per_minute,
                    request.tokens,
                    window_ms=WINDOW_MS,
                    bucket_ms=BUCKET_MS,
                ),
            )
        if policy.requests_per_minute is not None:
            add(
                "requests",
                request,
                Counter(
                    f"{key}:rpm",
                    "sliding",
                    policy.requests_per_minute,
                    1,
                    window_ms=WINDOW_MS,
                    bucket_ms=BUCKET_MS,
                ),
            )
        if policy.token_quota is not None and policy.token_quota_period is not None:
            period = policy.token_quota_period
            start_ms, end_ms = period_bounds(period, now, policy.quota_timezone)
            add(
                "quota",
                request,
                Counter(
                    f"{key}:quota:{period}:{start_ms}",
                    "fixed",
                    policy.token_quota,
                    request.tokens,
                    end_ms=end_ms,
                ),
            )
    return Plan(counters, bindings)


class Limiter:
    """Admits requests against their limits through a :class:`CounterStore`.

    Safe for concurrent use: each admission is one atomic store call. With a synchronous
    store (the in-memory one) :meth:`admit` completes without yielding to the event loop.
    """

    def __init__(self, store: CounterStore, clock: Clock) -> None:
        self.store = store
        self._clock = clock
        self._sync: SyncCounterStore | None = store if isinstance(store, SyncCounterStore) else None

    def __repr__(self) -> str:
        return f"Limiter(store={self.store!r})"

    async def admit(self, requests: Sequence[LimitRequest]) -> Admission:
        """Check and reserve every limit of every request, all or none.

        Never raises for an unreachable store: a store failing closed gives a 503
        admission; one failing open decides with its in-memory fallback.
        """
        now = self._clock.now()
        now_ms = int(now * 1000)
        work = plan(requests, now)
        if not work.counters:
            return ALLOWED_UNLIMITED
        try:
            if self._sync is not None:
                result = self._sync.admit_sync(work.counters, now_ms)
            else:
                result = await self.store.admit(work.counters, now_ms)
        except StoreUnavailable as exc:
            return unavailable(exc.retry_after_s, requests)
        return _decide(work, result, tuple(requests), now_ms)

    async def settle(self, reservation: Reservation | None, actual_tokens: int) -> None:
        """Replace the reserved estimate by ``actual_tokens`` in the windows it went into.

        Counters go up when the actual is larger (never a refusal at this point) and down
        when smaller. A no-op for ``None`` or a reservation already settled or released.
        """
        if reservation is None or reservation.done:
            return
        reservation.done = True
        await self._adjust(reservation, lambda charge: actual_tokens - charge.amount)

    async def release(self, reservation: Reservation | None) -> None:
        """Give the reserved tokens back (the backend failed); the request still counts
        against the requests-per-minute limit. No-op if already settled or released."""
        if reservation is None or reservation.done:
            return
        reservation.done = True
        await self._adjust(reservation, lambda charge: -charge.amount)

    async def _adjust(self, reservation: Reservation, delta_of: Callable[[Charge], int]) -> None:
        adjustments = [
            Adjustment(charge.name, charge.kind, charge.slot, delta)
            for charge in reservation.charges
            if (delta := delta_of(charge)) != 0
        ]
        if not adjustments:
            return
        if self._sync is not None:
            self._sync.adjust_sync(adjustments, reservation.origin)
        else:
            await self.store.adjust(adjustments, reservation.origin)


def _decide(
    work: Plan, result: StoreResult, requests: tuple[LimitRequest, ...], now_ms: int
) -> Admission:
    statuses = tuple(
        LimitStatus(
            kind=binding.kind,
            request=binding.request,
            limit=binding.limit,
            used=result.states[binding.index].used,
            cost=binding.cost,
            retry_after_ms=result.states[binding.index].retry_after_ms,
            period_end_ms=binding.period_end_ms,
        )
        for binding in work.bindings
    )
    reservation = None
    if result.allowed:
        charges = tuple(
            Charge(counter.name, counter.kind, state.slot, counter.cost)
            for counter, state, is_tokens in zip(
                work.counters, result.states, _token_counters(work), strict=True
            )
            if is_tokens
        )
        tokens = max((request.tokens for request in requests), default=0)
        reservation = Reservation(charges, result.origin, tokens)
    return decide(result.allowed, statuses, reservation, now_ms)


def _token_counters(work: Plan) -> list[bool]:
    """Which counters count tokens (settled and released) rather than requests."""
    is_tokens = [False] * len(work.counters)
    for binding in work.bindings:
        if binding.kind != "requests":
            is_tokens[binding.index] = True
    return is_tokens
