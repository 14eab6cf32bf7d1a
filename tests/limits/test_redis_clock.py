"""Whose clock the shared windows run on (docs/limits.md, "Time"), on the real Redis.

Each gateway instance has a clock of its own (fake here, so that a skew is exact); with
``time_source="redis"`` the sliding windows run on Redis's ``TIME`` instead, so instances
whose clocks disagree still share one window. The gateway's clock still cuts quota periods:
the store measures its skew against Redis at every admission, exports it and warns.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.config.model import RedisConfig
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import RedisStore
from sluicegate.metrics.registry import GatewayMetrics

TPM = LimitPolicy(tokens_per_minute=1000)
QUOTA = LimitPolicy(token_quota=1000, token_quota_period="monthly")


@pytest.mark.parametrize(("time_source", "admitted"), [("redis", 1000), ("gateway", 2000)])
async def test_two_instances_30_s_apart_share_one_window_on_redis_time(
    redis_client: aioredis.Redis, redis_prefix: str, time_source: Any, admitted: int
) -> None:
    """Instance B's clock is 30 s ahead of A's. A fills the shared TPM counter, then 31 s
    pass (on both fake clocks): on B's clock A's buckets have left the window, on A's they
    have not. On Redis's clock (which the fake clocks do not move) the window holds exactly
    the limit; on the gateways' clocks (the defect: the behaviour before Redis time) B
    admits a whole limit more within the minute."""
    clock_a = FakeClock(start=1_700_000_040.0)
    clock_b = FakeClock(start=1_700_000_070.0)
    store_a = RedisStore(redis_client, redis_prefix, clock_a, "closed", time_source=time_source)
    store_b = RedisStore(redis_client, redis_prefix, clock_b, "closed", time_source=time_source)
    a, b = Limiter(store_a, clock_a), Limiter(store_b, clock_b)
    request = [LimitRequest("sub:shared", TPM, 100)]
    total = 0
    try:
        for _ in range(10):
            admission = await a.admit(request)
            assert admission.allowed
            await a.settle(admission.reservation, 100)
            total += 100
        assert not (await a.admit(request)).allowed
        assert not (await b.admit(request)).allowed
        for clock in (clock_a, clock_b):
            clock.advance(31)
        for limiter in (b, a, b):
            while (admission := await limiter.admit(request)).allowed:
                await limiter.settle(admission.reservation, 100)
                total += 100
                assert total <= 2000
            assert admission.status == 429 and admission.retry_after_s > 0
    finally:
        await store_a.aclose()
        await store_b.aclose()
    assert total == admitted


async def test_the_clock_skew_is_measured_exported_and_warned_about_once(
    redis_client: aioredis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every admission's reply carries Redis's time: the store keeps the skew (Redis minus
    this instance), /metrics exports it as sluicegate_redis_clock_skew_seconds, and a skew
    over 1 s is logged once (again only after it was back in line)."""
    clock = FakeClock(start=time.time() - 30)  # this instance is 30 s behind Redis
    store = RedisStore(redis_client, redis_prefix, clock, "closed", time_source="redis")
    metrics = GatewayMetrics()
    metrics.watch_limit_store(store)
    limiter = Limiter(store, clock)
    request = [LimitRequest("sub:skew", QUOTA, 10)]
    assert b"sluicegate_redis_clock_skew_seconds" not in metrics.render()  # not known yet
    try:
        with caplog.at_level(logging.INFO, logger="sluicegate.limits.redis_store"):
            for _ in range(3):
                assert (await limiter.admit(request)).allowed
            assert store.clock_skew_s == pytest.approx(30, abs=2)
            [line] = [
                line
                for line in metrics.render().decode().splitlines()
                if line.startswith("sluicegate_redis_clock_skew_seconds ")
            ]
            assert float(line.split()[1]) == pytest.approx(30, abs=2)
            assert [r.levelname for r in caplog.records] == ["WARNING"]
            assert "differ by 30" in caplog.records[0].getMessage()
            assert "Redis ahead" in caplog.records[0].getMessage()

            clock.advance(30)  # in line again: told once, and the warning is re-armed
            assert (await limiter.admit(request)).allowed
            assert store.clock_skew_s == pytest.approx(0, abs=2)
            clock.advance(30)  # now 30 s ahead
            for _ in range(2):
                assert (await limiter.admit(request)).allowed
            assert store.clock_skew_s == pytest.approx(-30, abs=2)
        assert [r.levelname for r in caplog.records] == ["WARNING", "INFO", "WARNING"]
        assert "Redis behind" in caplog.records[2].getMessage()
    finally:
        await store.aclose()


async def test_a_quota_period_stays_the_gateways_on_redis_time(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """On Redis's clock a quota still counts in the period the gateway names, keeps its key
    until that period's end + grace (the gateway's), and a refusal waits until that end: a
    gateway clock far from Redis's (a fake one) changes nothing about the quota."""
    clock = FakeClock(start=1_700_000_040.0)  # 2023-11-14T22:14Z: 16 days before the end
    store = RedisStore(redis_client, redis_prefix, clock, "closed", time_source="redis")
    limiter = Limiter(store, clock)
    try:
        admitted = await limiter.admit([LimitRequest("sub:q", QUOTA, 900)])
        assert admitted.allowed
        held = await limiter.admit([LimitRequest("sub:q", QUOTA, 200)])
        assert held.status == 429  # in flight, in a minute of Redis's clock: a short wait
        assert held.code == "TokenQuotaInFlight" and held.retry_after_s == 5
        await limiter.settle(admitted.reservation, 900)
        refused = await limiter.admit([LimitRequest("sub:q", QUOTA, 200)])
        assert refused.status == 403 and refused.code == "TokenQuotaExceeded"
        until_period_end = 1_701_388_800 - 1_700_000_040  # 2023-12-01T00:00Z
        assert refused.retry_after_s == pytest.approx(until_period_end, abs=1)
        [key] = [
            key
            async for key in redis_client.scan_iter(match=redis_prefix + "sub:q:quota:*")
            if key.decode().rsplit(":", 1)[-1].isdigit()
        ]
        ttl_ms = await redis_client.pttl(key)
        assert ttl_ms == pytest.approx((until_period_end + 600) * 1000, abs=5_000)
    finally:
        await store.aclose()


def test_the_configuration_runs_the_windows_on_redis_time_by_default() -> None:
    assert RedisConfig().clock == "redis"
    assert RedisConfig(clock="gateway").clock == "gateway"
