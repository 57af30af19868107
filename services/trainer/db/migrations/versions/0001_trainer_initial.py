"""Trainer schema: datasets and jobs.

Revision ID: t0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "t0001"
down_revision = None
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "trainer_datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("max_seq_len", sa.Integer(), nullable=False),
        sa.Column("longest_example", sa.Integer(), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.Text(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
    )
    op.create_index("ix_trainer_datasets_tenant_created", "trainer_datasets", ["tenant_id", "created_at", "id"])
    op.create_table(
        "trainer_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("training", sa.JSON(), nullable=False),
        sa.Column("output_adapter_name", sa.String(63), nullable=False),
        sa.Column("deployment_name", sa.String(128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("learning_rate", sa.Float(), nullable=False),
        sa.Column("tokens_per_second", sa.Float(), nullable=False),
        sa.Column("eta_seconds", sa.Float(), nullable=True),
        sa.Column("adapter_id", sa.String(40), nullable=False),
        sa.Column("adapter_version", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("interruptions", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("started_at", UTC, nullable=True),
        sa.Column("finished_at", UTC, nullable=True),
    )
    op.create_index("ix_trainer_jobs_tenant_created", "trainer_jobs", ["tenant_id", "created_at", "id"])
    op.create_index("ix_trainer_jobs_state_created", "trainer_jobs", ["state", "created_at"])
    op.create_index("ix_trainer_jobs_dataset", "trainer_jobs", ["dataset_id"])


def downgrade() -> None:
    op.drop_table("trainer_jobs")
    op.drop_table("trainer_datasets")
