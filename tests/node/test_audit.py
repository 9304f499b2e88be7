"""The hash-chained audit trail on real SQLite and PostgreSQL: appends, concurrency, tampering."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dicom_node.audit import (
    GENESIS_HASH,
    AuditKeyError,
    AuditTrail,
    ChainHead,
    EventID,
    EventTypeCode,
    HeadFile,
    Outcome,
    Participant,
    Role,
    load_audit_key,
)
from dicom_node.config import load_settings
from dicom_node.db import AuditEvent, Database
from dicom_node.db.migrate import upgrade

KEY = b"k" * 32


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    upgrade(database_url)
    handle = Database(database_url)
    yield handle
    handle.dispose()


@pytest.fixture
def trail(database: Database, tmp_path: Path) -> AuditTrail:
    return AuditTrail(database, KEY, head_file=tmp_path / "audit.head")


def _rows(database: Database) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def _record_three(trail: AuditTrail) -> None:
    trail.record(EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, event_type=EventTypeCode.APPLICATION_START)
    trail.record(
        EventID.DICOM_INSTANCES_TRANSFERRED,
        Outcome.SUCCESS,
        action="C",
        participants=[
            Participant(Role.SOURCE, ae_title="MODALITY", network_address="127.0.0.1", requestor=True),
            Participant(Role.DESTINATION, ae_title="BRAIN3D", network_address="127.0.0.1"),
        ],
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        detail={"instances_stored": 3},
    )
    trail.record(EventID.EXPORT, Outcome.SERIOUS_FAILURE, action="R", series_uid="1.2.3.4", job_id=7)


def _tamper(database: Database, statement: str) -> None:
    """Run ``statement`` as an attacker with table rights would: append-only triggers removed first."""
    with database.engine.begin() as connection:
        if database.is_sqlite:
            connection.execute(text("DROP TRIGGER audit_events_no_update"))
            connection.execute(text("DROP TRIGGER audit_events_no_delete"))
        else:
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        connection.exec_driver_sql(statement)


def test_rows_are_canonical_utc_json_chained_by_hmac(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    rows = _rows(database)
    assert [row.event_id for row in rows] == ["110100", "110104", "110106"]
    previous = GENESIS_HASH
    for sequence, row in enumerate(rows, start=1):
        document = json.loads(row.document)
        assert row.document == json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert document["sequence"] == sequence
        assert document["time"].endswith("Z")
        moment = datetime.strptime(document["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        stored = row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=UTC)
        assert stored == moment
        assert row.previous_hash == previous
        expected = hmac.new(KEY, (previous + row.document).encode(), hashlib.sha256).hexdigest()
        assert row.chain_hash == expected
        previous = row.chain_hash

    transfer = json.loads(rows[1].document)
    assert transfer["event_id"] == {
        "code": "110104",
        "meaning": "DICOM Instances Transferred",
        "scheme": "DCM",
    }
    assert transfer["action"] == "C"
    assert transfer["participants"][0]["role"]["code"] == "110153"
    assert transfer["participants"][0]["ae_title"] == "MODALITY"
    assert (rows[1].study_instance_uid, rows[1].series_instance_uid) == ("1.2.3", "1.2.3.4")
    assert json.loads(rows[0].document)["event_type"]["code"] == "110120"
    assert (rows[2].outcome, rows[2].job_id) == (8, 7)


def test_verify_passes_untouched_and_head_file_follows(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    report = trail.verify()
    assert report.ok, report.problems
    assert report.rows_checked == 3
    assert report.head == report.head_file
    assert report.head is not None and report.head.sequence == 3


def test_local_event_types_are_kept_with_a_local_scheme(trail: AuditTrail) -> None:
    event = trail.record(EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, event_type="routing-decision")
    assert event.event_type == "routing-decision"
    assert json.loads(event.document)["event_type"]["scheme"] == "99BRAIN3D"
    assert trail.verify().ok


def test_unknown_vocabulary_is_refused(trail: AuditTrail) -> None:
    with pytest.raises(ValueError):
        trail.record("999999", Outcome.SUCCESS)
    with pytest.raises(ValueError):
        trail.record(EventID.EXPORT, 3)
    with pytest.raises(ValueError):
        trail.record(EventID.EXPORT, Outcome.SUCCESS, action="X")


def test_edited_document_is_detected(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    _tamper(
        database, "UPDATE audit_events SET document = REPLACE(document, '\"outcome\":8', '\"outcome\":0')"
    )
    report = trail.verify()
    assert not report.ok
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.sequence) == ("edited", 3)


def test_edited_query_column_is_detected(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    _tamper(database, "UPDATE audit_events SET outcome = 0 WHERE event_id = '110106'")
    problem = trail.verify().first_problem
    assert problem is not None and problem.kind == "column_mismatch" and "outcome" in problem.message


def test_deleted_middle_row_is_detected(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    _tamper(database, "DELETE FROM audit_events WHERE event_id = '110104'")
    kinds = {problem.kind for problem in trail.verify().problems}
    assert kinds == {"chain_break", "sequence_gap"}


def test_cut_tail_is_detected_from_the_head_file(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    _tamper(database, "DELETE FROM audit_events WHERE event_id = '110106'")
    report = trail.verify()
    assert [problem.kind for problem in report.problems] == ["tail_cut"]
    assert "sequence 3" in report.problems[0].message


def test_emptied_table_is_detected(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    _tamper(database, "DELETE FROM audit_events")
    assert [problem.kind for problem in trail.verify().problems] == ["tail_cut"]


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("DELETE FROM audit_events WHERE event_id IN ('110104', '110106')", "head_mismatch"),
        ("DELETE FROM audit_events", "head_mismatch"),
    ],
    ids=["cut-tail", "emptied"],
)
def test_a_cut_stays_detected_after_later_events(
    trail: AuditTrail, database: Database, statement: str, kind: str
) -> None:
    """Writers never overwrite a head file that names rows the table no longer holds: after a cut
    (or an emptied table) and more events than were cut, verify still fails."""
    _record_three(trail)
    _tamper(database, statement)
    for _ in range(4):
        trail.record(
            EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, event_type=EventTypeCode.APPLICATION_START
        )
    report = trail.verify()
    assert not report.ok and kind in {problem.kind for problem in report.problems}


def test_a_last_row_edited_into_no_event_is_reported_and_auditing_goes_on(
    trail: AuditTrail, database: Database
) -> None:
    _record_three(trail)
    _tamper(database, "UPDATE audit_events SET document = '{}' WHERE event_id = '110106'")
    trail.record(EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, event_type=EventTypeCode.APPLICATION_START)
    kinds = {problem.kind for problem in trail.verify().problems}
    assert "bad_document" in kinds and "edited" in kinds
    assert json.loads(_rows(database)[-1].document)["sequence"] == 4


def test_verify_while_events_are_appended_finds_no_cut(trail: AuditTrail) -> None:
    """The head file is read before the rows: appends during a verify leave it behind, not ahead."""
    _record_three(trail)
    stop = threading.Event()

    def append() -> None:
        while not stop.is_set():
            trail.record(
                EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, event_type=EventTypeCode.APPLICATION_START
            )

    writer = threading.Thread(target=append)
    writer.start()
    try:
        reports = [trail.verify() for _ in range(15)]
    finally:
        stop.set()
        writer.join()
    assert [problem.kind for report in reports for problem in report.problems] == []


def test_row_inserted_without_the_key_is_detected(trail: AuditTrail, database: Database) -> None:
    _record_three(trail)
    last = _rows(database)[-1]
    forged = json.loads(last.document) | {"sequence": 4}
    document = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    wrong = hmac.new(b"x" * 32, (last.chain_hash + document).encode(), hashlib.sha256).hexdigest()
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_events (recorded_at, event_id, outcome, series_instance_uid, job_id,"
                " document, previous_hash, chain_hash)"
                " VALUES (:at, '110106', 8, '1.2.3.4', 7, :document, :previous, :hash)"
            ),
            {"at": last.recorded_at, "document": document, "previous": last.chain_hash, "hash": wrong},
        )
    problems = trail.verify().problems
    assert [(problem.kind, problem.sequence) for problem in problems] == [("edited", 4)]


def test_a_different_key_fails_every_row(database: Database, trail: AuditTrail, tmp_path: Path) -> None:
    _record_three(trail)
    other = AuditTrail(database, b"o" * 32, head_file=tmp_path / "audit.head")
    assert [problem.kind for problem in other.verify().problems] == ["edited"] * 3


def test_missing_head_file_fails_verification(trail: AuditTrail) -> None:
    _record_three(trail)
    assert trail.head_file is not None
    trail.head_file.unlink()
    assert [problem.kind for problem in trail.verify().problems] == ["head_missing"]


def test_concurrent_threads_keep_one_chain(trail: AuditTrail, database: Database) -> None:
    threads_count, per_thread = 4, 15
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            for index in range(per_thread):
                trail.record(
                    EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, detail={"worker": worker, "i": index}
                )
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = trail.verify()
    assert report.ok, report.problems
    assert report.rows_checked == threads_count * per_thread
    assert report.head_file is not None and report.head_file.sequence == threads_count * per_thread


def _append_from_process(url: str, head_file: str, count: int) -> None:
    database = Database(url)
    trail = AuditTrail(database, KEY, head_file=Path(head_file))
    for index in range(count):
        trail.record(EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS, detail={"pid": os.getpid(), "i": index})
    database.dispose()


def test_concurrent_processes_keep_one_chain(trail: AuditTrail, database: Database) -> None:
    assert trail.head_file is not None
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_append_from_process, args=(database.url, str(trail.head_file), 15))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    report = trail.verify()
    assert report.ok, report.problems
    assert report.rows_checked == 45


def test_the_head_file_keeps_its_owner_and_mode(tmp_path: Path) -> None:
    """An administrator's `sudo brain3d audit verify` appends (Audit Log Used) and so rewrites the
    head file: it must stay the service's, or the service could no longer read it."""
    head_file = HeadFile(tmp_path / "audit.head")
    head_file.advance(ChainHead(row_id=1, sequence=1, chain_hash="a" * 64, origin="o" * 64))
    os.chmod(head_file.path, 0o640)
    as_root = os.geteuid() == 0
    service_user = 4242 if as_root else os.getuid()  # as root, another owner to keep
    if as_root:
        os.chown(head_file.path, service_user, service_user)
    head_file.advance(ChainHead(row_id=2, sequence=2, chain_hash="b" * 64, origin="o" * 64))
    kept = head_file.path.stat()
    assert (kept.st_mode & 0o777, kept.st_uid) == (0o640, service_user)
    assert head_file.read() == ChainHead(row_id=2, sequence=2, chain_hash="b" * 64, origin="o" * 64)


