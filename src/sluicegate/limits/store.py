"""The counter store protocol: check-and-charge several counters atomically, adjust later.

Two implementations keep exactly the same window maths: :class:`~.memory.MemoryStore`
(embedded mode, in process) and :class:`~.redis_store.RedisStore` (cluster mode, one Lua
script per admission). ``tests/limits`` runs one conformance suite against both.

Window maths, shared by both (all times are integer epoch milliseconds from the caller;
the Redis store may run its sliding windows on Redis's clock instead, ``time_source``):

* **Sliding** counters (TPM, RPM) split the window into buckets of ``bucket_ms``; a bucket
  ``b`` (covering ``[b*bucket_ms, (b+1)*bucket_ms)``) counts until ``(b + n)*bucket_ms``
  where ``n = window_ms / bucket_ms``. So at most ``limit`` is charged within the current
  bucket and the ``n - 1`` before it: no burst at a minute boundary, constant memory per key
  (at most ``n`` buckets), and a refused request learns exactly when the oldest buckets
  free enough room.
* **Fixed** counters (quotas) count from the period start (part of the counter's name) until
  ``end_ms``; they are kept :data:`FIXED_GRACE_MS` longer so that late settles still land.
* A request is admitted when, for every counter, ``used + max(cost, 1) <= limit`` (so a
  zero-cost request is still refused once a counter is at or over its limit, as APIM blocks
  everything after an overshoot); then every counter is charged ``cost``. Otherwise nothing
  is charged.
* **In flight**: a sliding counter whose cost is a reservation (``Counter.reserve``, the
  tokens counters) also keeps, per bucket, how much of it is reserved by admissions not yet
  settled; an adjustment carrying ``reserved`` takes that much off again (the settle or
  release of that admission). A refused counter reports the total of its live buckets as
  ``CounterState.pending``: the limiter then knows that the refusal may be over as soon as
  requests in progress settle, not only when buckets leave the window. The amount in flight
  leaves with its bucket, so a reservation never settled (a lost request) is forgotten
  with the window like any charge.
* **Quota origin** (for seeding from the ledger, ``limits/seeding.py``): a quota counter
  remembers when it was created (``since``: the ``arrived_ms`` of the admission that created
  it, when its request arrived, on the ledger's clock; its ``now_ms`` when none is given)
  and whether a seed has been added to it; a store that creates one calls its
  ``quota_created`` hook with the counter's name (:class:`SeedableStore`). Why the arrival
  and not the admission: the ledger records a request at its arrival (``ts``), and the seed
  counts the records before ``since``; the creating request is in the counter already.
* **In flight, quotas**: a fixed counter whose cost is a reservation keeps the same, per
  minute of admission (:data:`QUOTA_HELD_BUCKET_MS`; the counter's ``slot`` is that minute's
  index), and a refused one reports, as ``pending``, what the minutes of the last
  :data:`QUOTA_HELD_WINDOW_MS` hold. A quota has no window for them to leave with, so this
  bounds how long a reservation never settled can pass for one in progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

CounterKind = Literal["sliding", "fixed"]

FIXED_GRACE_MS = 600_000
"""How long a quota counter outlives its period, so settles of late responses still land."""

NEVER = -1
"""``retry_after_ms`` of a counter whose cost exceeds its whole limit: waiting cannot help."""


QUOTA_HELD_BUCKET_MS = 60_000
"""A quota counter keeps what is reserved in flight per minute of admission."""

QUOTA_HELD_WINDOW_MS = 600_000
"""How long a quota's reservation counts as in flight at most (9 to 10 minutes: whole
minutes of admission). A request in progress for longer (a very long stream) is taken as
used up for a refusal's answer, as is a reservation whose settle was lost (the process
died, Redis was unreachable): the quota then answers "exhausted" again instead of "held by
requests in progress" until its period renews. Long enough for nearly every request (a
backend's first byte times out after 2 min by default), short enough that a lost settle
misleads clients for minutes, not for the rest of a month."""

QUOTA_HELD_BUCKETS = QUOTA_HELD_WINDOW_MS // QUOTA_HELD_BUCKET_MS


class LimitsError(Exception):
    """Base of the errors raised by the limits package."""


class StoreUnavailable(LimitsError):
    """The shared counter store cannot be reached and the store is configured to fail closed.

    ``retry_after_s`` is when the store will be tried again.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Counter:
    """One counter to check and charge in an admission.

    ``name`` identifies the counter in the store (the store adds its own prefix). Sliding
    counters use ``window_ms`` and ``bucket_ms``; fixed counters use ``end_ms``. ``reserve``:
    the cost is a reservation that an adjustment will settle (a tokens counter, a quota): the
    counter keeps it as in flight until then (module docstring).
    """

    name: str
    kind: CounterKind
    limit: int
    cost: int
    window_ms: int = 0
    bucket_ms: int = 0
    end_ms: int = 0
    reserve: bool = False


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class CounterState:
    """A counter as the admission found it.

    ``used`` is the count after the charge when admitted, else the count found.
    ``retry_after_ms`` is 0 when this counter had room, :data:`NEVER` when the cost exceeds
    the whole limit, else how long until buckets leave the window and free enough room
    (in-flight reservations aside). ``slot`` is the bucket charged (sliding), the minute of
    admission (a fixed counter with ``reserve``) or 0 (another fixed counter), needed to
    adjust the same window later. ``pending``: for a counter with reservations refused with a
    wait (``retry_after_ms > 0``), how much of ``used`` is reserved by admissions not settled
    yet (for a quota, by those of the last :data:`QUOTA_HELD_WINDOW_MS`); 0 otherwise.
    """

    used: int
    retry_after_ms: int
    slot: int
    pending: int = 0


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class StoreResult:
    """Outcome of one atomic admission; ``states`` line up with the counters given.

    ``origin`` names the store that decided (``"memory"``, ``"redis"`` or ``"fallback"``);
    adjustments of this admission must be sent back with the same origin.
    """

    allowed: bool
    states: tuple[CounterState, ...]
    origin: str
    #: When the store ran an admission (epoch ms on the clock its windows run on: the Redis
    #: store's script time), for a replayed adjustment's guard; 0: not recorded.
    admitted_ms: int = 0


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Adjustment:
    """Change a counter already charged by ``delta`` (negative gives tokens back).

    Only the window that was charged is touched (``slot`` for sliding counters); a window
    that has expired meanwhile is left alone. Counters never go below zero. ``reserved``:
    what the admission reserved in that window (``slot``: its bucket, or its minute for a
    quota), no longer in flight after this adjustment (a settle or release of a
    reservation; 0 for anything else). ``admitted_ms``: the admission's
    :attr:`StoreResult.admitted_ms` (0: unknown); the Redis store replays a failed quota
    adjustment only onto a key created before it.
    """

    name: str
    kind: CounterKind
    slot: int
    delta: int
    reserved: int = 0
    admitted_ms: int = 0


