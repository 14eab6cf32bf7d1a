"""Initial schema: subscriptions, usage_records, state_version.

A frozen copy of the tables as ``storage/schema.py`` first defined them; later changes get their
own revision rather than editing this one.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("product", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("primary_key_hash", sa.LargeBinary(64), nullable=False),
        sa.Column("secondary_key_hash", sa.LargeBinary(64), nullable=False),
        sa.Column("primary_key_prefix", sa.String(32), nullable=False),
        sa.Column("secondary_key_prefix", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("overrides", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_subscriptions"),
    )
    op.create_index(
        "ix_subscriptions_primary_key_hash", "subscriptions", ["primary_key_hash"], unique=True
    )
    op.create_index(
        "ix_subscriptions_secondary_key_hash", "subscriptions", ["secondary_key_hash"], unique=True
    )
    op.create_index("ix_subscriptions_owner", "subscriptions", ["owner"])
    op.create_index("ix_subscriptions_product", "subscriptions", ["product"])

    op.create_table(
        "usage_records",
        sa.Column("id", _BigIntId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("subscription_id", sa.String(64), nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("product", sa.String(100), nullable=True),
        sa.Column("deployment", sa.String(200), nullable=True),
        sa.Column("backend", sa.String(200), nullable=True),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("ttfb_ms", sa.Double(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=False),
        sa.Column("caller", sa.String(200), nullable=True),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("extra", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
        sa.UniqueConstraint("request_id", "attempt", name="uq_usage_records_request_id_attempt"),
    )
    op.create_index("ix_usage_records_ts", "usage_records", ["ts"])
    op.create_index(
        "ix_usage_records_subscription_id_ts", "usage_records", ["subscription_id", "ts"]
    )

    state_version = op.create_table(
        "state_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_state_version"),
    )
    op.bulk_insert(state_version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("state_version")
    op.drop_index("ix_usage_records_subscription_id_ts", table_name="usage_records")
    op.drop_index("ix_usage_records_ts", table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_index("ix_subscriptions_product", table_name="subscriptions")
    op.drop_index("ix_subscriptions_owner", table_name="subscriptions")
    op.drop_index("ix_subscriptions_secondary_key_hash", table_name="subscriptions")
    op.drop_index("ix_subscriptions_primary_key_hash", table_name="subscriptions")
    op.drop_table("subscriptions")
