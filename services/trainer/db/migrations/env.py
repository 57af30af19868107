"""Alembic environment of the trainer's tables (see services/registry/db/alembic_env.py). The
version table is `trainer_alembic_version` so the trainer can share a database with the Registry."""

from services.registry.db.alembic_env import run_env
from services.trainer.db.models import Base
from services.trainer.db.session import VERSION_TABLE

run_env(Base.metadata, VERSION_TABLE)
