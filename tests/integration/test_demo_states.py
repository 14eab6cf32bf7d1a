"""Review of the subscription states (R5): a rerun of `sluicegate demo` finds its demo
subscription submitted, rejected or expired (changed by hand between runs) and still prints a
key that works: a submitted one is approved, a rejected or expired one replaced."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate.admin.service import AdminService
from sluicegate.auth.subscriptions import SubscriptionState
from sluicegate.cli.demo import DEMO_NAME, DEMO_OWNER, DEMO_PRODUCT, demo_key
from sluicegate.config.loader import parse_config
from sluicegate.gateway import key_hasher_for
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository
from tests.support.gateway import gateway_config, gateway_environ

S = SubscriptionState


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[AdminService]:
    config = parse_config(gateway_config(tmp_path, {"sim": "http://127.0.0.1:9"}))
    migrate(config.storage.url)
    engine = create_engine_for(config.storage.url)
    try:
        yield AdminService(
            config,
            SubscriptionRepository(engine),
            key_hasher_for(config, gateway_environ()),
            engine=engine,
        )
    finally:
        engine.dispose()


def _works(admin: AdminService, key: str) -> bool:
    assert admin.hasher is not None
    digest = admin.hasher.digest(key)
    subs, _ = admin.list(search=DEMO_NAME, limit=1000)
    owner = [s for s in subs if digest in (s.primary_key_hash, s.secondary_key_hash)]
    now = time.time()
    return len(owner) == 1 and owner[0].effective_state(now) is S.ACTIVE


def test_a_submitted_demo_subscription_is_approved(admin: AdminService) -> None:
    made = admin.create_subscription(
        product=DEMO_PRODUCT, owner=DEMO_OWNER, name=DEMO_NAME, state="submitted"
    )
    key, created = demo_key(admin)
    assert not created and _works(admin, key)
    assert admin.get(made.subscription.id).state is S.ACTIVE


@pytest.mark.parametrize("how", ["rejected", "expired"])
def test_a_demo_subscription_that_never_works_again_is_replaced(
    admin: AdminService, how: str
) -> None:
    if how == "rejected":
        old = admin.create_subscription(
            product=DEMO_PRODUCT, owner=DEMO_OWNER, name=DEMO_NAME, state="submitted"
        ).subscription.id
        admin.reject(old)
    else:
        old = admin.create_subscription(
            product=DEMO_PRODUCT, owner=DEMO_OWNER, name=DEMO_NAME, expires_at=time.time() - 1
        ).subscription.id
    key, created = demo_key(admin)
    assert created and _works(admin, key)
    assert admin.get(old).effective_state(time.time()) is S(how)
