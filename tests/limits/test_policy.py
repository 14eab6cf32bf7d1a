"""Policies: validation, product/subscription merge, counter keys, reservation size, ceiling."""

from __future__ import annotations

import pydantic
import pytest

from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.limits.ceiling import apply_max_tokens_ceiling
from sluicegate.limits.policy import LimitPolicy, merge, resolve_counter_key, tokens_to_reserve
from sluicegate.tokens.estimate import TokenEstimate


def test_defaults_are_apim_like() -> None:
    policy = LimitPolicy()
    assert not policy.has_limits
    assert policy.counter_key == "subscription"
    assert policy.estimate_prompt_tokens is True
    assert policy.default_completion_tokens == 1024
    assert policy.retry_after_header == "Retry-After"
    assert policy.remaining_tokens_header is None
    assert policy.remaining_quota_header is None
    assert policy.tokens_consumed_header is None
    assert policy.quota_timezone == "UTC"


@pytest.mark.parametrize(
    "data",
    [
        {"tokens_per_minit": 10},  # typo
        {"tokens_per_minute": 0},
        {"token_quota": 100},  # no period
        {"token_quota_period": "daily"},  # no quota
        {"token_quota": 100, "token_quota_period": "fortnightly"},
        {"quota_timezone": "Mars/Olympus"},
        {"retry_after_header": "Retry After"},
        {"max_tokens_action": "truncate"},
        {"counter_key": "team"},
    ],
)
def test_invalid_policies_are_errors(data: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        LimitPolicy.model_validate(data)


def test_apim_period_spelling_is_accepted() -> None:
    policy = LimitPolicy.model_validate({"token_quota": 5, "token_quota_period": "Monthly"})
    assert policy.token_quota_period == "monthly"


def test_policies_are_immutable() -> None:
    policy = LimitPolicy(tokens_per_minute=10)
    with pytest.raises(pydantic.ValidationError):
        policy.tokens_per_minute = 20


def test_subscription_overrides_win_field_by_field() -> None:
    product = LimitPolicy(
        tokens_per_minute=10_000,
        requests_per_minute=60,
        token_quota=1_000_000,
        token_quota_period="monthly",
        remaining_tokens_header="x-remaining",
    )
    merged = merge(product, {"tokens_per_minute": 50_000, "requests_per_minute": None})
    assert merged.tokens_per_minute == 50_000
    assert merged.requests_per_minute is None  # an explicit None lifts the limit
    assert merged.token_quota == 1_000_000
    assert merged.remaining_tokens_header == "x-remaining"
    assert merge(None, {"tokens_per_minute": 5}) == LimitPolicy(tokens_per_minute=5)
    with pytest.raises(pydantic.ValidationError):
        merge(product, {"tokens_per_minuet": 1})
    with pytest.raises(pydantic.ValidationError):
        merge(product, {"token_quota_period": None})


def test_counter_keys() -> None:
    def key(kind: str, **kwargs: str | None) -> str:
        policy = LimitPolicy.model_validate({"counter_key": kind})
        return resolve_counter_key(policy, subscription_id="s1", **kwargs)

    assert key("subscription", owner="o") == "sub:s1"
    assert key("owner", owner="team-a") == "owner:team-a"
    assert key("owner", owner=None) == "sub:s1"  # a standalone subscription
    assert key("product", product="gold") == "product:gold"
    assert key("client_ip", client_ip="10.1.2.3") == "ip:10.1.2.3"
    assert key("client_ip") == "ip:unknown"


def test_tokens_to_reserve() -> None:
    estimate = TokenEstimate(120, 1000, True, "tiktoken:o200k_base")
    assert tokens_to_reserve(LimitPolicy(), estimate) == 1120
    off = LimitPolicy(estimate_prompt_tokens=False)
    # APIM's estimate-prompt-tokens="false": usage from the response only, nothing reserved
    # up front (the completion budget neither: a 1,024-token default refused every request
    # without max_tokens under a 100 TPM limit, as too large for it).
    assert tokens_to_reserve(off, estimate) == 0
    assert tokens_to_reserve(off, estimate, stream=True) == 120  # APIM: a stream's prompt


def test_ceiling_rejects_or_clamps_what_the_client_asked_for() -> None:
    reject = LimitPolicy(max_tokens_ceiling=4096)
    clamp = LimitPolicy(max_tokens_ceiling=4096, max_tokens_action="clamp")
    body = {"messages": [], "max_tokens": 8000, "max_completion_tokens": 100}

    refused = apply_max_tokens_ceiling(body, "chat.completions", reject)
    assert refused.error is not None and "4096" in refused.error and "max_tokens" in refused.error
    assert refused.body is body

    clamped = apply_max_tokens_ceiling(body, "chat.completions", clamp)
    assert clamped.error is None and clamped.changed
    assert clamped.body == {"messages": [], "max_tokens": 4096, "max_completion_tokens": 100}
    assert body["max_tokens"] == 8000  # the original is not modified

    responses = apply_max_tokens_ceiling({"max_output_tokens": 5000}, "responses", clamp)
    assert responses.body == {"max_output_tokens": 4096}
    fine = apply_max_tokens_ceiling({"max_tokens": 4096}, "completions", reject)
    assert fine.error is None and not fine.changed
    absent = apply_max_tokens_ceiling({"messages": []}, "chat.completions", reject)
    assert absent.error is None and not absent.changed
    assert apply_max_tokens_ceiling(body, "embeddings", reject).error is None
    assert apply_max_tokens_ceiling(body, "chat.completions", LimitPolicy()).error is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"request_quota": 100}, "request_quota and request_quota_period must be set together"),
        ({"request_quota_period": "daily"}, "must be set together"),
        ({"request_quota": 0, "request_quota_period": "daily"}, "greater than 0"),
        ({"request_quota": 10, "request_quota_period": "fortnightly"}, "Input should be 'hourly'"),
        ({"remaining_requests_quota_header": "Remaining Requests"}, "not a valid HTTP header"),
    ],
)
def test_invalid_request_quotas_are_errors(data: dict[str, object], problem: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=problem):
        LimitPolicy.model_validate(data)


