"""Keyless clients: the official ``openai`` SDK with ``azure_ad_token_provider`` calls the
gateway with tokens from the test identity provider, and the ledger attributes every call to
the subscription the token rules name, with the caller's identity."""

from __future__ import annotations

import uuid
from pathlib import Path

import openai

from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import MESSAGES, entra_gateway
from tests.support.idp import TestIdentityProvider

APP_A = str(uuid.uuid4())
GROUP_B = str(uuid.uuid4())


def _rules(ids: dict[str, str]) -> list[dict[str, object]]:
    return [
        {"app_ids": [APP_A], "subscription": ids["team-a"]},
        {"groups": [GROUP_B], "roles": ["Gateway.User"], "subscription": ids["team-b"]},
    ]


def test_sdk_with_token_provider_is_attributed_to_the_mapped_subscription(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    subs = {"team-a": "starter", "team-b": "starter"}
    with entra_gateway(tmp_path, simulator, idp, subscriptions=subs, rules=_rules) as h:
        # An application (managed identity / client credentials): matched by its app id.
        app_oid = str(uuid.uuid4())
        app_token = idp.issue(azp=APP_A, oid=app_oid)
        client = h.azure(app_token)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=4, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert len(text.split()) == 4
        emb = client.embeddings.create(model="text-embedding-3-small", input=["one two"])
        assert emb.usage.prompt_tokens > 0

        # A user: v1.0-style token (appid, no azp) matched by group and role together.
        user_oid = str(uuid.uuid4())
        user_token = idp.issue(
            azp=None, appid=str(uuid.uuid4()), oid=user_oid, groups=[GROUP_B, "other"],
            roles=["Gateway.User"], scp="user_impersonation",
        )  # fmt: skip
        reply = h.azure(user_token).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=3
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3

        # The OpenAI v1 client sends the token as its api_key (Authorization: Bearer).
        v1 = openai.OpenAI(base_url=f"{h.url}/openai/v1", api_key=app_token, max_retries=0)
        assert [m.id for m in v1.models.list()]
        v1_reply = v1.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
        assert v1_reply.choices[0].message.content

        records = h.records(expect=6)
        upstream = h.sim_log()
    assert len(records) == 6  # the model list is recorded too, without a backend
    by_caller: dict[str | None, list[str | None]] = {}
    for r in records:
        assert r.outcome == "ok", r
        by_caller.setdefault(r.caller, []).append(r.subscription_id)
    assert by_caller == {
        app_oid: [h.subs["team-a"]] * 5,
        user_oid: [h.subs["team-b"]],
    }
    assert {r.owner for r in records} == {"owner-team-a", "owner-team-b"}
    assert sum(r.streamed for r in records) == 1
    # Token-authenticated calls reached the backend like keyed ones.
    assert len(upstream) == 5


def test_token_and_key_traffic_share_limits(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    """A token mapped to a subscription spends that subscription's limits: two requests per
    minute, one by key and one by token, and the third (either way) is refused with 429."""
    products = [
        {"name": "starter", "deployments": ["*"], "limits": {"requests_per_minute": 2}},
    ]
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        subscriptions={"team-a": "starter"},
        rules=lambda ids: [{"app_ids": [APP_A], "subscription": ids["team-a"]}],
        products=products,
    ) as h:
        token = idp.issue(azp=APP_A)
        assert h.chat({"api-key": h.keys["team-a"]}).status_code == 200
        assert h.bearer(token).status_code == 200
        third = h.bearer(token)
        assert third.status_code == 429, third.text
        assert h.chat({"api-key": h.keys["team-a"]}).status_code == 429
        records = h.records(expect=4)
    assert [r.status for r in sorted(records, key=lambda r: r.ts)] == [200, 200, 429, 429]
    assert {r.subscription_id for r in records} == {h.subs["team-a"]}
