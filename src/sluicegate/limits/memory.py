"""In-process counter store for the embedded mode (and the fail-open fallback of Redis).

All work is synchronous and short (a few dict and deque operations per counter), so the
async methods never yield to the event loop; a ``threading.Lock`` makes the store safe to
share between threads too. Memory per key is constant (at most ``window/bucket`` buckets);
idle counters are swept out every :data:`SWEEP_INTERVAL_MS` of caller time.

Quota counters remember their creation (``since``) and whether a seed from the ledger has
been added (:class:`~sluicegate.limits.store.SeedableStore`, ``limits/seeding.py``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

from sluicegate.limits.store import (
    FIXED_GRACE_MS,
    NEVER,
    QUOTA_HELD_BUCKET_MS,
    QUOTA_HELD_BUCKETS,
    Adjustment,
    Counter,
    CounterState,
    QuotaOrigin,
    StoreResult,
)

SWEEP_INTERVAL_MS = 60_000


class _Sliding:
    """Buckets ``[index, amount, in flight]`` in increasing index order, and the sum of the
    amounts (``in flight``: the part of the amount reserved by admissions not yet settled,
    see :mod:`sluicegate.limits.store`)."""

    __slots__ = ("bucket_ms", "buckets", "total", "window_ms")

    def __init__(self, window_ms: int, bucket_ms: int) -> None:
        self.buckets: deque[list[int]] = deque()
        self.total = 0
        self.window_ms = window_ms
        self.bucket_ms = bucket_ms

    def idle(self, now_ms: int) -> bool:
        """True when even the newest bucket has left the window."""
        return not self.buckets or self.buckets[-1][0] * self.bucket_ms + self.window_ms <= now_ms

    def evict(self, oldest: int) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] < oldest:
            self.total -= buckets.popleft()[1]

    def retry_after_ms(self, need: int, limit: int, bucket_ms: int, n: int, now_ms: int) -> int:
        excess = self.total + need - limit
        freed = 0
        for index, amount, _ in self.buckets:
            freed += amount
            if freed >= excess:
                return (index + n) * bucket_ms - now_ms
        return NEVER  # unreachable while need <= limit

    def pending(self) -> int:
        """What the buckets hold in reservations not yet settled (for a refusal only)."""
        return sum([bucket[2] for bucket in self.buckets])


class _Fixed:
    """A quota's count, and ``held``: minute of admission -> what admissions of that minute
    reserved and have not settled yet (``None`` until the first reservation; see
    :mod:`sluicegate.limits.store`). ``since_ms``: when it was created; ``seeded``: the
    ledger's earlier usage has been added (``limits/seeding.py``)."""

    __slots__ = ("expires_ms", "held", "seeded", "since_ms", "used")

    def __init__(self, expires_ms: int, since_ms: int) -> None:
        self.used = 0
        self.expires_ms = expires_ms
        self.held: dict[int, int] | None = None
        self.since_ms = since_ms
        self.seeded = False

    def hold(self, minute: int, amount: int) -> None:
        held = self.held
        if held is None:
            held = self.held = {}
        known = held.get(minute)
        if known is not None:
            held[minute] = known + amount
            return
        # A new minute (about once a minute): forget what is too old to be in flight, the
        # reservations whose settle was lost, so that the dict stays small.
        oldest = minute - QUOTA_HELD_BUCKETS + 1
        for old in [index for index in held if index < oldest]:
            del held[old]
        held[minute] = amount

    def release(self, minute: int, amount: int) -> None:
        held = self.held
        if held is None:
            return
        known = held.get(minute)
        if known is None:
            return
        left = known - amount
        if left > 0:
            held[minute] = left
        else:
            del held[minute]

    def pending(self, now_ms: int) -> int:
        """What the last minutes hold in reservations not yet settled (for a refusal only)."""
        if not self.held:
            return 0
        oldest = now_ms // QUOTA_HELD_BUCKET_MS - QUOTA_HELD_BUCKETS + 1
        return sum([amount for index, amount in self.held.items() if index >= oldest])


