"""Migrations: idempotent, concurrent-safe, and producing exactly ``schema.metadata``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from sluicegate.storage import migrations
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import current_revision, head_revision, migrate
from sluicegate.storage.schema import metadata, state_version

VERSIONS = Path(migrations.__file__).parent / "versions"


def test_migrate_twice_creates_the_schema_once(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)
    engine = create_engine_for(db_url)
    try:
        assert current_revision(engine) == head_revision()
        assert head_revision() == sorted(p.stem.split("_")[0] for p in VERSIONS.glob("0*.py"))[-1]
        tables = set(inspect(engine).get_table_names())
        assert {"subscriptions", "usage_records", "state_version", "alembic_version"} <= tables
        with engine.connect() as conn:
            assert conn.execute(select(state_version)).all() == [(1, 0)]
    finally:
        engine.dispose()


def test_migrated_schema_matches_metadata(db_url: str) -> None:
    migrate(db_url)
    engine = create_engine_for(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_usage_records_has_the_idempotency_constraint(db_url: str) -> None:
    migrate(db_url)
    engine = create_engine_for(db_url)
    try:
        inspector = inspect(engine)
        uniques = [u["column_names"] for u in inspector.get_unique_constraints("usage_records")]
        assert ["request_id", "attempt"] in uniques
        indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("usage_records")}
        assert {("ts",), ("subscription_id", "ts")} <= indexes
        key_indexes = {
            tuple(i["column_names"]): i["unique"] for i in inspector.get_indexes("subscriptions")
        }
        assert key_indexes[("primary_key_hash",)] and key_indexes[("secondary_key_hash",)]
    finally:
        engine.dispose()


def test_concurrent_migrations_apply_once(db_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            migrate(db_url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    engine = create_engine_for(db_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(select(state_version)).all() == [(1, 0)]
    finally:
        engine.dispose()


def test_the_known_head_is_alembics_head() -> None:
    assert head_revision() == migrations.HEAD


def test_a_database_at_head_is_checked_without_loading_alembic(db_url: str) -> None:
    migrate(db_url)
    probe = (
        "import sys; from sluicegate.storage.migrations import migrate; "
        f"migrate({db_url!r}); print('alembic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
