"""Alembic environment: the node's models are the target; the URL comes from the caller or the settings.

``dicom_node.db.migrate`` passes the URL (or an open connection) in ``config.attributes``;
the plain ``alembic`` command falls back to ``sqlalchemy.url`` in ``alembic.ini`` and then
to the effective ``database.url`` of the node's configuration.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from dicom_node.db.models import Base
from dicom_node.db.session import create_database_engine

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from dicom_node.config import load_settings

    return load_settings().database.url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite alters tables by copying them; batch mode lets later revisions do so.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_database_engine(_database_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
