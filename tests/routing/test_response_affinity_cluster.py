"""Responses affinity in cluster mode: an id learned by one gateway instance is honoured by
another (two gateways on the same Redis and ledger)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import openai
import redis

from sluicegate.routing.redis_state import RESPONSE_ID_TTL, RedisResponseIds
from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, pool_config, start_sim
from tests.routing.test_response_affinity import EQUAL_POOL, holder
from tests.support.gateway import GatewayThread
from tests.support.pg import throwaway_database

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_an_id_learned_by_one_gateway_is_honoured_by_another(tmp_path: Path) -> None:
    sims: dict[str, SimulatorThread] = {"east": start_sim(), "west": start_sim()}
    prefix = f"sgtest-{os.urandom(6).hex()}"
    gateways: list[Routed | GatewayThread] = []
    store = redis.Redis.from_url(REDIS_URL)
    try:
        with throwaway_database() as pg_url:
            config = pool_config(
                tmp_path, sims, EQUAL_POOL, mode="cluster", storage_url=pg_url,
                redis={"url": REDIS_URL, "prefix": prefix},
            )  # fmt: skip
            one = Routed(config, sims)
            gateways.append(one)
            two = GatewayThread(config).start()
            gateways.append(two)
            two.gateway.refresher.refresh_now()  # the key made on `one` is known here too

            first = openai.OpenAI(base_url=f"{one.url}/openai/v1", api_key=one.key, max_retries=0)
            second = openai.OpenAI(base_url=f"{two.url}/openai/v1", api_key=one.key, max_retries=0)
            with first, second:
                ids = [first.responses.create(model="gpt-4o", input=f"q{i}").id for i in range(6)]
                assert {holder(one, i) for i in ids} == {"east", "west"}
                keys = [f"{prefix}:routing:resp:{i}" for i in ids]
                deadline = time.monotonic() + 5  # written after each answer, off its path
                while store.exists(*keys) < len(keys) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert {store.get(k).decode() for k in keys} == {"east", "west"}  # type: ignore[union-attr]
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
            for gateway in gateways:
                gateway.stop()
            gateways.clear()
    finally:
        for gateway in gateways:
            gateway.stop()
        for sim in sims.values():
            sim.stop()
        leftover = list(store.scan_iter(f"{prefix}:*"))
        if leftover:
            store.delete(*leftover)
        store.close()
