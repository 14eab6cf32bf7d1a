"""Fixtures for the accounting tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
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


def write_ledger(engine: Engine, tmp: Path, recs: list[UsageRecord]) -> None:
    """Write ``recs`` to the ledger through a real ``LedgerWriter`` (spilling under ``tmp``),
    all of them flushed before it returns."""
    writer = LedgerWriter(engine, spill_path=tmp / "spill.jsonl", flush_interval=0.01)
    writer.start()
    for r in recs:
        writer.submit(r)
    assert writer.flush(10)
    writer.close(10)


def chat_record(
    request_id: str,
    ts: float,
    sub: str,
    prompt_tokens: int,
    completion_tokens: int = 0,
    *,
    owner: str = "team",
) -> UsageRecord:
    """A successful ``chat/completions`` record of product ``p`` on the ``gpt-4o`` deployment
    of backend ``east`` (the accounting tests' configs), its total the sum of its tokens."""
    return UsageRecord(
        request_id=request_id,
        ts=ts,
        subscription_id=sub,
        owner=owner,
        product="p",
        deployment="gpt-4o",
        backend="east",
        operation="chat/completions",
        status=200,
        outcome=Outcome.OK,
        model="gpt-4o",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
