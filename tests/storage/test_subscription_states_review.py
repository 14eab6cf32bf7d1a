"""Review of the subscription states (R5) in the repository: migration 0004 downgraded and
upgraded again over a database holding subscriptions (SQLite and PostgreSQL), and the guarded
transition when two administrators decide the same request at once on PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from alembic import command
from sqlalchemy import inspect, text, update
from sqlalchemy.engine import Engine

from sluicegate.auth.subscriptions import TRANSITIONS, SubscriptionState
from sluicegate.clock import FakeClock
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import alembic_config, current_revision, migrate
from sluicegate.storage.schema import subscriptions
from sluicegate.storage.subscriptions import SubscriptionConflict, SubscriptionRepository
from tests.storage.conftest import SubscriptionFactory

NOW = 1_800_000_000.0
S = SubscriptionState


def _downgrade(url: str, revision: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def _indexes(engine: Engine) -> set[tuple[tuple[str, ...], bool]]:
    return {
        (tuple(str(c) for c in ix["column_names"]), bool(ix["unique"]))
        for ix in inspect(engine).get_indexes("subscriptions")
    }


def test_migration_0004_downgrades_and_upgrades_again_keeping_the_subscriptions(
    db_url: str, make_subscription: SubscriptionFactory
) -> None:
    migrate(db_url)
    engine = create_engine_for(db_url)
    try:
        repo = SubscriptionRepository(engine, clock=FakeClock(start=NOW))
        for n in range(1, 4):
            repo.create(make_subscription(n, state_comment=f"why {n}"))
        before = repo.load_all()
        indexes = _indexes(engine)
        engine.dispose()
        _downgrade(db_url, "0003")
        assert current_revision(engine) == "0003"
        columns = {c["name"] for c in inspect(engine).get_columns("subscriptions")}
        assert "state_comment" not in columns
        # SQLite's batch mode copies the table: the unique key indexes must come along.
        assert _indexes(engine) == indexes
        engine.dispose()
        migrate(db_url)
        after = repo.load_all()
        assert [s.id for s in after] == [s.id for s in before]
        assert all(s.state_comment is None for s in after)
        assert [s.primary_key_hash for s in after] == [s.primary_key_hash for s in before]
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_approval_waiting_on_a_concurrent_rejection_is_refused(
    engine: Engine, make_subscription: SubscriptionFactory
) -> None:
    """Two administrators decide the same request at once. The rejection's UPDATE holds the
    row; the approval's UPDATE waits for it and, on PostgreSQL (READ COMMITTED), re-checks its
    guard against the committed row: 409, the rejection stands."""
    repo = SubscriptionRepository(engine, clock=FakeClock(start=NOW))
    repo.create(make_subscription(1, state=S.SUBMITTED))
    approve = TRANSITIONS["approve"]
    outcome: list[object] = []

    def approver() -> None:
        try:
            outcome.append(
                repo.set_state("sub-1", approve.target, allowed_from=approve.sources, comment="ok")
            )
        except SubscriptionConflict as exc:
            outcome.append(exc)

    with engine.connect() as first, engine.connect() as watcher:
        first.execute(  # the rejection, holding the row lock until it commits
            update(subscriptions)
            .where(subscriptions.c.id == "sub-1", subscriptions.c.state == "submitted")
            .values(state="rejected", state_comment="no")
        )
        thread = threading.Thread(target=approver)
        thread.start()
        # Wait until the approval is blocked on the row lock (not merely not started yet).
        for _ in range(200):
            watcher.rollback()  # pg_stat_activity is read once per transaction
            waiting = watcher.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
            if waiting:
                break
            thread.join(0.02)
        assert waiting, "the approval never waited on the rejection's row lock"
        first.commit()
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], SubscriptionConflict), outcome
    assert str(outcome[0]) == "subscription sub-1 is rejected"
    stored = repo.get("sub-1")
    assert stored is not None and (stored.state, stored.state_comment) == (S.REJECTED, "no")


def test_a_downgrade_leaves_only_states_the_earlier_version_reads(
    db_url: str, make_subscription: SubscriptionFactory
) -> None:
    """Revision 0003's code knows active, suspended and cancelled only (``SubscriptionState``
    of any other value raises, and one such row fails its whole load: a gateway downgraded
    with the migration would refuse every request). A submitted subscription goes back as
    suspended (still refused, resumable: the approval it awaited), a rejected one as
    cancelled (for good, as it was)."""
    migrate(db_url)
    engine = create_engine_for(db_url)
    try:
        repo = SubscriptionRepository(engine, clock=FakeClock(start=NOW))
        for n, state in enumerate(S, start=1):
            if state is not S.EXPIRED:
                repo.create(make_subscription(n, state=state))
        engine.dispose()
        _downgrade(db_url, "0003")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, state FROM subscriptions")).all()
        stored: dict[str, str] = {str(i): str(s) for i, s in rows}
        assert stored == {
            "sub-1": "suspended",  # was submitted
            "sub-2": "active",
            "sub-3": "suspended",
            "sub-4": "cancelled",  # was rejected
            "sub-5": "cancelled",
        }
    finally:
        engine.dispose()
