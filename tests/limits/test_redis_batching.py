"""Batching of the Redis store (limits/redis_batch.py): concurrent calls share one command,
keep their order and their own answers, and survive Redis forgetting its scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sluicegate.clock import FakeClock
from sluicegate.limits.redis_batch import (
    ScriptBatcher,
    evalsha_head,
    pack_evalsha,
    reply_ttl_ms,
)
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import Adjustment, Counter
from tests.limits.conftest import REDIS_URL
from tests.limits.failover_proxy import ReplyDroppingProxy

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
    batcher = ScriptBatcher(redis_client, scripts, key_prefix=redis_prefix)
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
    batcher = ScriptBatcher(redis_client, scripts, key_prefix=redis_prefix, connections=1)
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


@pytest.fixture
async def dropping_proxy() -> AsyncIterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy()
    yield proxy
    await proxy.aclose()


async def test_a_batch_resent_after_its_reply_was_lost_runs_once(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
    dropping_proxy: ReplyDroppingProxy,
) -> None:
    """Redis ran the batch, the connection dropped before its reply was read, and the retry
    policy sent the batch again on a new connection: the admission is charged once and a
    settle (a negative delta) applied once, and each caller gets the reply of that one run."""
    url = await dropping_proxy.start()
    # The store's own client: one immediate reconnect and resend after a dropped connection.
    store = RedisStore(url, redis_prefix, clock, fail_mode="closed")
    try:
        tpm = Counter("k:tpm", "sliding", 10_000, 1000, window_ms=61_000, bucket_ms=1000)
        # Through the proxy before arming it: the scripts are loaded, the batcher connected.
        assert (await store.admit([rpm(10)], NOW_MS)).allowed

        dropping_proxy.armed = True
        first = await store.admit([tpm], NOW_MS)
        assert dropping_proxy.dropped == 1
        assert first.allowed and first.states[0].used == 1000  # not 2000: one run's reply
        slot = first.states[0].slot

        dropping_proxy.armed = True
        await store.adjust([Adjustment("k:tpm", "sliding", slot, -300)], first.origin)
        assert dropping_proxy.dropped == 2

        bucket, total = await redis_client.hmget(redis_prefix + "k:tpm", [str(slot), "-1"])
        assert bucket is not None and total is not None
        assert (int(bucket), int(total)) == (700, 700)  # charged 1000 once, refunded 300 once
        assert store.batching.connections == 1 and dropping_proxy.connections >= 3
        assert store.available and store.stats.outages == 0
    finally:
        await store.aclose()


def _comparable(reply: Any) -> Any:
    """A reply with its errors as (type, message), for comparing replies that hold them."""
    if isinstance(reply, BaseException):
        return (type(reply).__name__, str(reply))
    if isinstance(reply, list):
        return [_comparable(item) for item in reply]
    return reply


async def test_a_resent_batch_answers_the_replies_of_its_one_run_as_they_were(
    redis_client: aioredis.Redis, redis_prefix: str, dropping_proxy: ReplyDroppingProxy
) -> None:
    """The replies kept for a resend are those of the run itself: integers past 2**31 and
    2**53 stay exact integers, strings are bytes, nil, true, nested lists, status replies,
    and each call's own error, the same as a batch answered at once."""
    scripts = {
        "count": "return redis.call('INCR', KEYS[1])",
        "values": (
            "return {1, -7, 2^31 + 1, 1e14 + 7, 2^53, -2^53, 1.5, 'bin\\0x', false, true,"
            " {1, {2, 'a'}}, {}, {ok = 'FINE'}, {err = 'ERR nested'}}"
        ),
        "status": "return redis.status_reply('FINE')",
        "nothing": "return false",
        "wrongtype": "return redis.call('HGET', KEYS[1], 'f')",
        "raise": "error('broken on purpose')",
    }
    url = await dropping_proxy.start()
    # As the store's own client: one immediate reconnect and resend after a dropped connection.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    client = aioredis.Redis.from_url(url, retry=retry)
    batchers = {
        "at once": ScriptBatcher(redis_client, scripts, key_prefix=redis_prefix),
        "resent": ScriptBatcher(client, scripts, key_prefix=redis_prefix),
    }
    answers = {}
    try:
        for name, batcher in batchers.items():
            key = f"{redis_prefix}{name}"
            dropping_proxy.armed = name == "resent"
            calls = [
                batcher.call("count", [key], []),
                batcher.call("values", [], []),
                batcher.call("status", [], []),
                batcher.call("nothing", [], []),
                batcher.call("wrongtype", [key], []),  # key holds a string, not a hash
                batcher.call("raise", [], []),
                batcher.call("count", [key], []),
            ]
            answers[name] = _comparable(await asyncio.gather(*calls, return_exceptions=True))
            count = await redis_client.get(key)
            assert count is not None
            assert int(count) == 2  # each call ran once
    finally:
        for batcher in batchers.values():
            await batcher.aclose()
        await client.aclose()
    assert dropping_proxy.dropped == 1 and dropping_proxy.connections >= 2
    assert answers["resent"] == answers["at once"]
    count, values, status, nothing, wrongtype, raised, count_again = answers["resent"]
    assert (count, count_again) == (1, 2)
    assert values == [
        1, -7, 2**31 + 1, 10**14 + 7, 2**53, -(2**53), 1, b"bin\0x", None, 1,
        [1, [2, b"a"]], [], b"FINE", ("ResponseError", "nested"),  # redis-py drops "ERR "
    ]  # fmt: skip
    assert (status, nothing) == (b"FINE", None)
    assert wrongtype[0] == "ResponseError" and "WRONGTYPE" in wrongtype[1]
    assert raised[0] == "ResponseError" and "broken on purpose" in raised[1]


async def test_a_batch_key_shares_the_hash_slot_of_the_counters(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """On a Redis Cluster every key of a batch must be in one slot, and an ACL admitting the
    store's prefix must admit every key: the batch's key lives under the prefix (hash tag
    included, redis_store.py's convention) and expires within seconds (ten times the store's
    0.5 s deadline)."""
    prefix = "{" + redis_prefix.rstrip(":") + "}:"
    store = RedisStore(REDIS_URL, prefix, clock, fail_mode="closed")
    try:
        await store.admit([rpm(10)], NOW_MS)
        keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
        batches = [key for key in keys if key.startswith((prefix + "batch:").encode())]
        assert sorted(set(keys) - set(batches)) == [(prefix + "k:rpm").encode()]
        assert len(batches) == 1
        assert key_slot(batches[0]) == key_slot((prefix + "k:rpm").encode())
        assert 0 < await redis_client.pttl(batches[0]) <= reply_ttl_ms(0.5) == 5_000
    finally:
        await store.aclose()
        keys = [key async for key in redis_client.scan_iter(match=f"*{prefix}*")]
        if keys:
            await redis_client.delete(*keys)
