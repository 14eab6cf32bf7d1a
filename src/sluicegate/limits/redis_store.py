"""Redis counter store for the cluster mode: one Lua script round trip per admission.

The scripts live in ``limits/lua/`` (``admit.lua``, ``adjust.lua``) and are run with
EVALSHA, the calls of one event-loop turn sharing one pipeline (``limits/redis_batch.py``;
scripts are re-loaded automatically after a Redis restart). Keys are
``{prefix}{counter name}``; sliding counters are hashes of one-second buckets with a TTL of
window + one bucket, quota counters are integers expiring at period end + grace (with, beside
each, ``…:held``, a hash of its reservations in flight by minute, expiring 11 minutes after
the last, and ``…:origin``, a hash of since when the quota key counts (the arrival of the
request that created it, on the gateway's clock) and whether the ledger's earlier usage was
added to it, ``limits/seeding.py``, expiring with the quota key),
so every key expires on its own (so does ``{prefix}batch:…``, a batch's replies
kept a few seconds for a resend: ``limits/redis_batch.py``). All keys of one admission are
touched by one script, so on a Redis Cluster they must share a hash slot: put a hash tag in
the prefix (``"{sg}:limits:"``).

Time (``time_source``): ``"redis"`` (the configuration's default, ``redis.clock``) runs the
sliding windows (TPM, RPM) and a quota's minutes of reservations in flight on Redis's own
clock (``TIME`` inside ``admit.lua``: no extra round trip), one clock for every instance;
``"gateway"`` (the constructor's default, for tests with a fake clock) on the injected clock.
Quota periods are the gateway's either way (the limiter names the period in the key), so
every admission's reply also carries Redis's time: :attr:`RedisStore.clock_skew_s` is Redis's
time minus this instance's at the last admission, ``/metrics`` exports it, and on Redis's
clock a warning is logged when it exceeds :data:`SKEW_WARNING_S` (once, until it is back under
half of that; not on the gateway's clock, which tests fake on purpose).

When Redis cannot be reached, ``fail_mode`` decides:

* ``"open"`` (default): admissions are decided by an in-memory fallback store, per instance,
  until Redis answers again; a warning is logged once per outage and ``stats`` counts it.
* ``"closed"``: :meth:`admit` raises :class:`StoreUnavailable` (the limiter turns it into
  a 503 with ``Retry-After``).

Either way Redis is tried again ``retry_interval_s`` (monotonic clock) after the failure, by
one admission at a time, so recovery is automatic and a dead server costs at most one
timeout per interval. Settles (and releases) of reservations made in Redis are always sent to
Redis, also while it is marked down: they run after the response was sent, so a wait costs
the client nothing, and a short stall must not lose the settles of every request in flight.
One that succeeds marks Redis up again. One that fails is kept in a bounded queue
(``max_replay`` adjustments; beyond it the oldest are dropped and counted) and replayed, in
the background, after the next call that reaches Redis (the probing admission, any
settle). A batch that certainly did not run (never written to a connection: connecting
failed) is replayed whenever Redis answers again. One that may have run (a timeout, a
connection dropped after the send: its reply lost) is replayed under its failed batch's key
(:meth:`ScriptBatcher.resend <sluicegate.limits.redis_batch.ScriptBatcher.resend>`), so that
if it did run it is not applied twice, and only while that key surely lives
(:class:`~sluicegate.limits.redis_batch.BatchFailed`'s ``resend_by``, a few seconds:
:func:`~sluicegate.limits.redis_batch.reply_ttl_ms`); later it is dropped and counted, as
before replays existed: a lost correction over-counts, a second refund would under-count
(and wipe other requests' tokens in flight). Keeping every batch's replies for as long as an
outage lasts would cost Redis ~200 bytes a batch (300 MB for 5 min at 5,000 settles/s). An
adjustment whose window is over is dropped too (a bucket :data:`SLIDING_REPLAY_MS` after the
failure; a quota's after its period and grace), and a quota's is applied only to the quota
key it was charged to, not to one Redis created again after its admission (``adjust.lua``'s
guard: the origin's ``created``, on the script's clock, against the admission's time,
``StoreResult.admitted_ms``). A script that timed
out may still have run in Redis, so the request can be charged there and in the fallback:
the error is on the side of counting too much, never of admitting too much.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from sluicegate.clock import Clock
from sluicegate.limits.limiter import parse_quota_counter_name
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.redis_batch import BatchFailed, BatchStats, ScriptBatcher, needs_reconnect
from sluicegate.limits.store import (
    FIXED_GRACE_MS,
    QUOTA_HELD_BUCKET_MS,
    QUOTA_HELD_BUCKETS,
    QUOTA_HELD_WINDOW_MS,
    Adjustment,
    Counter,
    CounterState,
    QuotaOrigin,
    StoreResult,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

FailMode = Literal["open", "closed"]
TimeSource = Literal["redis", "gateway"]
SKEW_WARNING_S = 1.0
"""A warning is logged when Redis's clock and this instance's differ by more than this."""
MAX_REPLAY = 60_000
"""Failed adjustments kept for a replay by default: ~290 bytes each queued (tracemalloc,
a TPM and a quota settle per request, batches of 10), so ~17 MB at most; 3 s of settles at
10,000 a second, far longer at usual rates (the oldest are dropped beyond it)."""
SLIDING_REPLAY_MS = 120_000
"""A failed adjustment of a sliding counter is replayed for this long at most (ms after the
failure): its bucket has left every window by then (the limiter's are 61 s)."""
_PERIOD_MAX_MS = {
    "hourly": 3_600_000,
    "daily": 25 * 3_600_000,  # a day of 25 hours at a daylight-saving change
    "weekly": 7 * 86_400_000 + 3_600_000,
    "monthly": 31 * 86_400_000 + 3_600_000,
    "yearly": 366 * 86_400_000 + 3_600_000,
}
REDIS_ORIGIN = "redis"
FALLBACK_ORIGIN = "fallback"
#: A quota's reservations in flight are a hash of their own, ``{prefix}{counter name}`` and
#: this (``admit.lua``). No counter's name ends so (they end in ``:tpm``, ``:rpm`` or the
#: quota period's start).
HELD_SUFFIX = ":held"
#: A quota's origin (``admit.lua``: when its key was created; ``seed.lua``: its seed is in),
#: a hash ``{prefix}{counter name}`` and this, expiring with the quota key.
ORIGIN_SUFFIX = ":origin"


def _script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(slots=True)
class RedisStoreStats:
    """Counters for metrics: outages begun, admissions decided while Redis was down
    (by the fallback, or refused when failing closed); adjustments (settles, releases) that
    failed (each then queued for a replay), replayed since, and dropped (the queue full,
    their window over before Redis answered again, or an error of the script itself)."""

    outages: int = 0
    fallback_admissions: int = 0
    refused_admissions: int = 0
    failed_adjustments: int = 0
    replayed_adjustments: int = 0
    dropped_adjustments: int = 0


@dataclass(slots=True)
class _Replay:
    """Failed adjustments of one batch, to send again under its key (``None``: the batch
    never ran, any key will do), before ``resend_by`` (``loop.time()``; ``None``: any time,
    the batch never ran; after it the batch is dropped: ``BatchFailed``). Per adjustment:
    the adjustment and until when (epoch ms, the gateway's clock) it is worth replaying."""

    batch_key: str | None
    items: list[tuple[Adjustment, int]]
    resend_by: float | None = None


class RedisStore:
    """A :class:`~sluicegate.limits.store.CounterStore` on Redis (see the module docstring).

    ``url_or_client`` is a ``redis://`` URL (the store then owns the client: a blocking pool
    of ``max_connections``, ``socket_timeout_s`` timeouts, one immediate reconnect after a
    dropped connection) or a ``redis.asyncio.Redis`` the caller owns (give it a
    ``BlockingConnectionPool`` and short timeouts too: any Redis error counts as an outage).
    ``prefix`` starts every key (give each gateway deployment its own). ``time_source``:
    whose clock the sliding windows run on, ``"redis"`` or ``"gateway"`` (``clock``; the
    module docstring). ``max_replay``: how many failed adjustments wait for a replay at most.
    Safe for concurrent use from one event loop.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        prefix: str,
        clock: Clock,
        fail_mode: FailMode = "open",
        *,
        retry_interval_s: float = 5.0,
        socket_timeout_s: float = 0.5,
        max_connections: int = 64,
        fallback: MemoryStore | None = None,
        time_source: TimeSource = "gateway",
        max_replay: int = MAX_REPLAY,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', not {fail_mode!r}")
        if time_source not in ("redis", "gateway"):
            raise ValueError(f"time_source must be 'redis' or 'gateway', not {time_source!r}")
        if isinstance(url_or_client, str):
            # A blocking pool: a burst of admissions waits for a connection instead of
            # failing with "too many connections" (which would look like an outage).
            pool = aioredis.BlockingConnectionPool.from_url(
                url_or_client,
                max_connections=max_connections,
                timeout=socket_timeout_s * 4,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # Reconnect once at once after a dropped connection (a restarted server),
                # but never repeat a timed-out script: it may have run and charged.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self.prefix = prefix
        self.fail_mode: FailMode = fail_mode
        self.retry_interval_s = retry_interval_s
        self.stats = RedisStoreStats()
        self._clock = clock
        self._fallback = fallback if fallback is not None else MemoryStore(FALLBACK_ORIGIN)
        # Calls of one event-loop turn share a pipeline (see limits/redis_batch.py).
        self._scripts = ScriptBatcher(
            self._client,
            {"admit": _script("admit.lua"), "adjust": _script("adjust.lua")},
            # A batch's key: under the prefix (its ACL, its hash slot); no counter is
            # named "batch:…".
            key_prefix=f"{prefix}batch:",
        )
        self._down_until: float | None = None
        self.time_source: TimeSource = time_source
        self._time_arg = "r" if time_source == "redis" else "g"  # admit.lua's ARGV[5]
        #: Redis's clock minus this instance's, in seconds, at the last admission in Redis.
        self.clock_skew_s: float | None = None
        self._skew_warned = False
        # Only on Redis's clock: on the gateway's, a test's fake clock is far off on purpose.
        self._warn_skew = time_source == "redis"
        self.max_replay = max_replay
        # Failed adjustments by batch (insertion order: oldest first), and how many in all.
        self._replays: dict[str, _Replay] = {}
        self._replay_count = 0
        self._replay_serial = 0
        self._replaying: str | None = None  # the group being sent
        self._replay_task: asyncio.Task[None] | None = None
        #: Called with a quota counter's name when an admission created its key (seeding).
        self.quota_created: Callable[[str], None] | None = None
        self._seed_script = self._client.register_script(_script("seed.lua"))

    @property
    def batching(self) -> BatchStats:
        """Pipelines sent and script calls they carried (calls / pipelines = batching)."""
        return self._scripts.stats

    @property
    def available(self) -> bool:
        """False from a failed call until Redis answers again."""
        return self._down_until is None

    def __repr__(self) -> str:
        state = "up" if self.available else "down"
        return (
            f"RedisStore(prefix={self.prefix!r}, fail_mode={self.fail_mode!r}, {state}, "
            f"outages={self.stats.outages}, fallback={self._fallback!r})"
        )

    async def admit(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None = None
    ) -> StoreResult:
        if not self._should_try_redis():
            return self._while_down(counters, now_ms, arrived_ms)
        prefix = self.prefix
        keys = [prefix + counter.name for counter in counters]
        # ARGV[6], the arrival: a created quota's origin "since", on the gateway's clock (the
        # ledger's) even when the windows run on Redis's.
        args: list[Any] = [
            now_ms, FIXED_GRACE_MS, QUOTA_HELD_BUCKET_MS, QUOTA_HELD_BUCKETS, self._time_arg,
            now_ms if arrived_ms is None else arrived_ms,
        ]  # fmt: skip
        for counter in counters:
            if counter.kind == "sliding":
                kind = "r" if counter.reserve else "s"  # "r": kept in flight (admit.lua)
                args += [
                    kind, counter.limit, counter.cost, counter.window_ms, counter.bucket_ms, 0,
                ]  # fmt: skip
            else:
                held = 0
                name = prefix + counter.name
                if counter.reserve:  # its reservations in flight: a key after the counters'
                    keys.append(name + HELD_SUFFIX)
                    held = len(keys)
                keys.append(name + ORIGIN_SUFFIX)  # written when admit.lua creates the quota
                args += ["f", counter.limit, counter.cost, counter.end_ms, held, len(keys)]
        try:
            reply = await self._scripts.call("admit", keys, args)
        except RedisError as exc:
            self._mark_down(exc)
            return self._while_down(counters, now_ms, arrived_ms)
        self._mark_up()
        n = len(counters)
        values = [int(value) for value in reply]
        skew = (values[-1] - now_ms) / 1000  # Redis's time comes last (admit.lua)
        self.clock_skew_s = skew
        if (
            skew > SKEW_WARNING_S or skew < -SKEW_WARNING_S
        ) != self._skew_warned and self._warn_skew:
            self._skew_changed(skew)
        if values[0] != 0:
            states = tuple(
                CounterState(values[1 + i], values[1 + n + i], values[1 + 2 * n + i])
                for i in range(n)
            )
            if values[0] == 2:  # a quota key created (admit.lua): rare, once per period
                self._created(counters, values[1 + 3 * n : 1 + 4 * n])
            # When the script ran, on its clock (admit.lua's `now`, a created quota's
            # "created"): the replay guard's reference (adjust.lua).
            admitted_ms = values[-1] if self._time_arg == "r" else now_ms
            return StoreResult(True, states, REDIS_ORIGIN, admitted_ms)
        # A refusal also says what is in flight (after the slots).
        states = tuple(
            CounterState(
                values[1 + i], values[1 + n + i], values[1 + 2 * n + i], values[1 + 3 * n + i]
            )
            for i in range(n)
        )
        return StoreResult(False, states, REDIS_ORIGIN)

    async def adjust(self, adjustments: Sequence[Adjustment], origin: str) -> None:
        if not adjustments:
            return
        if origin != REDIS_ORIGIN:
            self._fallback.adjust_sync(adjustments, origin)
            return
        # No _should_try_redis(): always tried (module docstring).
        prefix = self.prefix
        keys: list[str] = []
        args: list[Any] = []
        for adjustment in adjustments:
            if adjustment.kind == "sliding":
                keys.append(prefix + adjustment.name)
                args += ["s", adjustment.slot, adjustment.delta, adjustment.reserved]
                continue
            if adjustment.delta:
                keys.append(prefix + adjustment.name)
                args += ["f", adjustment.slot, adjustment.delta, 0]
            if adjustment.reserved:  # no longer in flight: off the quota's held key
                keys.append(prefix + adjustment.name + HELD_SUFFIX)
                args += ["h", adjustment.slot, 0, adjustment.reserved]
        if not keys:
            return
        try:
            await self._scripts.call("adjust", keys, args)
        except RedisError as exc:
            self._mark_down(exc)
            self.stats.failed_adjustments += len(adjustments)
            if isinstance(exc, ResponseError) and not needs_reconnect(exc):
                self.stats.dropped_adjustments += len(adjustments)  # the script's own error
                return
            self._queue(exc, adjustments)
            return
        self._mark_up()

    @property
    def queued_adjustments(self) -> int:
        """Failed adjustments waiting to be replayed."""
        return self._replay_count

    def _queue(self, exc: RedisError, adjustments: Sequence[Adjustment]) -> None:
        """Keep the failed ``adjustments`` for a replay (module docstring): with the key of
        their batch when it may have run, each with until when it matters."""
        # A batch that may have run goes again under its key (before resend_by only); one
        # that certainly did not under a new one, whenever.
        resend_by = exc.resend_by if isinstance(exc, BatchFailed) else None
        batch_key = (
            exc.batch_key if isinstance(exc, BatchFailed) and resend_by is not None else None
        )
        if batch_key is not None and batch_key == self._replaying:
            # Its batch is being replayed already (cannot happen: a batch's callers all learn
            # of its failure in one turn): sending these under its key would not run them.
            self.stats.dropped_adjustments += len(adjustments)
            return
        now_ms = int(self._clock.now() * 1000)
        # The adjustments themselves (their names are the limiter's, shared), not their
        # keys and arguments: ~290 bytes an adjustment queued, not ~580 (MAX_REPLAY).
        items: list[tuple[Adjustment, int]] = []
        for adjustment in adjustments:
            if adjustment.kind == "sliding":
                items.append((adjustment, now_ms + SLIDING_REPLAY_MS))
                continue
            if not adjustment.delta and not adjustment.reserved:
                continue
            parsed = parse_quota_counter_name(adjustment.name)
            if parsed is not None and parsed[1] in _PERIOD_MAX_MS:
                until = parsed[2] + _PERIOD_MAX_MS[parsed[1]] + FIXED_GRACE_MS
            else:  # not a name of ours: as long as a reservation counts as in flight
                until = now_ms + QUOTA_HELD_WINDOW_MS
            items.append((adjustment, until))
        if not items:
            return
        if batch_key is None:
            self._replay_serial += 1
            group_id = f"new:{self._replay_serial}"
        else:
            group_id = batch_key
        group = self._replays.get(group_id)
        if group is None:
            group = self._replays[group_id] = _Replay(batch_key, [], resend_by)
        group.items += items
        self._replay_count += len(items)
        # Bounded: the oldest go first (the nearest to the end of their windows).
        while self._replay_count > self.max_replay:
            oldest_id = next(iter(self._replays))
            oldest = self._replays[oldest_id]
            excess = min(self._replay_count - self.max_replay, len(oldest.items))
            if oldest_id == self._replaying:  # being sent: drop the newest instead
                group.items = group.items[
                    : len(group.items) - (self._replay_count - self.max_replay)
                ]
                excess = self._replay_count - self.max_replay
            else:
                del oldest.items[:excess]
                if not oldest.items:
                    del self._replays[oldest_id]
            self._replay_count -= excess
            self.stats.dropped_adjustments += excess

    async def _replay(self) -> None:
        """Send the queued adjustments again, oldest batch first, until the queue is empty
        or Redis fails again (the rest wait for the next success)."""
        loop = asyncio.get_running_loop()
        try:
            while self._replays:
                group_id, group = next(iter(self._replays.items()))
                if group.resend_by is not None and loop.time() >= group.resend_by:
                    # It may have run, and its key may be gone: a resend could apply it twice.
                    self._replay_count -= len(group.items)
                    self.stats.dropped_adjustments += len(group.items)
                    del self._replays[group_id]
                    continue
                now_ms = int(self._clock.now() * 1000)
                live = [item for item in group.items if item[1] > now_ms]
                expired = len(group.items) - len(live)
                self._replay_count -= expired
                self.stats.dropped_adjustments += expired
                group.items = live
                if not live:
                    del self._replays[group_id]
                    continue
                keys: list[str] = []
                args: list[Any] = []
                for adjustment, _ in live:
                    self._replay_call(adjustment, keys, args)
                self._replaying = group_id
                try:
                    replies = await self._scripts.resend(group.batch_key, [("adjust", keys, args)])
                except RedisError as exc:
                    if (
                        isinstance(exc, BatchFailed)
                        and exc.resend_by is not None
                        and group.batch_key is None
                    ):
                        # This send may have run: its key now. (Under the batch's own key,
                        # the first send's deadline stays: a stored reply keeps its TTL.)
                        group.batch_key = exc.batch_key
                        group.resend_by = exc.resend_by
                    self._mark_down(exc)
                    return
                finally:
                    self._replaying = None
                failure = replies[0]
                if isinstance(failure, ResponseError) and needs_reconnect(failure):
                    self._mark_down(failure)  # nothing ran (a replica, a loading server)
                    return
                # Sent (or it had run: the batch's key answered). A script error of its own
                # would fail again: dropped.
                sent = len(group.items)
                del self._replays[group_id]
                self._replay_count -= sent
                if isinstance(failure, ResponseError):
                    self.stats.dropped_adjustments += sent
                else:
                    self.stats.replayed_adjustments += sent
        finally:
            self._replay_task = None

    def _replay_call(self, adjustment: Adjustment, keys: list[str], args: list[Any]) -> None:
        """Append ``adjustment``'s keys and ``adjust.lua`` arguments for a replay."""
        name = self.prefix + adjustment.name
        if adjustment.kind == "sliding":
            keys.append(name)
            args += ["s", adjustment.slot, adjustment.delta, adjustment.reserved]
            return
        if adjustment.delta and adjustment.admitted_ms:
            # Only to the quota key it was charged to: skipped when the key was created after
            # the admission (adjust.lua's guard).
            keys += [name + ORIGIN_SUFFIX, name]
            args += ["g", adjustment.admitted_ms, 0, 0, "f", adjustment.slot, adjustment.delta, 0]
        elif adjustment.delta:  # the admission's time unknown: no guard
            keys.append(name)
            args += ["f", adjustment.slot, adjustment.delta, 0]
        if adjustment.reserved:
            keys.append(name + HELD_SUFFIX)
            args += ["h", adjustment.slot, 0, adjustment.reserved]

    def _created(self, counters: Sequence[Counter], flags: list[int]) -> None:
        hook = self.quota_created
        if hook is None:
            return
        for counter, flag in zip(counters, flags, strict=False):
            if flag:
                hook(counter.name)

    async def quota_origin(self, name: str) -> QuotaOrigin | None:
        """From the quota's origin key (one HMGET; not batched: for the seeder, off the
        request path). Raises ``RedisError``."""
        since, seeded = await self._client.hmget(
            self.prefix + name + ORIGIN_SUFFIX, ["since", "seeded"]
        )
        if since is None:
            return None
        return QuotaOrigin(int(since), seeded is not None)

    async def apply_seed(self, name: str, since_ms: int, tokens: int) -> bool:
        """``seed.lua``: atomic and idempotent across instances. Raises ``RedisError``."""
        key = self.prefix + name
        applied = await self._seed_script(
            keys=[key, key + ORIGIN_SUFFIX], args=[str(since_ms), max(tokens, 0)]
        )
        return int(applied) == 1

    async def replayed(self) -> None:
        """Wait until the replay of failed adjustments in progress, if any, has ended (sent
        everything queued, or stopped at a failure)."""
        task = self._replay_task
        if task is not None:
            await asyncio.shield(task)

    async def aclose(self) -> None:
        # A replay in progress delivers what it can first (each send has its deadline).
        await self.replayed()
        await self._scripts.aclose()
        if self._owns_client:
            await self._client.aclose()

    def _should_try_redis(self) -> bool:
        if self._down_until is None:
            return True
        now = self._clock.monotonic()
        if now < self._down_until:
            return False
        # Claim the probe: concurrent callers keep using the fallback until it answers.
        self._down_until = now + self.retry_interval_s
        return True

    def _while_down(
        self, counters: Sequence[Counter], now_ms: int, arrived_ms: int | None
    ) -> StoreResult:
        if self.fail_mode == "closed":
            self.stats.refused_admissions += 1
            until = self._down_until or 0.0
            wait = max(until - self._clock.monotonic(), 0.0) or self.retry_interval_s
            raise StoreUnavailable("the Redis limit store is unavailable", wait)
        self.stats.fallback_admissions += 1
        return self._fallback.admit_sync(counters, now_ms, arrived_ms)

    def _mark_down(self, exc: RedisError) -> None:
        if isinstance(exc, BatchFailed):
            exc = exc.error
        if self._down_until is None:
            self.stats.outages += 1
            action = (
                "failing open: enforcing limits per instance in memory"
                if self.fail_mode == "open"
                else "failing closed: refusing requests with 503"
            )
            logger.warning(
                "Redis limit store unavailable (%s: %s); %s; retrying every %.1f s",
                type(exc).__name__,
                exc,
                action,
                self.retry_interval_s,
            )
        self._down_until = self._clock.monotonic() + self.retry_interval_s

    def _mark_up(self) -> None:
        if self._down_until is not None:
            logger.info("Redis limit store is reachable again; counting in Redis")
            self._down_until = None
        if self._replays and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._replay())

    def _skew_changed(self, skew: float) -> None:
        """Log when the skew passes :data:`SKEW_WARNING_S`, and when it is back under half
        of it (not at every admission in between)."""
        if not self._skew_warned:
            self._skew_warned = True
            logger.warning(
                "Redis's clock and this instance's differ by %.1f s (Redis %s): quota periods "
                "are cut by this instance's clock; keep the clocks in sync (NTP)",
                abs(skew),
                "ahead" if skew > 0 else "behind",
            )
        elif abs(skew) < SKEW_WARNING_S / 2:
            self._skew_warned = False
            logger.info("Redis's clock and this instance's agree again (%.3f s)", skew)
