"""The group committer: inline when idle, one batch for what queued meanwhile, failures isolated."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Study
from dicom_node.db.session import Database
from dicom_node.ingest import Batch, GroupCommitter


def _add_study(uid: str):  # type: ignore[no-untyped-def]
    def operation(batch: Batch) -> int:
        return batch.connection.execute(
            insert(Study).values(study_instance_uid=uid).returning(Study.id)
        ).scalar_one()

    return operation


def _studies(database: Database) -> int:
    with database.session() as session:
        return session.execute(select(func.count()).select_from(Study)).scalar_one()


@pytest.fixture
def database(database_url: str):  # type: ignore[no-untyped-def]
    upgrade(database_url)
    handle = Database(database_url)
    yield handle
    handle.dispose()


def test_idle_submission_commits_inline_and_queued_ones_share_one_batch(database: Database) -> None:
    committer = GroupCommitter(database)
    committer.start()
    try:
        first = committer.submit(_add_study("1.1"))
        assert first.done(), "nothing was running: committed in the submitting thread"
        assert committer.batches_committed == 1

        inside, release = threading.Event(), threading.Event()

        def slow(batch: Batch) -> int:
            inside.set()
            release.wait(10)
            return _add_study("1.2")(batch)

        holder = threading.Thread(target=committer.submit, args=(slow,))
        holder.start()
        assert inside.wait(10)
        queued: list[Future[int]] = [committer.submit(_add_study(f"2.{n}")) for n in range(5)]
        assert not any(future.done() for future in queued), "a transaction runs: they wait for the next"
        release.set()
        holder.join(10)
        ids = [future.result(timeout=10) for future in queued]
        assert len(set(ids)) == 5
        assert committer.batches_committed == 3, "the five queued operations were one transaction"
        assert committer.operations_committed == 7
        assert _studies(database) == 7
    finally:
        committer.stop()


def test_a_failing_operation_fails_alone(database: Database) -> None:
    committer = GroupCommitter(database)
    committer.start()
    try:
        inside, release = threading.Event(), threading.Event()

        def hold(batch: Batch) -> None:
            inside.set()
            release.wait(10)

        holder = threading.Thread(target=committer.submit, args=(hold,))
        holder.start()
        assert inside.wait(10)
        good = committer.submit(_add_study("3.1"))
        duplicate = committer.submit(_add_study("3.1"))  # violates the unique Study UID
        other = committer.submit(_add_study("3.2"))
        release.set()
        holder.join(10)
        assert good.result(timeout=10) != other.result(timeout=10)
        with pytest.raises(IntegrityError):
            duplicate.result(timeout=10)
        assert _studies(database) == 2
    finally:
        committer.stop()


def test_submissions_after_stop_still_commit(database: Database) -> None:
    committer = GroupCommitter(database)
    committer.start()
    committer.stop()
    assert committer.submit(_add_study("4.1")).result(timeout=10) > 0
    assert _studies(database) == 1


def test_many_concurrent_submitters_lose_nothing(database: Database) -> None:
    committer = GroupCommitter(database)
    committer.start()
    results: list[int] = []
    lock = threading.Lock()

    def submitter(thread: int) -> None:
        for n in range(40):
            study_id = committer.submit(_add_study(f"5.{thread}.{n}")).result(timeout=30)
            with lock:
                results.append(study_id)

    threads = [threading.Thread(target=submitter, args=(thread,)) for thread in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    committer.stop()
    assert len(set(results)) == 240
    assert _studies(database) == 240
    assert committer.operations_committed == 240


def test_a_postgresql_host_that_never_answers_is_given_up_on() -> None:
    """A database behind a dropped route must fail a connect (the SCP then answers Out of
    Resources), not hold it for the OS's TCP timeout while every sender times out. A listening
    socket that never accepts plays that host: the TCP handshake completes, nothing answers."""
    from sqlalchemy.exc import OperationalError

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        handle = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
        try:
            with pytest.raises(OperationalError, match="timeout"), handle.session() as session:
                session.execute(select(1))
        finally:
            handle.dispose()
