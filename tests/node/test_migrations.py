"""The Alembic migrations create exactly the models, append-only triggers included, on both databases."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from dicom_node.db import Base, Database, Delivery, Job, Series, Study
from dicom_node.db.migrate import current_revision, downgrade, head_revision, upgrade

MODEL_TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_then_downgrade_to_base_and_back(database_url: str) -> None:
    assert current_revision(database_url) is None

    upgrade(database_url)
    assert current_revision(database_url) == head_revision()
    assert _tables(database_url) == MODEL_TABLES
    upgrade(database_url)  # a second upgrade (every serve start-up) changes nothing
    assert current_revision(database_url) == head_revision()

    downgrade(database_url, "base")
    assert current_revision(database_url) is None
    assert _tables(database_url) == set()

    upgrade(database_url)
    assert _tables(database_url) == MODEL_TABLES


def test_downgrade_keeps_jobs_that_other_rows_point_at(database_url: str) -> None:
    """A job with a delivery: SQLite enforces the foreign keys, so a downgrade must not drop and
    copy the jobs table under them (it failed, and left a half-made table behind)."""
    upgrade(database_url)
    database = Database(database_url)
    with database.session() as session:
        study = Study(study_instance_uid="1.2")
        job = Job(series=Series(series_instance_uid="1.2.1", study=study, modality="MR"))
        session.add_all([study, job, Delivery(job=job, destination="PACS", sop_instance_uid="1.2.9")])
    database.dispose()
    downgrade(database_url, "0001")
    assert current_revision(database_url) == "0001"
    upgrade(database_url)
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM deliveries")).scalar_one() == 1
    engine.dispose()


def test_autogenerate_finds_no_difference_from_the_models(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


@pytest.mark.parametrize("statement", ["UPDATE audit_events SET outcome = 12", "DELETE FROM audit_events"])
def test_audit_table_refuses_update_and_delete(database_url: str, statement: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO audit_events (recorded_at, event_id, outcome, document,"
                    " previous_hash, chain_hash) VALUES (CURRENT_TIMESTAMP, '110100', 0, '{}', :zero, :hash)"
                ),
                {"zero": "0" * 64, "hash": "1" * 64},
            )
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT outcome FROM audit_events")).scalar_one() == 0
    finally:
        engine.dispose()


def test_postgres_refuses_truncate_of_the_audit_table(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = create_engine(postgres_url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text("TRUNCATE audit_events"))
    finally:
        engine.dispose()


def test_concurrent_upgrades_all_succeed(database_url: str) -> None:
    """serve, workers and an admin may all run the migrations at the same moment."""
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(database_url)
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert current_revision(database_url) == head_revision()
    assert _tables(database_url) == MODEL_TABLES
