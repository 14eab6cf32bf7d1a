"""Redis counter store for the cluster mode: one Lua script round trip per admission.

The scripts live in ``limits/lua/`` (``admit.lua``, ``adjust.lua``) and are run with
EVALSHA, the calls of one event-loop turn sharing one pipeline (``limits/redis_batch.py``;
scripts are re-loaded automatically after a Redis restart). Keys are
``{prefix}{counter name}``; sliding counters are hashes of one-second buckets with a TTL of
window + one bucket, quota counters are integers expiring at period end + grace (with, beside
each, ``…:held``, a hash of its reservations in flight by minute, expiring 11 minutes after
the last, and ``…:origin``, a hash of when the quota key was created and whether the
ledger's earlier usage was added to it, ``limits/seeding.py``, expiring with the quota key),
so every key expires on its own (so does ``{prefix}batch:…``, a batch's replies
kept a few seconds for a resend: ``limits/redis_batch.py``). All keys of one admission are
touched by one script, so on a Redis Cluster they must share a hash slot: put a hash tag in
the prefix (``"{sg}:limits:"``).

Time: the gateway's injected clock is passed to the scripts (see ``admit.lua`` for why).

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
One that succeeds marks Redis up again; one that fails is dropped and counted (the estimate
stays charged until the window ends). A script that timed
out may still have run in Redis, so the request can be charged there and in the fallback:
the error is on the side of counting too much, never of admitting too much.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sluicegate.clock import Clock
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.redis_batch import BatchStats, ScriptBatcher
from sluicegate.limits.store import (
    FIXED_GRACE_MS,
    QUOTA_HELD_BUCKET_MS,
    QUOTA_HELD_BUCKETS,
    Adjustment,
    Counter,
    CounterState,
    QuotaOrigin,
    StoreResult,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

FailMode = Literal["open", "closed"]
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
    (by the fallback, or refused when failing closed) and adjustments dropped."""

    outages: int = 0
    fallback_admissions: int = 0
    refused_admissions: int = 0
    dropped_adjustments: int = 0


class RedisStore:
    """A :class:`~sluicegate.limits.store.CounterStore` on Redis (see the module docstring).

    ``url_or_client`` is a ``redis://`` URL (the store then owns the client: a blocking pool
    of ``max_connections``, ``socket_timeout_s`` timeouts, one immediate reconnect after a
    dropped connection) or a ``redis.asyncio.Redis`` the caller owns (give it a
    ``BlockingConnectionPool`` and short timeouts too: any Redis error counts as an outage).
    ``prefix`` starts every key (give each gateway deployment its own). Safe for concurrent
    use from one event loop.
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
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', not {fail_mode!r}")
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

    async def admit(self, counters: Sequence[Counter], now_ms: int) -> StoreResult:
        if not self._should_try_redis():
            return self._while_down(counters, now_ms)
        prefix = self.prefix
        keys = [prefix + counter.name for counter in counters]
        args: list[Any] = [now_ms, FIXED_GRACE_MS, QUOTA_HELD_BUCKET_MS, QUOTA_HELD_BUCKETS]
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
            return self._while_down(counters, now_ms)
        self._mark_up()
        n = len(counters)
        values = [int(value) for value in reply]
        if values[0] != 0:
            states = tuple(
                CounterState(values[1 + i], values[1 + n + i], values[1 + 2 * n + i])
                for i in range(n)
            )
            if values[0] == 2:  # a quota key created (admit.lua): rare, once per period
                self._created(counters, values[1 + 3 * n :])
            return StoreResult(True, states, REDIS_ORIGIN)
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
            self.stats.dropped_adjustments += len(adjustments)
            return
        self._mark_up()

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

    async def aclose(self) -> None:
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

    def _while_down(self, counters: Sequence[Counter], now_ms: int) -> StoreResult:
        if self.fail_mode == "closed":
            self.stats.refused_admissions += 1
            until = self._down_until or 0.0
            wait = max(until - self._clock.monotonic(), 0.0) or self.retry_interval_s
            raise StoreUnavailable("the Redis limit store is unavailable", wait)
        self.stats.fallback_admissions += 1
        return self._fallback.admit_sync(counters, now_ms)

    def _mark_down(self, exc: RedisError) -> None:
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
