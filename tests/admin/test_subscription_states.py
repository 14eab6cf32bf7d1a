"""APIM's six subscription states through the admin API and a real gateway: the transition
table (every action from every state), approval, rejection, state comments, products with
``approval_required``, the computed ``expired`` state, and what a key of each state gets from
the gateway through the openai SDK."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sluicegate.storage.reports import fetch_records
from tests.admin.harness import API_VERSION, AdminHarness, admin_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
ACTIONS = ("approve", "reject", "suspend", "resume", "cancel")

#: The transition table as docs/subscriptions.md states it: for each state a subscription
#: reads as, what each action leaves it in (None: refused with 409, nothing changes).
EXPECTED: dict[str, dict[str, str | None]] = {
    "submitted": {
        "approve": "active",
        "reject": "rejected",
        "suspend": None,
        "resume": None,
        "cancel": "cancelled",
    },
    "active": {
        "approve": "active",  # a repeat: a retried approval answers as the first did
        "reject": None,
        "suspend": "suspended",
        "resume": "active",
        "cancel": "cancelled",
    },
    "suspended": {
        "approve": None,
        "reject": None,
        "suspend": "suspended",
        "resume": "active",
        "cancel": "cancelled",
    },
    "rejected": {
        "approve": None,
        "reject": "rejected",
        "suspend": None,
        "resume": None,
        "cancel": "cancelled",
    },
    "cancelled": {
        "approve": None,
        "reject": None,
        "suspend": None,
        "resume": None,
        "cancel": "cancelled",
    },
    "expired": {
        "approve": None,
        "reject": None,
        "suspend": None,
        "resume": None,
        "cancel": "cancelled",
    },
}

PRODUCTS = [
    {"name": "starter", "deployments": ["*"]},
    {"name": "reviewed", "deployments": ["*"], "approval_required": True},
]


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminHarness]:
    with admin_gateway(tmp_path_factory.mktemp("states"), products=PRODUCTS) as harness:
        yield harness


def _create(h: AdminHarness, **body: Any) -> dict[str, Any]:
    fields = {"product": "starter", "owner": "team-a", "name": "s", **body}
    r = h.api.post("/subscriptions", json=fields)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _in_state(h: AdminHarness, state: str) -> dict[str, Any]:
    """A new subscription that reads as ``state``, made through the admin API only."""
    if state == "expired":
        made = _create(h, expires_at=time.time() - 60)
    elif state in ("submitted", "rejected"):
        made = _create(h, state="submitted")
    else:
        made = _create(h)
    sub_id = made["subscription"]["id"]
    then = {"suspended": "suspend", "rejected": "reject", "cancelled": "cancel"}.get(state)
    if then is not None:
        assert h.api.post(f"/subscriptions/{sub_id}/{then}").status_code == 200
    shown = h.api.get(f"/subscriptions/{sub_id}").json()
    assert shown["state"] == state
    return made


@pytest.mark.parametrize("state", list(EXPECTED))
def test_every_action_from_every_state(h: AdminHarness, state: str) -> None:
    for action in ACTIONS:
        sub_id = _in_state(h, state)["subscription"]["id"]
        before = h.api.get(f"/subscriptions/{sub_id}").json()
        r = h.api.post(f"/subscriptions/{sub_id}/{action}", json={"state_comment": "why"})
        expected = EXPECTED[state][action]
        after = h.api.get(f"/subscriptions/{sub_id}").json()
        if expected is None:
            assert r.status_code == 409, (state, action, r.text)
            error = r.json()["error"]
            assert error["code"] == "Conflict"
            assert f"is {state}" in error["message"] and action in error["message"]
            assert after == before, (state, action)  # nothing changed, not even the comment
        else:
            assert r.status_code == 200, (state, action, r.text)
            assert r.json()["state"] == expected == after["state"], (state, action)
            assert after["state_comment"] == "why"


def test_unknown_subscription_and_bad_comments(h: AdminHarness) -> None:
    assert h.api.post("/subscriptions/sub_nope/approve").status_code == 404
    sub_id = _create(h, state="submitted")["subscription"]["id"]
    for comment in ("x" * 1001, "two\nlines", 5):
        r = h.api.post(f"/subscriptions/{sub_id}/approve", json={"state_comment": comment})
        assert r.status_code == 422, (comment, r.text)
        assert r.json()["error"]["message"].startswith("state_comment")
    assert h.api.get(f"/subscriptions/{sub_id}").json()["state"] == "submitted"


def test_a_comment_belongs_to_its_state_change(h: AdminHarness) -> None:
    sub_id = _create(h)["subscription"]["id"]
    r = h.api.post(f"/subscriptions/{sub_id}/suspend", json={"state_comment": " over budget "})
    assert r.json()["state_comment"] == "over budget"
    # Resumed without a comment: the suspension's reason no longer describes the state.
    assert h.api.post(f"/subscriptions/{sub_id}/resume").json()["state_comment"] is None


def test_creation_state_and_approval_required_products(h: AdminHarness) -> None:
    plain = _create(h)["subscription"]
    assert (plain["state"], plain["state_comment"]) == ("active", None)
    reviewed = _create(h, product="reviewed", state_comment="asked by mail")["subscription"]
    assert (reviewed["state"], reviewed["state_comment"]) == ("submitted", "asked by mail")
    # An administrator may skip the approval, or ask for one on any product.
    assert _create(h, product="reviewed", state="active")["subscription"]["state"] == "active"
    assert _create(h, state="submitted")["subscription"]["state"] == "submitted"
    for state in ("suspended", "rejected", "cancelled", "expired", "bogus"):
        r = h.api.post(
            "/subscriptions",
            json={"product": "starter", "owner": "o", "name": "n", "state": state},
        )
        assert r.status_code == 422, (state, r.text)
    products = {p["name"]: p for p in h.api.get("/products").json()["items"]}
    assert products["reviewed"]["approval_required"] is True
    assert products["starter"]["approval_required"] is False


def test_list_filters_by_the_effective_state(h: AdminHarness) -> None:
    owner = "filter-team"
    expired = _create(h, owner=owner, expires_at=time.time() - 1)["subscription"]["id"]
    live = _create(h, owner=owner, expires_at=time.time() + 3600)["subscription"]["id"]
    waiting = _create(h, owner=owner, state="submitted")["subscription"]["id"]

    def ids(state: str) -> set[str]:
        r = h.api.get("/subscriptions", params={"search": owner, "state": state})
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()["items"]}

    assert ids("expired") == {expired}
    assert ids("active") == {live}
    assert ids("submitted") == {waiting}
    assert ids("rejected") == set()


def _refusal(client: openai.OpenAI) -> tuple[int, Any]:
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    body = refused.value.body
    assert isinstance(body, dict)
    return refused.value.status_code, body.get("code")


def _sdk(h: AdminHarness, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    )


def test_only_active_keys_work_every_other_state_is_refused_as_suspended(
    h: AdminHarness,
) -> None:
    """Through the real gateway and the openai SDK: a submitted or rejected key gets what a
    suspended key gets (403 SubscriptionInactive), an expired one the expiry refusal of the
    same status; none of them reaches the ledger (refused before admission)."""
    made = {state: _in_state(h, state) for state in EXPECTED}
    h.gw.gateway.refresher.refresh_now()
    answers = {}
    for state, created in made.items():
        with _sdk(h, created["primary_key"]) as client:
            if state == "active":
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
                continue
            answers[state] = _refusal(client)
    assert answers["suspended"] == (403, "SubscriptionInactive")
    for state in ("submitted", "rejected", "cancelled"):
        assert answers[state] == answers["suspended"], state
    assert answers["expired"] == (403, "SubscriptionExpired")
    assert h.gw.gateway.ledger.flush(10.0)
    # Refused before admission: the ledger holds the active key's request, nothing of the
    # others (a refused request has no subscription, as for a suspended key).
    recorded = {r.subscription_id for r in fetch_records(h.gw.gateway.engine, limit=1_000_000)}
    assert made["active"]["subscription"]["id"] in recorded
    assert not recorded & {made[s]["subscription"]["id"] for s in answers}


def test_an_approval_reaches_the_running_gateway_within_the_refresh_interval(
    h: AdminHarness,
) -> None:
    made = _create(h, product="reviewed")
    sub_id, key = made["subscription"]["id"], made["primary_key"]
    assert made["subscription"]["state"] == "submitted"
    h.gw.gateway.refresher.refresh_now()
    with _sdk(h, key) as client:
        with pytest.raises(openai.PermissionDeniedError) as waiting:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        body = waiting.value.body
        assert isinstance(body, dict) and body.get("code") == "SubscriptionInactive"
        # What the operators can do for it: approve, not resume.
        assert f"Subscription {sub_id} is submitted" in str(body.get("message"))
        assert "approve it" in str(body.get("message")), body
        assert h.api.post(f"/subscriptions/{sub_id}/approve").status_code == 200
        started = time.monotonic()
        while True:  # the background refresher (refresh_seconds 0.2), not refresh_now
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
                break
            except openai.PermissionDeniedError:
                assert time.monotonic() - started < 1.5, "approval not seen within 1.5 s"
                time.sleep(0.02)
        # A rejection of another request stops nothing that works.
        other = _create(h, product="reviewed")
        other_id = other["subscription"]["id"]
        assert h.api.post(f"/subscriptions/{other_id}/reject").status_code == 200
        assert h.api.post(f"/subscriptions/{other_id}/approve").status_code == 409
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)


def test_state_changes_are_audited_without_their_comment(
    h: AdminHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    sub_id = _create(h, state="submitted")["subscription"]["id"]
    h.api.post(f"/subscriptions/{sub_id}/reject", json={"state_comment": "secret-ish reason"})
    h.api.post(f"/subscriptions/{sub_id}/approve")
    audit = [r.getMessage() for r in caplog.records if r.name == "sluicegate.admin"]
    assert audit[-2:] == [
        f"admin API: POST /admin/api/subscriptions/{sub_id}/reject by token: 200",
        f"admin API: POST /admin/api/subscriptions/{sub_id}/approve by token: 409",
    ]
    assert "secret-ish" not in caplog.text


def test_a_key_is_refused_with_the_state_the_admin_api_shows(h: AdminHarness) -> None:
    """The refusal names the effective state: a submitted or suspended subscription past its
    expiry is ``expired`` in the admin API (approving it is refused), so its key gets the
    expiry refusal, not an invitation to approve or resume it; a rejected one past its
    expiry stays rejected."""
    past = time.time() - 60
    waiting = _create(h, state="submitted", expires_at=past)
    held = _create(h, expires_at=past)
    assert h.api.post(f"/subscriptions/{held['subscription']['id']}/suspend").status_code in (
        200,
        409,
    )
    turned_down = _create(h, state="submitted", expires_at=time.time() + 3600)
    down_id = turned_down["subscription"]["id"]
    assert h.api.post(f"/subscriptions/{down_id}/reject").status_code == 200
    h.gw.gateway.refresher.refresh_now()
    for made in (waiting, held):
        assert h.api.get(f"/subscriptions/{made['subscription']['id']}").json()["state"] == (
            "expired"
        )
        with (
            _sdk(h, made["primary_key"]) as client,
            pytest.raises(openai.PermissionDeniedError) as refused,
        ):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        body = refused.value.body
        assert isinstance(body, dict) and body.get("code") == "SubscriptionExpired", body
        assert "issue a new subscription" in str(body.get("message")), body
    with _sdk(h, turned_down["primary_key"]) as client:
        assert _refusal(client) == (403, "SubscriptionInactive")
