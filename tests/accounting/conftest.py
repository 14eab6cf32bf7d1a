"""Fixtures for the accounting tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from tests.support.pg import pg_database_url, postgres_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a migrated, empty database: a SQLite file, or a throwaway PostgreSQL
    database."""
    url = (
        f"sqlite:///{tmp_path / 'l.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_database_url")
    )
    migrate(url)
    eng = create_engine_for(url)
    yield eng
    eng.dispose()
