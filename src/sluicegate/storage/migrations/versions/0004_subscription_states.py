"""Subscription states: state_comment on subscriptions (APIM's stateComment).

The three new states (submitted, rejected and the computed expired) need no schema change:
``state`` is a VARCHAR(16) without a CHECK constraint, and ``submitted`` and ``rejected``
fit. Existing rows keep their state and get no comment.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite adds a nullable column in place (no table copy is needed).
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("state_comment", sa.String(1000), nullable=True))


def downgrade() -> None:
    # Revision 0003's code reads active, suspended and cancelled only: a row in another state
    # fails its whole load (no key is served). A submitted subscription goes back as
    # suspended (still refused, and resumable: the approval it awaited), a rejected one as
    # cancelled (for good, as it was).
    subscriptions = sa.table("subscriptions", sa.column("state", sa.String(16)))
    for new_state, old_state in (("submitted", "suspended"), ("rejected", "cancelled")):
        op.execute(
            subscriptions.update().where(subscriptions.c.state == new_state).values(state=old_state)
        )
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("state_comment")
