"""Trainer schema: tombstones of deleted tenants and the Registry change-feed cursor.

Revision ID: t0002
Revises: t0001
Create Date: 2026-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "t0002"
down_revision = "t0001"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "trainer_deleted_tenants",
        sa.Column("tenant_id", sa.String(40), primary_key=True),
        sa.Column("deleted_at", UTC, nullable=False),
    )
    op.create_table(
        "trainer_feed_state",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("cursor", sa.BigInteger(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trainer_feed_state")
    op.drop_table("trainer_deleted_tenants")
