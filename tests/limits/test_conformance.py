"""One conformance suite for every counter store: the same limiter, the same answers.

Each test runs against the in-memory store and the Redis store (real Redis, own prefix),
driven by a fake clock; times are relative to T0, a minute boundary.
"""

from __future__ import annotations

import asyncio
import heapq
import random

import pytest

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import Admission
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.policy import DEFAULT_COMPLETION_TOKENS, LimitPolicy, tokens_to_reserve
from sluicegate.tokens.estimate import TokenEstimate
from tests.limits.conftest import epoch

TPM = LimitPolicy(tokens_per_minute=10_000)


def headers(admission: Admission) -> dict[str, str]:
    return dict(admission.headers())


async def admit(
    limiter: Limiter, tokens: int, policy: LimitPolicy = TPM, key: str = "sub:a"
) -> Admission:
    return await limiter.admit([LimitRequest(key, policy, tokens)])


async def use(
    limiter: Limiter, tokens: int, policy: LimitPolicy = TPM, key: str = "sub:a"
) -> Admission:
    """Admit and settle at once to the estimate: tokens used, no longer in flight (a refusal
    then waits for the window, not for requests in progress)."""
    admission = await admit(limiter, tokens, policy, key)
    await limiter.settle(admission.reservation, tokens)
    return admission


async def test_tpm_admits_until_full_then_refuses_with_exact_retry_after(
    limiter: Limiter, clock: FakeClock
) -> None:
    first = await use(limiter, 6000)
    assert first.allowed and first.status == 200
    assert headers(first)["x-ratelimit-remaining-tokens"] == "4000"
    assert headers(first)["x-ratelimit-limit-tokens"] == "10000"

    clock.advance(10)
    second = await use(limiter, 4000)
    assert second.allowed
    assert headers(second)["x-ratelimit-remaining-tokens"] == "0"

    clock.advance(10.5)
    refused = await admit(limiter, 3000)
    assert not refused.allowed
    assert refused.status == 429
    assert refused.code == "TokenRateLimitExceeded"
    assert refused.reservation is None
    # The 6000 charged in bucket T0 stay counted 61 buckets, until T0+61: 40.5 s from now
    # (T0+20.5), so never less than 60 s after the request's true arrival.
    assert refused.retry_after_s == pytest.approx(40.5)
    h = headers(refused)
    assert h["Retry-After"] == "41"
    assert h["retry-after-ms"] == "40500"
    assert h["x-ratelimit-remaining-tokens"] == "0"
    assert "x-should-retry" not in h
    assert "10000 tokens per minute" in refused.reason and "sub:a" in refused.reason

    clock.advance(40.4)
    assert not (await admit(limiter, 3000)).allowed
    clock.advance(0.1)
    again = await admit(limiter, 3000)
    assert again.allowed
    assert headers(again)["x-ratelimit-remaining-tokens"] == "3000"


async def test_retry_after_waits_for_as_many_buckets_as_the_request_needs(
    limiter: Limiter, clock: FakeClock
) -> None:
    for step, tokens in ((0, 3000), (5, 3000), (5, 4000)):
        clock.advance(step)
        assert (await use(limiter, tokens)).allowed
    clock.advance(20)  # T0+30, the window holds 3000@T0, 3000@T0+5, 4000@T0+10
    small = await admit(limiter, 2000)
    assert small.retry_after_s == pytest.approx(31.0)  # T0's bucket frees enough at T0+61
    large = await admit(limiter, 5000)
    assert large.retry_after_s == pytest.approx(36.0)  # needs T0+5's bucket too (T0+66)


