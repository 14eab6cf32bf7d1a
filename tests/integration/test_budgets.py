"""Spending budgets through a real gateway, the real openai SDK and the real rollup job: a
subscription that spends its product's budget is refused (403 BudgetExceeded, Retry-After
until the period renews) once the job has run, its neighbours are not, ``warn`` serves and
logs and counts each threshold once, and the next period serves again."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.admin.harness import ADMIN_TOKEN, API_VERSION, AdminHarness, admin_gateway
from tests.integration.conftest import OffsetClock

# The simulator counts 4 per message + words + 3 = 10 prompt tokens for this message, and
# answers max_tokens (10) completion tokens: 20 tokens, at 0.05 USD per token (50,000 USD per
# million, so that one request is a whole budget) 1.00 USD per request.
MESSAGES: Any = [{"role": "user", "content": "hello hello hello"}]
PER_REQUEST = 1.0
PRICES = [{"model": "gpt-4o-mini", "input": 50000, "output": 50000}]
PRODUCTS = [
    {"name": "team", "deployments": ["*"], "budget": {"amount": "1.5", "period": "daily"}},
]


#: How long the job may take to see a change. It waits retention.rollup_interval_seconds
#: (0.05 here) between runs, or 50 times its last run's duration (job.PACING): on a loaded
#: machine, several seconds.
WITHIN = 30.0


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def gateway(tmp_path: Path, clock: OffsetClock) -> Iterator[AdminHarness]:
    with admin_gateway(
        tmp_path,
        clock,
        products=PRODUCTS,
        prices=PRICES,
        retention={"rollup_interval_seconds": 0.05},
    ) as h:
        yield h


def chat(h: AdminHarness, key: str) -> Any:
    with openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    ) as client:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
        )


def until(what: Callable[[], bool], within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(0.02)


def job_state(h: AdminHarness) -> str:
    """For a failure's message: the rollup job's runs and the budgets' last refresh."""
    job = getattr(h.gw.server.config.app, "job", None)  # admin.mount.AdminGatewayApp
    budgets = h.gw.gateway.budgets
    return (
        f"{job and job.stats()}, {budgets!r} refreshed at {budgets.last_refresh}, now {time.time()}"
    )


def refused_within(h: AdminHarness, key: str, within: float = WITHIN) -> tuple[int, Any]:
    """Send until refused: (requests served meanwhile, the SDK's error)."""
    served = 0
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chat(h, key)
            served += 1
        except openai.PermissionDeniedError as exc:
            return served, exc
        time.sleep(0.05)
    raise AssertionError(f"never refused ({served} served): {job_state(h)}")


def test_over_budget_is_refused_until_the_period_renews(
    gateway: AdminHarness, clock: OffsetClock
) -> None:
    h = gateway
    a_id, a_key = h.create("team-a", "a", product="team")
    _, b_key = h.create("team-b", "b", product="team")
    lifted_id, lifted_key = h.create("team-c", "c", product="team")
    r = h.api.put(f"/subscriptions/{lifted_id}/overrides", json={"budget": None})
    assert r.status_code == 200, r.text
    h.gw.gateway.refresher.refresh_now()

    assert chat(h, a_key).http_response.status_code == 200  # 1.00 of 1.50
    assert chat(h, a_key).http_response.status_code == 200  # 2.00: over, not known yet
    # Served until the job's next run has seen it (the overshoot: a budget, not a limit).
    served, exc = refused_within(h, a_key)
    assert exc.status_code == 403
    error = exc.body if isinstance(exc.body, dict) and "code" in exc.body else exc.body["error"]
    assert error["code"] == "BudgetExceeded"
    now = clock.now()
    midnight = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
    renews = datetime.combine(midnight, datetime.min.time(), UTC)
    message = error["message"]
    assert a_id in message and "1.50 USD per day" in message
    assert f"renews at {renews.isoformat()}" in message
    headers = exc.response.headers
    wait = renews.timestamp() - now
    assert abs(int(headers["retry-after"]) - math.ceil(wait)) <= 2
    assert headers["x-should-retry"] == "false"
    assert exc.response.headers["content-type"].startswith("application/json")

    # Another subscription of the product, and one whose override lifts the budget.
    assert chat(h, b_key).http_response.status_code == 200
    for _ in range(3):
        assert chat(h, lifted_key).http_response.status_code == 200

    # The admin API shows the budget, what was spent and when it renews.
    r = h.api.get("/budgets", params={"subscription_id": a_id})
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["amount"] == "1.5" and item["currency"] == "USD"
    assert float(item["spent"]) == (2 + served) * PER_REQUEST
    assert item["refused"] is True and item["source"] == "product"
    assert item["period_end"] == renews.strftime("%Y-%m-%dT%H:%M:%SZ")
    everyone = {i["subscription_id"] for i in h.api.get("/budgets").json()["items"]}
    assert a_id in everyone and lifted_id not in everyone

    # The dashboard's subscription page says it in one line.
    with httpx.Client(base_url=h.url, timeout=30) as dashboard:
        login = dashboard.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303, login.text
        page = dashboard.get(f"/dashboard/subscriptions/{a_id}")
        assert page.status_code == 200
        line = f"Budget: {2 + served}.00 of 1.50 USD this day (over: refused)"
        assert line in page.text, page.text
        other = dashboard.get(f"/dashboard/subscriptions/{lifted_id}")
        assert other.status_code == 200 and 'id="budget"' not in other.text

    # Tomorrow: a new period, served again (before the job even runs again).
    clock.offset += renews.timestamp() - now + 1
    assert chat(h, a_key).http_response.status_code == 200
    until(lambda: h.gw.gateway.budgets.statuses[a_id].period_start >= renews.timestamp())
    assert chat(h, a_key).http_response.status_code == 200


