"""The Registry's Database (engine, SQLite WAL + BEGIN IMMEDIATE, PostgreSQL advisory locks),
with the trainer's own Alembic migrations and version table.

Reusing services/registry/db/session.py keeps one set of SQLite/PostgreSQL decisions for the
whole project (read there why writers begin IMMEDIATE and what `lock` serializes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text

from services.registry.db.session import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "trainer_alembic_version"
_MIGRATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"loraplex\x00trainer-migrations").digest()[:8], "big",
                                     signed=True)


class TrainerDatabase(Database):
    def migrate(self) -> None:
        """Brings the trainer's tables to the newest revision (under a lock on PostgreSQL)."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.execution_options(loraplex_write=True).begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": _MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
