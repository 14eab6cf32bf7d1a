"""Rollups for reports: usage_hourly, usage_daily and rollup_state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_COUNTS = (
    "requests",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "errors",
    "aborted",
    "estimated",
    "cost_nanos",
    "unpriced_records",
    "unpriced_tokens",
)


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("subscription_id", sa.String(64), nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("product", sa.String(100), nullable=True),
        sa.Column("deployment", sa.String(200), nullable=True),
        sa.Column("backend", sa.String(200), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in _COUNTS),
    )
    op.create_index(f"ix_{name}_bucket", name, ["bucket"])
    op.create_index(f"ix_{name}_subscription_id_bucket", name, ["subscription_id", "bucket"])


def upgrade() -> None:
    _rollup("usage_hourly")
    _rollup("usage_daily")
    state = op.create_table(
        "rollup_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_record_id", sa.BigInteger(), nullable=False),
        sa.Column("raw_purged_before", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollup_state"),
    )
    op.bulk_insert(state, [{"id": 1, "last_record_id": 0}])


def downgrade() -> None:
    op.drop_table("rollup_state")
    for name in ("usage_daily", "usage_hourly"):
        op.drop_index(f"ix_{name}_subscription_id_bucket", table_name=name)
        op.drop_index(f"ix_{name}_bucket", table_name=name)
        op.drop_table(name)
