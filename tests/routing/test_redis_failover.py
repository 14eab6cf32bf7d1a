"""The routing store after a Redis failover behind one address (tests/limits/failover_proxy.py):
it must write to the new primary without a restart, which only a new connection can do."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from sluicegate.routing.redis_state import RedisStateStore
from sluicegate.routing.state import SharedTrip
from tests.limits.failover_proxy import failover, wait_until


async def test_routing_store_follows_a_failover_behind_one_address() -> None:
    async with failover() as (proxy, swap):
        await _routing_store_follows(proxy.url, swap)


async def _routing_store_follows(url: str, swap: Callable[[], Awaitable[None]]) -> None:
    store = RedisStateStore(url, f"sgtest:{uuid.uuid4().hex}:")
    try:
        store.publish_trip("b/d", SharedTrip(time.time() + 5, "429", True))
        await store.sync()
        assert store.healthy
        await swap()

        async def recovered() -> bool:
            store.publish_trip("b/d", SharedTrip(time.time() + 30, "429", True))
            await store.sync()
            return store.healthy

        await wait_until(recovered, "the routing store writing again after the failover")
    finally:
        await store.aclose()
