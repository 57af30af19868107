"""The Registry's Database (engine, SQLite WAL + BEGIN IMMEDIATE, PostgreSQL advisory locks),
with the trainer's own Alembic migrations and version table.

Reusing services/registry/db/session.py keeps one set of SQLite/PostgreSQL decisions for the
whole project (read there why writers begin IMMEDIATE and what `lock` serializes).
"""

from __future__ import annotations

from pathlib import Path

from services.registry.db.session import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "trainer_alembic_version"


class TrainerDatabase(Database):
    """Brings the trainer's tables to the newest revision at start (under its own lock on PostgreSQL)."""

    migrations_dir = MIGRATIONS_DIR
    migration_lock = "trainer-migrations"
