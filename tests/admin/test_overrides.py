"""A subscription's limit overrides through the admin API: set with
``PUT /subscriptions/{id}/overrides`` (or at creation), read back, applied by the running
gateway, checked with the limit policy's own rules (422 naming the field), refused for
anyone but an administrator and for a cancelled subscription, and audited."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.admin.entra import ADMIN_APP, ADMIN_GROUP, ADMIN_ROLE, admin_section
from tests.admin.harness import API_VERSION, AdminHarness, admin_gateway
from tests.support.idp import TestIdentityProvider

#: A product whose policy is counted per subscription (the overrides are merged into it),
#: with a monthly quota so that an override can contradict it.
STARTER: dict[str, Any] = {
    "name": "starter",
    "deployments": ["*"],
    "limits": {
        "requests_per_minute": 100,
        "token_quota": 1_000_000_000,
        "token_quota_period": "monthly",
    },
}
MESSAGES: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[AdminHarness]:
    with admin_gateway(tmp_path, products=[STARTER]) as harness:
        yield harness


def _overrides(h: AdminHarness, sub_id: str) -> Any:
    r = h.api.get(f"/subscriptions/{sub_id}")
    assert r.status_code == 200, r.text
    return r.json()["overrides"]


def _chat(h: AdminHarness, key: str) -> tuple[int, str]:
    """One chat completion through the openai SDK: (status, the requests limit it saw)."""
    client = openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    )
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
        )
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers.get("x-ratelimit-limit-requests", "")
    finally:
        client.close()
    return raw.http_response.status_code, raw.headers["x-ratelimit-limit-requests"]


def test_overrides_are_set_read_back_audited_and_limit_the_running_gateway(
    h: AdminHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    limited, limited_key = h.create("team-a", "limited")
    other, other_key = h.create("team-a", "other")
    version = h.gw.gateway.repository.version()

    r = h.api.put(
        f"/subscriptions/{limited}/overrides", json={"limits": {"requests_per_minute": 2}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"] == limited
    assert r.json()["overrides"] == {"limits": {"requests_per_minute": 2}}
    assert _overrides(h, limited) == {"limits": {"requests_per_minute": 2}}
    listed = h.api.get("/subscriptions", params={"search": limited}).json()["items"]
    assert [s["overrides"] for s in listed] == [{"limits": {"requests_per_minute": 2}}]
    assert _overrides(h, other) == {}
    # The change moved the state version, which every running gateway polls.
    assert h.gw.gateway.repository.version() > version

    h.gw.gateway.refresher.refresh_now()  # the poll, now rather than within 0.2 s
    assert [_chat(h, limited_key) for _ in range(3)] == [(200, "2"), (200, "2"), (429, "2")]
    # Only that subscription: the other keeps the product's limit.
    assert [_chat(h, other_key) for _ in range(3)] == [(200, "100")] * 3

    # {} clears them: the product's limit applies again.
    cleared = h.api.put(f"/subscriptions/{limited}/overrides", json={})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["overrides"] == {}
    h.gw.gateway.refresher.refresh_now()
    assert _chat(h, limited_key) == (200, "100")

    audit = [r.getMessage() for r in caplog.records if r.name == "sluicegate.admin"]
    path = f"/admin/api/subscriptions/{limited}/overrides"
    assert audit[-2:] == [f"admin API: PUT {path} by token: 200"] * 2


def test_invalid_overrides_are_refused_naming_the_field(h: AdminHarness) -> None:
    sub_id, _ = h.create("team-a", "k")
    kept = {"limits": {"requests_per_minute": 7}}
    assert h.api.put(f"/subscriptions/{sub_id}/overrides", json=kept).status_code == 200
    cases: list[tuple[Any, str]] = [
        ({"limits": {"tokens_per_minut": 5}}, "limits.tokens_per_minut: Extra inputs"),
        ({"limits": {"tokens_per_minute": 0}}, "limits.tokens_per_minute: Input should be"),
        ({"limits": {"requests_per_minute": "many"}}, "limits.requests_per_minute: Input"),
        ({"limits": {"counter_key": "team"}}, "limits.counter_key: Input should be"),
        ({"limits": {"quota_timezone": "Mars/Olympus"}}, "limits.quota_timezone: Value error"),
        ({"limits": {"retry_after_header": "Retry After"}}, "limits.retry_after_header: Value"),
        # Valid alone, but not over the product's quota (no period left for it).
        (
            {"limits": {"token_quota_period": None}},
            "limits: Value error, token_quota and token_quota_period must be set together "
            "(merged over the limits of product 'starter')",
        ),
        ({"limits": {"token_quota": 5}}, "limits: Value error, token_quota and token_quota_p"),
        ({"limits": 5}, "limits: Input should be a valid dictionary"),
        ({"limits": None}, "limits: Input should be a valid dictionary"),
        ({"limit": {"tokens_per_minute": 5}}, "limit: Extra inputs are not permitted"),
        ([{"limits": {}}], "body: Input should be a valid dictionary"),
    ]
    for body, message in cases:
        r = h.api.put(f"/subscriptions/{sub_id}/overrides", json=body)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"code", "message"} and error["code"] == "InvalidRequest"
        assert error["message"].startswith(message), (body, r.text)
    for raw in (b"", b"{", b"   "):
        r = h.api.put(f"/subscriptions/{sub_id}/overrides", content=raw)
        assert r.status_code == 422, (raw, r.text)
        assert r.json()["error"]["code"] == "InvalidRequest"
    assert _overrides(h, sub_id) == kept

    unknown = h.api.put("/subscriptions/sub_nope/overrides", json=kept)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "NotFound"


def test_overrides_at_creation_are_checked_and_stored_as_the_policy_reads_them(
    h: AdminHarness,
) -> None:
    base = {"product": "starter", "owner": "team-a", "name": "k"}
    bad = h.api.post("/subscriptions", json={**base, "overrides": {"limits": {"tpm": 5}}})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"] == {
        "code": "InvalidRequest",
        "message": "overrides.limits.tpm: Extra inputs are not permitted",
    }
    clash = {"limits": {"token_quota": None}}
    bad = h.api.post("/subscriptions", json={**base, "overrides": clash})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["message"].startswith("overrides.limits: Value error")
    assert h.api.get("/subscriptions").json()["total"] == 0  # nothing was created

    # APIM's spelling of a period and a number as text are stored as the policy reads them.
    limits = {"token_quota": "5000", "token_quota_period": "Daily", "tokens_per_minute": None}
    made = h.api.post("/subscriptions", json={**base, "overrides": {"limits": limits}})
    assert made.status_code == 201, made.text
    stored = {
        "limits": {"token_quota": 5000, "token_quota_period": "daily", "tokens_per_minute": None}
    }
    assert made.json()["subscription"]["overrides"] == stored
    assert _overrides(h, made.json()["subscription"]["id"]) == stored
    # Without overrides, as before.
    plain = h.api.post("/subscriptions", json=base)
    assert plain.status_code == 201 and plain.json()["subscription"]["overrides"] == {}


def test_a_cancelled_subscription_takes_no_overrides(h: AdminHarness) -> None:
    sub_id, _ = h.create("team-a", "k")
    assert h.api.post(f"/subscriptions/{sub_id}/cancel").status_code == 200
    r = h.api.put(f"/subscriptions/{sub_id}/overrides", json={"limits": {"requests_per_minute": 1}})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "Conflict"
    assert "cancelled for good" in r.json()["error"]["message"]
    assert _overrides(h, sub_id) == {}


def test_only_administrators_may_set_overrides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    with (
        TestIdentityProvider() as idp,
        admin_gateway(tmp_path, products=[STARTER], admin=admin_section(idp)) as h,
    ):
        sub_id, _ = h.create("team-a", "k")
        url = f"{h.url}/admin/api/subscriptions/{sub_id}/overrides"
        body = {"limits": {"requests_per_minute": 1}}
        not_admin = idp.issue(aud=ADMIN_APP, groups=[str(uuid.uuid4())], roles=["Reader"])
        refused = [
            (not_admin, 403, "NotAnAdmin"),
            ("not-the-admin-token-0123456789", 401, "Unauthorized"),
            (None, 401, "Unauthorized"),
        ]
        for credential, status, code in refused:
            headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
            r = httpx.put(url, json=body, headers=headers, timeout=30)
            assert r.status_code == status, (credential, r.text)
            assert r.json()["error"]["code"] == code
        assert _overrides(h, sub_id) == {}

        # An administrator's Entra ID token may (by group or by role), and is audited by name.
        admins: list[tuple[str, dict[str, Any]]] = [
            ("admin-by-group", {"groups": [ADMIN_GROUP]}),
            ("admin-by-role", {"roles": [ADMIN_ROLE]}),
        ]
        for oid, claims in admins:
            admin = idp.issue(aud=ADMIN_APP, oid=oid, **claims)
            r = httpx.put(url, json=body, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
            assert r.status_code == 200, r.text
        assert _overrides(h, sub_id) == body
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin API: PUT")]
    path = f"/admin/api/subscriptions/{sub_id}/overrides"
    assert audit == [f"admin API: PUT {path} by {oid}: 200" for oid, _ in admins]