class CounterStore(Protocol):
    """Atomic multi-counter admission. Implementations must be safe for concurrent use."""

    async def admit(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None = None
    ) -> StoreResult:
        """Check every counter and charge all of them, or none (see the module docstring).

        ``arrived_ms``: when the request arrived (epoch ms on the gateway's clock, the
        ledger's ``ts``; at most ``now_ms``), the ``since`` of a quota counter this
        admission creates; ``None``: ``now_ms``. Counter names must be distinct. May raise
        :class:`StoreUnavailable`.
        """
        ...

    async def adjust(self, adjustments: Sequence[Adjustment], origin: str) -> None:
        """Apply adjustments to counters charged by an admission with this ``origin``.

        Never raises for an unreachable store (the Redis store keeps the adjustment for a
        replay when Redis answers again, or drops and counts it).
        """
        ...

    async def aclose(self) -> None:
        """Release connections owned by the store."""
        ...


@runtime_checkable
class SyncCounterStore(Protocol):
    """A store that can also decide without awaiting (the in-memory store's fast path)."""

    def admit_sync(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None = None
    ) -> StoreResult: ...

    def adjust_sync(self, adjustments: Sequence[Adjustment], origin: str) -> None: ...


@dataclass(frozen=True, slots=True)
class QuotaOrigin:
    """When a quota counter began counting and whether its seed is in.

    ``since_ms``: epoch milliseconds (the gateway's clock, the ledger's) from which the
    counter holds every request charged to its name, by arrival: the creating request's
    arrival (requests charged before, by an earlier counter of the same name that was lost,
    are what a seed adds; one that arrived before it but was admitted after it is in both,
    docs/limits.md). ``seeded``: a seed has been applied to this counter already.
    """

    since_ms: int
    seeded: bool


@runtime_checkable
class SeedableStore(Protocol):
    """A counter store whose quota counters can be seeded (``limits/seeding.py``).

    ``quota_created``: called (on the event loop, synchronously, so keep it tiny) with a quota
    counter's name when an admission creates that counter; ``None``: nobody listens.
    """

    quota_created: Callable[[str], None] | None

    async def quota_origin(self, name: str) -> QuotaOrigin | None:
        """The origin of quota counter ``name``; ``None`` when it does not exist (or was
        created by a version that did not record its origin: it cannot be seeded exactly).
        May raise the store's errors (the seeder retries)."""
        ...

    async def apply_seed(self, name: str, since_ms: int, tokens: int) -> bool:
        """Add ``tokens`` to quota counter ``name`` once, atomically: only while the counter
        still has origin ``since_ms`` (it was not lost and created again meanwhile) and no
        seed was applied to it. Returns whether this call applied it. May raise the store's
        errors."""
        ...