def test_warn_serves_logs_and_counts_each_threshold_once(
    gateway: AdminHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = gateway
    sub_id, key = h.create("team-w", "w", product="team")
    warn = {"amount": "2", "period": "monthly", "action": "warn", "warn_at": [0.5, 0.9]}
    r = h.api.put(f"/subscriptions/{sub_id}/overrides", json={"budget": warn})
    assert r.status_code == 200, r.text
    h.gw.gateway.refresher.refresh_now()
    budgets = h.gw.gateway.budgets
    caplog.set_level(logging.WARNING, logger="sluicegate.budgets")

    for _ in range(3):  # 3.00 of 2.00: over, served anyway
        assert chat(h, key).http_response.status_code == 200
    until(lambda: sub_id in budgets.statuses and budgets.statuses[sub_id].over)
    runs = h.gw.gateway.budgets.last_refresh
    until(lambda: budgets.last_refresh != runs)  # at least one more run: no second line
    assert chat(h, key).http_response.status_code == 200
    assert sub_id not in budgets.refused

    lines = [r.getMessage() for r in caplog.records if r.name == "sluicegate.budgets"]
    mine = [line for line in lines if sub_id in line]
    assert len(mine) == 3, mine  # 50 %, 90 % and the whole budget, once each
    assert any("action warn: still served" in line for line in mine)
    assert all(key not in line for line in lines)
    metrics = h.gw.gateway.metrics.render().decode()
    assert 'sluicegate_budget_thresholds_crossed_total{action="warn"} 3.0' in metrics
    ratio = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'sluicegate_budget_spent_ratio{{subscription="{sub_id}"}}')
    ]
    assert ratio and float(ratio[0].split()[-1]) >= 1.5


def test_an_invalid_budget_override_is_refused_with_the_field(gateway: AdminHarness) -> None:
    h = gateway
    sub_id, _ = h.create("team-x", "x", product="team")
    for bad, field in [
        ({"amount": "-1"}, "budget.amount"),
        ({"amount": "1", "period": "hourly"}, "budget.period"),
        ({"amount": "1", "timezone": "Mars/Olympus"}, "budget.timezone"),
        ({"amount": "1", "warn_at": [0]}, "budget.warn_at"),
        ({"amount": "1", "action": "suspend"}, "budget.action"),
    ]:
        r = h.api.put(f"/subscriptions/{sub_id}/overrides", json={"budget": bad})
        assert r.status_code == 422, (bad, r.text)
        assert field in r.json()["error"]["message"], r.text


def test_a_budget_override_longer_than_the_hourly_retention_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    # 3 days of hourly rollups hold a daily budget's period (the product's), not a weekly one.
    with admin_gateway(
        tmp_path,
        clock,
        products=PRODUCTS,
        prices=PRICES,
        retention={"rollup_interval_seconds": 0.05, "hourly_rollups_days": 3},
    ) as h:
        sub_id, _ = h.create("team-x", "x", product="team")
        r = h.api.put(
            f"/subscriptions/{sub_id}/overrides",
            json={"budget": {"amount": "1", "period": "weekly"}},
        )
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "budget.period" in message and "hourly_rollups_days" in message, message
        r = h.api.put(
            f"/subscriptions/{sub_id}/overrides",
            json={"budget": {"amount": "1", "period": "daily"}},
        )
        assert r.status_code == 200, r.text
