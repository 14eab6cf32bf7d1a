"""Responses affinity in cluster mode: an id learned by one gateway instance is honoured by
another (two gateways on the same Redis and ledger)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
import redis
import redis.asyncio as aioredis

from sluicegate.routing.redis_state import (
    BACKOFF_SECONDS,
    MAX_MISSES,
    MISS_SECONDS,
    RESPONSE_ID_TTL,
    RedisResponseIds,
    RedisStateStore,
)
from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import REDIS_URL, Routed, cluster_pair, pool_config, start_sim
from tests.routing.test_response_affinity import EQUAL_POOL, holder
from tests.support.pg import throwaway_database


def test_an_id_learned_by_one_gateway_is_honoured_by_another(
    tmp_path: Path, redis_store: redis.Redis, redis_prefix: str
) -> None:
    sims: dict[str, SimulatorThread] = {"east": start_sim(), "west": start_sim()}
    prefix, store = redis_prefix, redis_store
    with cluster_pair(tmp_path, sims, EQUAL_POOL, prefix) as (one, two, _):
        first = openai.OpenAI(base_url=f"{one.url}/openai/v1", api_key=one.key, max_retries=0)
        second = openai.OpenAI(base_url=f"{two.url}/openai/v1", api_key=one.key, max_retries=0)
        with first, second:
            ids = [first.responses.create(model="gpt-4o", input=f"q{i}").id for i in range(6)]
            assert {holder(one, i) for i in ids} == {"east", "west"}
            keys = [f"{prefix}:routing:resp:{i}" for i in ids]
            deadline = time.monotonic() + 5  # written after each answer, off its path
            while store.exists(*keys) < len(keys) and time.monotonic() < deadline:
                time.sleep(0.02)
            values = [store.get(k).decode() for k in keys]  # type: ignore[union-attr]
            owner = one.admin.list()[0][0].id
            assert {v.split("\t")[0] for v in values} == {"east", "west"}
            assert {v.split("\t")[1] for v in values} == {owner}
            assert RESPONSE_ID_TTL - 60 < store.ttl(keys[0]) <= RESPONSE_ID_TTL
            # Gateway two never saw these ids; reversed, its own round-robin would send
            # every one of them to the other region.
            # Half of them are first retrieved (a passthrough path), half first continued.
            for n, response_id in enumerate(reversed(ids)):
                if n % 2:
                    assert second.responses.retrieve(response_id).id == response_id
                answer = second.responses.create(
                    model="gpt-4o", input="more", previous_response_id=response_id
                )
                assert answer.previous_response_id == response_id
                assert second.responses.retrieve(response_id).id == response_id
        affinity = two.gateway.router.affinity
        assert affinity is not None and isinstance(affinity.shared, RedisResponseIds)
        # One lookup per id (by the first call that named it): then it is in the local map.
        assert affinity.shared.lookups == len(ids)
        assert affinity.shared.lookup_errors == 0 and affinity.shared.write_errors == 0


def test_unknown_ids_cost_one_lookup_and_invalid_ones_none(
    tmp_path: Path, redis_store: redis.Redis, redis_prefix: str
) -> None:
    """N requests naming the same unknown id make 1 Redis GET (misses are remembered);
    an id not shaped like Azure's makes none. Also: ``ttl_seconds`` is the keys' TTL, and a
    ``"store": false`` creation is never written."""
    sims: dict[str, SimulatorThread] = {"east": start_sim(), "west": start_sim()}
    prefix, store = redis_prefix, redis_store
    routed: Routed | None = None
    try:
        with throwaway_database() as pg_url:
            config = pool_config(
                tmp_path, sims, EQUAL_POOL, mode="cluster", storage_url=pg_url,
                redis={"url": REDIS_URL, "prefix": prefix},
                routing={"response_affinity": {"ttl_seconds": 3600}},
            )  # fmt: skip
            routed = Routed(config, sims)
            affinity = routed.gw.gateway.router.affinity
            assert affinity is not None and isinstance(affinity.shared, RedisResponseIds)
            shared = affinity.shared
            unknown = "resp_" + "0" * 32
            with openai.OpenAI(
                base_url=f"{routed.url}/openai/v1", api_key=routed.key, max_retries=0
            ) as client:
                for _ in range(5):
                    with pytest.raises(openai.NotFoundError):
                        client.responses.retrieve(unknown)
                    with pytest.raises(openai.BadRequestError):
                        client.responses.create(
                            model="gpt-4o", input="x", previous_response_id=unknown
                        )
                assert shared.lookups == 1
                for invalid in ("not-a-response-id", "resp_" + "a" * 2000):
                    with pytest.raises(openai.APIStatusError):
                        client.responses.create(
                            model="gpt-4o", input="x", previous_response_id=invalid
                        )
                assert shared.lookups == 1
                client.responses.create(model="gpt-4o", input="forget me", store=False)
                kept = client.responses.create(model="gpt-4o", input="keep me")
            key = f"{prefix}:routing:resp:{kept.id}"
            deadline = time.monotonic() + 5
            while not store.exists(key) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert 3000 < store.ttl(key) <= 3600
            assert shared.written == 1  # the store: false one was not
            routed.stop()
            routed = None
    finally:
        if routed is not None:
            routed.stop()
        for sim in sims.values():
            sim.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lookups_back_off_after_a_redis_failure() -> None:
    """Redis down: one lookup waits for the failure, the next ones for BACKOFF_SECONDS answer
    at once (unknown) without trying."""
    clock = Clock()
    dead = aioredis.Redis.from_url(
        "redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2
    )
    ids = RedisResponseIds(dead, "sgtest:", owns_client=True, clock=clock)
    try:
        assert await ids.lookup("resp_x") is None
        assert ids.lookup_errors == 1
        for _ in range(10):
            assert await ids.lookup("resp_y") is None
        assert ids.lookups == 1 and ids.lookup_errors == 1
        clock.now += BACKOFF_SECONDS + 0.1
        assert await ids.lookup("resp_y") is None
        assert ids.lookups == 2 and ids.lookup_errors == 2
    finally:
        await ids.aclose()


async def test_misses_are_remembered_briefly_and_bounded(redis_prefix: str) -> None:
    clock = Clock()
    state = RedisStateStore(REDIS_URL, f"{redis_prefix}:")
    ids = state.response_ids()
    ids._clock = clock  # the store made it: its clock set for the test
    try:
        # Its own small pool: lookups never queue behind the state exchange.
        assert ids._client is not state._client
        assert await ids.lookup("resp_a") is None
        assert await ids.lookup("resp_a") is None
        assert ids.lookups == 1
        clock.now += MISS_SECONDS + 0.1
        assert await ids.lookup("resp_a") is None
        assert ids.lookups == 2
        ids.remember("resp_a", ("east", "sub-1"))  # learned meanwhile: no longer a miss
        for _ in range(250):
            if ids.written:
                break
            await asyncio.sleep(0.02)
        assert await ids.lookup("resp_a") == ("east", "sub-1")
        for i in range(MAX_MISSES + 10):
            await ids.lookup(f"resp_m{i}")
        assert len(ids._misses) == MAX_MISSES
    finally:
        await state.aclose()
