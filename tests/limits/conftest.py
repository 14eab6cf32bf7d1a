"""Fixtures: one store per backend (memory, real Redis on 127.0.0.1:6379) and a fake clock.

Every Redis test gets its own key prefix and deletes its keys afterwards. Redis must be
running on 127.0.0.1:6379 (Debian: apt-get install redis-server); a missing server fails
the test, it is never skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.limits.limiter import Limiter
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import CounterStore
from tests.integration.conftest import simulator, stop_later  # noqa: F401  (gateway tests' fixtures)

REDIS_URL = "redis://127.0.0.1:6379/0"
# A minute boundary (2023-11-14T22:14:00Z), so that bucket arithmetic in tests is plain.
T0 = 1_700_000_040.0


def epoch(text: str) -> float:
    """Epoch seconds of an ISO timestamp (UTC unless it carries an offset)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=T0)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise RuntimeError(
            f"Redis is not reachable at {REDIS_URL}: start it (Debian: apt-get install "
            "redis-server) — these tests need a real Redis"
        ) from exc
    yield client
    await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    prefix = f"sgtest:limits:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis_client.scan_iter(match=prefix + "*", count=500)]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest,
    clock: FakeClock,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> AsyncIterator[CounterStore]:
    """Each conformance test runs once per store implementation."""
    if request.param == "memory":
        yield MemoryStore()
        return
    redis_store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    yield redis_store
    await redis_store.aclose()


@pytest.fixture
def limiter(store: CounterStore, clock: FakeClock) -> Limiter:
    return Limiter(store, clock)


@pytest.fixture
async def make_redis_store(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make_redis_store(**options)``: a RedisStore on the test's client and prefix, closed
    after the test (a store keeps connections of its own besides the client's)."""
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        store = RedisStore(redis_client, redis_prefix, clock, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()
