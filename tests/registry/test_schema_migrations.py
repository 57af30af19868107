"""Alembic migrations build exactly the schema the models describe, on both databases, and
`upgrade head` is safe to run again and from several processes at once."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.config import Config
from sqlalchemy import inspect, select, text

from services.registry.db import Database
from services.registry.db.models import AdapterName, Base
from services.registry.db.session import MIGRATIONS_DIR


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres").new_database("migrations")


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


def test_migrations_match_the_models_and_rerun_cleanly(database_url):
    databases = [Database(database_url) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:  # several registry processes starting together
            list(pool.map(lambda db: db.migrate(), databases))
        db = databases[0]
        db.migrate()
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
            assert connection.execute(text("SELECT pruned_through FROM feed_state WHERE id = 1")).scalar() == 0
        tables = set(inspect(db.engine).get_table_names())
        assert {"tenants", "api_keys", "base_models", "adapters", "deployments", "change_events"} <= tables
    finally:
        for db in databases:
            db.close()


def test_upgrading_a_filled_database_starts_each_version_counter_at_its_newest(database_url):
    """0002 adds adapter_names; names uploaded before it must continue after their newest version."""
    db = Database(database_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
            now = dt.datetime.now(dt.timezone.utc)
            connection.execute(text("INSERT INTO tenants VALUES ('tnt_1', 'acme', 'Acme', :now)"), {"now": now})
            connection.execute(text("INSERT INTO base_models VALUES ('tiny', '/m', '', '{}', :now)"), {"now": now})
            for version in (1, 3):
                connection.execute(text(
                    "INSERT INTO adapters VALUES (:id, 'tnt_1', 'fin', :v, 'tiny', 4, 8, false, 2, '[]', 1, 'a', :id,"
                    " '{}', '', '{}', :now)"), {"id": f"adp_{version}", "v": version, "now": now})
        db.migrate()
        with db.read() as session:
            counters = [(row.tenant_id, row.name, row.last_version) for row in session.scalars(select(AdapterName))]
        assert counters == [("tnt_1", "fin", 3)]
    finally:
        db.close()
