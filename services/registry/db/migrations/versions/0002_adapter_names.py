"""adapter_names: the highest version ever given to each (tenant, adapter name).

Versions used to be max(existing version) + 1, so deleting the newest version handed its
number to the next upload, with other weights: "fin v2" no longer meant one set of bytes.
The counter survives deletes. Existing names start from their current newest version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_names",
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("last_version", sa.Integer(), nullable=False),
    )
    op.execute("INSERT INTO adapter_names (tenant_id, name, last_version) "
               "SELECT tenant_id, name, MAX(version) FROM adapters GROUP BY tenant_id, name")


def downgrade() -> None:
    op.drop_table("adapter_names")
