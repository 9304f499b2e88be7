"""Counts from headers or site rules, and retention of spooled series, in-process on both databases."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pacs import enhanced_mr, free_port, mr_series
from pydantic import ValidationError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from sqlalchemy import func, insert, select, update

from dicom_node.audit import AuditTrail
from dicom_node.config import COUNT_RULE_KEYWORDS, CountRule, StorageSettings
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


def _retention(
    database: Database, spool: Spool, tmp_path: Path, *, retention_hours: float, guard_seconds: float
) -> Retention:
    return Retention(
        database,
        spool,
        AuditTrail(database, b"k" * 32),
        retention_hours=retention_hours,
        guard_seconds=guard_seconds,
        job_dir=StorageSettings(work_dir=tmp_path / "work").job_dir,
    )


def test_retention_removes_only_series_whose_jobs_ended(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    database = Database(database_url)
    spool = Spool(tmp_path / "spool")
    audit = AuditTrail(database, b"k" * 32)
    ineligible = _series(database, spool, "1.1", "1.1.1", eligible=False)
    finished = _series(database, spool, "1.2", "1.2.1", eligible=True)
    running = _series(database, spool, "1.3", "1.3.1", eligible=True)
    recent = _series(database, spool, "1.4", "1.4.1", eligible=True)
    resent = _series(database, spool, "1.6", "1.6.1", eligible=True)  # re-opened: generation 1
    resent_late = _series(database, spool, "1.7", "1.7.1", eligible=True)  # its first job ended last
    now = datetime.now(UTC)
    with database.session() as session:
        session.execute(update(Series).where(Series.id.in_([resent, resent_late])).values(generation=1))
        for series_id, generation, state, finished_at in (
            (finished, 0, JobState.SUCCEEDED, now - timedelta(hours=3)),
            (running, 0, JobState.RUNNING, None),
            (recent, 0, JobState.FAILED, now - timedelta(minutes=30)),
            (resent, 0, JobState.RUNNING, None),  # the first generation's job still reads the spool
            (resent, 1, JobState.SUCCEEDED, now - timedelta(hours=3)),
            (resent_late, 0, JobState.FAILED, now - timedelta(minutes=30)),
            (resent_late, 1, JobState.SUCCEEDED, now - timedelta(hours=3)),
        ):
            session.execute(
                insert(Job).values(
                    series_id=series_id, series_generation=generation, state=state, finished_at=finished_at
                )
            )

    storage = StorageSettings(work_dir=tmp_path / "work")
    with database.session() as session:
        job_ids = dict(session.execute(select(Job.series_id, Job.id).order_by(Job.id)).all())
    for job_id in job_ids.values():
        storage.job_dir(job_id).mkdir(parents=True)
        (storage.job_dir(job_id) / "series.nii.gz").write_bytes(b"a copy of the images")

    removed = Retention(
        database, spool, audit, retention_hours=2, guard_seconds=0, job_dir=storage.job_dir
    ).run_once()

    assert sorted(r.series_uid for r in removed) == ["1.1.1", "1.2.1"]
    assert not storage.job_dir(job_ids[finished]).exists(), "the job's copy of the images goes with the spool"
    assert storage.job_dir(job_ids[running]).exists() and storage.job_dir(job_ids[recent]).exists()
    assert not spool.series_dir("1.1", "1.1.1").exists() and not spool.series_dir("1.2", "1.2.1").exists()
    assert spool.series_dir("1.3", "1.3.1").exists() and spool.series_dir("1.4", "1.4.1").exists()
    assert spool.series_dir("1.6", "1.6.1").exists() and spool.series_dir("1.7", "1.7.1").exists()
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
    retention = _retention(database, spool, tmp_path, retention_hours=1, guard_seconds=0)
    assert [removed.series_uid for removed in retention.run_once()] == ["1.5.1"]
    assert not spool.series_dir("1.5", "1.5.1").exists() and not corrected.exists()
    database.dispose()


def test_retention_never_removes_a_folder_written_just_now(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    _series(database, spool, "1.1", "1.1.1", eligible=False)
    retention = _retention(database, spool, tmp_path, retention_hours=0, guard_seconds=60)
    assert retention.run_once() == []
    assert spool.series_dir("1.1", "1.1.1").exists()
    database.dispose()


def test_an_instance_re_sent_after_retention_is_removed_again(sqlite_url: str, tmp_path: Path) -> None:
    """A PACS re-sending a series whose spool retention removed: SQL has the instance (a duplicate),
    the spool has its file again, and retention must see that file, or it would stay forever."""
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    retention = _retention(database, spool, tmp_path, retention_hours=1, guard_seconds=0)
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


def test_a_job_is_handed_on_while_the_result_backend_is_down(sqlite_url: str, tmp_path: Path) -> None:
    """Nothing reads task results, so the node never waits for their store: before, a send asked
    for one and a result backend that was down held series completion about 20 s per job."""
    from kombu import Connection

    from dicom_node.config import load_settings
    from dicom_node.handoff import HandOff
    from worker.app import CPU_QUEUE, RUN_JOB_TASK, create_app

    upgrade(sqlite_url)
    database = Database(sqlite_url)
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    unreachable = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    app = create_app(load_settings(queue={"broker_url": broker, "result_backend": unreachable}))
    with database.session() as session:
        study_id = session.execute(
            insert(Study).values(study_instance_uid="1.9").returning(Study.id)
        ).scalar_one()
        series_id = session.execute(
            insert(Series).values(series_instance_uid="1.9.1", study_id=study_id).returning(Series.id)
        ).scalar_one()
        job_id = session.execute(insert(Job).values(series_id=series_id).returning(Job.id)).scalar_one()

    HandOff(database, app).enqueue(job_id)

    with database.session() as session:
        assert session.get(Job, job_id).queued_at is not None
    with Connection(broker) as connection:
        queue = connection.SimpleQueue(CPU_QUEUE)
        message = queue.get(timeout=2)
        queue.close()
    assert message.headers["task"] == RUN_JOB_TASK and message.decode()[0] == [job_id]
    database.dispose()


def test_series_forgotten_by_the_bounded_cache_are_read_back_from_sql(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The node keeps a bounded number of series in memory; one it forgot is read from SQL again,
    so a late instance still finds its series (and re-opens it) instead of making a second one."""
    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    ingest = Ingest(database)
    ingest.cache_limit = 2
    ingest.start()
    series = [mr_series(2) for _ in range(5)]

    def receive(dataset) -> InstanceOutcome:
        headers = _headers(dataset)
        meta = file_meta_bytes(dataset.SOPClassUID, dataset.SOPInstanceUID, ExplicitVRLittleEndian)
        spooled = spool.store(
            headers.study_uid,
            headers.series_uid,
            headers.sop_instance_uid,
            meta,
            encode(dataset, False, True),
        )
        return ingest.record_instance(
            headers, spooled, transfer_syntax_uid=ExplicitVRLittleEndian, association_id=None,
            received_at=datetime.now(UTC),
        ).result()  # fmt: skip

    try:
        for first, _ in series:
            assert receive(first) is InstanceOutcome.STORED
        assert len(ingest._series) <= 2, "the cache stays bounded"
        first_series = series[0][0].SeriesInstanceUID
        with database.session() as session:
            session.execute(
                update(Series).where(Series.series_instance_uid == first_series).values(state="complete")
            )
        assert receive(series[0][1]) is InstanceOutcome.STORED  # a late instance of a forgotten series
        with database.session() as session:
            rows = session.execute(
                select(Series.generation, func.count(Instance.id))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.series_instance_uid == first_series)
                .group_by(Series.id)
            ).all()
        assert rows == [(1, 2)], "one series row, re-opened, holding both instances"
    finally:
        ingest.stop()
        database.dispose()


