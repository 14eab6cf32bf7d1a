"""Values the ``subscriptions`` table cannot hold are refused the same way on SQLite and
PostgreSQL, before the INSERT, and a value the database refuses anyway is reported without
the INSERT's parameters (the key hashes are among them)."""

from __future__ import annotations

import traceback

import pytest
from sqlalchemy.engine import Engine

from sluicegate.admin.service import AdminError, AdminService
from sluicegate.auth.keys import KeyHasher
from sluicegate.config.loader import parse_config
from sluicegate.storage.subscriptions import SubscriptionInvalid, SubscriptionRepository
from tests.storage.conftest import SubscriptionFactory


@pytest.mark.parametrize(
    ("field", "length"), [("name", 200), ("owner", 200), ("product", 100), ("id", 64)]
)
def test_a_text_longer_than_its_column_is_refused_on_both_databases(
    field: str, length: int, engine: Engine, make_subscription: SubscriptionFactory
) -> None:
    repo = SubscriptionRepository(engine)
    version = repo.version()
    with pytest.raises(SubscriptionInvalid) as caught:
        repo.create(make_subscription(1, **{field: "x" * (length + 1)}))
    assert caught.value.field == field
    assert str(caught.value) == (
        f"{field} must be at most {length} characters (it has {length + 1})"
    )
    assert repo.load_all() == [] and repo.version() == version

    at_limit = make_subscription(2, **{field: "é" * length})  # characters, not bytes
    assert repo.create(at_limit) == at_limit
    assert repo.get(at_limit.id) == at_limit


def test_a_value_postgresql_refuses_is_reported_without_the_parameters(
    pg_database_url: str, make_subscription: SubscriptionFactory
) -> None:
    from sluicegate.storage.engine import create_engine_for
    from sluicegate.storage.migrations import migrate

    migrate(pg_database_url)
    engine = create_engine_for(pg_database_url)
    try:
        repo = SubscriptionRepository(engine)
        sub = make_subscription(1, name="nul\x00byte")  # PostgreSQL text cannot hold NUL
        with pytest.raises(SubscriptionInvalid) as caught:
            repo.create(sub)
        assert str(caught.value) == (
            "the database refused the subscription: "
            "PostgreSQL text fields cannot contain NUL (0x00) bytes"
        )
        # Nothing that would be logged with it (its chain included) names the statement or
        # its values.
        logged = "".join(traceback.format_exception(caught.value))
        assert "INSERT INTO" not in logged
        assert "[parameters:" not in logged  # how SQLAlchemy's text lists them
        assert repr(sub.primary_key_hash) not in logged
        assert repo.load_all() == []
    finally:
        engine.dispose()


def test_the_admin_service_refuses_a_long_name_with_422(engine: Engine) -> None:
    """What the dashboard's form and the CLI go through (the admin API's body schema
    refuses it first)."""
    config = parse_config(
        {
            "storage": {"url": "sqlite:///unused.db"},
            "backends": [{"name": "east", "url": "http://127.0.0.1:9"}],
            "deployments": [{"name": "mini", "backend": "east"}],
            "products": [{"name": "p"}],
        },
        "test",
    )
    repo = SubscriptionRepository(engine)
    service = AdminService(config, repo, KeyHasher(b"0123456789abcdef0123"), engine=engine)
    with pytest.raises(AdminError) as caught:
        service.create_subscription(product="p", owner="team", name="n" * 201)
    assert caught.value.status == 422
    assert caught.value.message == "name must be at most 200 characters (it has 201)"
    assert repo.load_all() == []
