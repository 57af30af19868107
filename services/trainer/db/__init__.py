"""The trainer's SQL state: datasets and jobs (SQLite by default, PostgreSQL by URL)."""

from services.trainer.db.session import TrainerDatabase

__all__ = ["TrainerDatabase"]
