"""Run the Alembic migrations in ``migrations/`` against a database URL.

The node (``brain3d serve``), ``brain3d db upgrade`` and the tests all call ``upgrade``,
so a database is only ever shaped by the migrations, never by ``create_all``.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from dicom_node.db.session import create_database_engine

#: PostgreSQL advisory lock key held while migrating ("B3DMIGRT" as a signed 64-bit integer).
MIGRATION_LOCK_KEY = int.from_bytes(b"B3DMIGRT", "big", signed=True)

#: ``migrations/`` at the repository root, found relative to this package (editable installs).
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` that needs no ``alembic.ini`` and no working directory."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"Alembic migrations not found at {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url  # not set_main_option: '%' in a password would be interpolated
    return config


@contextmanager
def _migration_lock(url: str) -> Iterator[Connection]:
    """A connection holding the database's migration lock.

    The node, its workers and ``brain3d db upgrade`` may start together; without the lock
    two of them would both create the tables and one would fail. A SQLite file is locked
    before it is opened: opening it switches it to WAL, which fails while another
    connection is migrating.
    """
    engine = create_database_engine(url)  # creates a SQLite file's folder, not a connection
    database = make_url(url).database
    file_locked = engine.dialect.name == "sqlite" and bool(database) and database != ":memory:"
    try:
        with (
            _file_lock(f"{database}.migrate-lock") if file_locked else nullcontext(),
            engine.connect() as connection,
        ):
            if connection.dialect.name != "postgresql":
                yield connection
                return
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
            try:
                yield connection
            finally:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()
    finally:
        engine.dispose()


@contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(url: str, action: str, revision: str) -> None:
    config = alembic_config(url)
    with _migration_lock(url) as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)
        connection.commit()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``; idempotent and safe to run concurrently."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` down to ``revision`` (``base`` drops every table)."""
    _run(url, "downgrade", revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    engine = create_database_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
