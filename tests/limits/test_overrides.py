"""A subscription's limit overrides through a real gateway (real simulator, the openai SDK):
applied when no product has limits, and an invalid one stored (bypassing the admin API's
checks) ignored with one warning instead of answering 500. Overrides are set through the
storage layer, as anything that writes the database could."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sluicegate.admin.service import AdminError
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.support.gateway import GatewayThread, gateway_config

MESSAGES: Any = [{"role": "user", "content": "hello hello hello"}]
# The simulator counts 10 prompt tokens and answers max_tokens (10): 20 tokens a request,
# and the gateway reserves 19 (its own count of the prompt, 9, and the budget).
TPM = 30


def _gateway(tmp_path: Path, sim: SimulatorThread, limits: dict[str, Any] | None) -> Harness:
    product: dict[str, Any] = {"name": "starter", "deployments": ["*"]}
    if limits is not None:
        product["limits"] = limits
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=[product],
    )
    return Harness(GatewayThread(cfg).start(), sim)


def _subscription(
    h: Harness, name: str, overrides: dict[str, Any] | None = None
) -> tuple[str, str]:
    """A new subscription's id and key; ``overrides`` written straight to the database,
    then the gateway's view refreshed (no waiting for its next poll)."""
    issued = h.new_key(name=name)
    sub_id = issued.subscription.id
    if overrides is not None:
        h.gw.gateway.repository.set_overrides(sub_id, overrides)
        h.gw.gateway.refresher.refresh_now()
    return sub_id, issued.primary_key or ""


def _chat(h: Harness, key: str) -> tuple[int, str | None, str | None]:
    """One chat completion through the openai SDK, without retries: (status, the error code
    or None, the x-ratelimit-limit-tokens header or None)."""
    client = h.sdk(key)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
        )
    except openai.APIStatusError as exc:
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        return exc.status_code, code, exc.response.headers.get("x-ratelimit-limit-tokens")
    finally:
        client.close()
    return raw.http_response.status_code, None, raw.headers.get("x-ratelimit-limit-tokens")


def test_an_override_limits_a_subscription_when_no_product_has_limits(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    """The gateway built no admitter when no product had limits, so a subscription's
    tokens_per_minute override was never enforced."""
    h = _gateway(tmp_path, simulator, None)
    stop_later.append(h)
    _, limited = _subscription(h, "limited", {"limits": {"tokens_per_minute": TPM}})
    _, free = _subscription(h, "free")
    assert _chat(h, limited) == (200, None, str(TPM))
    assert _chat(h, limited) == (429, "TokenRateLimitExceeded", str(TPM))  # 20 + 19 > 30
    for _ in range(3):  # no limits, and no limit headers, for the others
        assert _chat(h, free) == (200, None, None)
    assert sum(1 for _ in h.sim_log()) == 4  # the refused request never reached the backend


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ({"tokens_per_minute": "lots"}, "tokens_per_minute: Input should be a valid integer"),
        ({"tokens_per_hour": 5}, "tokens_per_hour: Extra inputs are not permitted"),
        (
            {"token_quota": 1000},
            "limits: Value error, token_quota and token_quota_period must be set together",
        ),
        ("lots", "a JSON object is expected, not str"),
    ],
)
def test_an_invalid_override_is_ignored_with_one_warning_and_the_products_limits_apply(
    tmp_path: Path,
    simulator: SimulatorThread,
    stop_later: list[Harness],
    caplog: pytest.LogCaptureFixture,
    limits: Any,
    problem: str,
) -> None:
    """Stored overrides the policy refuses answered every request of that subscription with
    500. Now the product's policy applies as if there were no override (not fail closed: an
    administrator's typo would lock a team out), and the gateway says so once per version
    of the subscription, naming the subscription and the field but no value and no key."""
    caplog.set_level(logging.WARNING, logger="sluicegate.limits")
    h = _gateway(tmp_path, simulator, {"tokens_per_minute": TPM})
    stop_later.append(h)
    sub_id, key = _subscription(h, "typo", {"limits": limits})
    assert _chat(h, key) == (200, None, str(TPM))
    assert _chat(h, key) == (429, "TokenRateLimitExceeded", str(TPM))  # the product's TPM
    assert _chat(h, key)[0] == 429
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluicegate.limits"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"subscription {sub_id} (product starter): its limits override is invalid and "
        f"ignored, the product's limits apply ({problem}"
    )
    assert "lots" not in warnings[0] and key not in warnings[0]
    # A new version of the subscription (an administrator's change) is told again, once.
    h.gw.gateway.repository.set_overrides(sub_id, {"limits": limits, "note": "still wrong"})
    h.gw.gateway.refresher.refresh_now()
    assert _chat(h, key)[0] == 429
    assert _chat(h, key)[0] == 429
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluicegate.limits"]
    assert len(warnings) == 2 and warnings[1] == warnings[0]


