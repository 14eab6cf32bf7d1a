"""Admissions as the client sees them: headers with configured names, messages, codes."""

from __future__ import annotations

import pytest

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import unavailable
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.policy import LimitPolicy
from tests.limits.conftest import epoch

CONFIGURED = LimitPolicy(
    tokens_per_minute=10_000,
    requests_per_minute=100,
    token_quota=50_000,
    token_quota_period="daily",
    remaining_tokens_header="x-apim-remaining-tokens",
    remaining_quota_header="x-apim-remaining-quota",
    tokens_consumed_header="x-apim-consumed-tokens",
    retry_after_header="x-retry-after",
)


@pytest.fixture
def memory_limiter(clock: FakeClock) -> Limiter:
    return Limiter(MemoryStore(), clock)


async def test_allowed_headers_include_configured_names(memory_limiter: Limiter) -> None:
    admission = await memory_limiter.admit(
        [LimitRequest("sub:a", CONFIGURED, 1200, label="subscription team-a")]
    )
    assert admission.headers() == [
        ("x-ratelimit-limit-tokens", "10000"),
        ("x-ratelimit-remaining-tokens", "8800"),
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "99"),
        ("x-apim-remaining-tokens", "8800"),
        ("x-apim-remaining-quota", "48800"),
    ]
    assert repr(memory_limiter).startswith("Limiter(store=MemoryStore(")


async def test_refusal_uses_the_configured_retry_header_and_the_label(
    memory_limiter: Limiter, clock: FakeClock
) -> None:
    request = LimitRequest("sub:a", CONFIGURED, 9000, label="subscription team-a")
    first = await memory_limiter.admit([request])
    assert first.allowed
    await memory_limiter.settle(first.reservation, 9000)  # used, not in flight
    clock.advance(2.75)
    refused = await memory_limiter.admit([request])
    assert refused.reason == (
        "Token limit of 10000 tokens per minute exceeded for subscription team-a; "
        "retry after 58.2 s."
    )
    headers = dict(refused.headers())
    assert headers["x-retry-after"] == "59"  # T0's bucket counts until T0+61
    assert headers["retry-after-ms"] == "58250"
    assert "Retry-After" not in headers
    assert headers["x-ratelimit-remaining-tokens"] == "1000"


async def test_quota_message_names_the_renewal_in_the_quota_zone(
    memory_limiter: Limiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(
        token_quota=1000, token_quota_period="weekly", quota_timezone="Europe/Berlin"
    )
    clock.set(epoch("2024-03-07T10:00:00"))  # a Thursday
    used = await memory_limiter.admit([LimitRequest("owner:o", policy, 1000)])
    await memory_limiter.settle(used.reservation, 1000)  # used, not in flight
    refused = await memory_limiter.admit([LimitRequest("owner:o", policy, 1)])
    assert refused.status == 403
    assert refused.reason == (
        "Token quota of 1000 tokens per week is exhausted for owner:o; it renews at "
        "2024-03-11T00:00:00+01:00 (in 3 d 13 h)."
    )
    headers = dict(refused.headers())
    assert headers["Retry-After"] == str(3 * 86_400 + 13 * 3600)
    assert headers["x-should-retry"] == "false"


async def test_a_request_larger_than_the_quota_is_refused_for_good(
    memory_limiter: Limiter,
) -> None:
    policy = LimitPolicy(token_quota=1000, token_quota_period="daily")
    refused = await memory_limiter.admit([LimitRequest("sub:a", policy, 1001)])
    assert (refused.status, refused.code) == (403, "TokenRequestTooLarge")
    assert dict(refused.headers()) == {"x-should-retry": "false"}


def test_store_unavailable_is_a_503_with_retry_after() -> None:
    admission = unavailable(4.2, [LimitRequest("sub:a", LimitPolicy(tokens_per_minute=1), 1)])
    assert (admission.allowed, admission.status) == (False, 503)
    assert admission.code == "LimitStoreUnavailable"
    assert admission.headers() == [("Retry-After", "5"), ("retry-after-ms", "4200")]
