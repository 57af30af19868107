"""Alembic environment. The registry passes its open connection in `config.attributes`
(see Database.migrate, run at every start). For hand use with the `alembic` command, give an
ini file with `script_location` (this folder) and `sqlalchemy.url`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from services.registry.db.models import Base

config = context.config


def run_migrations(connection) -> None:
    # render_as_batch lets future ALTERs work on SQLite (it copies the table).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
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
