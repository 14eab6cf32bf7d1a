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
``{key}:rpm`` (sliding windows of 61 one-second buckets, see :data:`WINDOW_MS`),
``{key}:quota:{period}:{start_ms}`` (the token quota's calendar period) and
``{key}:request-quota:{period}:{start_ms}`` (the request quota's: charged 1 at admission and
never adjusted, like ``:rpm``, so a request that then fails upstream still counts, as APIM's
``quota-by-key`` counts every call that reached it). All are checked and charged in one
atomic store call, all or none. Two requests naming the same counter (the same key used by
two policies) share it, as in APIM, and it is charged once, against the lower limit.

The wait a refusal advertises (``Retry-After``, ``retry-after-ms``) for a TPM or RPM window is
when enough buckets leave it, with two exceptions (:func:`_advertise`): never more than
:data:`~sluicegate.limits.admission.MAX_RETRY_AFTER_MS` (60 s), and only
:data:`~sluicegate.limits.admission.IN_FLIGHT_RETRY_MS` when reservations of requests still
in progress could cover the shortfall once they settle. A quota waits until its period
renews, unless reservations in progress cover its shortfall: then it too is a short wait
(a 429, not a 403: see :mod:`sluicegate.limits.admission`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from sluicegate.clock import Clock
from sluicegate.limits.admission import (
    ALLOWED_UNLIMITED,
    IN_FLIGHT_RETRY_MS,
    MAX_RETRY_AFTER_MS,
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
    CounterKind,
    CounterState,
    CounterStore,
    StoreResult,
    StoreUnavailable,
    SyncCounterStore,
)

BUCKET_MS = 1_000
#: Shapes kept (one per distinct counter key and policy set in use).
_SHAPE_CACHE_SIZE = 100_000
#: A charge made at any moment of bucket ``b`` stays counted until ``b`` is 61 buckets old,
#: i.e. at least a full 60 s after the request's true arrival. With exactly 60 buckets a
#: charge made late in a bucket would leave the window up to one bucket early, and an
#: arbitrary 60-s span of arrival times could hold up to a bucket's worth too much (clients
#: waking together when a bucket frees make that a whole limit). The price is at most 1/61 of
#: the limit left unused at the edge.
WINDOW_MS = 60_000 + BUCKET_MS


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
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


@dataclass(slots=True)
class _Spec:
    """One distinct counter of an admission, without its cost. ``sources`` are the indices
    of the requests whose tokens it charges (the largest of them, when several requests
    share it); empty for a requests counter, which is charged 1. ``reserve``: its charge is
    a reservation, settled later (a tokens counter: it has sources)."""

    name: str
    kind: CounterKind
    limit: int
    window_ms: int
    bucket_ms: int
    end_ms: int
    sources: tuple[int, ...]
    reserve: bool = False

    def __post_init__(self) -> None:
        self.reserve = bool(self.sources)


@dataclass(slots=True)
class _Bind:
    """One limit of one request: which counter it uses, under which of its own limits."""

    kind: LimitKind
    request: int
    counter: int
    limit: int
    period_end_ms: int
    #: Its cost is the request itself (1: RPM, the request quota), not the request's tokens.
    per_request: bool = False


@dataclass(slots=True)
class _Shape:
    """The counters of a list of limit requests and which limit uses which: everything but
    the costs, so it is worked out once per (keys, policies) and period, not per request."""

    specs: tuple[_Spec, ...]
    binds: tuple[_Bind, ...]
    #: The shape holds until this epoch millisecond (the end of its earliest quota period).
    until_ms: int
    policies: tuple[LimitPolicy, ...]


_FOREVER_MS = 2**62

_QUOTA_MARK = ":quota:"
_REQUEST_QUOTA_MARK = ":request-quota:"

QuotaMeasure = Literal["tokens", "requests"]
"""What a quota counter counts: tokens (``token_quota``) or admitted requests
(``request_quota``)."""


def quota_counter_name(key: str, period: str, start_ms: int) -> str:
    """The name of ``key``'s token quota counter of the period starting at ``start_ms``, e.g.
    ``sub:abc:quota:monthly:1700000000000`` (docs/limits.md)."""
    return f"{key}{_QUOTA_MARK}{period}:{start_ms}"


def request_quota_counter_name(key: str, period: str, start_ms: int) -> str:
    """The name of ``key``'s request quota counter of the period starting at ``start_ms``,
    e.g. ``sub:abc:request-quota:monthly:1700000000000`` (docs/limits.md)."""
    return f"{key}{_REQUEST_QUOTA_MARK}{period}:{start_ms}"


def parse_quota_counter_name(name: str) -> tuple[str, str, int] | None:
    """``(key, period, start_ms)`` of a name made by :func:`quota_counter_name` or
    :func:`request_quota_counter_name`; ``None`` for any other name (see
    :func:`quota_counter_measure` for which of them it is)."""
    parsed = _parse_quota(name)
    return None if parsed is None else parsed[:3]


def quota_counter_measure(name: str) -> QuotaMeasure | None:
    """What the quota counter called ``name`` counts; ``None`` for a name that is not a
    quota counter's."""
    parsed = _parse_quota(name)
    return None if parsed is None else parsed[3]


def _parse_quota(name: str) -> tuple[str, str, int, QuotaMeasure] | None:
    # The key may hold colons (an owner's name), even a mark: the rightmost mark is the
    # counter's, and the period and start are cut from the right.
    tokens_at = name.rfind(_QUOTA_MARK)
    requests_at = name.rfind(_REQUEST_QUOTA_MARK)
    measure: QuotaMeasure
    if requests_at > tokens_at:
        at, mark, measure = requests_at, _REQUEST_QUOTA_MARK, "requests"
    else:
        at, mark, measure = tokens_at, _QUOTA_MARK, "tokens"
    if at <= 0:
        return None
    key, rest = name[:at], name[at + len(mark) :]
    period, _, start = rest.partition(":")
    if not period or not start.isdigit():
        return None
    return key, period, int(start), measure


def shape_of(requests: Sequence[LimitRequest], now: float) -> _Shape:
    """Turn limit requests into store counters and bindings (pure; ``now`` is epoch s)."""
    specs: list[_Spec] = []
    binds: list[_Bind] = []
    by_name: dict[str, int] = {}
    until_ms = _FOREVER_MS

    def add(kind: LimitKind, number: int, spec: _Spec) -> None:
        index = by_name.get(spec.name)
        if index is None:
            index = by_name[spec.name] = len(specs)
            specs.append(spec)
        else:
            shared = specs[index]
            # Shared by several requests: charged once, against the lower limit.
            shared.limit = min(shared.limit, spec.limit)
            shared.sources = tuple(dict.fromkeys(shared.sources + spec.sources))
        binds.append(_Bind(kind, number, index, spec.limit, spec.end_ms, not spec.sources))

    for number, request in enumerate(requests):
        policy, key = request.policy, request.key
        if policy.tokens_per_minute is not None:
            add(
                "tokens",
                number,
                _Spec(
                    f"{key}:tpm", "sliding", policy.tokens_per_minute, WINDOW_MS, BUCKET_MS, 0,
                    (number,),
                ),
            )  # fmt: skip
        if policy.requests_per_minute is not None:
            add(
                "requests",
                number,
                _Spec(
                    f"{key}:rpm", "sliding", policy.requests_per_minute, WINDOW_MS, BUCKET_MS, 0,
                    (),
                ),
            )  # fmt: skip
        if policy.token_quota is not None and policy.token_quota_period is not None:
            period = policy.token_quota_period
            start_ms, end_ms = period_bounds(period, now, policy.quota_timezone)
            until_ms = min(until_ms, end_ms)
            add(
                "quota",
                number,
                _Spec(
                    quota_counter_name(key, period, start_ms), "fixed", policy.token_quota, 0,
                    0, end_ms, (number,),
                ),
            )  # fmt: skip
        if policy.request_quota is not None and policy.request_quota_period is not None:
            period = policy.request_quota_period
            start_ms, end_ms = period_bounds(period, now, policy.quota_timezone)
            until_ms = min(until_ms, end_ms)
            # No sources: charged 1 per request, never settled (like :rpm).
            add(
                "request_quota",
                number,
                _Spec(
                    request_quota_counter_name(key, period, start_ms), "fixed",
                    policy.request_quota, 0, 0, end_ms, (),
                ),
            )  # fmt: skip
    return _Shape(tuple(specs), tuple(binds), until_ms, tuple(r.policy for r in requests))


def _counters(shape: _Shape, tokens: list[int]) -> list[Counter]:
    counters: list[Counter] = []
    for spec in shape.specs:
        sources = spec.sources
        if not sources:
            cost = 1
        elif len(sources) == 1:
            cost = tokens[sources[0]]
        else:
            cost = max([tokens[i] for i in sources])
        counters.append(
            Counter(
                spec.name, spec.kind, spec.limit, cost, spec.window_ms, spec.bucket_ms,
                spec.end_ms, spec.reserve,
            )
        )  # fmt: skip
    return counters


class Limiter:
    """Admits requests against their limits through a :class:`CounterStore`.

    Safe for concurrent use: each admission is one atomic store call. With a synchronous
    store (the in-memory one) :meth:`admit` completes without yielding to the event loop.
    """

    def __init__(self, store: CounterStore, clock: Clock) -> None:
        self.store = store
        self._clock = clock
        self._sync: SyncCounterStore | None = store if isinstance(store, SyncCounterStore) else None
        self._shapes: dict[tuple[tuple[str, int], ...], _Shape] = {}
        #: Called with the name of each quota counter of a shape built anew (the first
        #: admission of a key, policy and period in this process; not on every request):
        #: the seeder's cheap wake-up (``limits/seeding.py``), with the ``counter_key`` of
        #: each policy charging it (a ``sub:`` counter may be a caller policy's fallback).
        self.quota_seen: Callable[[str, str], None] | None = None

    def __repr__(self) -> str:
        return f"Limiter(store={self.store!r})"

    async def admit(
        self, requests: Sequence[LimitRequest], arrived: float | None = None
    ) -> Admission:
        """Check and reserve every limit of every request, all or none.

        ``arrived``: when the request arrived (epoch seconds on this limiter's clock, the
        ledger record's ``ts``); a quota counter this admission creates counts from then
        (its origin's ``since``, ``limits/seeding.py``), so that the seed, the ledger's
        records before ``since``, never holds the creating request too. ``None``: now.

        Never raises for an unreachable store: a store failing closed gives a 503
        admission; one failing open decides with its in-memory fallback.
        """
        now = self._clock.now()
        now_ms = int(now * 1000)
        shape = self._shape(requests, now, now_ms)
        if not shape.specs:
            return ALLOWED_UNLIMITED
        arrived_ms = now_ms
        if arrived is not None and arrived < now:
            arrived_ms = int(arrived * 1000)
            # At or before the record's ts even when the product rounded up to a whole ms
            # (the seed compares ts < since / 1000 in floats): else it would count the
            # creating request. (Not after now_ms: a clock that stepped back.)
            if arrived_ms / 1000 > arrived:
                arrived_ms -= 1
        # Not a comprehension: one fewer call on every request (before Python 3.12).
        tokens = [requests[0].tokens] if len(requests) == 1 else [r.tokens for r in requests]
        counters = _counters(shape, tokens)
        try:
            if self._sync is not None:
                result = self._sync.admit_sync(counters, now_ms, arrived_ms)
            else:
                result = await self.store.admit(counters, now_ms, arrived_ms)
        except StoreUnavailable as exc:
            return unavailable(exc.retry_after_s, requests)
        return _decide(shape, counters, result, requests, tokens, now_ms)

    def _shape(self, requests: Sequence[LimitRequest], now: float, now_ms: int) -> _Shape:
        """The shape of these requests, from the cache while it holds (same keys, the same
        policy objects, the same quota periods)."""
        if len(requests) == 1:  # the usual case, without building lists
            only = requests[0]
            cache_key: tuple[tuple[str, int], ...] = ((only.key, id(only.policy)),)
            shape = self._shapes.get(cache_key)
            stale = (
                shape is None or now_ms >= shape.until_ms or shape.policies[0] is not only.policy
            )
        else:
            cache_key = tuple([(request.key, id(request.policy)) for request in requests])
            shape = self._shapes.get(cache_key)
            stale = (
                shape is None
                or now_ms >= shape.until_ms
                or any(a is not b.policy for a, b in zip(shape.policies, requests, strict=True))
            )
        if stale or shape is None:
            shape = shape_of(requests, now)
            if len(self._shapes) >= _SHAPE_CACHE_SIZE:
                self._shapes.clear()
            self._shapes[cache_key] = shape
            seen = self.quota_seen
            if seen is not None:
                for bind in shape.binds:
                    if bind.kind == "quota" or bind.kind == "request_quota":
                        seen(
                            shape.specs[bind.counter].name, shape.policies[bind.request].counter_key
                        )
        return shape

    async def settle(self, reservation: Reservation | None, actual_tokens: int) -> None:
        """Replace the reserved estimate by ``actual_tokens`` in the windows it went into.

        Counters go up when the actual is larger (never a refusal at this point) and down
        when smaller; either way the reservation is no longer in flight in its TPM windows
        (see :func:`_advertise`). A no-op for ``None`` or a reservation already settled or
        released.
        """
        if reservation is None or reservation.done:
            return
        reservation.done = True
        adjustments: list[Adjustment] = []
        for charge in reservation.charges:  # a loop, not a comprehension: every request
            delta = actual_tokens - charge.amount
            if charge.kind == "sliding":
                # Also when the estimate was exact: the reservation is no longer in flight.
                if delta != 0 or charge.amount:
                    adjustments.append(
                        Adjustment(charge.name, "sliding", charge.slot, delta, charge.amount)
                    )
            elif delta != 0 or charge.amount:
                # A quota's reservation is in flight too (its minute is the slot).
                adjustments.append(
                    Adjustment(
                        charge.name,
                        charge.kind,
                        charge.slot,
                        delta,
                        charge.amount,
                        reservation.admitted_ms,
                    )
                )
        if not adjustments:
            return
        if self._sync is not None:
            self._sync.adjust_sync(adjustments, reservation.origin)
        else:
            await self.store.adjust(adjustments, reservation.origin)

    async def release(self, reservation: Reservation | None) -> None:
        """Give the reserved tokens back (the backend failed); the request still counts
        against the requests-per-minute limit. No-op if already settled or released."""
        await self.settle(reservation, 0)  # settled to no tokens at all


def _decide(
    shape: _Shape,
    counters: list[Counter],
    result: StoreResult,
    requests: Sequence[LimitRequest],
    tokens: list[int],
    now_ms: int,
) -> Admission:
    # Plain loops, not comprehensions: this runs on every admitted request, and each
    # comprehension is a function call of its own (before Python 3.12).
    states = result.states
    statuses: list[LimitStatus] = []
    for bind in shape.binds:
        state = states[bind.counter]
        statuses.append(
            LimitStatus(
                bind.kind,
                requests[bind.request],
                bind.limit,
                state.used,
                1 if bind.per_request else tokens[bind.request],
                state.retry_after_ms,
                bind.period_end_ms,
            )
        )
    if not result.allowed:
        _advertise(statuses, shape, counters, states)
    reservation = None
    if result.allowed:
        charges: list[Charge] = []
        for index, spec in enumerate(shape.specs):
            if spec.sources:  # counters of tokens are settled; counters of requests not
                counter = counters[index]
                charges.append(Charge(counter.name, counter.kind, states[index].slot, counter.cost))
        reservation = Reservation(
            tuple(charges),
            result.origin,
            tokens[0] if len(tokens) == 1 else max(tokens, default=0),
            admitted_ms=result.admitted_ms,
        )
    return decide(result.allowed, tuple(statuses), reservation, now_ms)


def _advertise(
    statuses: list[LimitStatus],
    shape: _Shape,
    counters: list[Counter],
    states: tuple[CounterState, ...],
) -> None:
    """Turn a refused window's exact wait into the one to advertise (refusals only).

    * In flight: when what the window holds in reservations of requests still in progress
      (``CounterState.pending``) is at least the shortfall, the refusal can end as soon as
      they settle to their real usage, typically far below the estimate (a default
      completion budget of 1,024 tokens against a reply of a few hundred): the wait is
      :data:`IN_FLIGHT_RETRY_MS` if shorter than the buckets' expiry. Settles never refuse,
      so a retry that comes too early is refused again, cheaply, and told again.
    * A quota: until its period renews, unless its reservations in progress (those of the
      last minutes, :data:`~sluicegate.limits.store.QUOTA_HELD_WINDOW_MS`) are at least
      the shortfall, i.e. the usage settled so far leaves room for this request: then
      :data:`IN_FLIGHT_RETRY_MS` (or the renewal, if sooner) and ``in_flight`` is set,
      which makes it a 429 (:func:`~sluicegate.limits.admission.decide`).
    * At most :data:`MAX_RETRY_AFTER_MS`: a window of 61 buckets can hold a charge up to
      61 s, and openai-python ignores a Retry-After over 60 s (then retrying after its own
      short backoff). A retry at 60 s that is still too early gets the last second.
    """
    specs = shape.specs
    for index, bind in enumerate(shape.binds):
        status = statuses[index]
        retry = status.retry_after_ms
        if retry <= 0:
            continue  # room, or too large for any wait
        state = states[bind.counter]
        counter = counters[bind.counter]
        # Positive (a refusal with a wait): settles could free it when pending covers it.
        shortfall = state.used + max(counter.cost, 1) - counter.limit
        held = state.pending >= shortfall
        if specs[bind.counter].kind != "sliding":
            if held:  # the settled usage leaves room: a short wait, not the period's end
                status.retry_after_ms = min(retry, IN_FLIGHT_RETRY_MS)
                status.in_flight = state.pending
            continue
        if held and retry > IN_FLIGHT_RETRY_MS:
            retry = IN_FLIGHT_RETRY_MS
            status.in_flight = state.pending
        status.retry_after_ms = min(retry, MAX_RETRY_AFTER_MS)
