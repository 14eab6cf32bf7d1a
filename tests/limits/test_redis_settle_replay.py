"""Settles that fail while Redis is unreachable are replayed when it answers again, once.

On private redis-servers of the test's own (``tests/support/redis_server.py``), stopped and
started again, and behind a TCP proxy of the test's that can lose a reply after Redis ran the
command and then refuse connections for a while. The store's retry interval runs on the fake
clock; only the servers take real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import Reservation
from sluicegate.limits.limiter import Limiter, LimitRequest, quota_counter_name
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import HELD_SUFFIX, ORIGIN_SUFFIX, RedisStore
from sluicegate.limits.store import Adjustment
from sluicegate.metrics.registry import GatewayMetrics
from tests.limits.failover_proxy import ReplyDroppingProxy
from tests.support.redis_server import RedisServer

QUOTA = LimitPolicy(tokens_per_minute=100_000, token_quota=100_000, token_quota_period="monthly")


@pytest.fixture
def persistent_server() -> Iterator[RedisServer]:
    """A private Redis whose data survives a stop and start (AOF, written at shutdown)."""
    with RedisServer(extra_args=("--appendonly", "yes")) as server:
        yield server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private Redis that starts empty again after a stop (a lost cache node)."""
    with RedisServer() as private:
        yield private


def probe_client(url: str) -> aioredis.Redis:
    """The test's own client, reconnecting once after a restart dropped its connection."""
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1))


@contextlib.asynccontextmanager
async def replaying(
    server_url: str, clock: FakeClock, *, store_url: str | None = None, **options: Any
) -> AsyncIterator[tuple[str, RedisStore, Limiter, aioredis.Redis]]:
    """A fail-closed ``RedisStore`` under a fresh key prefix on ``store_url`` (the server's
    own by default, else a proxy in front of it) with these ``options``, its ``Limiter``, and
    a ``probe_client`` of the server itself: (prefix, store, limiter, client), both clients
    closed at the end."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(store_url or server_url, prefix, clock, fail_mode="closed", **options)
    client = probe_client(server_url)
    try:
        yield prefix, store, Limiter(store, clock), client
    finally:
        await store.aclose()
        await client.aclose()


async def counters(client: aioredis.Redis, prefix: str, key: str) -> tuple[int, int, int]:
    """``key``'s quota counter, its TPM window's sum and its quota's tokens in flight."""
    quota = tpm = held = -1
    async for name in client.scan_iter(match=f"{prefix}{key}:*"):
        text = name.decode()
        if text.endswith(":tpm"):
            tpm = int(await client.hget(name, "-1") or -1)
        elif text.endswith(HELD_SUFFIX):
            held = sum(int(v) for v in (await client.hgetall(name)).values())
        elif not text.endswith(ORIGIN_SUFFIX) and ":quota:" in text:
            quota = int(await client.get(name) or -1)
    return quota, tpm, max(held, 0)


async def recover(store: RedisStore, limiter: Limiter, clock: FakeClock) -> None:
    """After the retry interval, an admission probes Redis (of another key) and succeeds;
    the replay it starts has ended when this returns."""
    clock.advance(store.retry_interval_s)
    probe = await limiter.admit([LimitRequest("sub:probe", QUOTA, 1)])
    assert probe.allowed and probe.reservation is not None
    assert probe.reservation.origin == "redis"
    await store.replayed()


async def admit(limiter: Limiter, key: str, tokens: int) -> Reservation:
    admission = await limiter.admit([LimitRequest(key, QUOTA, tokens)])
    assert admission.allowed and admission.reservation is not None
    assert admission.reservation.origin == "redis"
    return admission.reservation


async def test_a_settle_that_failed_lands_once_redis_is_back(
    persistent_server: RedisServer, clock: FakeClock
) -> None:
    """Admitted with an estimate of 5,000, Redis stops, the request settles at 200: the
    settle fails and is queued, not dropped. Once Redis is back (with its data), the replay
    leaves the quota and the TPM window at the real usage and nothing in flight."""
    async with replaying(persistent_server.url, clock) as (prefix, store, limiter, client):
        metrics = GatewayMetrics()
        metrics.watch_limit_store(store)
        reservation = await admit(limiter, "sub:t", 5000)
        assert await counters(client, prefix, "sub:t") == (5000, 5000, 5000)

        persistent_server.stop()
        await limiter.settle(reservation, 200)
        # Two adjustments (its TPM window's and its quota's), queued, not dropped.
        assert store.stats.failed_adjustments == 2 and store.queued_adjustments == 2
        assert b"sluicegate_limit_adjustments_queued 2.0" in metrics.render()

        persistent_server.start()
        assert await counters(client, prefix, "sub:t") == (5000, 5000, 5000)  # survived
        await recover(store, limiter, clock)
        assert await counters(client, prefix, "sub:t") == (200, 200, 0)
        assert store.queued_adjustments == 0
        assert (store.stats.replayed_adjustments, store.stats.dropped_adjustments) == (2, 0)
        rendered = metrics.render()
        assert b"sluicegate_limit_adjustments_replayed_total 2.0" in rendered
        assert b"sluicegate_limit_adjustments_queued 0.0" in rendered