def test_a_request_quota_is_a_limit_alone_or_beside_a_token_quota() -> None:
    alone = LimitPolicy.model_validate({"request_quota": 5, "request_quota_period": "Monthly"})
    assert alone.has_limits and alone.request_quota_period == "monthly"
    both = LimitPolicy(
        token_quota=1000, token_quota_period="daily", request_quota=5, request_quota_period="hourly"
    )
    assert both.has_limits


def test_the_config_check_refuses_a_request_quota_without_its_period() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "backends": [{"name": "b", "url": "https://b.example.com"}],
                "deployments": [{"name": "d", "backend": "b"}],
                "products": [{"name": "p", "deployments": ["d"], "limits": [{"request_quota": 5}]}],
            }
        )
    assert info.value.problems == [
        "products[0].limits[0]: request_quota and request_quota_period must be set together"
    ]


def test_subscription_overrides_merge_the_request_quota_field_by_field() -> None:
    product = LimitPolicy(
        request_quota=1000,
        request_quota_period="monthly",
        remaining_requests_quota_header="x-remaining-requests-quota",
    )
    lowered = merge(product, {"request_quota": 10})
    assert (lowered.request_quota, lowered.request_quota_period) == (10, "monthly")
    assert lowered.remaining_requests_quota_header == "x-remaining-requests-quota"
    lifted = merge(product, {"request_quota": None, "request_quota_period": None})
    assert lifted.request_quota is None and not lifted.has_limits
    added = merge(None, {"request_quota": 3, "request_quota_period": "daily"})
    assert added.request_quota == 3
    with pytest.raises(pydantic.ValidationError, match="must be set together"):
        merge(product, {"request_quota_period": None})
