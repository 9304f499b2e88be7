"""The whole product with real parts: storescu -> brain3d serve -> Celery worker -> Orthanc.

PostgreSQL and Redis (or the embedded SQLite transport), a worker in its own process, dcmtk's
storescu as the modality, Orthanc as the PACS, dciodvfy and dsrdump as SR validators. The
faults are real too: SIGKILL of the worker's child and of its main process, a Redis restart that
loses the queue, and a PACS outage of a minute.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pydicom
import pytest
import redis
from harness import (
    MODEL,
    NodeEnvironment,
    Study,
    lateral_case,
    start_node,
    start_worker,
    write_study,
)
from pacs import Orthanc, free_port
from serve_harness import dataset_bytes, storescu, wait_for
from sqlalchemy import select

from dicom_node.db import AuditEvent, Delivery, JobState, Series, StructuredReport
from dicom_node.db.models import utcnow
from dicom_node.spool import dataset_offset
from dicom_node.sr import AI_DISCLAIMER, DEMO_DISCLAIMER, read_coded_findings, read_narrative
from dicom_node.sr.validate import validate_sr
from inference.report_schema import Side, parse
from worker.jobs import latest_job, wait_for_final_job

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

ORTHANC_AE = "ORTHANC"


@pytest.fixture(scope="module", autouse=True)
def _demo_checkpoint_present() -> None:
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no checkpoint at {MODEL}: the committed demo checkpoint is missing")


@pytest.fixture
def orthanc(tmp_path):
    with Orthanc(tmp_path / "orthanc", ae_title=ORTHANC_AE) as pacs:
        yield pacs


def _destination(pacs: Orthanc) -> list[dict]:
    return [{"host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.ae_title}]


def _sr_files_in_orthanc(pacs: Orthanc, study_uid: str) -> list[bytes]:
    """The files of every SR Orthanc holds in the study, as it stored them."""
    query = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
    request = urllib.request.Request(f"{pacs.url}/tools/find", data=query, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        found = json.loads(response.read())
    files = []
    for study_id in found:
        for series_id in pacs.get(f"/studies/{study_id}")["Series"]:
            series = pacs.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") == "SR":
                files += [pacs.file_of(i) for i in series["Instances"]]
    return files


def _sr_instances_in_orthanc(pacs: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """Every SR Orthanc holds in the study, read from the bytes it stored."""
    return [pydicom.dcmread(io.BytesIO(data)) for data in _sr_files_in_orthanc(pacs, study_uid)]


def _in_order(seen: list, expected: list) -> bool:
    """True when ``expected`` occurs in ``seen`` in this order (other items may come between)."""
    remaining = iter(seen)
    return all(item in remaining for item in expected)


def _events(environment: NodeEnvironment, job_id: int) -> list[tuple[str, str | None, int]]:
    with environment.database().session() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id))
        return [(row.event_id, row.event_type, row.outcome) for row in rows]


def _worker_activity(environment: NodeEnvironment) -> list[tuple[str, str, list[str] | None]]:
    """(event type, process id, SR validators it runs) of each worker start (110120) and stop
    (110121) the trail holds."""
    with environment.database().session() as session:
        query = select(AuditEvent.document).where(AuditEvent.event_id == "110100")
        documents = [json.loads(document) for document in session.scalars(query)]
    return [
        (d["event_type"]["code"], d["participants"][0]["user_id"], d["detail"].get("sr_validators"))
        for d in documents
        if d["detail"].get("service") == "worker"
    ]


def _audit_verifies(environment: NodeEnvironment) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "audit", "verify", "--json"],
        env=environment.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True


def _check_reports(pacs: Orthanc, study: Study, job, tmp_path: Path) -> list[pydicom.Dataset]:
    """Exactly two SRs in Orthanc, in the source study; valid; exact evidence; codes = text."""
    reports = _sr_instances_in_orthanc(pacs, study.uid("flair", "StudyInstanceUID"))
    assert len(reports) == 2, "exactly one copy of each SR at the PACS"
    sources = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in study.flair}
    parsed = parse(job.report_text)
    for index, report in enumerate(reports):
        path = tmp_path / f"received-{index}.dcm"
        report.save_as(path, enforce_file_format=True)
        assert validate_sr(path) == [], "dciodvfy and dsrdump report no errors"
        assert report.VerificationFlag == "UNVERIFIED"
        assert report.CompletionFlag == "COMPLETE"
        evidence = {
            item.ReferencedSOPInstanceUID
            for study_item in report.CurrentRequestedProcedureEvidenceSequence
            for series_item in study_item.ReferencedSeriesSequence
            for item in series_item.ReferencedSOPSequence
        }
        assert evidence == sources, "the evidence lists exactly the source instances"
        if report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage:
            # The codes are the text's. Whether the text is the truth is the model's quality:
            # test_laterality_pipeline measures it over every geometry.
            coded = read_coded_findings(report)
            assert (coded.abnormal, coded.side, coded.lobes) == (parsed.abnormal, parsed.side, parsed.lobes)
        else:
            narrative = read_narrative(report)
            assert AI_DISCLAIMER in narrative.comments and DEMO_DISCLAIMER in narrative.comments
            assert narrative.findings[0] == job.report_text
    return reports


def _delivered_once(job, environment: NodeEnvironment, pacs: Orthanc, study: Study) -> None:
    """Each persisted SR delivered once, and the PACS holds its very bytes (a re-delivery sends
    what was persisted, never a rebuilt copy)."""
    with environment.database().session() as session:
        reports = session.scalars(select(StructuredReport).where(StructuredReport.job_id == job.id)).all()
        deliveries = session.scalars(
            select(Delivery).where(Delivery.job_id == job.id, Delivery.succeeded)
        ).all()
    assert sorted(d.sop_instance_uid for d in deliveries) == sorted(r.sop_instance_uid for r in reports)
    held = {
        str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID): data[
            dataset_offset(data) :
        ]
        for data in _sr_files_in_orthanc(pacs, study.uid("flair", "StudyInstanceUID"))
    }
    assert held == {report.sop_instance_uid: dataset_bytes(Path(report.path)) for report in reports}


def _embedded_environment(tmp_path: Path, pacs: Orthanc, extra: dict[str, str]) -> NodeEnvironment:
    """The embedded defaults (SQLite, kombu's SQL transport) in the test's folder."""
    root = tmp_path / "node"
    return NodeEnvironment(
        root=root,
        database_url=f"sqlite:///{root / 'brain3d.db'}",
        broker_url=f"sqla+sqlite:///{root / 'broker.db'}",
        destinations=_destination(pacs),
        extra=extra,
    )


@pytest.fixture
def redis_environment(tmp_path, postgres_url, redis_url, orthanc) -> NodeEnvironment:
    return NodeEnvironment(
        root=tmp_path / "node",
        database_url=postgres_url,
        broker_url=redis_url,
        destinations=_destination(orthanc),
    )


def test_a_study_comes_back_as_two_valid_srs_in_orthanc(redis_environment, orthanc, tmp_path):
    environment = redis_environment
    study = write_study(tmp_path / "study", lateral_case(Side.LEFT), seed=11)
    node, worker = start_node(environment), start_worker(environment)
    try:
        storescu(environment.node_port, study.flair + study.t1)
        job = wait_for_final_job(environment.database(), study.uid(), timeout_s=180)
        assert job.state == JobState.SUCCEEDED, job.error_reason
        _check_reports(orthanc, study, job, tmp_path)
        _delivered_once(job, environment, orthanc, study)
        # Every step has its timestamp, in order, from the last instance to the PACS.
        steps = [
            job.last_instance_received_at,
            job.series_complete_at,
            job.queued_at,
            job.conversion_finished_at,
            job.inference_finished_at,
            job.sr_built_at,
            job.delivered_at,
        ]
        assert all(steps) and steps == sorted(steps)
        # The T1 series was stored, routed out with its reason, and got no job.
        assert latest_job(environment.database(), study.uid("t1")) is None
        with environment.database().session() as session:
            t1 = session.scalars(select(Series).where(Series.series_instance_uid == study.uid("t1"))).one()
            assert t1.eligible is False and t1.routing_reason
        events = _events(environment, job.id)
        steps = ["job-started", "conversion", "inference", "reports-built", "110106", "job-succeeded"]
        assert _in_order([event_type or event_id for event_id, event_type, _ in events], steps)
        assert all(outcome == 0 for _, _, outcome in events), f"every step succeeded, first time: {events}"
        pid = str(worker.process.pid)
        worker.stop()
        assert _worker_activity(environment) == [
            ("110120", pid, ["dciodvfy", "dsrdump"]),
            ("110121", pid, ["dciodvfy", "dsrdump"]),
        ], "start and stop audited, with the SR validators the worker runs"
        _audit_verifies(environment)
    finally:
        worker.stop()
        node.stop()


def test_a_study_that_waits_for_a_starting_worker_runs_once_and_is_not_called_lost(
    redis_environment, tmp_path
):
    """Queued while no worker runs, then held by a worker whose child still loads the model: the
    reconciler (here every 0.2 s) must see a job that waits, not one the broker lost."""
    environment = redis_environment
    environment.extra["BRAIN3D_WORKER__RECONCILE_EVERY_S"] = "0.2"
    stale_after_s = float(environment.env()["BRAIN3D_WORKER__STALE_AFTER_S"])
    study = write_study(tmp_path / "study", lateral_case(Side.RIGHT, seed=20), seed=21)
    node = start_node(environment)
    worker = None
    try:
        storescu(environment.node_port, study.flair)
        database = environment.database()
        queued = wait_for(
            lambda: (job := latest_job(database, study.uid())) is not None and job.queued_at, 30
        )
        time.sleep(max(0.0, stale_after_s + 1 - (utcnow() - queued).total_seconds()))
        worker = start_worker(environment)
        job = wait_for_final_job(database, study.uid(), timeout_s=180)
        assert job.state == JobState.SUCCEEDED, job.error_reason
        events = [event_type for _, event_type, _ in _events(environment, job.id)]
        assert "job-requeued" not in events and events.count("job-started") == 1, events
    finally:
        if worker is not None:
            worker.stop()
        node.stop()


def test_sigkill_of_the_inference_child_reruns_it_and_the_pacs_gets_one_copy(
    redis_environment, orthanc, tmp_path
):
    environment = redis_environment
    study = write_study(tmp_path / "study", lateral_case(Side.RIGHT), seed=21)
    node, worker = start_node(environment), start_worker(environment)
    try:
        children = {child.pid for child in worker.children()}
        storescu(environment.node_port, study.flair + study.t1)
        database = environment.database()

        def in_inference():
            job = latest_job(database, study.uid())
            return (
                job
                if job is not None and job.inference_started_at and not job.inference_finished_at
                else None
            )

        wait_for(in_inference, 60, interval_s=0.01)
        for pid in children:
            psutil.Process(pid).kill()
        job = wait_for_final_job(database, study.uid(), timeout_s=180)
        assert job.state == JobState.SUCCEEDED, job.error_reason
        assert job.attempts == 2, "the interrupted inference counts as an attempt"
        # The replacement child loads the model before it reports up; Celery must wait for it.
        assert "Timed out waiting for UP message" not in worker.log()
        _check_reports(orthanc, study, job, tmp_path)
        _delivered_once(job, environment, orthanc, study)
    finally:
        worker.stop()
        node.stop()


def test_sigkill_of_the_worker_main_process_is_recovered_from_sql(tmp_path, postgres_url, orthanc):
    """On the embedded transport a fetched message is never redelivered: the reconciler recovers it."""
    environment = NodeEnvironment(
        root=tmp_path / "node",
        database_url=postgres_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'node' / 'broker.db'}",
        destinations=_destination(orthanc),
    )
    study = write_study(tmp_path / "study", lateral_case(Side.LEFT, seed=40), seed=31)
    node, worker = start_node(environment), start_worker(environment)
    try:
        storescu(environment.node_port, study.flair + study.t1)
        database = environment.database()
        wait_for(
            lambda: (job := latest_job(database, study.uid())) is not None and job.conversion_started_at,
            60,
            0.01,
        )
        worker.kill()
        replacement = start_worker(environment, name="worker-2")
        try:
            job = wait_for_final_job(database, study.uid(), timeout_s=180)
        finally:
            replacement.stop()
        assert job.state == JobState.SUCCEEDED, job.error_reason
        assert "job-requeued" in [event[1] for event in _events(environment, job.id)]
        _check_reports(orthanc, study, job, tmp_path)
    finally:
        worker.stop()
        node.stop()


def _redis_server(port: int) -> subprocess.Popen:
    """A private Redis keeping nothing on disk, as this project's machines run theirs."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(pings, 10)
    return process


def test_a_redis_restart_that_loses_the_queue_is_recovered_within_a_minute(tmp_path, postgres_url, orthanc):
    port = free_port()
    redis_process = _redis_server(port)
    environment = NodeEnvironment(
        root=tmp_path / "node",
        database_url=postgres_url,
        broker_url=f"redis://127.0.0.1:{port}/0",
        destinations=_destination(orthanc),
    )
    study = write_study(tmp_path / "study", lateral_case(Side.RIGHT, seed=50), seed=41)
    node = start_node(environment)
    worker = None
    try:
        storescu(environment.node_port, study.flair + study.t1)
        database = environment.database()
        wait_for(lambda: (job := latest_job(database, study.uid())) is not None and job.queued_at, 30)
        # Redis restarts with nothing kept on disk: the queued message is gone.
        redis_process.kill()
        redis_process.wait()
        redis_process = _redis_server(port)
        worker = start_worker(environment)
        job = wait_for_final_job(database, study.uid(), timeout_s=90)
        assert job.state == JobState.SUCCEEDED, job.error_reason
        assert "job-requeued" in [event[1] for event in _events(environment, job.id)]
        _check_reports(orthanc, study, job, tmp_path)
    finally:
        if worker is not None:
            worker.stop()
        node.stop()
        redis_process.kill()
        redis_process.wait()


def test_a_one_minute_pacs_outage_delays_delivery_and_loses_nothing(redis_environment, orthanc, tmp_path):
    environment = redis_environment
    study = write_study(tmp_path / "study", lateral_case(Side.LEFT, seed=60), seed=51)
    node, worker = start_node(environment), start_worker(environment)
    try:
        orthanc.__exit__(None, None, None)  # the PACS goes down
        down_at = time.monotonic()
        storescu(environment.node_port, study.flair + study.t1)
        database = environment.database()

        def failed_attempts() -> int:
            with database.session() as session:
                return len(session.scalars(select(Delivery).where(Delivery.succeeded.is_(False))).all())

        wait_for(lambda: failed_attempts() >= 4, 60)
        assert latest_job(database, study.uid()).state == JobState.RUNNING, "the job waits for the PACS"
        time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
        orthanc.__enter__()  # back, same ports and storage
        job = wait_for_final_job(database, study.uid(), timeout_s=60)
        assert job.state == JobState.SUCCEEDED, job.error_reason
        _check_reports(orthanc, study, job, tmp_path)
        _delivered_once(job, environment, orthanc, study)
        exports = [event for event in _events(environment, job.id) if event[0] == "110106"]
        assert exports[0][2] != 0 and exports[-1][2] == 0, "failed exports audited, then the successful one"
    finally:
        worker.stop()
        node.stop()


def test_a_series_with_a_missing_slice_is_not_analysed_and_says_why(tmp_path, orthanc):
    environment = _embedded_environment(tmp_path, orthanc, {"BRAIN3D_DELIVERY__NOT_ANALYSED_REPORT": "true"})
    study = write_study(tmp_path / "study", lateral_case(Side.LEFT), seed=61)
    gap = study.flair[len(study.flair) // 2]
    sent = [path for path in study.flair if path != gap]
    for path in sent:  # the scanner's count matches what arrives: only geometry can tell
        dataset = pydicom.dcmread(path)
        dataset.ImagesInAcquisition = len(sent)
        dataset.save_as(path, enforce_file_format=True)
    node, worker = start_node(environment), start_worker(environment)
    try:
        storescu(environment.node_port, sent)
        job = wait_for_final_job(environment.database(), study.uid(), timeout_s=180)
        assert job.state == JobState.NOT_ANALYSED
        assert "slice" in job.error_reason
        assert job.inference_started_at is None, "never passed to the model"
        reports = _sr_instances_in_orthanc(orthanc, study.uid("flair", "StudyInstanceUID"))
        assert len(reports) == 1
        assert job.error_reason in read_narrative(reports[0]).findings[0]
        assert "job-not_analysed" in [event[1] for event in _events(environment, job.id)]
    finally:
        worker.stop()
        node.stop()


def test_shadow_mode_keeps_srs_locally_and_sends_nothing(tmp_path, orthanc):
    environment = _embedded_environment(tmp_path, orthanc, {"BRAIN3D_DELIVERY__SHADOW_MODE": "true"})
    study = write_study(tmp_path / "study", lateral_case(Side.RIGHT), seed=71)
    node, worker = start_node(environment), start_worker(environment)
    try:
        storescu(environment.node_port, study.flair)
        job = wait_for_final_job(environment.database(), study.uid(), timeout_s=180)
        assert job.state == JobState.SUCCEEDED and "shadow" in job.error_reason
        assert _sr_instances_in_orthanc(orthanc, study.uid("flair", "StudyInstanceUID")) == []
        stored = list((tmp_path / "node" / "reports").rglob("*.dcm"))
        assert len(stored) == 2 and all(validate_sr(path) == [] for path in stored)
    finally:
        worker.stop()
        node.stop()
