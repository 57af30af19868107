"""SQL metadata: models, sessions and Alembic migrations (SQLite by default, PostgreSQL by URL)."""

from services.registry.db.session import Database

__all__ = ["Database"]