def test_head_file_never_moves_backwards(tmp_path: Path) -> None:
    head_file = HeadFile(tmp_path / "audit.head")
    head_file.advance(ChainHead(row_id=9, sequence=9, chain_hash="b" * 64, origin="o" * 64))
    head_file.advance(ChainHead(row_id=8, sequence=8, chain_hash="a" * 64, origin="o" * 64))
    assert head_file.read() == ChainHead(row_id=9, sequence=9, chain_hash="b" * 64, origin="o" * 64)
    head_file.advance(ChainHead(row_id=1, sequence=1, chain_hash="c" * 64, origin="n" * 64))  # a new chain
    assert head_file.read() is not None and head_file.read().origin == "n" * 64


def test_key_file_is_created_private_once_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "audit.key"
    with pytest.raises(AuditKeyError, match="does not exist"):
        load_audit_key(None, key_file, create=False)
    key = load_audit_key(None, key_file)
    assert len(key) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_audit_key(None, key_file) == key
    assert load_audit_key("an environment key of 32+ bytes!", key_file) == b"an environment key of 32+ bytes!"
    with pytest.raises(AuditKeyError, match="at least"):
        load_audit_key("short", key_file)


def test_from_settings_uses_the_configured_key_and_puts_the_head_beside_it(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRAIN3D_DATABASE__AUDIT_KEY_FILE", str(tmp_path / "audit.key"))
    trail = AuditTrail.from_settings(load_settings(), database)
    trail.record(EventID.APPLICATION_ACTIVITY, Outcome.SUCCESS)
    assert trail.head_file == tmp_path / "audit.head"
    assert (tmp_path / "audit.key").stat().st_size == 32

    monkeypatch.setenv("BRAIN3D_DATABASE__AUDIT_KEY", "a key given by the environment!!")
    env_trail = AuditTrail.from_settings(load_settings(), database)
    assert [problem.kind for problem in env_trail.verify().problems] == ["edited"]
