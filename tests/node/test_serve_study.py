"""Done-means of issue 2, first bullet: a three-series study from dcmtk's storescu to ``brain3d serve``.

Run twice, on the embedded defaults (SQLite, kombu's SQL transport) and on PostgreSQL +
Redis: every instance is in the spool with the dataset bytes that were sent, the FLAIR
series is eligible and its job queued within 2 s of its last instance (the count is in
its headers), T1 and localizer are ineligible with reasons, and a re-sent series only
counts duplicates.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from conftest import require_tool
from pydicom.dataset import Dataset
from serve_harness import NodeProcess, SentSeries, dataset_bytes, storescu, wait_for, write_study
from sqlalchemy import create_engine, select, text

from dicom_node.acquisition import FLAIR_2D
from dicom_node.db.models import Association, AuditEvent, Instance, Job, JobState, Series, SeriesState, as_utc
from worker.app import RUN_JOB_TASK

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def _send_study(node: NodeProcess, study: dict[str, SentSeries]) -> None:
    require_tool("storescu")
    for series in study.values():
        storescu(node.port, series.paths)


def _complete_series(node: NodeProcess, count: int) -> dict[str, Series]:
    database = node.database()
    try:

        def all_complete() -> dict[str, Series] | None:
            with database.session() as session:
                rows = session.execute(select(Series)).scalars().all()
            if len(rows) == count and all(row.state == SeriesState.COMPLETE for row in rows):
                return {row.series_instance_uid: row for row in rows}
            return None

        return wait_for(all_complete, timeout_s=20)
    finally:
        database.dispose()


def _check_study(node: NodeProcess, study: dict[str, SentSeries]) -> int:
    """The checks shared by both back ends; returns the FLAIR job's id."""
    series = _complete_series(node, 3)
    flair, t1, localizer = (series[study[name].series_uid] for name in ("flair", "t1", "localizer"))

    for sent in study.values():
        for dataset, path in zip(sent.datasets, sent.paths, strict=True):
            spooled = node.spool_dir / sent.study_uid / sent.series_uid / f"{dataset.SOPInstanceUID}.dcm"
            assert dataset_bytes(spooled) == dataset_bytes(path), f"bytes differ for {spooled.name}"

    assert flair.eligible is True and flair.completion_reason == "count"
    assert flair.routing_reason.startswith("flair")
    assert t1.eligible is False and t1.routing_reason.startswith("not_inversion_recovery")
    assert localizer.eligible is False and localizer.routing_reason.startswith("localizer")

    database = node.database()
    try:
        with database.session() as session:
            jobs = session.execute(select(Job)).scalars().all()
            assert [job.series_id for job in jobs] == [flair.id], "only the FLAIR series gets a job"
            job = jobs[0]
            assert job.state == JobState.QUEUED and job.series_generation == 0
            assert job.queued_at is not None
            latency = as_utc(job.queued_at) - as_utc(job.last_instance_received_at)
            assert latency >= timedelta(0), "handed on after its last instance, not before"
            stored = session.execute(select(Instance.sop_instance_uid)).scalars().all()
            sent_uids = [str(ds.SOPInstanceUID) for sent in study.values() for ds in sent.datasets]
            assert sorted(stored) == sorted(sent_uids)
        return job.id
    finally:
        database.dispose()


def _check_resend_counts_duplicates(node: NodeProcess, study: dict[str, SentSeries]) -> None:
    storescu(node.port, study["flair"].paths)
    database = node.database()
    try:

        def last_association() -> Association | None:
            with database.session() as session:
                newest = select(Association).order_by(Association.id.desc()).limit(1)
                row = session.execute(newest).scalar_one()
            # The re-send is the last of the associations so far: one per series sent, then this one.
            return row if row.outcome == "released" and row.id == len(study) + 1 else None

        association = wait_for(last_association)
        assert (association.instances_stored, association.instances_duplicate) == (0, 12)
        with database.session() as session:
            assert len(session.execute(select(Instance)).scalars().all()) == 36
            assert len(session.execute(select(Job)).scalars().all()) == 1, "identical re-send is no new job"
            generation = session.execute(
                select(Series.generation).where(Series.series_instance_uid == study["flair"].series_uid)
            ).scalar_one()
            assert generation == 0
            transfers = session.execute(
                select(AuditEvent.document).where(AuditEvent.event_id == "110104")
            ).scalars()
            details = [json.loads(document)["detail"] for document in transfers]
        assert [detail["instances_stored"] for detail in details] == [12, 12, 12, 0]
        assert details[-1]["instances_duplicate"] == 12
    finally:
        database.dispose()