async def test_rpm_counts_requests_and_release_keeps_them(
    limiter: Limiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(requests_per_minute=3)
    for _ in range(3):
        admission = await admit(limiter, 10, policy)
        assert admission.allowed
        await limiter.release(admission.reservation)
        clock.advance(1)
    refused = await admit(limiter, 10, policy)
    assert refused.status == 429
    assert refused.code == "RequestRateLimitExceeded"
    assert refused.retry_after_s == pytest.approx(58.0)  # T0's request leaves at T0+61
    h = headers(refused)
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in h


async def test_no_double_burst_at_a_minute_boundary(limiter: Limiter, clock: FakeClock) -> None:
    clock.advance(59.5)
    assert (await use(limiter, 10_000)).allowed
    clock.advance(1.0)  # T0+60.5: a fixed window would be empty again
    refused = await admit(limiter, 1)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(59.5)  # bucket T0+59 counts until T0+120
    clock.advance(59.4)
    assert not (await admit(limiter, 1)).allowed
    clock.advance(0.1)
    assert (await admit(limiter, 10_000)).allowed


async def test_tokens_per_sliding_minute_never_exceed_the_limit(
    limiter: Limiter, clock: FakeClock
) -> None:
    """Requests every 0.7 s for 3 minutes: any 60 s span holds at most the limit."""
    policy = LimitPolicy(tokens_per_minute=5000)
    admitted: list[tuple[float, int]] = []
    for i in range(260):
        tokens = 300 + (i * 37) % 500
        if (await admit(limiter, tokens, policy)).allowed:
            admitted.append((clock.now(), tokens))
        clock.advance(0.7)
    assert sum(t for _, t in admitted) > 10_000  # the limit kept being reusable
    for start, _ in admitted:
        in_window = sum(t for at, t in admitted if start <= at < start + 60)
        assert in_window <= 5000


async def test_no_60_second_span_of_arrivals_holds_more_than_the_limit(
    limiter: Limiter, clock: FakeClock
) -> None:
    """Greedy clients arriving late in a bucket and all retrying exactly when told: no span
    [t, t+60 s) of true arrival times may hold more than the limit. (With a 60-bucket
    window the charges of a late arrival left after 59.1 s and this held twice the limit.)"""
    policy = LimitPolicy(tokens_per_minute=1000)
    clock.advance(0.9)
    admitted: list[tuple[float, int]] = []
    end = clock.now() + 200
    while clock.now() < end:
        admission = await admit(limiter, 100, policy)
        if admission.allowed:
            admitted.append((clock.now(), 100))
            clock.advance(0.001)
        else:
            clock.advance(admission.retry_after_s)
    assert len(admitted) >= 30  # the limit was reused minute after minute
    for start, _ in admitted:
        assert sum(t for at, t in admitted if start <= at < start + 60) <= 1000


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_arrivals_and_synchronized_retries_never_overfill_a_60_second_span(
    limiter: Limiter, clock: FakeClock, seed: int
) -> None:
    """Eight greedy clients, seeded, with TPM and RPM both binding: after an admission a
    client sends again at once or late in a later second (x.900-x.999 s); after a refusal it
    retries exactly ``retry-after-ms`` later, so refused clients wake together when a bucket
    frees. No span [t, t+60 s) of arrival times may hold more tokens or requests than the
    limits (with a 60-bucket window every seed here breaks one of them)."""
    rng = random.Random(seed)
    policy = LimitPolicy(tokens_per_minute=5000, requests_per_minute=20)
    start_ms = int(clock.now() * 1000)
    pending = [(start_ms + rng.randrange(3000), client) for client in range(8)]
    heapq.heapify(pending)
    admitted: list[tuple[int, int]] = []  # (arrival ms, tokens)
    refusals: list[str | None] = []
    while pending[0][0] < start_ms + 240_000:
        at_ms, client = heapq.heappop(pending)
        clock.set((at_ms + 0.5) / 1000)  # mid-millisecond, so float rounding cannot move it
        assert int(clock.now() * 1000) == at_ms  # the arrival time the limiter sees
        tokens = rng.randrange(10, 60) if rng.random() < 0.5 else rng.randrange(100, 700)
        admission = await admit(limiter, tokens, policy, key="sub:span")
        if admission.allowed:
            admitted.append((at_ms, tokens))
            if rng.random() < 0.5:
                next_ms = at_ms + rng.randrange(3)
            else:
                next_ms = (at_ms // 1000 + rng.randrange(1, 4)) * 1000 + rng.randrange(900, 1000)
        else:
            refusals.append(admission.code)
            next_ms = at_ms + int(headers(admission)["retry-after-ms"])
        heapq.heappush(pending, (next_ms, client))
    # Both limits were reused minute after minute, both refused, and clients retried.
    assert sum(t for _, t in admitted) > 2.5 * 5000 and len(admitted) > 3 * 20
    assert set(refusals) == {"TokenRateLimitExceeded", "RequestRateLimitExceeded"}
    assert len(refusals) > 40
    for first, _ in admitted:
        span = [t for at, t in admitted if first <= at < first + 60_000]
        assert sum(span) <= 5000, f"{sum(span)} tokens in the 60 s from {first - start_ms} ms"
        assert len(span) <= 20, f"{len(span)} requests in the 60 s from {first - start_ms} ms"


async def test_request_larger_than_the_limit_is_refused_for_good(limiter: Limiter) -> None:
    refused = await admit(limiter, 10_001)
    assert refused.status == 429
    assert refused.code == "TokenRequestTooLarge"
    h = headers(refused)
    assert h["x-should-retry"] == "false"
    assert "Retry-After" not in h and "retry-after-ms" not in h
    assert "10001" in refused.reason
    assert (await admit(limiter, 10_000)).allowed  # nothing was charged


async def test_quota_refuses_with_403_until_the_month_renews(
    limiter: Limiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(token_quota=1000, token_quota_period="monthly")
    clock.set(epoch("2024-01-31T23:59:50"))
    assert (await use(limiter, 800, policy)).allowed
    refused = await admit(limiter, 300, policy)
    assert refused.status == 403
    assert refused.code == "TokenQuotaExceeded"
    assert refused.retry_after_s == pytest.approx(10.0)
    h = headers(refused)
    assert h["x-should-retry"] == "false"
    assert h["Retry-After"] == "10"
    assert "2024-02-01T00:00:00+00:00" in refused.reason
    assert (await admit(limiter, 200, policy)).allowed  # what is left is still usable
    clock.set(epoch("2024-02-01T00:00:00"))
    assert (await admit(limiter, 1000, policy)).allowed


#: (period, zone, an instant in the period, the instant it renews): calendar cuts that quotas
#: of tokens and of requests must both make.
PERIOD_EDGES = [
    ("monthly", "UTC", "2024-02-29T23:59:59", "2024-03-01T00:00:00"),  # leap day
    ("monthly", "UTC", "2023-02-28T23:59:59", "2023-03-01T00:00:00"),
    ("yearly", "UTC", "2024-12-31T23:59:59.5", "2025-01-01T00:00:00"),
    ("weekly", "UTC", "2024-03-10T12:00:00", "2024-03-11T00:00:00"),  # Sunday → Monday
    ("daily", "UTC", "2024-03-10T23:00:00", "2024-03-11T00:00:00"),
    ("hourly", "UTC", "2024-03-10T23:15:00", "2024-03-11T00:00:00"),
    ("daily", "Asia/Tokyo", "2024-01-01T14:59:59", "2024-01-01T15:00:00"),
    # New York on the day clocks go forward: the local day is 23 hours long.
    ("daily", "America/New_York", "2024-03-10T10:00:00", "2024-03-11T04:00:00"),
    ("monthly", "Europe/Berlin", "2024-03-31T21:00:00", "2024-03-31T22:00:00"),
]


@pytest.mark.parametrize(("period", "timezone", "full_at", "renews_at"), PERIOD_EDGES)
async def test_quota_period_edges(
    limiter: Limiter,
    clock: FakeClock,
    period: str,
    timezone: str,
    full_at: str,
    renews_at: str,
) -> None:
    policy = LimitPolicy.model_validate(
        {"token_quota": 100, "token_quota_period": period, "quota_timezone": timezone}
    )
    clock.set(epoch(full_at))
    assert (await use(limiter, 100, policy)).allowed
    refused = await admit(limiter, 1, policy)
    assert refused.status == 403
    assert refused.retry_after_s == pytest.approx(epoch(renews_at) - epoch(full_at))
    clock.set(epoch(renews_at) - 0.001)
    assert not (await admit(limiter, 1, policy)).allowed
    clock.set(epoch(renews_at))
    assert (await admit(limiter, 100, policy)).allowed


async def test_several_limits_are_reserved_all_or_none(limiter: Limiter) -> None:
    sub_tpm = LimitPolicy(tokens_per_minute=10_000)
    sub_quota = LimitPolicy(token_quota=10_000, token_quota_period="daily")
    owner_tpm = LimitPolicy(tokens_per_minute=5000, counter_key="owner")
    assert (await limiter.admit([LimitRequest("owner:o", owner_tpm, 3000)])).allowed

    refused = await limiter.admit(
        [
            LimitRequest("sub:a", sub_tpm, 4000),
            LimitRequest("sub:a", sub_quota, 4000),
            LimitRequest("owner:o", owner_tpm, 4000),
        ]
    )
    assert refused.status == 429
    assert "5000 tokens per minute" in refused.reason and "owner:o" in refused.reason
    # Nothing was charged on the subscription's TPM nor on its quota.
    whole = await limiter.admit(
        [LimitRequest("sub:a", sub_tpm, 10_000), LimitRequest("sub:a", sub_quota, 10_000)]
    )
    assert whole.allowed


async def test_quota_refusal_wins_over_rate_refusal(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=1000, token_quota=1500, token_quota_period="daily")
    assert (await use(limiter, 1000, policy)).allowed
    refused = await admit(limiter, 600, policy)
    assert refused.status == 403 and refused.code == "TokenQuotaExceeded"


async def test_the_same_counter_in_two_policies_is_charged_once(limiter: Limiter) -> None:
    loose = LimitRequest("sub:a", LimitPolicy(tokens_per_minute=50_000), 3000)
    tight = LimitRequest("sub:a", LimitPolicy(tokens_per_minute=4000), 3000)
    first = await limiter.admit([loose, tight])
    assert first.allowed
    assert headers(first)["x-ratelimit-remaining-tokens"] == "1000"  # the tighter one shows
    assert not (await limiter.admit([loose, tight])).allowed
    assert (await limiter.admit([loose])).allowed


async def test_settle_down_returns_the_unused_estimate(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=10_000, token_quota=20_000, token_quota_period="daily")
    admission = await admit(limiter, 5000, policy)
    await limiter.settle(admission.reservation, 2000)
    after = await admit(limiter, 1, policy)
    assert headers(after)["x-ratelimit-remaining-tokens"] == str(10_000 - 2000 - 1)
    assert (await admit(limiter, 7999, policy)).allowed
    assert not (await admit(limiter, 1, policy)).allowed


async def test_settle_up_overshoots_and_then_blocks_even_zero_cost(
    limiter: Limiter, clock: FakeClock
) -> None:
    admission = await admit(limiter, 1000)
    clock.advance(30)
    await limiter.settle(admission.reservation, 12_000)  # never refused at settle time
    zero = await admit(limiter, 0)
    assert not zero.allowed
    assert zero.retry_after_s == pytest.approx(31.0)  # the T0 bucket must leave (T0+61)
    clock.advance(30)
    assert not (await admit(limiter, 0)).allowed
    clock.advance(1)
    assert (await admit(limiter, 0)).allowed


async def test_without_estimation_a_request_is_admitted_below_the_limit_and_charged_its_usage(
    limiter: Limiter, clock: FakeClock
) -> None:
    """APIM's estimate-prompt-tokens="false" (its token-rate-limiting lab: 100 TPM): nothing
    is reserved up front, whatever the completion budget, so a request is admitted while the
    count is below the limit (at limit - 1 too: a zero cost needs room for one token), the
    reported usage is charged at settle, the request that passes the limit goes through, and
    the next ones wait for the window. The gateway reserved the default budget of 1,024
    tokens and refused every such request as larger than the whole limit."""
    policy = LimitPolicy(tokens_per_minute=100, estimate_prompt_tokens=False)
    # What estimate_request_tokens gives a policy that does not count the prompt.
    no_budget = TokenEstimate(0, DEFAULT_COMPLETION_TOKENS, False, "not-counted")
    asked = TokenEstimate(0, 500, False, "not-counted")  # max_tokens 500: ignored, as in APIM
    cost = tokens_to_reserve(policy, no_budget)

    first = await admit(limiter, cost, policy)
    assert first.allowed, first.reason
    await limiter.settle(first.reservation, 60)  # bucket T0
    clock.advance(1)
    second = await admit(limiter, tokens_to_reserve(policy, asked), policy)
    assert second.allowed, second.reason
    assert headers(second)["x-ratelimit-remaining-tokens"] == "40"
    await limiter.settle(second.reservation, 39)  # bucket T0+1: 99 in the window
    clock.advance(1)
    third = await admit(limiter, cost, policy)  # count == limit - 1
    assert third.allowed, third.reason
    await limiter.settle(third.reservation, 30)  # 129: over the limit, let through

    refused = await admit(limiter, cost, policy)
    assert not refused.allowed
    assert (refused.status, refused.code) == (429, "TokenRateLimitExceeded")
    assert refused.should_retry
    # 129 + 1 - 100 = 30 must leave: the 60 of bucket T0 do, at T0+61 (now T0+2).
    assert refused.retry_after_s == pytest.approx(59.0)
    h = headers(refused)
    assert h["Retry-After"] == "59" and "x-should-retry" not in h

    clock.advance(59)  # T0+61: 69 left
    fourth = await admit(limiter, cost, policy)
    assert fourth.allowed, fourth.reason
    await limiter.settle(fourth.reservation, 31)  # exactly 100
    at_limit = await admit(limiter, cost, policy)  # count == limit: no room
    assert not at_limit.allowed and at_limit.code == "TokenRateLimitExceeded"
    assert at_limit.retry_after_s == pytest.approx(1.0)  # the 39 of T0+1 leave at T0+62


async def test_settle_of_quota_raises_the_period_counter(limiter: Limiter) -> None:
    policy = LimitPolicy(token_quota=10_000, token_quota_period="daily")
    admission = await admit(limiter, 100, policy)
    await limiter.settle(admission.reservation, 9_950)
    refused = await admit(limiter, 100, policy)
    assert refused.status == 403
    assert (await admit(limiter, 50, policy)).allowed


async def test_release_gives_tokens_back_and_only_once(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=10_000, requests_per_minute=100)
    admission = await admit(limiter, 8000, policy)
    await limiter.release(admission.reservation)
    await limiter.release(admission.reservation)  # second call is a no-op
    await limiter.settle(admission.reservation, 5000)  # so is a settle after a release
    after = await admit(limiter, 10_000, policy)
    assert after.allowed
    assert headers(after)["x-ratelimit-remaining-requests"] == "98"


async def test_settle_after_the_window_moved_on_does_not_touch_new_windows(
    limiter: Limiter, clock: FakeClock
) -> None:
    admission = await admit(limiter, 4000)
    clock.advance(61)
    assert (await admit(limiter, 10_000)).allowed
    await limiter.release(admission.reservation)  # its bucket is gone: nothing happens
    assert not (await admit(limiter, 1)).allowed


async def test_a_settle_lands_in_its_own_bucket_among_later_ones(
    limiter: Limiter, clock: FakeClock
) -> None:
    """A settle changes the bucket its admission charged, wherever it is in the window (the
    in-memory store looks for it newest first)."""
    first = await admit(limiter, 3000)  # T0
    clock.advance(10)
    middle = await admit(limiter, 3000)  # T0+10
    clock.advance(10)
    await admit(limiter, 3000)  # T0+20
    await limiter.settle(middle.reservation, 1000)
    await limiter.settle(first.reservation, 3000)  # as estimated: nothing to change
    assert headers(await admit(limiter, 0))["x-ratelimit-remaining-tokens"] == "3000"
    clock.advance(51)  # T0+71: the buckets of T0 and T0+10 have left the window
    assert headers(await admit(limiter, 0))["x-ratelimit-remaining-tokens"] == "7000"


async def test_concurrent_admissions_never_exceed_the_limit(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=5000, requests_per_minute=1000)
    results = await asyncio.gather(*(admit(limiter, 100, policy) for _ in range(120)))
    assert sum(result.allowed for result in results) == 50
    after = await admit(limiter, 0, policy)
    assert not after.allowed
    assert headers(after)["x-ratelimit-remaining-requests"] == str(1000 - 50)


async def test_concurrent_multi_limit_admissions_stay_all_or_none(limiter: Limiter) -> None:
    shared = LimitPolicy(tokens_per_minute=3000)
    own = LimitPolicy(tokens_per_minute=1000)

    async def one(i: int) -> bool:
        requests = [LimitRequest("owner:o", shared, 100), LimitRequest(f"sub:{i % 5}", own, 100)]
        return (await limiter.admit(requests)).allowed

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert sum(results) == 30  # the owner's 3000 tokens bind
    used = 0
    for i in range(5):
        probe = await limiter.admit([LimitRequest(f"sub:{i}", own, 0)])
        used += 1000 - int(headers(probe)["x-ratelimit-remaining-tokens"])
    assert used == 3000  # refused admissions reserved nothing on the subscriptions


async def test_no_limits_admits_without_headers(limiter: Limiter) -> None:
    admission = await admit(limiter, 10**9, LimitPolicy())
    assert admission.allowed
    assert admission.headers() == []
    await limiter.settle(admission.reservation, 10)


async def test_request_quota_counts_admitted_requests_and_refuses_with_403_until_renewal(
    limiter: Limiter, clock: FakeClock
) -> None:
    """APIM's quota-by-key calls: every admitted request counts 1 (tokens are no matter), a
    released request (its backend failed) still counts, and the quota answers 403 with
    Retry-After until its calendar period renews."""
    policy = LimitPolicy(
        request_quota=3,
        request_quota_period="daily",
        remaining_requests_quota_header="x-remaining-requests-quota",
    )
    clock.set(epoch("2024-01-31T23:59:50"))
    first = await use(limiter, 50_000, policy)
    assert first.allowed
    assert headers(first)["x-remaining-requests-quota"] == "2"
    failed = await admit(limiter, 10, policy)
    await limiter.release(failed.reservation)  # the backend failed: still counted
    third = await use(limiter, 0, policy)
    assert headers(third)["x-remaining-requests-quota"] == "0"

    clock.advance(2)
    refused = await admit(limiter, 1, policy)
    assert (refused.status, refused.code) == (403, "RequestQuotaExceeded")
    assert refused.reservation is None
    assert refused.retry_after_s == pytest.approx(8.0)
    h = headers(refused)
    assert h["Retry-After"] == "8" and h["retry-after-ms"] == "8000"
    assert h["x-should-retry"] == "false"
    assert h["x-remaining-requests-quota"] == "0"
    assert refused.reason.startswith("Request quota of 3 requests per day is exhausted for sub:a")
    assert "2024-02-01T00:00:00+00:00" in refused.reason

    clock.set(epoch("2024-02-01T00:00:00") - 0.001)
    assert not (await admit(limiter, 1, policy)).allowed  # refusals charged nothing
    clock.set(epoch("2024-02-01T00:00:00"))
    renewed = await admit(limiter, 1, policy)
    assert renewed.allowed
    assert headers(renewed)["x-remaining-requests-quota"] == "2"


@pytest.mark.parametrize(("period", "timezone", "full_at", "renews_at"), PERIOD_EDGES)
async def test_request_quota_periods_are_cut_as_the_token_quotas(
    limiter: Limiter,
    clock: FakeClock,
    period: str,
    timezone: str,
    full_at: str,
    renews_at: str,
) -> None:
    """The same calendar cut as the token quota, in the policy's quota_timezone: the same
    period, renewing at the same instant, for both quotas of one policy."""
    policy = LimitPolicy.model_validate(
        {
            "request_quota": 2,
            "request_quota_period": period,
            "token_quota": 1_000,
            "token_quota_period": period,
            "quota_timezone": timezone,
        }
    )
    clock.set(epoch(full_at))
    assert (await use(limiter, 1, policy)).allowed
    assert (await use(limiter, 1, policy)).allowed
    refused = await admit(limiter, 1, policy)
    assert (refused.status, refused.code) == (403, "RequestQuotaExceeded")
    assert refused.retry_after_s == pytest.approx(epoch(renews_at) - epoch(full_at))
    clock.set(epoch(renews_at) - 0.001)
    assert not (await admit(limiter, 1, policy)).allowed
    clock.set(epoch(renews_at))
    assert (await use(limiter, 1_000, policy)).allowed  # both renewed
    assert (await admit(limiter, 0, policy)).code == "TokenQuotaExceeded"


async def test_token_and_request_quotas_are_separate_counters_charged_all_or_none(
    limiter: Limiter,
) -> None:
    """Either quota can bind; a request refused by one charges neither (the other's count is
    untouched); the refusal's code and message say which quota it was."""
    policy = LimitPolicy(
        token_quota=1_000,
        token_quota_period="daily",
        request_quota=3,
        request_quota_period="daily",
        remaining_quota_header="x-remaining-quota-tokens",
        remaining_requests_quota_header="x-remaining-requests-quota",
    )
    first = await use(limiter, 900, policy)
    assert headers(first)["x-remaining-quota-tokens"] == "100"
    assert headers(first)["x-remaining-requests-quota"] == "2"
    over_tokens = await admit(limiter, 200, policy)
    assert (over_tokens.status, over_tokens.code) == (403, "TokenQuotaExceeded")
    assert over_tokens.reason.startswith("Token quota")
    assert (await use(limiter, 50, policy)).allowed  # the refusal took no request
    last = await use(limiter, 50, policy)
    assert headers(last)["x-remaining-requests-quota"] == "0"
    assert headers(last)["x-remaining-quota-tokens"] == "0"
    refused = await admit(limiter, 0, policy)
    assert refused.status == 403
    # Both are exhausted (tokens at the limit, requests too): either code is right; with
    # tokens left only the request quota can refuse.
    assert refused.code in {"TokenQuotaExceeded", "RequestQuotaExceeded"}
    requests_only = LimitPolicy(request_quota=3, request_quota_period="daily")
    assert (await admit(limiter, 0, requests_only, key="sub:b")).allowed
    for _ in range(2):
        assert (await admit(limiter, 0, requests_only, key="sub:b")).allowed
    only = await admit(limiter, 0, requests_only, key="sub:b")
    assert (only.status, only.code) == (403, "RequestQuotaExceeded")


async def test_a_request_quota_wins_over_rate_refusals_and_is_shared_by_policies_of_one_key(
    limiter: Limiter,
) -> None:
    """Two policies of one key with the same request quota period share its counter,
    charged once per request against the lower limit (APIM: several quota-by-key policies
    on one key increment once per request); an exhausted request quota wins over an RPM
    refusal (waiting a minute would not help)."""
    loose = LimitPolicy(request_quota=10, request_quota_period="monthly")
    tight = LimitPolicy(request_quota=2, request_quota_period="monthly", requests_per_minute=2)
    both = [LimitRequest("sub:a", loose, 10), LimitRequest("sub:a", tight, 10)]
    assert (await limiter.admit(both)).allowed
    assert (await limiter.admit(both)).allowed
    refused = await limiter.admit(both)
    assert (refused.status, refused.code) == (403, "RequestQuotaExceeded")
    assert "Request quota of 2 requests per month" in refused.reason
    # The loose policy alone has had 2 of its 10: charged once per request, not twice.
    alone = await limiter.admit([LimitRequest("sub:a", loose, 10)])
    assert alone.allowed
    assert [s.used for s in alone.limits] == [3]
