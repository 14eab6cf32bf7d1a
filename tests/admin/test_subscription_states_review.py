"""Review of the subscription states (R5): key rotation by state, through the admin API and a
real gateway with the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.admin.harness import API_VERSION, AdminHarness, admin_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminHarness]:
    with admin_gateway(tmp_path_factory.mktemp("states-review")) as harness:
        yield harness


def _create(h: AdminHarness, **body: Any) -> str:
    fields = {"product": "starter", "owner": "team-r", "name": "r", **body}
    r = h.api.post("/subscriptions", json=fields)
    assert r.status_code == 201, r.text
    sub_id: str = r.json()["subscription"]["id"]
    return sub_id


def _refusal(h: AdminHarness, key: str) -> tuple[int, object]:
    client = openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    )
    with client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    body = refused.value.body
    return refused.value.status_code, body.get("code") if isinstance(body, dict) else None


def test_no_key_is_issued_for_a_subscription_whose_keys_never_work_again(
    h: AdminHarness,
) -> None:
    """A rejected or expired subscription is, like a cancelled one, for good (nothing
    approves a rejection or extends an expiry): rotating its key would hand out a secret that
    never works, which the dashboard already refuses to offer. 409, and the key is kept."""
    rejected = _create(h, state="submitted")
    assert h.api.post(f"/subscriptions/{rejected}/reject").status_code == 200
    expired = _create(h, expires_at=time.time() - 60)
    for sub_id, state in ((rejected, "rejected"), (expired, "expired")):
        before = h.api.get(f"/subscriptions/{sub_id}").json()
        r = h.api.post(f"/subscriptions/{sub_id}/rotate", json={"slot": "primary"})
        assert r.status_code == 409, (state, r.text)
        error = r.json()["error"]
        assert error["code"] == "Conflict" and f"is {state}" in error["message"], error
        assert "key" not in r.json()
        assert h.api.get(f"/subscriptions/{sub_id}").json() == before, state


def test_a_rotated_key_of_a_submitted_subscription_waits_for_the_approval(
    h: AdminHarness,
) -> None:
    """The key of a submitted subscription may be replaced (it is handed over before the
    approval), and the new key is refused as the old one was until the approval."""
    sub_id = _create(h, state="submitted")
    r = h.api.post(f"/subscriptions/{sub_id}/rotate", json={"slot": "secondary"})
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    h.gw.gateway.refresher.refresh_now()
    assert _refusal(h, key) == (403, "SubscriptionInactive")
    assert h.api.post(f"/subscriptions/{sub_id}/approve").status_code == 200
    h.gw.gateway.refresher.refresh_now()
    with openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    ) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)


def test_the_openapi_document_lists_the_409_of_a_rotation(h: AdminHarness) -> None:
    """A client generated from the document expects every status the operation answers."""
    doc = h.api.get("/openapi.json").json()
    rotate = doc["paths"]["/admin/api/subscriptions/{subscription_id}/rotate"]["post"]
    assert "409" in rotate["responses"], sorted(rotate["responses"])
