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
from tests.limits.conftest import epoch
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


# --- Quotas held by reservations in flight --------------------------------------------------

DAILY = LimitPolicy(token_quota=5000, token_quota_period="daily")
# A quota keeps its reservations in flight per minute of admission, for ten minutes
# (limits/store.py: QUOTA_HELD_BUCKET_MS, QUOTA_HELD_WINDOW_MS; docs/limits.md).
QUOTA_HELD_BUCKET_MS = 60_000
QUOTA_HELD_WINDOW_MS = 600_000


async def test_a_quota_held_by_requests_in_progress_asks_for_a_short_wait(
    limiter: Limiter, clock: FakeClock
) -> None:
    """The quota's version of the reviewer's case: a daily quota of 5,000, four requests in
    progress reserving 1,100 each; a fifth was told 403 until midnight although the four
    settle seconds later to 150 each. The settled usage (none) leaves room: 429, 5 s."""
    held = [await admit(limiter, 1100, DAILY) for _ in range(4)]
    assert all(admission.allowed for admission in held)
    clock.advance(0.5)
    refused = await admit(limiter, 1100, DAILY)
    assert (refused.status, refused.code) == (429, "TokenQuotaInFlight")
    assert refused.retry_after_s == IN_FLIGHT_RETRY_MS / 1000
    h = headers(refused)
    assert (h["Retry-After"], h["retry-after-ms"]) == ("5", str(IN_FLIGHT_RETRY_MS))
    assert "x-should-retry" not in h  # the SDKs retry it
    assert refused.reason == (
        "Token quota of 5000 tokens per day for sub:a is held by requests still in progress "
        "(4400 tokens reserved until they end); the usage settled so far leaves room for this "
        "request: retry after 5.0 s."
    )
    clock.advance(1)
    for admission in held:
        await limiter.settle(admission.reservation, 150)
    assert (await admit(limiter, 1100, DAILY)).allowed


async def test_a_quota_the_settled_usage_exhausts_stays_403(
    limiter: Limiter, clock: FakeClock
) -> None:
    """Reservations in flight shorten the answer only when they cover the shortfall, i.e.
    when the usage settled so far leaves room for the request."""
    await use(limiter, 4000, DAILY)
    in_flight = await admit(limiter, 800, DAILY)
    refused = await admit(limiter, 300, DAILY)  # 100 short, 800 in flight: could be enough
    assert (refused.status, refused.code) == (429, "TokenQuotaInFlight")
    assert "800 tokens reserved" in refused.reason
    exhausted = await admit(limiter, 1100, DAILY)  # 900 short: the settled 4,000 leave 1,000
    assert (exhausted.status, exhausted.code) == (403, "TokenQuotaExceeded")
    assert exhausted.retry_after_s > 3600
    assert headers(exhausted)["x-should-retry"] == "false"
    await limiter.settle(in_flight.reservation, 800)  # as estimated: all of it used
    refused = await admit(limiter, 300, DAILY)
    assert (refused.status, refused.code) == (403, "TokenQuotaExceeded")
    await limiter.settle(in_flight.reservation, 0)  # settled already: changes nothing
    assert (await admit(limiter, 200, DAILY)).allowed  # what is left is still usable


async def test_a_released_quota_reservation_is_no_longer_in_flight(
    limiter: Limiter, clock: FakeClock
) -> None:
    first = await admit(limiter, 3000, DAILY)
    second = await admit(limiter, 2000, DAILY)
    await limiter.release(first.reservation)  # nothing used
    await limiter.settle(second.reservation, 5000)  # more than estimated: all of it used
    refused = await admit(limiter, 1, DAILY)
    assert (refused.status, refused.code) == (403, "TokenQuotaExceeded")


async def test_a_quota_reservation_never_settled_stops_counting_as_in_flight(
    limiter: Limiter, clock: FakeClock
) -> None:
    """A reservation whose settle was lost (the process died, Redis was down) does not make
    the quota answer "in progress" for the rest of the period: only the reservations of the
    last ten minutes (whole minutes of admission) count."""
    await admit(limiter, 5000, DAILY)  # at T0, a minute's start: never settled
    clock.advance(599.999)  # the last moment of its tenth minute
    refused = await admit(limiter, 100, DAILY)
    assert (refused.status, refused.code) == (429, "TokenQuotaInFlight")
    clock.advance(0.001)
    refused = await admit(limiter, 100, DAILY)
    assert (refused.status, refused.code) == (403, "TokenQuotaExceeded")
    assert "in progress" not in refused.reason


async def test_a_quota_in_flight_yields_to_a_longer_rate_wait_and_to_an_exhausted_quota(
    limiter: Limiter, clock: FakeClock
) -> None:
    """Held by requests in progress, a quota's refusal is a rate refusal among the others
    (the longest wait binds), and an exhausted quota of another key still wins."""
    owner_tpm = LimitPolicy(tokens_per_minute=1000, counter_key="owner")
    await use(limiter, 1000, owner_tpm, key="owner:o")  # full until T0+61, nothing in flight
    quota = LimitPolicy(token_quota=1500, token_quota_period="daily")
    await admit(limiter, 1400, quota)  # in progress
    clock.advance(1)
    alone = await admit(limiter, 200, quota)  # 100 short, 1,400 in flight
    assert (alone.status, alone.code) == (429, "TokenQuotaInFlight")
    refused = await limiter.admit(
        [LimitRequest("sub:a", quota, 200), LimitRequest("owner:o", owner_tpm, 200)]
    )
    assert (refused.status, refused.code) == (429, "TokenRateLimitExceeded")
    assert refused.retry_after_s == pytest.approx(60.0)  # the window's, not the quota's 5 s
    assert "owner:o" in refused.reason
    owner_quota = LimitPolicy(token_quota=1000, token_quota_period="daily", counter_key="owner")
    await use(limiter, 1000, owner_quota, key="owner:o")  # used up, nothing in flight
    refused = await limiter.admit(
        [LimitRequest("sub:a", quota, 200), LimitRequest("owner:o", owner_quota, 200)]
    )
    assert (refused.status, refused.code) == (403, "TokenQuotaExceeded")
    assert "owner:o" in refused.reason


