"""Batching of the Redis store (limits/redis_batch.py): concurrent calls share one command,
keep their order and their own answers, and survive Redis forgetting its scripts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

from sluicegate.clock import FakeClock
from sluicegate.limits.redis_batch import ScriptBatcher, evalsha_head, pack_evalsha
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import Adjustment, Counter

NOW_MS = 1_700_000_040_000


def rpm(limit: int) -> Counter:
    return Counter("k:rpm", "sliding", limit, 1, window_ms=61_000, bucket_ms=1000)


async def test_concurrent_admissions_share_a_pipeline_in_order(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    results = await asyncio.gather(*(store.admit([rpm(30)], NOW_MS) for _ in range(40)))
    assert [r.allowed for r in results] == [True] * 30 + [False] * 10
    # Submission order is the order Redis ran them in: counts 1..30, then refusals at 30.
    assert [r.states[0].used for r in results] == [*range(1, 31), *[30] * 10]
    assert store.batching.calls == 40
    assert store.batching.pipelines < 40 // 4  # in practice one
    await store.aclose()


async def test_settles_ride_along_and_apply_before_they_return(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    tpm = Counter("k:tpm", "sliding", 1000, 400, window_ms=61_000, bucket_ms=1000)
    first = await store.admit([tpm], NOW_MS)
    slot = first.states[0].slot
    await asyncio.gather(
        store.adjust([Adjustment("k:tpm", "sliding", slot, -300)], first.origin),
        store.admit(
            [Counter("k:other", "sliding", 5, 1, window_ms=61_000, bucket_ms=1000)], NOW_MS
        ),
    )
    again = await store.admit([tpm], NOW_MS)
    assert again.allowed and again.states[0].used == 100 + 400
    await store.aclose()


async def test_scripts_are_reloaded_after_redis_forgets_them(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    assert (await store.admit([rpm(10)], NOW_MS)).allowed
    await redis_client.script_flush()  # as after a Redis restart
    results = await asyncio.gather(*(store.admit([rpm(10)], NOW_MS) for _ in range(3)))
    assert [r.states[0].used for r in results] == [2, 3, 4]
    assert store.batching.script_reloads == 1
    assert store.available
    await store.aclose()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The batcher's own RESP encoding is byte for byte redis-py's, keys in any script."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    keys = ["sg:sub:équipe-1:tpm", "sg:owner:o:rpm"]
    args: list[Any] = [NOW_MS, 5000, "s", 1_000_000_000, 88, 61_000, 1000, "f", 7, 0, -3, 0]
    theirs = b"".join(Connection().pack_command("EVALSHA", sha, len(keys), *keys, *args))
    assert pack_evalsha(evalsha_head(sha), keys, args) == theirs
    assert pack_evalsha(evalsha_head(sha), [], []) == b"".join(
        Connection().pack_command("EVALSHA", sha, 0)
    )
    with pytest.raises(TypeError):
        pack_evalsha(evalsha_head(sha), keys, [1.5])
    with pytest.raises(TypeError):
        pack_evalsha(evalsha_head(sha), keys, [True])


async def test_each_call_of_a_batch_gets_its_own_keys_arguments_and_reply(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """One command runs the batch: each call sees only its keys and arguments, in order, and
    a call that fails in its script gets its error while the others get their replies."""
    scripts = {
        "add": "return redis.call('INCRBY', KEYS[1], ARGV[1]) + #KEYS * 1000 + #ARGV * 100",
        "wrongtype": "return redis.call('HGET', KEYS[1], 'f')",
        "raise": "error('broken on purpose')",
    }
    batcher = ScriptBatcher(redis_client, scripts)
    a, b = redis_prefix + "a", redis_prefix + "b"
    calls = [
        batcher.call("add", [a], [5]),
        batcher.call("wrongtype", [a], []),  # a holds a string, not a hash
        batcher.call("add", [b], [7]),
        batcher.call("raise", [], ["x"]),
        batcher.call("add", [a], [1]),
    ]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert replies[0] == 5 + 1100 and replies[2] == 7 + 1100 and replies[4] == 6 + 1100
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    assert isinstance(replies[3], ResponseError) and "broken on purpose" in str(replies[3])
    assert batcher.stats.pipelines == 1 and batcher.stats.calls == 5
    await batcher.aclose()


async def test_calls_wait_for_a_busy_connection_and_go_together(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """With every connection in flight, later calls queue up and leave as one batch when a
    connection comes back; the batcher's connections are closed by ``aclose``."""
    before = len(await redis_client.client_list())
    scripts = {"add": "return redis.call('INCRBY', KEYS[1], ARGV[1])"}
    batcher = ScriptBatcher(redis_client, scripts, connections=1)
    key = redis_prefix + "n"
    first = batcher.call("add", [key], [1])
    await asyncio.sleep(0)  # the first batch leaves (one call) and occupies the connection
    later = [batcher.call("add", [key], [10]) for _ in range(3)]
    await asyncio.sleep(0)
    assert batcher.stats.pipelines == 1  # the connection is busy: the three wait
    assert await first == 1
    assert await asyncio.gather(*later) == [11, 21, 31]
    assert (batcher.stats.pipelines, batcher.stats.calls, batcher.stats.connections) == (2, 4, 1)
    assert len(await redis_client.client_list()) == before + 1  # the batcher's one connection
    await batcher.aclose()
    assert len(await redis_client.client_list()) == before
