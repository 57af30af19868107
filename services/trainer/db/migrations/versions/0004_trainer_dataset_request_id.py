"""Trainer schema: UploadDataset's idempotency key, unique per tenant, and the upload's digest.

Revision ID: t0004
Revises: t0003
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "t0004"
down_revision = "t0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a column with a constraint in place.
    with op.batch_alter_table("trainer_datasets") as table:
        table.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        table.add_column(sa.Column("request_digest", sa.String(64), nullable=False, server_default=""))
        table.create_index("ux_trainer_datasets_tenant_request", ["tenant_id", "request_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("trainer_datasets") as table:
        table.drop_index("ux_trainer_datasets_tenant_request")
        table.drop_column("request_digest")
        table.drop_column("request_id")
