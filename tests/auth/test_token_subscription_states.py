"""Review of the subscription states (R5): an Entra ID / OIDC caller whose token rule maps it
to a subscription that is not active is refused as a key of that subscription is (403
``SubscriptionInactive``), and works once an administrator approves the subscription."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sluicegate.admin.service import AdminService
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.subscriptions import SubscriptionRepository
from tests.auth.harness import MESSAGES, EntraHarness, entra_gateway
from tests.support.idp import TestIdentityProvider

APP = str(uuid.uuid4())
PRODUCTS = [{"name": "reviewed", "deployments": ["*"], "approval_required": True}]


@pytest.fixture
def h(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> Iterator[EntraHarness]:
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        subscriptions={"team-a": "reviewed"},
        rules=lambda ids: [{"app_ids": [APP], "subscription": ids["team-a"]}],
        products=PRODUCTS,
    ) as harness:
        yield harness


def test_a_token_mapped_to_a_submitted_subscription_waits_for_the_approval(
    h: EntraHarness, idp: TestIdentityProvider
) -> None:
    sub_id = h.subs["team-a"]
    admin = AdminService(
        h.gateway.config, SubscriptionRepository(h.gateway.engine), h.gateway.hasher
    )
    assert admin.get(sub_id).state.value == "submitted"
    token = idp.issue(azp=APP)
    with h.azure(token) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
        body = refused.value.body
        assert isinstance(body, dict) and body.get("code") == "SubscriptionInactive", body
        assert f"Subscription {sub_id} is submitted" in str(body.get("message"))
        admin.reject(sub_id, "not this quarter")
        h.gateway.refresher.refresh_now()
        with pytest.raises(openai.PermissionDeniedError, match="is rejected"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert h.records() == []  # refused before admission: nothing in the ledger