def _message_job_ids(payloads: list[bytes | str]) -> list[int]:
    """Job ids of ``brain3d.run_job`` messages (Celery protocol 2, JSON body in base64)."""
    job_ids = []
    for payload in payloads:
        message = json.loads(payload)
        assert message["headers"]["task"] == RUN_JOB_TASK
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        job_ids.append(args[0])
    return job_ids


def test_study_on_embedded_defaults(tmp_path: Path) -> None:
    study = write_study(tmp_path / "study")
    with NodeProcess(tmp_path / "node") as node:
        _send_study(node, study)
        job_id = _check_study(node, study)
        _check_resend_counts_duplicates(node, study)

    broker = create_engine(node.broker_url.removeprefix("sqla+"))
    with broker.connect() as connection:
        payloads = connection.execute(
            text(
                "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
                " WHERE q.name = 'cpu'"
            )
        ).scalars()
        assert _message_job_ids(list(payloads)) == [job_id]
    broker.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_study_on_postgres_and_redis(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    study = write_study(tmp_path / "study", seed=2)
    node = NodeProcess(
        tmp_path / "node", database_url=postgres_url, broker_url=redis_url, result_backend=redis_url
    )
    with node:
        _send_study(node, study)
        job_id = _check_study(node, study)
        _check_resend_counts_duplicates(node, study)

    client = redis.Redis.from_url(redis_url)
    try:
        assert _message_job_ids(client.lrange("cpu", 0, -1)) == [job_id]
    finally:
        client.close()


def test_a_site_count_rule_completes_a_series_whose_headers_give_no_count(tmp_path: Path) -> None:
    """Station MR7 sends no ImagesInAcquisition; a count rule for it completes the FLAIR series on
    its last instance, while the same series from a station without a rule waits for the timer."""
    require_tool("storescu")

    def station(name: str) -> Callable[[Dataset], None]:
        def edit(dataset: Dataset) -> None:
            del dataset.ImagesInAcquisition
            dataset.StationName = name

        return edit

    with_rule = write_study(tmp_path / "mr7", presets=[("flair", FLAIR_2D)], seed=3, edit=station("MR7"))
    without = write_study(tmp_path / "mr8", presets=[("flair", FLAIR_2D)], seed=4, edit=station("MR8"))
    rule = {"match": {"StationName": "mr7", "SeriesDescription": "*dark-fluid*"}, "instances": 12}
    with NodeProcess(tmp_path / "node", stable_seconds=60, count_rules=[rule]) as node:
        storescu(node.port, without["flair"].paths)
        storescu(node.port, with_rule["flair"].paths)
        database = node.database()
        try:

            def queued_job() -> Job | None:
                with database.session() as session:
                    return session.execute(select(Job).where(Job.queued_at.is_not(None))).scalar_one_or_none()

            job = wait_for(queued_job, timeout_s=20)
            with database.session() as session:
                series = session.execute(select(Series).where(Series.id == job.series_id)).scalar_one()
                waiting = session.execute(
                    select(Series).where(Series.series_instance_uid == without["flair"].series_uid)
                ).scalar_one()
        finally:
            database.dispose()
    assert series.series_instance_uid == with_rule["flair"].series_uid
    assert (series.expected_instances, series.completion_reason) == (12, "count")
    assert waiting.state == SeriesState.RECEIVING and waiting.expected_instances is None
    assert as_utc(job.queued_at) >= as_utc(job.last_instance_received_at)