def test_a_series_completes_on_its_count_only_once_its_senders_are_done(
    sqlite_url: str, tmp_path: Path
) -> None:
    """ImagesInAcquisition counts one acquisition: a series of two reaches it halfway, and the
    second acquisition follows in the same association. The series completes once, with both,
    when that association is released; one sent an instance per association completes at its
    last. A sender that aborted, or a restart, leaves the series to the timer."""
    from serve_harness import wait_for

    from dicom_node.completeness import CompletenessTracker
    from dicom_node.config import CompletionSettings, RoutingSettings, load_settings
    from dicom_node.handoff import HandOff
    from worker.app import create_app

    upgrade(sqlite_url)
    database = Database(sqlite_url)
    spool = Spool(tmp_path / "spool")
    ingest = Ingest(database)
    app = create_app(load_settings(queue={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"}))

    def tracker() -> CompletenessTracker:
        return CompletenessTracker(
            ingest,
            CompletionSettings(stable_seconds=600, check_interval=0.05),  # only a count completes here
            RoutingSettings(),
            HandOff(database, app),
            AuditTrail(database, b"k" * 32),
        )

    def receive(dataset, association_id: int) -> None:  # type: ignore[no-untyped-def]
        headers = _headers(dataset)
        meta = file_meta_bytes(dataset.SOPClassUID, dataset.SOPInstanceUID, ExplicitVRLittleEndian)
        uids = headers.study_uid, headers.series_uid, headers.sop_instance_uid
        spooled = spool.store(*uids, meta, encode(dataset, False, True))
        ingest.record_instance(
            headers, spooled, transfer_syntax_uid=ExplicitVRLittleEndian, association_id=association_id,
            received_at=datetime.now(UTC),
        ).result()  # fmt: skip

    def association() -> int:
        return ingest.open_association("MR1", "BRAIN3D", "127.0.0.1", 104).result()

    def completed(series_uid: str) -> tuple[str | None, int, int]:
        """How the series completed (None: still receiving), its instances, its generation."""
        with database.session() as session:
            series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one()
            instances = session.scalar(select(func.count(Instance.id)).where(Instance.series_id == series.id))
        reason = series.completion_reason if series.state == SeriesState.COMPLETE else None
        return reason, instances, series.generation

    def counted_series(count: int) -> tuple[list, str]:  # type: ignore[type-arg]
        datasets = mr_series(count)
        for dataset in datasets:
            dataset.ImagesInAcquisition = count
        return datasets, datasets[0].SeriesInstanceUID

    running = tracker()
    ingest.start()
    running.start()
    try:
        two_acquisitions = mr_series(24)
        for index, dataset in enumerate(two_acquisitions):
            dataset.AcquisitionNumber, dataset.ImagesInAcquisition = 1 + index // 12, 12
        series_uid = two_acquisitions[0].SeriesInstanceUID
        sender = association()
        for dataset in two_acquisitions[:12]:
            receive(dataset, sender)
        time.sleep(0.5)  # ten completion checks
        assert completed(series_uid)[0] is None, "one acquisition's count, its sender still open"
        for dataset in two_acquisitions[12:]:
            receive(dataset, sender)
        ingest.close_association(sender, "released", 24, 0, 0).result()
        assert wait_for(lambda: completed(series_uid)[0], timeout_s=10) == "count"
        assert completed(series_uid) == ("count", 24, 0), "completed once, with both acquisitions"

        one_per_association, series_uid = counted_series(6)
        for dataset in one_per_association:
            sender = association()
            receive(dataset, sender)
            ingest.close_association(sender, "released", 1, 0, 0).result()
        assert wait_for(lambda: completed(series_uid)[0], timeout_s=10) == "count"
        assert completed(series_uid) == ("count", 6, 0)

        aborted, aborted_uid = counted_series(4)
        sender = association()
        for dataset in aborted:
            receive(dataset, sender)
        ingest.close_association(sender, "aborted", 4, 0, 0).result()
        open_at_restart, restart_uid = counted_series(4)
        for dataset in open_at_restart:
            receive(dataset, association())  # never closed: the node stops meanwhile
        time.sleep(0.5)
        assert completed(aborted_uid) == (None, 4, 0), "an aborted sender may send again"
        running.stop()
        running = tracker()
        assert running.rebuild() == 2
        running.start()
        time.sleep(0.5)
        assert completed(restart_uid) == (None, 4, 0), "the sender was lost at the restart"
        assert completed(aborted_uid) == (None, 4, 0)
    finally:
        running.stop()
        ingest.stop()
        database.dispose()
