"""Counts from headers or site rules, and retention of spooled series, in-process on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pacs import enhanced_mr, mr_series
from pydantic import ValidationError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from sqlalchemy import insert, select, update

from dicom_node.audit import AuditTrail
from dicom_node.config import COUNT_RULE_KEYWORDS, CountRule
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Instance, Job, JobState, Series, SeriesState, Study
from dicom_node.db.session import Database
from dicom_node.ingest import Ingest, InstanceHeaders, InstanceOutcome, MalformedDatasetError, read_headers
from dicom_node.retention import Retention
from dicom_node.spool import Spool, file_meta_bytes


def _headers(dataset) -> InstanceHeaders:  # type: ignore[no-untyped-def]
    return read_headers(encode(dataset, False, True), ExplicitVRLittleEndian)


def test_counts_come_from_the_headers() -> None:
    classic = mr_series(1)[0]
    assert _headers(classic).expected_instances is None, "no count: the stable timer decides"
    classic.ImagesInAcquisition = 24
    assert _headers(classic).expected_instances == 24
    classic.InConcatenationTotalNumber = 3
    assert _headers(classic).expected_instances == 3, "a concatenation states its own total"
    enhanced = enhanced_mr(frames=10)
    assert _headers(enhanced).expected_instances == 1, "an Enhanced MR holds the whole series"


def test_a_site_count_rule_gives_a_count_only_where_the_headers_give_none() -> None:
    rules = [
        CountRule(match={"StationName": "MR7", "ProtocolName": "*flair*"}, instances=12),
        CountRule(match={"Manufacturer": "ACME*"}, instances=30),
    ]
    dataset = mr_series(1)[0]
    dataset.StationName, dataset.ProtocolName, dataset.Manufacturer = "mr7", "AX T2 FLAIR", "ACME Medical"
    assert _headers(dataset).expected_instances_with(rules) == 12, "first matching rule, case-insensitive"
    dataset.ProtocolName = "AX T1"
    assert _headers(dataset).expected_instances_with(rules) == 30, "every entry of a rule must hold"
    dataset.Manufacturer = "Other"
    assert _headers(dataset).expected_instances_with(rules) is None, "no rule matches: the timer decides"
    dataset.ImagesInAcquisition = 24
    assert _headers(dataset).expected_instances_with(rules) == 24, "the headers' own count wins"


def test_count_rules_only_match_headers_read_on_the_store_path() -> None:
    for keyword in COUNT_RULE_KEYWORDS:
        dataset = mr_series(1)[0]
        setattr(dataset, keyword, "MARK")
        assert _headers(dataset).text(keyword) == "MARK", keyword
    with pytest.raises(ValidationError, match="cannot match on SliceThickness"):
        CountRule(match={"SliceThickness": "5"}, instances=20)


def test_header_reading_refuses_datasets_without_uids() -> None:
    dataset = mr_series(1)[0]
    del dataset.SeriesInstanceUID
    with pytest.raises(MalformedDatasetError):
        _headers(dataset)
    with pytest.raises(MalformedDatasetError):
        read_headers(b"\x08\x00\x18\x00UI\xff\xff garbage", ExplicitVRLittleEndian)


def _series(database: Database, spool: Spool, study_uid: str, series_uid: str, *, eligible: bool) -> int:
    folder = spool.series_dir(study_uid, series_uid)
    folder.mkdir(parents=True)
    (folder / "1.dcm").write_bytes(b"instance")
    long_ago = datetime.now(UTC) - timedelta(hours=5)
    with database.session() as session:
        study_id = session.execute(
            insert(Study).values(study_instance_uid=study_uid).returning(Study.id)
        ).scalar_one()
        return session.execute(
            insert(Series)
            .values(
                series_instance_uid=series_uid,
                study_id=study_id,
                state=SeriesState.COMPLETE,
                completed_at=long_ago,
                eligible=eligible,
            )
            .returning(Series.id)
        ).scalar_one()


def test_retention_removes_only_series_whose_jobs_ended(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    database = Database(database_url)
    spool = Spool(tmp_path / "spool")
    audit = AuditTrail(database, b"k" * 32)
    ineligible = _series(database, spool, "1.1", "1.1.1", eligible=False)
    finished = _series(database, spool, "1.2", "1.2.1", eligible=True)
    running = _series(database, spool, "1.3", "1.3.1", eligible=True)
    recent = _series(database, spool, "1.4", "1.4.1", eligible=True)
    now = datetime.now(UTC)
    with database.session() as session:
        for series_id, state, finished_at in (
            (finished, JobState.SUCCEEDED, now - timedelta(hours=3)),
            (running, JobState.RUNNING, None),
            (recent, JobState.FAILED, now - timedelta(minutes=30)),
        ):
            session.execute(insert(Job).values(series_id=series_id, state=state, finished_at=finished_at))

    removed = Retention(database, spool, audit, retention_hours=2, guard_seconds=0).run_once()

    assert sorted(r.series_uid for r in removed) == ["1.1.1", "1.2.1"]
    assert not spool.series_dir("1.1", "1.1.1").exists() and not spool.series_dir("1.2", "1.2.1").exists()
    assert spool.series_dir("1.3", "1.3.1").exists() and spool.series_dir("1.4", "1.4.1").exists()
    with database.session() as session:
        removed_at = dict(session.execute(select(Series.id, Series.spool_removed_at)).all())
    assert removed_at[ineligible] and removed_at[finished]
    assert removed_at[running] is None and removed_at[recent] is None
    assert audit.verify().ok
    database.dispose()


def test_retention_removes_a_series_filed_under_two_studies(sqlite_url: str, tmp_path: Path) -> None:
    """A PACS re-sending a series under a corrected StudyInstanceUID files it in a second study
    folder; the series row keeps its first study. Retention removes both, or patient data stays."""
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    series_id = _series(database, spool, "1.5", "1.5.1", eligible=False)
    corrected = spool.series_dir("1.6", "1.5.1")
    corrected.mkdir(parents=True)
    (corrected / "2.dcm").write_bytes(b"instance")
    with database.session() as session:
        for path in (spool.series_dir("1.5", "1.5.1") / "1.dcm", corrected / "2.dcm"):
            session.execute(
                insert(Instance).values(
                    sop_instance_uid=f"1.5.1.{path.stem}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    series_id=series_id,
                    path=str(path),
                    size_bytes=8,
                    sha256=path.stem * 64,
                )
            )
    retention = Retention(
        database, spool, AuditTrail(database, b"k" * 32), retention_hours=1, guard_seconds=0
    )
    assert [removed.series_uid for removed in retention.run_once()] == ["1.5.1"]
    assert not spool.series_dir("1.5", "1.5.1").exists() and not corrected.exists()
    database.dispose()


def test_retention_never_removes_a_folder_written_just_now(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    _series(database, spool, "1.1", "1.1.1", eligible=False)
    retention = Retention(
        database, spool, AuditTrail(database, b"k" * 32), retention_hours=0, guard_seconds=60
    )
    assert retention.run_once() == []
    assert spool.series_dir("1.1", "1.1.1").exists()
    database.dispose()


def test_an_instance_re_sent_after_retention_is_removed_again(sqlite_url: str, tmp_path: Path) -> None:
    """A PACS re-sending a series whose spool retention removed: SQL has the instance (a duplicate),
    the spool has its file again, and retention must see that file, or it would stay forever."""
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    retention = Retention(
        database, spool, AuditTrail(database, b"k" * 32), retention_hours=1, guard_seconds=0
    )
    dataset = mr_series(1)[0]
    data = encode(dataset, False, True)
    headers = _headers(dataset)
    file_meta = file_meta_bytes(dataset.SOPClassUID, dataset.SOPInstanceUID, ExplicitVRLittleEndian)
    ingest = Ingest(database)
    ingest.start()

    def receive() -> InstanceOutcome:
        spooled = spool.store(
            headers.study_uid, headers.series_uid, headers.sop_instance_uid, file_meta, data
        )
        return ingest.record_instance(
            headers,
            spooled,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            association_id=None,
            received_at=datetime.now(UTC),
        ).result()

    try:
        assert receive() is InstanceOutcome.STORED
        with database.session() as session:  # complete and not eligible, two hours ago
            session.execute(
                update(Series).values(
                    state=SeriesState.COMPLETE, completed_at=datetime.now(UTC) - timedelta(hours=2)
                )
            )
        assert [r.series_uid for r in retention.run_once()] == [headers.series_uid]
        folder = spool.series_dir(headers.study_uid, headers.series_uid)
        assert not folder.exists()

        assert receive() is InstanceOutcome.DUPLICATE
        assert folder.exists(), "the re-sent file is on disk again"
        with database.session() as session:
            assert session.execute(select(Series.spool_removed_at)).scalar_one() is None
        assert [r.series_uid for r in retention.run_once()] == [headers.series_uid]
        assert not folder.exists()
    finally:
        ingest.stop()
        database.dispose()
