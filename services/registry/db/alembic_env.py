"""What every Alembic env.py of ours does (the Registry's and the Trainer's tables).

The service passes its open connection in `config.attributes["connection"]` (Database.migrate,
run at every start, under the migration lock). For hand use with the `alembic` command, give
an ini file with `script_location` (the migrations folder) and `sqlalchemy.url`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine


def run_env(metadata: MetaData, version_table: str = "alembic_version") -> None:
    config = context.config

    def run_migrations(connection) -> None:
        # render_as_batch lets future ALTERs work on SQLite (it copies the table).
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                          compare_type=True, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as fresh:
        run_migrations(fresh)
    engine.dispose()
