"""Store-level checks: keys expire, memory stays bounded, and both stores agree step by step."""

from __future__ import annotations

import random
from collections.abc import Callable

import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.periods import period_bounds
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import FIXED_GRACE_MS, NEVER, Adjustment, Counter


def sliding(name: str, limit: int, cost: int) -> Counter:
    return Counter(name, "sliding", limit, cost, window_ms=60_000, bucket_ms=1000)


async def test_redis_keys_carry_ttls(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    store = make_redis_store()
    limiter = Limiter(store, clock)
    policy = LimitPolicy(
        tokens_per_minute=1000,
        requests_per_minute=10,
        token_quota=5000,
        token_quota_period="hourly",
    )
    assert (await limiter.admit([LimitRequest("sub:ttl", policy, 10)])).allowed
    keys = await _stored_keys(redis_client, redis_prefix)
    start_ms, end_ms = period_bounds("hourly", clock.now())
    assert keys == [
        f"{redis_prefix}sub:ttl:quota:hourly:{start_ms}",
        f"{redis_prefix}sub:ttl:quota:hourly:{start_ms}:held",  # the reservation in flight
        f"{redis_prefix}sub:ttl:quota:hourly:{start_ms}:origin",  # when it was created
        f"{redis_prefix}sub:ttl:rpm",
        f"{redis_prefix}sub:ttl:tpm",
    ]
    for key in keys[3:]:
        assert 61_000 < await redis_client.pttl(key) <= 62_000  # 61 buckets + one
    quota_ttl = await redis_client.pttl(keys[0])
    expected = end_ms + FIXED_GRACE_MS - int(clock.now() * 1000)
    assert expected - 1000 < quota_ttl <= expected
    assert expected - 1000 < await redis_client.pttl(keys[2]) <= expected  # the quota's
    held_ttl = 660_000  # ten minutes in flight, and one (QUOTA_HELD_WINDOW_MS + _BUCKET_MS)
    assert held_ttl - 1000 < await redis_client.pttl(keys[1]) <= held_ttl


async def _stored_keys(client: aioredis.Redis, prefix: str) -> list[str]:
    """Every counter's key under ``prefix``, sorted (not the batches' replies kept for a
    resend, ``{prefix}batch:…``: test_redis_batching.py checks those)."""
    keys = [k.decode() async for k in client.scan_iter(match=prefix + "*")]
    return sorted(k for k in keys if not k.startswith(prefix + "batch:"))


async def test_redis_refusals_leave_no_key_without_a_ttl(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    """A refusal charges nothing, but the script writes the bookkeeping of a sliding counter
    it finds new (or expired): that key must expire on its own too. Both ways a client keeps
    being refused: asking for more than the limit (one key per address with ``counter_key:
    client_ip``), and a subscription over its quota whose rate counters are fresh."""
    limiter = Limiter(make_redis_store(), clock)
    rates = LimitPolicy(tokens_per_minute=1000, requests_per_minute=10)
    quota = LimitPolicy(token_quota=100, token_quota_period="hourly")
    both = LimitPolicy(
        tokens_per_minute=1000, requests_per_minute=10, token_quota=100, token_quota_period="hourly"
    )
    too_large = await limiter.admit([LimitRequest("ip:203.0.113.7", rates, 1001)])
    assert too_large.status == 429 and too_large.code == "TokenRequestTooLarge"
    used = await limiter.admit([LimitRequest("sub:over", quota, 100)])
    await limiter.settle(used.reservation, 100)  # no longer in flight: its held key goes
    # The quota is used up; its rate counters do not exist (as once they have expired).
    over = await limiter.admit([LimitRequest("sub:over", both, 10)])
    assert over.status == 403 and over.code == "TokenQuotaExceeded"
    keys = await _stored_keys(redis_client, redis_prefix)
    start_ms, _ = period_bounds("hourly", clock.now())
    assert keys == [
        f"{redis_prefix}ip:203.0.113.7:rpm",
        f"{redis_prefix}ip:203.0.113.7:tpm",
        f"{redis_prefix}sub:over:quota:hourly:{start_ms}",
        f"{redis_prefix}sub:over:quota:hourly:{start_ms}:origin",
        f"{redis_prefix}sub:over:rpm",
        f"{redis_prefix}sub:over:tpm",
    ]
    ttls = {key: await redis_client.pttl(key) for key in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert all(ttl <= 62_000 for key, ttl in ttls.items() if ":quota:" not in key), ttls


async def test_redis_adjust_never_recreates_an_expired_key(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    store = make_redis_store()
    await store.adjust(
        [Adjustment("gone:tpm", "sliding", 5, 100), Adjustment("gone:q", "fixed", 0, 100)],
        "redis",
    )
    assert await _stored_keys(redis_client, redis_prefix) == []


async def test_memory_store_forgets_idle_counters() -> None:
    store = MemoryStore()
    quota = Counter("k:quota", "fixed", 100, 1, end_ms=120_000)
    for i in range(50):
        assert store.admit_sync([sliding(f"k{i}:tpm", 100, 1)], 1000).allowed
    assert store.admit_sync([quota], 1000).allowed
    assert len(store) == 51
    store.admit_sync([sliding("other:tpm", 100, 1)], 30_000)
    assert len(store) == 52
    store.admit_sync([sliding("other:tpm", 100, 1)], 61_000)  # sweep: the k* buckets ended
    assert len(store) == 2  # "other" is live, the quota is kept through its grace period
    store.admit_sync([sliding("other:tpm", 100, 1)], 120_000 + FIXED_GRACE_MS + 60_000)
    assert len(store) == 1
    assert "sliding=1" in repr(store)


async def test_memory_and_redis_agree_step_by_step(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    """A seeded random mix of admissions and adjustments gives identical answers."""
    memory = MemoryStore()
    redis_store = make_redis_store(fail_mode="closed")
    rng = random.Random(20240229)
    now_ms = 1_700_000_040_000
    charged: list[tuple[str, str, int, int]] = []
    never_seen = False
    for _ in range(400):
        now_ms += rng.choice((0, 130, 700, 1000, 4100, 15_000))
        if charged and rng.random() < 0.25:
            name, kind, slot, amount = charged.pop(rng.randrange(len(charged)))
            delta = rng.randint(-amount, amount)
            adjustment = [Adjustment(name, kind, slot, delta)]  # type: ignore[arg-type]
            memory.adjust_sync(adjustment, "memory")
            await redis_store.adjust(adjustment, "redis")
            continue
        counters = [
            sliding(f"s{rng.randrange(3)}:tpm", 2000, rng.choice((0, 50, 400, 900, 2500))),
            Counter(f"s{rng.randrange(2)}:rpm", "sliding", 20, 1, window_ms=60_000, bucket_ms=1000),
            Counter(
                f"q:{now_ms // 300_000}", "fixed", 9000, rng.randrange(0, 600),
                end_ms=(now_ms // 300_000 + 1) * 300_000,
            ),
        ]  # fmt: skip
        mem = memory.admit_sync(counters, now_ms)
        red = await redis_store.admit(counters, now_ms)
        assert (mem.allowed, mem.states) == (red.allowed, red.states)
        never_seen = never_seen or any(s.retry_after_ms == NEVER for s in mem.states)
        if mem.allowed:
            for counter, state in zip(counters, mem.states, strict=True):
                if counter.cost:
                    charged.append((counter.name, counter.kind, state.slot, counter.cost))
    assert never_seen


async def test_a_redis_sliding_counter_keeps_the_sum_of_its_buckets(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    """The sum a sliding counter keeps ("-1") is its buckets' sum after every admission,
    settle and eviction, and buckets below "-2" are gone; a hash written without the sum
    (by an earlier version) is counted once and gets one."""
    store = make_redis_store(fail_mode="closed")
    key = redis_prefix + "k:tpm"
    now_ms = 1_700_000_040_000
    current = now_ms // 1000
    # Without bookkeeping: two buckets inside the window, one that has left it.
    await redis_client.hset(key, mapping={current - 70: 500, current - 30: 40, current - 2: 7})
    first = await store.admit([sliding("k:tpm", 10_000, 3)], now_ms)
    assert first.allowed and first.states[0].used == 40 + 7 + 3

    async def check() -> None:
        raw = {int(k): int(v) for k, v in (await redis_client.hgetall(key)).items()}
        buckets = {index: amount for index, amount in raw.items() if index >= 0}
        assert raw[-1] == sum(buckets.values())
        assert all(index >= raw[-2] for index in buckets)

    await check()
    rng = random.Random(7)
    charged: list[tuple[int, int]] = []
    for step in range(300):
        now_ms += rng.choice((0, 300, 1000, 2500, 9000)) if step != 150 else 400_000
        if charged and rng.random() < 0.3:
            slot, amount = charged.pop(rng.randrange(len(charged)))
            delta = rng.randint(-amount - 5, amount)
            await store.adjust([Adjustment("k:tpm", "sliding", slot, delta)], first.origin)
        else:
            result = await store.admit([sliding("k:tpm", 5000, rng.randrange(0, 700))], now_ms)
            if result.allowed:
                charged.append((result.states[0].slot, 300))
        await check()


async def test_a_redis_refusal_is_decided_on_the_buckets_not_a_drifted_sum(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    clock: FakeClock,
) -> None:
    """A sum that drifted (an earlier version settling a bucket without it, during a rolling
    upgrade) never refuses a request the buckets have room for, and is corrected."""
    store = make_redis_store(fail_mode="closed")
    key = redis_prefix + "k:tpm"
    now_ms = 1_700_000_040_000
    first = await store.admit([sliding("k:tpm", 1000, 900)], now_ms)
    assert first.allowed
    # An earlier version's settle: the bucket goes down to 100, the sum stays at 900.
    await redis_client.hincrby(key, str(first.states[0].slot), -800)
    second = await store.admit([sliding("k:tpm", 1000, 500)], now_ms + 1000)
    assert second.allowed and second.states[0].used == 100 + 500
    assert await redis_client.hget(key, "-1") == b"600"
