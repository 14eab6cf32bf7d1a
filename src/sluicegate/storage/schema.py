"""The database schema (SQLAlchemy Core), identical on SQLite and PostgreSQL.

This module is the schema the code expects. The Alembic migrations under
``storage/migrations/versions`` create it; a test compares the migrated database with
``metadata`` so that the two cannot drift apart. Changing a table here means adding a migration.

Design notes:

- Timestamps are epoch seconds (UTC) as double precision, like the dataclasses they store.
- JSON payloads (``overrides``, ``extra``) are stored as text that this package encodes and
  decodes itself, so both databases store exactly the same bytes.
- ``usage_records`` has a UNIQUE (request_id, attempt): the ledger writer inserts with
  ``ON CONFLICT DO NOTHING``, so a batch retried after an ambiguous failure (commit sent, answer
  lost) or replayed from the spill file is stored exactly once.
- ``state_version`` holds one row whose counter is bumped in the same transaction as every
  subscription change; gateways poll it (one cheap query) to know when to reload.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: Explicit constraint names, so that migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The id of the single row of ``state_version``.
STATE_VERSION_ROW_ID = 1

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias), not a BIGINT one.
_BigIntId = BigInteger().with_variant(Integer(), "sqlite")

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("product", String(100), nullable=False),
    Column("state", String(16), nullable=False),
    Column("primary_key_hash", LargeBinary(64), nullable=False),
    Column("secondary_key_hash", LargeBinary(64), nullable=False),
    Column("primary_key_prefix", String(32), nullable=False),
    Column("secondary_key_prefix", String(32), nullable=False),
    Column("created_at", Double(), nullable=False),
    Column("updated_at", Double(), nullable=False),
    Column("expires_at", Double(), nullable=True),
    Column("overrides", Text(), nullable=False),
    # The comment given with the last state change (APIM's stateComment); migration 0004.
    Column("state_comment", String(1000), nullable=True),
    Index(None, "primary_key_hash", unique=True),
    Index(None, "secondary_key_hash", unique=True),
    Index(None, "owner"),
    Index(None, "product"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", _BigIntId, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("attempt", Integer(), nullable=False),
    Column("ts", Double(), nullable=False),
    Column("subscription_id", String(64), nullable=True),
    Column("owner", String(200), nullable=True),
    Column("product", String(100), nullable=True),
    Column("deployment", String(200), nullable=True),
    Column("backend", String(200), nullable=True),
    Column("operation", String(64), nullable=False),
    Column("status", Integer(), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("model", String(200), nullable=True),
    Column("prompt_tokens", BigInteger(), nullable=False),
    Column("completion_tokens", BigInteger(), nullable=False),
    Column("total_tokens", BigInteger(), nullable=False),
    Column("cached_tokens", BigInteger(), nullable=False),
    Column("reasoning_tokens", BigInteger(), nullable=False),
    Column("streamed", Boolean(), nullable=False),
    Column("usage_estimated", Boolean(), nullable=False),
    Column("ttfb_ms", Double(), nullable=True),
    Column("duration_ms", Double(), nullable=False),
    Column("caller", String(200), nullable=True),
    Column("error_code", String(100), nullable=True),
    Column("extra", Text(), nullable=False),
    UniqueConstraint("request_id", "attempt"),
    Index(None, "ts"),
    Index(None, "subscription_id", "ts"),
)

state_version = Table(
    "state_version",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("version", BigInteger(), nullable=False),
)


def _rollup_table(name: str) -> Table:
    """A rollup of ``usage_records``: one row per bucket (an hour or a UTC day, ``bucket`` its
    start in epoch seconds) and group. Maintained by ``sluicegate.accounting.rollups``, which
    also prices it: ``cost_nanos`` is the pay-as-you-go cost in 1e-9 currency units;
    ``unpriced_*`` count records that had tokens but no price."""
    return Table(
        name,
        metadata,
        Column("bucket", BigInteger(), nullable=False),
        Column("subscription_id", String(64), nullable=True),
        Column("owner", String(200), nullable=True),
        Column("product", String(100), nullable=True),
        Column("deployment", String(200), nullable=True),
        Column("backend", String(200), nullable=True),
        Column("model", String(200), nullable=True),
        Column("requests", BigInteger(), nullable=False),
        Column("attempts", BigInteger(), nullable=False),
        Column("prompt_tokens", BigInteger(), nullable=False),
        Column("cached_tokens", BigInteger(), nullable=False),
        Column("completion_tokens", BigInteger(), nullable=False),
        Column("total_tokens", BigInteger(), nullable=False),
        Column("reasoning_tokens", BigInteger(), nullable=False),
        Column("errors", BigInteger(), nullable=False),
        Column("aborted", BigInteger(), nullable=False),
        Column("estimated", BigInteger(), nullable=False),
        Column("cost_nanos", BigInteger(), nullable=False),
        Column("unpriced_records", BigInteger(), nullable=False),
        Column("unpriced_tokens", BigInteger(), nullable=False),
        Index(None, "bucket"),
        Index(None, "subscription_id", "bucket"),
    )


usage_hourly = _rollup_table("usage_hourly")
usage_daily = _rollup_table("usage_daily")

#: One row (id 1): how far the rollups have read ``usage_records`` (by id), and before which
#: time raw records have been purged (rollups there can no longer be rebuilt).
rollup_state = Table(
    "rollup_state",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("last_record_id", BigInteger(), nullable=False),
    Column("raw_purged_before", Double(), nullable=True),
    Column("updated_at", Double(), nullable=True),
)

#: One row per export (``exports`` in the configuration, by name): every ``usage_records`` id
#: up to ``last_record_id`` has been shipped, except those in ``gaps`` (JSON ``[[lo, hi], ...]``,
#: inclusive: ids missing when read, PostgreSQL only) that may still commit. ``version`` grows
#: with every move (the move is conditional on it). Maintained by ``accounting.export``.
export_cursors = Table(
    "export_cursors",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("last_record_id", BigInteger(), nullable=False),
    Column("gaps", Text(), nullable=False),
    Column("version", BigInteger(), nullable=False),
    Column("exported", BigInteger(), nullable=False),
    Column("lost", BigInteger(), nullable=False),
    Column("created_at", Double(), nullable=False),
    Column("updated_at", Double(), nullable=False),
)