class MemoryStore:
    """Counters in a dict; see :mod:`sluicegate.limits.store` for the semantics.

    ``counting_since_ms`` (the gateway passes its start): this store has seen every
    admission of the process from then on. A quota counter it creates later then holds every
    admission of its name since that moment (a quota counter lives until its period is over),
    so :meth:`quota_origin` reports that moment, not the counter's creation: a request that
    arrived before the counter was created but was admitted just after (its prompt counted
    in the counting thread meanwhile) is in the counter, and the ledger's records before
    ``since`` must not hold it too. ``None``: the arrival of the request that created the
    counter (``arrived_ms``, else its admission), as the Redis store records it.
    """

    origin = "memory"

    def __init__(self, origin: str = "memory", *, counting_since_ms: int | None = None) -> None:
        self.origin = origin
        self.counting_since_ms = counting_since_ms
        #: Called with a quota counter's name when an admission creates it (seeding).
        self.quota_created: Callable[[str], None] | None = None
        self._sliding: dict[str, _Sliding] = {}
        self._fixed: dict[str, _Fixed] = {}
        self._lock = threading.Lock()
        self._next_sweep_ms = 0

    def __len__(self) -> int:
        return len(self._sliding) + len(self._fixed)

    def __repr__(self) -> str:
        return (
            f"MemoryStore(origin={self.origin!r}, sliding={len(self._sliding)}, "
            f"fixed={len(self._fixed)})"
        )

    async def admit(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None = None
    ) -> StoreResult:
        return self.admit_sync(counters, now_ms, arrived_ms)

    async def adjust(self, adjustments: Sequence[Adjustment], origin: str) -> None:
        self.adjust_sync(adjustments, origin)

    async def aclose(self) -> None:
        return None

    def admit_sync(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None = None
    ) -> StoreResult:
        with self._lock:
            if now_ms >= self._next_sweep_ms:
                self._sweep(now_ms)
            # First pass: find each counter's window and whether it has room. States are
            # only built for the answer actually given (refusal or charge): this runs on
            # every request.
            windows: list[_Sliding | _Fixed] = []
            found: list[tuple[int, int, int]] = []  # (used, retry_after_ms, slot)
            allowed = True
            sliding_map, fixed_map = self._sliding, self._fixed
            for counter in counters:
                need = counter.cost if counter.cost > 1 else 1
                limit = counter.limit
                if counter.kind == "sliding":
                    bucket_ms = counter.bucket_ms
                    sliding = sliding_map.get(counter.name)
                    if sliding is None:
                        sliding = sliding_map[counter.name] = _Sliding(counter.window_ms, bucket_ms)
                    n = counter.window_ms // bucket_ms
                    current = now_ms // bucket_ms
                    buckets = sliding.buckets
                    if buckets and buckets[0][0] <= current - n:
                        sliding.evict(current - n + 1)
                    windows.append(sliding)
                    used, slot = sliding.total, current
                    if used + need <= limit:
                        retry = 0
                    elif need > limit:
                        retry = NEVER
                    else:
                        retry = sliding.retry_after_ms(need, limit, bucket_ms, n, now_ms)
                else:
                    fixed = fixed_map.get(counter.name)
                    if fixed is None:
                        # Since the creating request's arrival, as in Redis (admit.lua);
                        # quota_origin may report the earlier counting_since_ms instead.
                        fixed = fixed_map[counter.name] = _Fixed(
                            counter.end_ms + FIXED_GRACE_MS,
                            now_ms if arrived_ms is None else arrived_ms,
                        )
                        if self.quota_created is not None:
                            self.quota_created(counter.name)
                    windows.append(fixed)
                    used = fixed.used
                    slot = now_ms // QUOTA_HELD_BUCKET_MS if counter.reserve else 0
                    if used + need <= limit:
                        retry = 0
                    elif need > limit:
                        retry = NEVER
                    else:
                        retry = max(counter.end_ms - now_ms, 0)
                if retry != 0:
                    allowed = False
                found.append((used, retry, slot))
            if not allowed:
                states: list[CounterState] = []
                for index, (used, retry, slot) in enumerate(found):
                    window = windows[index]
                    if retry <= 0:
                        pending = 0
                    elif isinstance(window, _Sliding):
                        pending = window.pending()
                    else:
                        pending = window.pending(now_ms) if counters[index].reserve else 0
                    states.append(CounterState(used, retry, slot, pending))
                return StoreResult(False, tuple(states), self.origin)
            charged: list[CounterState] = []
            for index, window in enumerate(windows):
                counter = counters[index]
                cost = counter.cost
                if isinstance(window, _Sliding):
                    slot = found[index][2]
                    # A zero cost still opens its bucket, so that a later settle lands.
                    buckets = window.buckets
                    if buckets and buckets[-1][0] >= slot:
                        # Same bucket, or the clock stepped back: add to the newest one.
                        newest = buckets[-1]
                        newest[1] += cost
                        if counter.reserve:
                            newest[2] += cost
                        slot = newest[0]
                    else:
                        buckets.append([slot, cost, cost if counter.reserve else 0])
                    window.total += cost
                    charged.append(CounterState(window.total, 0, slot))
                else:
                    window.used += cost
                    slot = found[index][2]
                    if counter.reserve and cost:
                        window.hold(slot, cost)
                    charged.append(CounterState(window.used, 0, slot))
            return StoreResult(True, tuple(charged), self.origin)

    def adjust_sync(self, adjustments: Sequence[Adjustment], origin: str) -> None:
        with self._lock:
            for adjustment in adjustments:
                if adjustment.kind == "sliding":
                    sliding = self._sliding.get(adjustment.name)
                    if sliding is None:
                        continue
                    # Newest first: a settle lands in the bucket its admission charged a
                    # moment ago, the last of up to 61.
                    for bucket in reversed(sliding.buckets):
                        if bucket[0] == adjustment.slot:
                            new = max(bucket[1] + adjustment.delta, 0)
                            sliding.total += new - bucket[1]
                            bucket[1] = new
                            if adjustment.reserved:
                                held = bucket[2] - adjustment.reserved
                                bucket[2] = held if held > 0 else 0
                            break
                else:
                    fixed = self._fixed.get(adjustment.name)
                    if fixed is not None:
                        fixed.used = max(fixed.used + adjustment.delta, 0)
                        if adjustment.reserved:
                            fixed.release(adjustment.slot, adjustment.reserved)

    async def quota_origin(self, name: str) -> QuotaOrigin | None:
        with self._lock:
            fixed = self._fixed.get(name)
            if fixed is None:
                return None
            since = fixed.since_ms
            # Embedded mode: the gateway's start, not the creating request's arrival. Still
            # right with arrivals: every request that arrived since the start was admitted
            # by this process, into this store, whose quota counters live until their
            # period is over, so the counter holds all of them (the creating one, and one
            # that arrived before it and was admitted after: no residual window here), and
            # the ledger's records before the start are exactly the previous runs'. And no
            # request can have arrived in this process before it started.
            if self.counting_since_ms is not None and self.counting_since_ms < since:
                since = self.counting_since_ms
            return QuotaOrigin(since, fixed.seeded)

    async def apply_seed(self, name: str, since_ms: int, tokens: int) -> bool:
        with self._lock:
            fixed = self._fixed.get(name)
            if fixed is None or fixed.seeded:
                return False
            since = fixed.since_ms
            if self.counting_since_ms is not None and self.counting_since_ms < since:
                since = self.counting_since_ms
            if since != since_ms:
                return False
            fixed.used += max(tokens, 0)
            fixed.seeded = True
            return True

    def _sweep(self, now_ms: int) -> None:
        """Drop counters with nothing left in their window (the in-memory "TTL")."""
        self._next_sweep_ms = now_ms + SWEEP_INTERVAL_MS
        idle = [name for name, sliding in self._sliding.items() if sliding.idle(now_ms)]
        for name in idle:
            del self._sliding[name]
        expired = [name for name, fixed in self._fixed.items() if fixed.expires_ms <= now_ms]
        for name in expired:
            del self._fixed[name]
