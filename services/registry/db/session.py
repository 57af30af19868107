"""Engine, sessions, locks and migrations for SQLite and PostgreSQL alike.

Decisions recorded here:
- The engine is synchronous. Domain calls are short, run in a thread pool from the servicer,
  and stay plain functions that tests and tools can call directly.
- SQLite: WAL (readers never block the writer), foreign keys on, a 30 s busy timeout, and
  every write transaction starts with `BEGIN IMMEDIATE`. A deferred transaction that reads
  and then writes fails at once with SQLITE_BUSY when another writer committed in between
  (the busy handler is not consulted for that upgrade); taking the write lock up front makes
  writers queue instead. synchronous stays FULL: the registry must not lose a commit.
- PostgreSQL: READ COMMITTED plus transaction-scoped advisory locks (`lock`) where order
  matters: per (tenant, adapter name) for version numbers and delete-vs-bind checks, per blob
  for upload-vs-garbage-collection, and one for the change feed. The feed lock is what makes
  sequence order equal commit order: a writer takes it just before inserting its event and
  holds it to commit, so when a reader sees event N, every event below N has committed or
  rolled back; a polling reader can never step over a late commit. On SQLite the database
  write lock already serializes writers, so `lock` is a no-op there.
- `upgrade head` runs at start under an advisory lock so several registry processes can start
  against one PostgreSQL at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = "migrations"
PG_CONNECT_TIMEOUT_S = 10


def _advisory_key(parts: tuple[str, ...]) -> int:
    digest = hashlib.sha256("\x00".join(("loraplex", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Database:
    """One engine; `read()` and `write()` sessions; `lock()` for ordering; `migrate()`.

    A service with its own tables (the Trainer) subclasses it with its own migrations folder
    and migration lock name."""

    migrations_dir: Path = MIGRATIONS_DIR
    migration_lock: str = _MIGRATION_LOCK

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False},
                                        pool_size=16, max_overflow=8)
            self._setup_sqlite()
        else:
            # libpq waits for a server that never answers (a black-holed host) forever by default;
            # bounded, a start-up or a request fails with a clear error instead. A URL's own
            # ?connect_timeout= wins.
            connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
            self.engine = create_engine(parsed, pool_size=16, max_overflow=8, pool_pre_ping=True,
                                        connect_args=connect_args)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(loraplex_write=True), expire_on_commit=False)
        #: Called (with no arguments) after a write transaction that recorded change events commits.
        self.on_feed_commit: list[Callable[[], None]] = []

    def _setup_sqlite(self) -> None:
        @event.listens_for(self.engine, "connect")
        def on_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(self.engine, "begin")
        def on_begin(connection) -> None:
            immediate = connection.get_execution_options().get("loraplex_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits when the block ends normally and rolls back otherwise."""
        with self._write() as session:
            with session.begin():
                yield session
            if session.info.pop("feed_changed", False):
                for listener in list(self.on_feed_commit):
                    listener()

    def lock(self, session: Session, *parts: str) -> None:
        """Serializes transactions that name the same parts, until commit (PostgreSQL)."""
        if not self.is_sqlite:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(parts)})

    def migrate(self) -> None:
        """Brings the schema to the newest Alembic revision."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(self.migrations_dir))
        with self.engine.execution_options(loraplex_write=True).begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": _advisory_key((self.migration_lock,))})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()


def _enable_wal(cursor) -> None:
    """Switching a new database to WAL needs a moment of exclusive access, and SQLite does
    not run the busy handler for it: processes starting together (several migrating at
    once) retry briefly instead of failing with "database is locked"."""
    import sqlite3
    import time

    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)
