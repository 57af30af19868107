"""Alembic environment of the trainer's tables. TrainerDatabase.migrate passes its open
connection in `config.attributes`; for hand use give an ini with `script_location` (this
folder) and `sqlalchemy.url`. The version table is `trainer_alembic_version` so the trainer can
share a database with the Registry."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from services.trainer.db.models import Base
from services.trainer.db.session import VERSION_TABLE

config = context.config


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as fresh:
        run_migrations(fresh)
    engine.dispose()
