"""Redis failover and stalls, on private redis-servers of the test's own.

A failover behind one address: a TCP proxy of the test's (as a Kubernetes Service, HAProxy or
a DNS name would) sends each new connection to the current primary; the two servers then swap
roles. The gateway must follow without a restart, which only a new connection can do.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import HELD_SUFFIX, ORIGIN_SUFFIX, RedisStore
from tests.limits.failover_proxy import failover, wait_until
from tests.support.redis_server import RedisServer

POLICY = LimitPolicy(tokens_per_minute=1_000_000)
QUOTA = LimitPolicy(
    tokens_per_minute=1_000_000, token_quota=1_000_000, token_quota_period="monthly"
)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_limit_store_follows_a_failover_behind_one_address(clock: FakeClock) -> None:
    async with failover() as (proxy, swap):
        await _limit_store_follows(proxy.url, swap, clock)


async def _limit_store_follows(
    url: str, swap: Callable[[], Awaitable[None]], clock: FakeClock
) -> None:
    store = RedisStore(url, f"sgtest:{uuid.uuid4().hex}:", clock, fail_mode="closed")
    limiter = Limiter(store, clock)
    try:
        assert (await limiter.admit([LimitRequest("sub:a", POLICY, 10)])).allowed
        await swap()
        first = await limiter.admit([LimitRequest("sub:a", POLICY, 10)])
        # The first try may still reach the demoted node (refused: 503), never more.
        assert first.allowed or first.status == 503

        async def recovered() -> bool:
            clock.advance(store.retry_interval_s)
            return (await limiter.admit([LimitRequest("sub:a", POLICY, 10)])).allowed

        await wait_until(recovered, "admissions in Redis again after the failover")
        assert store.available
    finally:
        await store.aclose()


async def test_settles_after_a_short_stall_reach_redis(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(redis_server.url, prefix, clock, fail_mode="closed")
    limiter = Limiter(store, clock)
    probe = aioredis.Redis.from_url(redis_server.url)
    pauser = aioredis.Redis.from_url(redis_server.url)
    try:
        reservations = []
        for _ in range(20):
            admission = await limiter.admit([LimitRequest("sub:t", QUOTA, 1100)])
            assert admission.allowed and admission.reservation is not None
            reservations.append(admission.reservation)
        [quota_key] = [
            key
            async for key in probe.scan_iter(match=prefix + "sub:t*quota*")
            if not key.endswith((HELD_SUFFIX.encode(), ORIGIN_SUFFIX.encode()))
        ]
        assert int(await probe.get(quota_key) or -1) == 22_000

        await pauser.client_pause(800)  # one stall, longer than the 0.5 s timeout
        stalled = await limiter.admit([LimitRequest("sub:other", QUOTA, 1)])
        assert stalled.status == 503  # timed out: Redis is marked down
        assert not store.available
        await probe.ping()  # answered once the pause is over

        for reservation in reservations:  # the 20 requests end, 100 tokens each
            await limiter.settle(reservation, 100)
        assert store.stats.dropped_adjustments == 0
        assert int(await probe.get(quota_key) or -1) == 2_000
        held = await probe.hgetall(quota_key + HELD_SUFFIX.encode())
        assert sum(int(v) for v in held.values()) == 0
        assert store.available  # a settle that got through marks Redis up again
    finally:
        await store.aclose()
        await probe.aclose()
        await pauser.aclose()
