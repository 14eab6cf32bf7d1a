"""Fixtures for the routing tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.routing.harness import REDIS_URL


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Things to stop at the end (gateways first, then their backends)."""
    things: list[Any] = []
    yield things
    for thing in things:
        thing.stop()


@pytest.fixture
def redis_store() -> Iterator[redis.Redis]:
    """A client of the test Redis (``REDIS_URL``), closed at the end."""
    store = redis.Redis.from_url(REDIS_URL)
    yield store
    store.close()


@pytest.fixture
def redis_prefix(redis_store: redis.Redis) -> Iterator[str]:
    """A key prefix of the test's own in Redis (no trailing colon); every key under it is
    deleted at the end, after the test's own clean-up (gateways stopped)."""
    prefix = f"sgtest-{os.urandom(6).hex()}"
    yield prefix
    leftover = list(redis_store.scan_iter(f"{prefix}:*"))
    if leftover:
        redis_store.delete(*leftover)
