"""Fixtures for the storage tests: one conformance suite, run on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.auth.subscriptions import Subscription, SubscriptionState
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from tests.support.pg import (  # noqa: F401  (fixtures re-exported for the tests here)
    pg_database_url,
    postgres_server,
    throwaway_database,
)

RecordFactory = Callable[..., UsageRecord]
SubscriptionFactory = Callable[..., Subscription]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database: a SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'sluicegate.db'}"
    else:
        with throwaway_database() as url:
            yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty database (both dialects)."""
    migrate(db_url)
    eng = create_engine_for(db_url)
    yield eng
    eng.dispose()


def build_record(i: int, **overrides: Any) -> UsageRecord:
    """A plausible usage record numbered ``i`` (``req-000i``); fields can be overridden."""
    values: dict[str, Any] = {
        "request_id": f"req-{i:06d}",
        "ts": 1_700_000_000.0 + i,
        "subscription_id": f"sub-{i % 3}",
        "owner": f"team-{i % 2}",
        "product": "standard",
        "deployment": "gpt-4o",
        "backend": "east",
        "operation": "chat/completions",
        "status": 200,
        "outcome": Outcome.OK,
        "model": "gpt-4o-2024-08-06",
        "prompt_tokens": 10 + i,
        "completion_tokens": 5,
        "total_tokens": 15 + i,
        "cached_tokens": 2,
        "reasoning_tokens": 1,
        "streamed": i % 2 == 0,
        "usage_estimated": False,
        "ttfb_ms": 12.5,
        "duration_ms": 100.25,
        "attempt": 1,
        "caller": None,
        "error_code": None,
        "extra": {"region": "eu", "n": str(i)},
    }
    values.update(overrides)
    return UsageRecord(**values)


@pytest.fixture
def make_record() -> RecordFactory:
    return build_record


def build_subscription(n: int, **overrides: Any) -> Subscription:
    """Subscription ``sub-n`` with distinct key hashes; fields can be overridden."""
    values: dict[str, Any] = {
        "id": f"sub-{n}",
        "name": f"Subscription {n}",
        "owner": f"team-{n % 2}",
        "product": "standard",
        "state": SubscriptionState.ACTIVE,
        "primary_key_hash": bytes([n % 256]) * 31 + b"\x01",
        "secondary_key_hash": bytes([n % 256]) * 31 + b"\x02",
        "primary_key_prefix": f"sg-p{n}",
        "secondary_key_prefix": f"sg-s{n}",
        "created_at": 1_700_000_000.0 + n,
        "updated_at": 1_700_000_000.0 + n,
        "expires_at": None,
        "overrides": {},
    }
    values.update(overrides)
    return Subscription(**values)


@pytest.fixture
def make_subscription() -> SubscriptionFactory:
    return build_subscription
