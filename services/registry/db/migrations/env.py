"""Alembic environment of the Registry's tables (see services/registry/db/alembic_env.py)."""

from services.registry.db.alembic_env import run_env
from services.registry.db.models import Base

run_env(Base.metadata)
