"""Subscription states in the repository, on SQLite and PostgreSQL: migration 0004 (the state
comment) over a database holding subscriptions, guarded transitions, and the computed
``expired`` state in list filters."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from sluicegate.auth.subscriptions import SubscriptionState
from sluicegate.clock import FakeClock
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import alembic_config, current_revision, head_revision, migrate
from sluicegate.storage.subscriptions import (
    SubscriptionConflict,
    SubscriptionInvalid,
    SubscriptionRepository,
)
from tests.storage.conftest import SubscriptionFactory

NOW = 1_800_000_000.0
S = SubscriptionState


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW)


@pytest.fixture
def repo(engine: Engine, clock: FakeClock) -> SubscriptionRepository:
    return SubscriptionRepository(engine, clock=clock)


def _upgrade(url: str, revision: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def test_migration_0004_adds_the_comment_and_keeps_existing_subscriptions(
    db_url: str, make_subscription: SubscriptionFactory
) -> None:
    _upgrade(db_url, "0003")
    engine = create_engine_for(db_url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("subscriptions")}
        assert "state_comment" not in columns
        with engine.begin() as conn:  # a row as a gateway of revision 0003 stored it
            conn.execute(
                text(
                    "INSERT INTO subscriptions (id, name, owner, product, state, "
                    "primary_key_hash, secondary_key_hash, primary_key_prefix, "
                    "secondary_key_prefix, created_at, updated_at, expires_at, overrides) "
                    "VALUES ('sub-old', 'old', 'team', 'p', 'suspended', :p, :s, 'sg-p', "
                    "'sg-s', 1.0, 2.0, NULL, '{}')"
                ),
                {"p": b"p" * 32, "s": b"s" * 32},
            )
        engine.dispose()
        migrate(db_url)
        assert current_revision(engine) == head_revision() == "0004"
        repo = SubscriptionRepository(engine, clock=FakeClock(start=NOW))
        old = repo.get("sub-old")
        assert old is not None
        assert (old.state, old.state_comment, old.updated_at) == (S.SUSPENDED, None, 2.0)
        resumed = repo.set_state("sub-old", S.ACTIVE, comment="paid")
        assert (resumed.state, resumed.state_comment) == (S.ACTIVE, "paid")
        repo.create(make_subscription(1, state=S.SUBMITTED, state_comment="x" * 1000))
        with pytest.raises(SubscriptionInvalid) as too_long:
            repo.create(make_subscription(2, state_comment="x" * 1001))
        assert too_long.value.field == "state_comment"
        with pytest.raises(SubscriptionInvalid):
            repo.set_state("sub-1", S.ACTIVE, comment="y" * 1001)
    finally:
        engine.dispose()


def test_a_guarded_change_from_another_state_changes_nothing(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    repo.create(make_subscription(1, state=S.SUBMITTED))
    version = repo.version()
    rejected = repo.set_state(
        "sub-1", S.REJECTED, allowed_from={S.SUBMITTED, S.REJECTED}, comment="no budget"
    )
    assert (rejected.state, rejected.state_comment) == (S.REJECTED, "no budget")
    # An approval that read "submitted" before the rejection landed: refused by the UPDATE.
    with pytest.raises(SubscriptionConflict) as late:
        repo.set_state("sub-1", S.ACTIVE, allowed_from={S.SUBMITTED, S.ACTIVE}, comment="ok")
    assert late.value.field == "state"
    assert str(late.value) == "subscription sub-1 is rejected"
    assert repo.get("sub-1") == rejected
    assert repo.version() == version + 1
    with pytest.raises(ValueError, match="computed"):
        repo.set_state("sub-1", S.EXPIRED)


def test_expiry_is_read_not_stored_and_guards_changes(
    repo: SubscriptionRepository, clock: FakeClock, make_subscription: SubscriptionFactory
) -> None:
    repo.create(make_subscription(1, expires_at=NOW + 10))
    repo.create(make_subscription(2, expires_at=NOW + 10, state=S.REJECTED))
    repo.create(make_subscription(3, state=S.SUSPENDED))
    repo.create(make_subscription(4, expires_at=NOW + 10, state=S.SUBMITTED))

    def ids(state: SubscriptionState) -> list[str]:
        return [s.id for s in repo.list(state=state)[0]]

    assert ids(S.ACTIVE) == ["sub-1"] and ids(S.EXPIRED) == []
    assert ids(S.SUBMITTED) == ["sub-4"]
    clock.advance(10)  # expires_at <= now: expired, as the request path decides
    assert ids(S.ACTIVE) == [] and ids(S.SUBMITTED) == []
    assert ids(S.EXPIRED) == ["sub-1", "sub-4"]  # a rejection stays a rejection
    assert ids(S.REJECTED) == ["sub-2"] and ids(S.SUSPENDED) == ["sub-3"]
    stored = repo.get("sub-1")
    assert stored is not None and stored.state is S.ACTIVE
    assert stored.effective_state(clock.now()) is S.EXPIRED
    with pytest.raises(SubscriptionConflict, match="sub-4 is expired"):
        repo.set_state("sub-4", S.ACTIVE, allowed_from={S.SUBMITTED, S.ACTIVE})
    cancelled = repo.set_state("sub-4", S.CANCELLED, allowed_from={S.EXPIRED, S.CANCELLED})
    assert cancelled.state is S.CANCELLED
    assert ids(S.CANCELLED) == ["sub-4"] and ids(S.EXPIRED) == ["sub-1"]
