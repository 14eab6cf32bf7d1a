"""Redis going away and coming back, on a private redis-server of the test's own.

The store's retry interval runs on the fake clock's monotonic reading, so "a few seconds"
of outage is a clock advance; only starting and stopping the server takes real time.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import Admission
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import RedisStore
from tests.support.redis_server import RedisServer

POLICY = LimitPolicy(tokens_per_minute=1000)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as private:
        yield private


@pytest.fixture
async def open_store(server: RedisServer, clock: FakeClock) -> AsyncIterator[RedisStore]:
    store = RedisStore(server.url, f"sgtest:{uuid.uuid4().hex}:", clock, fail_mode="open")
    yield store
    await store.aclose()


@pytest.fixture
async def closed_store(server: RedisServer, clock: FakeClock) -> AsyncIterator[RedisStore]:
    store = RedisStore(server.url, f"sgtest:{uuid.uuid4().hex}:", clock, fail_mode="closed")
    yield store
    await store.aclose()


async def admit(limiter: Limiter, tokens: int, key: str = "sub:a") -> Admission:
    return await limiter.admit([LimitRequest(key, POLICY, tokens)])


async def test_fail_open_enforces_in_memory_and_recovers(
    server: RedisServer,
    open_store: RedisStore,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = Limiter(open_store, clock)
    before = await admit(limiter, 600)
    assert before.allowed and before.reservation is not None
    assert before.reservation.origin == "redis"

    server.stop()
    with caplog.at_level(logging.WARNING, logger="sluicegate.limits.redis_store"):
        during = await admit(limiter, 600)
    assert during.allowed  # the in-memory fallback starts empty: 600 of 1000
    assert during.reservation is not None and during.reservation.origin == "fallback"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "failing open" in caplog.records[0].getMessage()
    assert not open_store.available
    # The fallback still enforces the limit, per instance.
    refused = await admit(limiter, 600)
    assert refused.status == 429 and refused.retry_after_s > 0
    await limiter.settle(during.reservation, 100)  # settles into the fallback
    assert (await admit(limiter, 800)).allowed
    # A settle of a reservation made in Redis cannot land: kept for a replay, and counted.
    await limiter.settle(before.reservation, 10)
    assert open_store.stats.failed_adjustments == 1 and open_store.queued_adjustments == 1
    assert open_store.stats.outages == 1
    assert open_store.stats.fallback_admissions == 3

    server.start()  # empty again: nothing is persisted
    clock.advance(open_store.retry_interval_s - 0.1)
    assert (await admit(limiter, 1)).reservation.origin == "fallback"  # type: ignore[union-attr]
    clock.advance(0.1)
    back = await admit(limiter, 900)
    assert back.allowed and back.reservation is not None
    assert back.reservation.origin == "redis"
    assert open_store.available
    assert not (await admit(limiter, 200)).allowed  # counted in Redis again
    assert open_store.stats.outages == 1


async def test_fail_closed_refuses_with_503_and_recovers(
    server: RedisServer, closed_store: RedisStore, clock: FakeClock
) -> None:
    limiter = Limiter(closed_store, clock)
    assert (await admit(limiter, 100)).allowed
    server.stop()
    refused = await admit(limiter, 100)
    assert not refused.allowed
    assert refused.status == 503
    assert refused.code == "LimitStoreUnavailable"
    assert refused.retry_after_s == pytest.approx(closed_store.retry_interval_s)
    h = dict(refused.headers())
    assert h["Retry-After"] == "5" and h["retry-after-ms"] == "5000"
    clock.advance(2)
    assert (await admit(limiter, 100)).retry_after_s == pytest.approx(3.0)
    assert closed_store.stats.refused_admissions == 2

    server.start()
    clock.advance(3)
    recovered = await admit(limiter, 100)
    assert recovered.allowed
    assert closed_store.available


async def test_a_hung_redis_times_out_instead_of_hanging_requests(
    server: RedisServer, open_store: RedisStore, clock: FakeClock
) -> None:
    limiter = Limiter(open_store, clock)
    assert (await admit(limiter, 100)).allowed
    probe = aioredis.Redis.from_url(server.url)
    pid = int((await probe.info("server"))["process_id"])
    await probe.aclose()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        during = await admit(limiter, 100)  # waits one socket timeout (0.5 s), then memory
        assert time.monotonic() - started < 3.0
        assert during.allowed and during.reservation is not None
        assert during.reservation.origin == "fallback"
        assert (await admit(limiter, 100)).reservation.origin == "fallback"  # type: ignore[union-attr]
    finally:
        os.kill(pid, signal.SIGCONT)
    clock.advance(open_store.retry_interval_s)
    assert (await admit(limiter, 100)).reservation.origin == "redis"  # type: ignore[union-attr]