async def test_a_quota_in_flight_renewing_within_seconds_says_so(
    limiter: Limiter, clock: FakeClock
) -> None:
    hourly = LimitPolicy(token_quota=1000, token_quota_period="hourly")
    clock.set(epoch("2023-11-14T22:59:57.5"))  # 2.5 s before the next hour
    await admit(limiter, 1000, hourly)
    refused = await admit(limiter, 10, hourly)
    assert (refused.status, refused.code) == (429, "TokenQuotaInFlight")
    assert refused.retry_after_s == pytest.approx(2.5)


def _quota(name: str, limit: int, cost: int, end_ms: int) -> Counter:
    return Counter(name, "fixed", limit, cost, end_ms=end_ms, reserve=True)


async def test_redis_keeps_a_quotas_amounts_in_flight_by_minute_and_only_while_they_count(
    make_redis_store: Callable[..., RedisStore],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """A quota's reservations in flight are a hash beside it, minute -> amount: a minute's
    field is deleted when its reservations have all settled, and fields too old to count
    (settles that were lost) when a new minute's field is made; the hash expires on its
    own, and a settle never re-creates it."""
    store = make_redis_store(fail_mode="closed")
    held_key = redis_prefix + "q:held"
    now_ms = 1_700_000_040_000
    end_ms = now_ms + 86_400_000
    minute = now_ms // QUOTA_HELD_BUCKET_MS

    async def fields() -> dict[int, int]:
        raw = await redis_client.hgetall(held_key)
        return {int(field): int(value) for field, value in raw.items()}

    first = await store.admit([_quota("q", 10_000, 300, end_ms)], now_ms)
    second = await store.admit([_quota("q", 10_000, 200, end_ms)], now_ms + 10)
    assert first.states[0].slot == second.states[0].slot == minute
    assert await fields() == {minute: 500}
    ttl = QUOTA_HELD_WINDOW_MS + QUOTA_HELD_BUCKET_MS
    assert ttl - 1000 < await redis_client.pttl(held_key) <= ttl
    await store.adjust([Adjustment("q", "fixed", minute, -250, 300)], "redis")
    assert await fields() == {minute: 200}
    assert await redis_client.get(redis_prefix + "q") == b"250"
    await store.adjust([Adjustment("q", "fixed", minute, 0, 200)], "redis")
    assert await fields() == {}
    assert await redis_client.exists(held_key) == 0
    await store.adjust([Adjustment("q", "fixed", minute, 0, 200)], "redis")  # no key again
    assert await redis_client.exists(held_key) == 0
    await store.admit([_quota("q", 10_000, 100, end_ms)], now_ms + 5000)  # never settled
    await store.admit([_quota("q", 10_000, 100, end_ms)], now_ms + 120_000)
    assert await fields() == {minute: 100, minute + 2: 100}
    later = now_ms + QUOTA_HELD_WINDOW_MS + 60_000  # the first minute no longer counts
    await store.admit([_quota("q", 10_000, 100, end_ms)], later)
    assert await fields() == {minute + 2: 100, minute + 11: 100}
    # A quota that is no reservation (a counter without reserve) has no held key.
    await store.admit([Counter("plain", "fixed", 10, 1, end_ms=end_ms)], now_ms)
    assert await redis_client.exists(redis_prefix + "plain:held") == 0


async def test_memory_and_redis_agree_on_what_a_quota_holds_in_flight(
    make_redis_store: Callable[..., RedisStore],
) -> None:
    """A seeded mix of reserving quota and TPM admissions, settles, releases and lost
    settles over an hour gives identical answers from both stores, amounts in flight
    included."""
    memory = MemoryStore()
    redis_store = make_redis_store(fail_mode="closed")
    rng = random.Random(20261208)
    now_ms = 1_700_000_040_000
    end_ms = now_ms + 86_400_000
    charged: list[tuple[str, str, int, int]] = []
    refusals = {True: 0, False: 0}  # a quota's refusals with a wait, with amounts in flight?
    for _ in range(600):
        now_ms += rng.choice((0, 90, 1000, 7000, 30_000))
        if charged and rng.random() < 0.3:
            name, kind, slot, amount = charged.pop(rng.randrange(len(charged)))
            if rng.random() < 0.2:
                continue  # a settle that was lost
            adjustment = [
                Adjustment(name, kind, slot, rng.randint(-amount, amount), amount)  # type: ignore[arg-type]
            ]
            memory.adjust_sync(adjustment, "memory")
            await redis_store.adjust(adjustment, "redis")
            continue
        counters = [
            _quota(f"q{rng.randrange(2)}", 40_000, rng.choice((0, 200, 900, 2500)), end_ms),
            _reserving("s:tpm", 20_000, rng.choice((0, 100, 400))),
        ]
        mem = memory.admit_sync(counters, now_ms)
        red = await redis_store.admit(counters, now_ms)
        assert (mem.allowed, mem.states) == (red.allowed, red.states)
        if mem.states[0].retry_after_ms > 0:
            refusals[bool(mem.states[0].pending)] += 1
        if mem.allowed:
            for counter, state in zip(counters, mem.states, strict=True):
                if counter.cost:
                    charged.append((counter.name, counter.kind, state.slot, counter.cost))
    assert refusals[True] > 10 and refusals[False] > 10  # both kinds were compared
