"""One conformance suite over every BackendStateStore: two routers on one store (two
instances of a cluster) see each other's trips and headroom reports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.routing.headroom import Report
from sluicegate.routing.pool import Member
from sluicegate.routing.redis_state import RedisStateStore, decode_field
from sluicegate.routing.retry import Outcome
from sluicegate.routing.router import Router, RouterSettings
from sluicegate.routing.state import (
    BackendStateStore,
    MemoryStateStore,
    SharedHeadroom,
    SharedTrip,
    SharedUpdate,
)
from tests.support.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"
PTU = Member("ptu", "gpt-4o", priority=1, kind="ptu")
PAYG = Member("paygo", "gpt-4o", priority=2)


@dataclass
class Pair:
    one: BackendStateStore
    two: BackendStateStore

    async def sync(self) -> None:
        await self.one.sync()
        await self.two.sync()


@pytest.fixture(params=["memory", "redis"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    if request.param == "memory":
        store = MemoryStateStore()
        yield Pair(store, store)
        return
    prefix = f"sgtest:{os.urandom(6).hex()}:routing:"
    one = RedisStateStore(REDIS_URL, prefix, interval=0.05)
    two = RedisStateStore(REDIS_URL, prefix, interval=0.05)
    try:
        yield Pair(one, two)
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        await client.delete(one.hash_key)
        await client.aclose()
        await one.aclose()
        await two.aclose()


def _routers(pair: Pair, clock: FakeClock) -> tuple[Router, Router]:
    one = Router(RouterSettings(), clock, pair.one)
    two = Router(RouterSettings(), clock, pair.two)
    for router in (one, two):
        router.add_pool("gpt-4o", [PTU, PAYG])
    return one, two


async def test_a_trip_on_one_instance_spares_the_other(pair: Pair) -> None:
    clock = FakeClock()
    one, two = _routers(pair, clock)
    pool_two = two.pools["gpt-4o"]
    one.failed(one.begin(one.targets[PTU.key], 10), Outcome(429, retry_after=20))
    await pair.sync()
    choice = two.choose(pool_two, 10)
    assert choice is not None and choice.member is PAYG
    view = {v.key: v for v in two.views()}[PTU.key]
    assert view.state == "open" and view.open_reason == "429"
    assert view.open_until == pytest.approx(clock.now() + 20)
    clock.advance(20)
    choice = two.choose(pool_two, 10)
    assert choice is not None and choice.member is PTU  # half-open: probed again


async def test_headroom_reports_are_shared(pair: Pair) -> None:
    clock = FakeClock()
    one, two = _routers(pair, clock)
    ticket = one.begin(one.targets[PTU.key], 10)
    one.report(
        ticket,
        [(b"x-ratelimit-remaining-tokens", b"40"), (b"x-ratelimit-remaining-requests", b"3")],
    )
    one.succeeded(ticket, 200)
    await pair.sync()
    view = {v.key: v for v in two.views()}[PTU.key]
    assert (view.headroom_tokens, view.headroom_requests) == (40, 3)
    choice = two.choose(two.pools["gpt-4o"], 100)
    assert choice is not None and choice.member is PAYG  # 100 tokens do not fit in 40


async def test_later_trip_ends_win_and_updates_are_idempotent(pair: Pair) -> None:
    seen: list[SharedUpdate] = []
    pair.two.subscribe(seen.append)
    pair.one.publish_trip("ptu/gpt-4o", SharedTrip(2_000_000_000.0, "500", False))
    pair.one.publish_trip("ptu/gpt-4o", SharedTrip(1_900_000_000.0, "500", False))
    pair.one.publish_headroom("ptu/gpt-4o", SharedHeadroom(Report(1, 2, 3, 4), 5.0))
    await pair.sync()
    await pair.sync()
    trips = [u.trip for u in seen if u.trip is not None]
    assert trips and all(t.open_until == 2_000_000_000.0 for t in trips)
    assert len(trips) == 1, "an unchanged trip is delivered once"
    reports = [u.headroom for u in seen if u.headroom is not None]
    assert reports == [SharedHeadroom(Report(1, 2, 3, 4), 5.0)]


def test_unreadable_fields_are_ignored() -> None:
    assert decode_field("trip:x/y", b"not json") is None
    assert decode_field("trip:x/y", b'{"until": 1}') is None
    assert decode_field("other:x/y", b"{}") is None
    update = decode_field("trip:x/y", b'{"until": 5, "reason": "429", "t": true}')
    assert update == SharedUpdate("x/y", trip=SharedTrip(5.0, "429", True))


async def test_redis_outage_keeps_local_state_and_recovers() -> None:
    with RedisServer() as server:
        prefix = f"sgtest:{os.urandom(6).hex()}:routing:"
        one = RedisStateStore(server.url, prefix, socket_timeout=0.2)
        two = RedisStateStore(server.url, prefix, socket_timeout=0.2)
        clock = FakeClock()
        r1, r2 = _routers(Pair(one, two), clock)
        try:
            server.stop()
            r1.failed(r1.begin(r1.targets[PTU.key], 1), Outcome(503))
            r1.failed(r1.begin(r1.targets[PTU.key], 1), Outcome(503))
            r1.failed(r1.begin(r1.targets[PTU.key], 1), Outcome(503))
            await one.sync()  # fails: the trip stays pending, routing goes on locally
            assert not one.healthy
            assert {v.key: v for v in r1.views()}[PTU.key].state == "open"
            server.start()
            await one.sync()
            await two.sync()
            assert one.healthy
            assert {v.key: v for v in r2.views()}[PTU.key].state == "open"
        finally:
            await one.aclose()
            await two.aclose()
