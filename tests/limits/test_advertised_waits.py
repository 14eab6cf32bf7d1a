"""The wait a rate refusal advertises: never over 60 s, and short when requests in progress
hold the shortfall in reservations. Conformance tests (both stores) first, then the Redis
hash's bookkeeping and a seeded step-by-step comparison of the stores."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import IN_FLIGHT_RETRY_MS, MAX_RETRY_AFTER_MS
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import Adjustment, Counter
from tests.limits.test_conformance import admit, headers, use

# --- At most 60 s ---------------------------------------------------------------------------


async def test_a_full_window_never_asks_for_more_than_60_seconds(
    limiter: Limiter, clock: FakeClock
) -> None:
    """A charge at the very start of a bucket stays 61 s; openai-python ignores a
    Retry-After over 60 s (and then retries after its own second or so), so the wait is
    capped: a retry at 60 s is refused once more, for the last second, then admitted."""
    assert clock.now() == int(clock.now())  # T0: the start of a bucket
    await use(limiter, 10_000)
    clock.advance(0.001)
    refused = await admit(limiter, 10)
    assert refused.retry_after_s == MAX_RETRY_AFTER_MS / 1000 == 60.0
    assert headers(refused)["Retry-After"] == "60"
    assert headers(refused)["retry-after-ms"] == "60000"
    assert refused.reason.endswith("retry after 1 min.")
    clock.advance(60)
    again = await admit(limiter, 10)
    assert not again.allowed
    assert again.retry_after_s == pytest.approx(0.999)
    clock.advance(0.999)
    assert (await admit(limiter, 10)).allowed


async def test_a_full_requests_window_never_asks_for_more_than_60_seconds(
    limiter: Limiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(requests_per_minute=2)
    for _ in range(2):
        await use(limiter, 0, policy)
    refused = await admit(limiter, 0, policy)
    assert refused.code == "RequestRateLimitExceeded"
    assert (headers(refused)["Retry-After"], headers(refused)["retry-after-ms"]) == (
        "60",
        "60000",
    )


async def test_a_quota_still_waits_for_its_period(limiter: Limiter, clock: FakeClock) -> None:
    """The cap is for the rate windows: a quota's wait is until it renews (and the SDKs do
    not retry it: x-should-retry: false)."""
    policy = LimitPolicy(token_quota=100, token_quota_period="daily")
    await use(limiter, 100, policy)
    refused = await admit(limiter, 1, policy)
    assert refused.status == 403
    assert refused.retry_after_s > 3600


# --- Reservations in flight -----------------------------------------------------------------


async def test_a_window_held_by_requests_in_progress_asks_for_a_short_wait(
    limiter: Limiter, clock: FakeClock
) -> None:
    """The reviewer's case: TPM 5,000, four requests in progress reserving 1,100 each; a
    fifth 0.5 s later was told 60.5 s although the four settle a second later to 150 each."""
    policy = LimitPolicy(tokens_per_minute=5000)
    held = [await admit(limiter, 1100, policy) for _ in range(4)]
    assert all(admission.allowed for admission in held)
    clock.advance(0.5)
    refused = await admit(limiter, 1100, policy)
    assert (refused.status, refused.code) == (429, "TokenRateLimitExceeded")
    assert refused.retry_after_s == IN_FLIGHT_RETRY_MS / 1000
    assert headers(refused)["retry-after-ms"] == str(IN_FLIGHT_RETRY_MS)
    assert "4400 of them reserved by requests still in progress" in refused.reason
    clock.advance(0.5)
    for admission in held:
        await limiter.settle(admission.reservation, 150)
    assert (await admit(limiter, 1100, policy)).allowed


async def test_reservations_too_small_to_cover_the_shortfall_leave_the_windows_wait(
    limiter: Limiter, clock: FakeClock
) -> None:
    await use(limiter, 8000)  # used: only the window frees it
    clock.advance(1)
    in_flight = await admit(limiter, 1500)
    clock.advance(1)
    refused = await admit(limiter, 2000)  # 1,500 short, 1,500 in flight: could be enough
    assert refused.retry_after_s == IN_FLIGHT_RETRY_MS / 1000
    refused = await admit(limiter, 2001)  # 1,501 short: only T0's bucket frees that
    assert refused.retry_after_s == pytest.approx(59.0)
    assert "in progress" not in refused.reason
    await limiter.settle(in_flight.reservation, 1500)  # as estimated: no longer in flight
    refused = await admit(limiter, 2000)
    assert refused.retry_after_s == pytest.approx(59.0)


async def test_a_released_or_settled_reservation_is_no_longer_in_flight(
    limiter: Limiter, clock: FakeClock
) -> None:
    first = await admit(limiter, 6000)
    second = await admit(limiter, 3000)
    await limiter.release(first.reservation)  # nothing used
    await limiter.settle(second.reservation, 9000)  # more than estimated: all of it used
    clock.advance(1)
    refused = await admit(limiter, 2000)
    assert refused.retry_after_s == pytest.approx(60.0)  # T0's bucket, capped from 60


async def test_a_reservation_never_settled_leaves_with_its_bucket(
    limiter: Limiter, clock: FakeClock
) -> None:
    """A request that never settles (lost) does not make refusals short for ever: its amount
    in flight goes when its bucket leaves the window, as its charge does."""
    await admit(limiter, 4000)  # T0, never settled
    clock.advance(30)
    await use(limiter, 6000)  # T0+30
    clock.advance(31)  # T0+61: T0's bucket is gone
    refused = await admit(limiter, 5000)
    assert refused.retry_after_s == pytest.approx(30.0)  # T0+30's bucket, at T0+91
    assert "in progress" not in refused.reason


async def test_a_counter_shared_by_two_policies_keeps_one_reservation_in_flight(
    limiter: Limiter, clock: FakeClock
) -> None:
    loose = LimitPolicy(tokens_per_minute=50_000)
    tight = LimitPolicy(tokens_per_minute=4000)
    first = await limiter.admit(
        [LimitRequest("sub:a", loose, 3000), LimitRequest("sub:a", tight, 3500)]
    )
    assert first.allowed
    refused = await limiter.admit([LimitRequest("sub:a", tight, 1000)])
    assert refused.retry_after_s == IN_FLIGHT_RETRY_MS / 1000
    await limiter.settle(first.reservation, 3500)
    refused = await limiter.admit([LimitRequest("sub:a", tight, 1000)])
    assert refused.retry_after_s == pytest.approx(60.0)


async def test_requests_windows_are_never_in_flight(limiter: Limiter, clock: FakeClock) -> None:
    """Only token reservations settle; a request counted stays counted."""
    policy = LimitPolicy(requests_per_minute=1, tokens_per_minute=10_000)
    await admit(limiter, 100, policy)  # in progress
    clock.advance(1)
    refused = await admit(limiter, 100, policy)
    assert refused.code == "RequestRateLimitExceeded"
    assert refused.retry_after_s == pytest.approx(60.0)


# --- The Redis hash and the stores compared -------------------------------------------------


def _reserving(name: str, limit: int, cost: int) -> Counter:
    return Counter(name, "sliding", limit, cost, window_ms=61_000, bucket_ms=1000, reserve=True)


async def test_redis_keeps_amounts_in_flight_only_for_live_buckets_in_progress(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """A bucket's amount in flight ("p<index>") is deleted when its reservations have all
    settled and when the bucket leaves the window, so the hash never grows with it."""
    store = make_redis_store(fail_mode="closed")
    key = redis_prefix + "k:tpm"
    now_ms = 1_700_000_040_000

    async def fields() -> dict[str, int]:
        raw = await redis_client.hgetall(key)
        named = {(f.decode() if isinstance(f, bytes) else f): int(v) for f, v in raw.items()}
        return {field: value for field, value in named.items() if field.startswith("p")}

    first = await store.admit([_reserving("k:tpm", 10_000, 300)], now_ms)
    second = await store.admit([_reserving("k:tpm", 10_000, 200)], now_ms + 10)
    slot = first.states[0].slot
    assert await fields() == {f"p{slot}": 500}
    await store.adjust([Adjustment("k:tpm", "sliding", slot, -250, 300)], "redis")
    assert await fields() == {f"p{slot}": 200}
    await store.adjust([Adjustment("k:tpm", "sliding", slot, 0, 200)], "redis")
    assert await fields() == {}
    assert second.allowed
    await store.admit([_reserving("k:tpm", 10_000, 100)], now_ms + 5000)  # never settled
    await store.admit([_reserving("k:tpm", 10_000, 100)], now_ms + 70_000)  # evicts it
    assert list(await fields()) == [f"p{(now_ms + 70_000) // 1000}"]
    # The same after a gap long enough for the buckets to be counted afresh.
    await store.admit([_reserving("k:tpm", 10_000, 100)], now_ms + 400_000)
    assert list(await fields()) == [f"p{(now_ms + 400_000) // 1000}"]


async def test_memory_and_redis_agree_on_what_is_in_flight(
    make_redis_store: Callable[..., RedisStore],
) -> None:
    """A seeded mix of reserving admissions, settles, releases and requests counters gives
    identical answers from both stores, amounts in flight included."""
    memory = MemoryStore()
    redis_store = make_redis_store(fail_mode="closed")
    rng = random.Random(20261207)
    now_ms = 1_700_000_040_000
    charged: list[tuple[str, int, int]] = []
    short = 0
    for _ in range(500):
        now_ms += rng.choice((0, 90, 400, 1000, 3000, 20_000))
        if charged and rng.random() < 0.35:
            name, slot, amount = charged.pop(rng.randrange(len(charged)))
            adjustment = [Adjustment(name, "sliding", slot, rng.randint(-amount, amount), amount)]
            memory.adjust_sync(adjustment, "memory")
            await redis_store.adjust(adjustment, "redis")
            continue
        counters = [
            _reserving(f"s{rng.randrange(2)}:tpm", 3000, rng.choice((0, 100, 400, 900, 1600))),
            Counter(f"s{rng.randrange(2)}:rpm", "sliding", 25, 1, window_ms=61_000, bucket_ms=1000),
        ]
        mem = memory.admit_sync(counters, now_ms)
        red = await redis_store.admit(counters, now_ms)
        assert (mem.allowed, mem.states) == (red.allowed, red.states)
        short += sum(1 for state in mem.states if state.pending)
        if mem.allowed and counters[0].cost:
            charged.append((counters[0].name, mem.states[0].slot, counters[0].cost))
    assert short > 20  # refusals with reservations in flight were compared