@pytest.fixture
async def losing_proxy(server: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(server.port, refuse_after_drop=True)
    yield proxy
    await proxy.aclose()


async def test_a_settle_that_ran_before_its_reply_was_lost_is_replayed_once(
    server: RedisServer, losing_proxy: ReplyDroppingProxy, clock: FakeClock
) -> None:
    """Redis ran the settle's batch, the reply was lost and the resend refused: the store
    cannot tell, and queues it. The replay goes under the failed batch's key, which Redis
    still holds: nothing runs twice (a second refund of 4,800 would leave the quota at 0)."""
    url = await losing_proxy.start()
    async with replaying(server.url, clock, store_url=url) as (prefix, store, limiter, client):
        first = await admit(limiter, "sub:t", 5000)
        second = await admit(limiter, "sub:t", 5000)
        assert await counters(client, prefix, "sub:t") == (10_000, 10_000, 10_000)

        losing_proxy.armed = True
        await limiter.settle(first, 200)
        assert losing_proxy.dropped == 1
        assert store.queued_adjustments == 2
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # it ran

        losing_proxy.heal()
        await recover(store, limiter, clock)
        assert store.queued_adjustments == 0 and store.stats.replayed_adjustments == 2
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # once
        await limiter.settle(second, 300)
        assert await counters(client, prefix, "sub:t") == (500, 500, 0)


async def test_a_replay_leaves_a_quota_that_redis_lost_and_counted_anew_alone(
    server: RedisServer, clock: FakeClock
) -> None:
    """Redis restarts empty while the settle waits: the quota key is created again by the
    next admission (and would be seeded from the ledger, which has the real usage). The
    replayed refund of the lost estimate must not come off the new counter."""
    async with replaying(server.url, clock) as (prefix, store, limiter, client):
        reservation = await admit(limiter, "sub:t", 5000)
        server.stop()
        await limiter.settle(reservation, 200)
        assert store.queued_adjustments == 2
        server.start()  # empty
        clock.advance(store.retry_interval_s)
        await admit(limiter, "sub:t", 300)  # creates the quota key anew
        await store.replayed()
        assert store.stats.replayed_adjustments == 2
        assert (await counters(client, prefix, "sub:t"))[0] == 300  # not max(300 - 4800, 0)


async def test_the_queue_is_bounded_and_over_windows_are_dropped(
    server: RedisServer, clock: FakeClock
) -> None:
    """At most ``max_replay`` adjustments wait (the oldest go first, counted); a TPM
    window's settle is not replayed once its bucket has left every window, while a quota's
    still is (until its period and grace are over)."""
    tpm_only = LimitPolicy(tokens_per_minute=100_000)
    async with replaying(server.url, clock, max_replay=3) as (_, store, limiter, _):
        reservations = [await admit(limiter, f"sub:{n}", 1000) for n in range(2)]
        tpm = await limiter.admit([LimitRequest("sub:tpm", tpm_only, 1000)])
        assert tpm.allowed and tpm.reservation is not None
        server.stop()
        # Each settle of sub:n is two adjustments (its TPM window and its quota).
        for reservation in reservations:
            await limiter.settle(reservation, 100)
        await limiter.settle(tpm.reservation, 100)
        assert store.stats.failed_adjustments == 5
        assert store.queued_adjustments == 3 and store.stats.dropped_adjustments == 2
        server.start()  # empty: only the drop counts matter
        clock.advance(121)  # the TPM settles' buckets have left every window
        await recover(store, limiter, clock)
        assert store.queued_adjustments == 0
        # sub:0's two went for room; sub:1's and sub:tpm's TPM settles are over: sub:1's
        # quota settle is the one replayed.
        assert store.stats.dropped_adjustments == 4
        assert store.stats.replayed_adjustments == 1


async def test_a_settle_that_may_have_run_is_not_replayed_once_its_key_may_be_gone(
    server: RedisServer, losing_proxy: ReplyDroppingProxy, clock: FakeClock
) -> None:
    """As the lost-reply test above, but Redis answers again only after 6 s: longer than the
    failed batch's stored replies live (5 s at least, ``reply_ttl_ms``). A resend under its
    key would then run the settle again (a second refund of 4,800, the other request's 5,000
    in flight wiped: (400, 400, 0)); it is dropped and counted instead, as before replays."""
    url = await losing_proxy.start()
    async with replaying(server.url, clock, store_url=url) as (prefix, store, limiter, client):
        first = await admit(limiter, "sub:t", 5000)
        second = await admit(limiter, "sub:t", 5000)

        losing_proxy.armed = True
        await limiter.settle(first, 200)
        assert losing_proxy.dropped == 1 and store.queued_adjustments == 2
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # it ran

        await asyncio.sleep(6)  # real time: Redis's key TTL
        losing_proxy.heal()
        await recover(store, limiter, clock)
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # once
        assert store.queued_adjustments == 0
        assert (store.stats.replayed_adjustments, store.stats.dropped_adjustments) == (0, 2)
        await limiter.settle(second, 300)
        assert await counters(client, prefix, "sub:t") == (500, 500, 0)


async def test_a_replay_leaves_a_quota_key_created_after_its_admission_alone(
    persistent_server: RedisServer, clock: FakeClock
) -> None:
    """Redis loses the quota key after the admission (a FLUSH, as a restart without
    persistence would) and the next request creates it anew, all BEFORE the settle fails
    in a second outage (Redis keeps its data through that one). The replayed refund of an
    estimate the new key never held must not come off it: the guard compares the key's
    creation with the admission, not with the failure."""
    async with replaying(persistent_server.url, clock) as (prefix, store, limiter, client):
        reservation = await admit(limiter, "sub:t", 5000)
        clock.advance(61)  # the next request holds its tokens in flight in another minute
        await client.flushall()  # Redis lost its data
        later = await admit(limiter, "sub:t", 300)  # creates the quota key anew
        assert later.admitted_ms > reservation.admitted_ms
        assert await counters(client, prefix, "sub:t") == (300, 300, 300)

        persistent_server.stop()
        await limiter.settle(reservation, 200)
        assert store.queued_adjustments == 2
        persistent_server.start()  # with its data
        await recover(store, limiter, clock)
        assert store.stats.replayed_adjustments == 2
        # Not max(300 - 4800, 0): the refund was skipped (the TPM's bucket was lost too).
        assert await counters(client, prefix, "sub:t") == (300, 300, 300)


async def test_a_settle_that_never_reached_redis_is_replayed_after_any_outage(
    persistent_server: RedisServer, clock: FakeClock
) -> None:
    """Redis is down for longer than a batch's replies live. The first settle goes out on
    the connection Redis closed (it may have been sent: dropped after the outage); the next
    one finds Redis refusing connections, so it certainly did not run, and is replayed once
    Redis answers, however late."""
    async with replaying(persistent_server.url, clock) as (prefix, store, limiter, client):
        sent = await admit(limiter, "sub:a", 5000)
        refused = await admit(limiter, "sub:b", 5000)
        persistent_server.stop()
        await limiter.settle(sent, 200)
        await limiter.settle(refused, 300)
        assert store.stats.failed_adjustments == 4 and store.queued_adjustments == 4
        await asyncio.sleep(6)
        persistent_server.start()
        await recover(store, limiter, clock)
        assert await counters(client, prefix, "sub:a") == (5000, 5000, 5000)  # dropped
        assert await counters(client, prefix, "sub:b") == (300, 300, 0)  # replayed
        assert (store.stats.replayed_adjustments, store.stats.dropped_adjustments) == (2, 2)


async def test_the_queue_holds_at_most_about_twenty_megabytes_by_default(
    clock: FakeClock,
) -> None:
    """Settles failing against a port nobody listens on fill the queue: measured with
    tracemalloc, ``max_replay`` of them take under 20 MB (the limiter's counter names are
    shared by a subscription's requests; each settle a TPM and a quota adjustment)."""
    with RedisServer() as gone:
        url = gone.url
    store = RedisStore(url, f"sgtest:{uuid.uuid4().hex}:", clock, fail_mode="closed")
    # The limiter's counter names, made once per subscription.
    names = [
        (f"{key}:tpm", quota_counter_name(key, "monthly", 1_764_547_200_000))
        for key in (f"sub:{uuid.uuid4().hex[:24]}" for _ in range(100))
    ]
    settles = 2000
    try:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(settles // 10):  # batches of ten settles
                await store.adjust(
                    [
                        adjustment
                        for r in range(10)
                        for tpm, quota in [names[(n * 10 + r) % len(names)]]
                        for adjustment in (
                            Adjustment(tpm, "sliding", 1_764_547_260 + r, -800 - r, 1024),
                            Adjustment(quota, "fixed", 29_409_121, -800 - r, 1024, n + 1),
                        )
                    ],
                    "redis",
                )
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert store.queued_adjustments == 2 * settles
        per_adjustment = used / store.queued_adjustments
        assert store.max_replay * per_adjustment < 20_000_000, per_adjustment
    finally:
        await store.aclose()