def test_a_request_quota_refuses_with_403_and_retry_after_and_a_subscription_overrides_it(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    """Through the real gateway and the openai SDK: a subscription's override lowers the
    product's request quota (merged field by field: the product's period and header stay);
    the request past it gets 403 RequestQuotaExceeded with Retry-After until the day
    renews (UTC midnight), never reaching the backend; another subscription keeps the
    product's quota."""
    h = _gateway(
        tmp_path,
        simulator,
        {
            "request_quota": 100,
            "request_quota_period": "daily",
            "remaining_requests_quota_header": "x-remaining-requests-quota",
        },
    )
    stop_later.append(h)
    _, limited = _subscription(h, "limited", {"limits": {"request_quota": 2}})
    _, other = _subscription(h, "other")
    client = h.sdk(limited)
    try:
        remaining = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
            )
            remaining.append(raw.headers.get("x-remaining-requests-quota"))
        assert remaining == ["1", "0"]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    finally:
        client.close()
    error = refused.value
    assert error.status_code == 403
    assert isinstance(error.body, dict) and error.body.get("code") == "RequestQuotaExceeded"
    assert str(error.body.get("message", "")).startswith(
        "Request quota of 2 requests per day is exhausted for"
    )
    now = time.time()
    to_midnight = 86_400 - now % 86_400
    retry_after = int(error.response.headers["retry-after"])
    assert to_midnight - 5 <= retry_after <= to_midnight + 5
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-remaining-requests-quota"] == "0"
    assert sum(1 for _ in h.sim_log()) == 2  # the refused request reached no backend
    assert _chat(h, other)[0] == 200  # the product's 100 a day
    metrics = httpx.get(f"{h.url}/metrics").text  # counted among the limits' refusals
    assert 'sluicegate_limit_rejections_total{reason="RequestQuotaExceeded"} 1.0' in metrics


def test_the_admin_api_lifts_a_request_quota_with_both_fields_null_and_never_one_alone(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    """docs/limits.md: ``{"request_quota": null}`` alone would leave the product's period
    without a quota (422, nothing stored); both null lift it for that subscription only."""
    h = _gateway(tmp_path, simulator, {"request_quota": 1, "request_quota_period": "daily"})
    stop_later.append(h)
    lifted, key = _subscription(h, "lifted")
    _, other = _subscription(h, "other")
    with pytest.raises(AdminError) as refused:
        h.admin.set_overrides(lifted, {"limits": {"request_quota": None}})
    assert refused.value.status == 422
    assert "request_quota and request_quota_period must be set together" in refused.value.message
    h.admin.set_overrides(lifted, {"limits": {"request_quota": None, "request_quota_period": None}})
    h.gw.gateway.refresher.refresh_now()
    assert [_chat(h, key)[0] for _ in range(3)] == [200, 200, 200]
    assert [_chat(h, other)[0] for _ in range(2)] == [200, 403]
