"""Job bookkeeping on both databases: claims, interruptions, final states, the reconciler's choice."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import re
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from kombu import Connection
from pacs import StoreSCP, free_port
from serve_harness import wait_for
from sqlalchemy import select, update

from dicom_node.acquisition import FLAIR_2D
from dicom_node.config import DestinationSettings, ModelSettings, load_settings
from dicom_node.db import AuditEvent, Delivery, Instance, Job, JobState, Series, StructuredReport, Study
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import as_utc, utcnow
from dicom_node.series_writer import write_series
from inference.report_schema import NORMAL, render
from inference.synthetic import synthesize_case
from worker.app import CPU_QUEUE, GPU_QUEUE, RUN_JOB_TASK, create_app
from worker.convert import convert, converted_sources, source_instances
from worker.delivery import DemoModelGuardError, deliver
from worker.inference import ModelIdentity, identify_model
from worker.jobs import JobBook, Step, stale_jobs
from worker.reconciler import reconcile_once
from worker.reports import (
    MEASUREMENT_KIND,
    NARRATIVE_KIND,
    NOT_ANALYSED_KIND,
    InvalidReportError,
    build_and_store,
    reports_of,
)
from worker.runtime import Runtime
from worker.tasks import failure_reason


@pytest.fixture
def runtime(database_url, tmp_path) -> Runtime:
    upgrade(database_url)
    settings = load_settings(
        database={"url": database_url, "audit_key_file": tmp_path / "audit.key"},
        queue={
            "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "result_backend": f"db+sqlite:///{tmp_path / 'results.db'}",
        },
        worker={"max_attempts": 2, "stale_after_s": 30},
        storage={"work_dir": tmp_path / "work", "reports_dir": tmp_path / "reports"},
    )
    return Runtime(settings)


_uids = itertools.count(1)


def _job(runtime: Runtime, **values) -> int:
    with runtime.database.session() as session:
        study = Study(study_instance_uid=f"1.2.3.{next(_uids)}")
        series = Series(series_instance_uid=f"{study.study_instance_uid}.1", study=study, modality="MR")
        job = Job(series=series, **{"queued_at": utcnow(), **values})
        session.add_all([study, series, job])
        session.flush()
        return job.id


def test_a_job_is_claimed_once(runtime):
    job_id = _job(runtime)
    book = JobBook(runtime)
    assert book.claim(job_id) is True
    assert book.claim(job_id) is False, "a duplicate run_job must not claim a running job"
    assert book.get(job_id).state == JobState.RUNNING


def _lost(runtime: Runtime, job_id: int) -> None:
    """The job's worker died: its heartbeat stopped longer than ``stale_after_s`` ago, and the
    reconciler found it so and re-sent it."""
    long_ago = utcnow() - timedelta(seconds=runtime.settings.worker.stale_after_s + 1)
    with runtime.database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=long_ago))
    assert job_id in reconcile_once(runtime, create_app(runtime.settings))
    with Connection(runtime.settings.queue.broker_url) as connection:  # a worker takes the message
        for name in (CPU_QUEUE, GPU_QUEUE):
            queue = connection.SimpleQueue(name)
            while queue.qsize():
                queue.get(timeout=2).ack()
            queue.close()


def test_an_interrupted_step_counts_as_an_attempt_and_the_job_fails_past_the_cap(runtime):
    job_id = _job(runtime)
    book = JobBook(runtime)
    book.claim(job_id)
    assert book.begin(job_id, Step.CONVERT) is not None
    book.complete(job_id, Step.CONVERT)
    assert book.begin(job_id, Step.INFER).attempts == 1
    # The worker died in inference and the reconciler re-sent it: second start.
    _lost(runtime, job_id)
    assert book.begin(job_id, Step.INFER).attempts == 2
    # Third start exceeds max_attempts=2: the job ends failed with the reason.
    _lost(runtime, job_id)
    assert book.begin(job_id, Step.INFER) is None
    job = book.get(job_id)
    assert job.state == JobState.FAILED
    assert "infer interrupted 2 times" in job.error_reason


def test_a_duplicate_of_a_step_still_running_elsewhere_neither_reruns_nor_fails_it(runtime):
    """A second message for a step whose heartbeat is fresh: the running copy goes on. Before, each
    duplicate ran the step again, and the third failed a healthy job as 'interrupted'."""
    book, job_id = _at(runtime, Step.INFER)
    assert book.begin(job_id, Step.INFER).attempts == 1
    for _ in range(3):
        assert book.begin(job_id, Step.INFER) is None
    job = book.get(job_id)
    assert (job.state, job.attempts, job.error_reason) == (JobState.RUNNING, 1, None)


def test_a_step_waits_for_the_one_before_and_a_result_never_lands_on_an_ended_job(runtime):
    """A skipped duplicate of inference returns and its chain goes on: building the SRs must not
    start (there is no report yet), nor delivery before the SRs exist."""
    book, job_id = _at(runtime, Step.INFER)
    assert book.begin(job_id, Step.INFER) is not None
    assert book.begin(job_id, Step.BUILD_REPORTS) is None
    assert book.begin(job_id, Step.DELIVER) is None
    assert book.get(job_id).state == JobState.RUNNING
    book.finish(job_id, JobState.FAILED, "cancelled by an administrator")
    assert book.complete(job_id, Step.INFER, report_text="late") is False
    job = book.get(job_id)
    assert job.report_text is None and job.inference_finished_at is None


def _at(runtime: Runtime, step: Step) -> tuple[JobBook, int]:
    """A claimed job whose steps before ``step`` have finished."""
    job_id = _job(runtime)
    book = JobBook(runtime)
    book.claim(job_id)
    for earlier in list(Step)[: list(Step).index(step)]:
        book.begin(job_id, earlier)
        book.complete(job_id, earlier)
    return book, job_id


@pytest.mark.parametrize("step", [Step.BUILD_REPORTS, Step.DELIVER])
def test_a_late_step_that_keeps_killing_its_worker_ends_the_job_failed(runtime, step):
    book, job_id = _at(runtime, step)
    assert book.begin(job_id, step).attempts == 1
    _lost(runtime, job_id)
    assert book.begin(job_id, step).attempts == 2, "the re-sent step is a second attempt"
    _lost(runtime, job_id)
    assert book.begin(job_id, step) is None
    job = book.get(job_id)
    assert job.state == JobState.FAILED and f"{step} interrupted 2 times" in job.error_reason


def test_a_scheduled_delivery_retry_is_not_an_interruption(runtime):
    book, job_id = _at(runtime, Step.DELIVER)
    for _ in range(5):  # the PACS stays down: more retries than max_attempts allows interruptions
        assert book.begin(job_id, Step.DELIVER).attempts == 1
        book.await_retry(job_id, 30)
        assert book.get(job_id).delivery_started_at is None
        # stale_after_s is 30: 45 s on, a heartbeat dated 30 s ahead is still fresh.
        later = utcnow() + timedelta(seconds=45)
        assert job_id not in dict(stale_jobs(runtime, now=later)), "a job waiting for its retry is not stale"
    book.begin(job_id, Step.DELIVER)  # the PACS is back
    book.complete(job_id, Step.DELIVER)
    assert book.begin(job_id, Step.DELIVER) is None, "a delivered job is not delivered again"
    book.finish(job_id, JobState.SUCCEEDED)
    book.await_retry(job_id, 30)  # a late duplicate's retry leaves a finished job as it is
    assert book.get(job_id).delivery_started_at is not None


def test_a_final_job_is_never_changed_again(runtime):
    job_id = _job(runtime)
    book = JobBook(runtime)
    book.claim(job_id)
    book.finish(job_id, JobState.NOT_ANALYSED, "too few slices")
    book.finish(job_id, JobState.SUCCEEDED)
    assert book.begin(job_id, Step.INFER) is None
    job = book.get(job_id)
    assert (job.state, job.error_reason) == (JobState.NOT_ANALYSED, "too few slices")
    with runtime.database.session() as session:
        types = [event.event_type for event in session.query(AuditEvent).filter_by(job_id=job_id)]
    assert types == ["job-started", "job-not_analysed"]


def test_a_copy_of_a_task_that_read_the_job_before_it_ended_leaves_it_ended(runtime, monkeypatch):
    """Duplicates happen (redelivery, the reconciler): one that read the job just before the other
    copy delivered and ended it must not set it running again, where nothing would ever end it."""
    book, job_id = _at(runtime, Step.DELIVER)
    read_before = book.get(job_id)
    book.begin(job_id, Step.DELIVER)
    book.finish(job_id, JobState.SUCCEEDED, completed=Step.DELIVER)
    monkeypatch.setattr(book, "get", lambda _: read_before)  # the duplicate's read, now out of date
    assert book.begin(job_id, Step.DELIVER) is None
    monkeypatch.undo()
    job = book.get(job_id)
    assert job.state == JobState.SUCCEEDED and job.delivered_at == job.finished_at


def test_of_two_copies_of_one_step_only_one_starts_it(runtime, monkeypatch):
    book, job_id = _at(runtime, Step.BUILD_REPORTS)
    read_before = book.get(job_id)
    assert book.begin(job_id, Step.BUILD_REPORTS).attempts == 1
    real_get = book.get
    reads = iter([read_before])
    monkeypatch.setattr(book, "get", lambda job: next(reads, None) or real_get(job))
    assert book.begin(job_id, Step.BUILD_REPORTS) is None, "the other copy has started this step"
    assert real_get(job_id).attempts == 1, "and no interruption is counted"


def test_the_srs_cite_the_instances_the_model_read_not_those_that_came_later(runtime, tmp_path):
    """Slices that reopen a series after its conversion belong to the series' next job: the SRs of
    this one cite, and are named by, exactly what its conversion read."""
    case = synthesize_case("late", lesional=False, seed=3)
    paths = write_series(tmp_path / "series", case.volume, case.affine, preset=FLAIR_2D, seed=3)
    job_id = _job(runtime)
    with runtime.database.session() as session:
        series_id = session.get(Job, job_id).series_id
        session.add_all(_instance_row(series_id, path) for path in paths)
    job = JobBook(runtime).get(job_id)
    read = source_instances(runtime, job)
    convert(runtime, job, read)
    with runtime.database.session() as session:  # two late slices arrive during inference
        session.add_all(
            Instance(
                sop_instance_uid=f"1.2.826.0.1.{number}",
                sop_class_uid=pydicom.uid.MRImageStorage,
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
                series_id=series_id,
                path=str(tmp_path / f"late{number}.dcm"),
                size_bytes=1,
                sha256=f"{number}" * 64,
            )
            for number in (1, 2)
        )
    assert len(source_instances(runtime, job).paths) == len(paths) + 2
    assert converted_sources(runtime, job) == read, "the SR stage reads what conversion read"
    assert source_instances(runtime, job).input_hash != read.input_hash, "the next job's SRs differ"


def _read_by_model_1_0(runtime, tmp_path, seed: int):  # type: ignore[no-untyped-def]
    """A job whose spooled healthy series model version 1.0 has read: its id and its sources."""
    case = synthesize_case(f"case{seed}", lesional=False, seed=seed)
    paths = _spooled(write_series(tmp_path / "series", case.volume, case.affine, preset=FLAIR_2D, seed=seed))
    job_id = _job(runtime, report_text=render(NORMAL), inference_finished_at=utcnow(), model_version="1.0")
    with runtime.database.session() as session:
        series_id = session.get(Job, job_id).series_id
        session.add_all(_instance_row(series_id, path) for path in paths)
    return job_id, source_instances(runtime, JobBook(runtime).get(job_id))


def test_a_job_read_again_by_another_model_sends_new_srs_that_cite_the_old(runtime, tmp_path):
    """A failed job retried after the checkpoint changed: its earlier SRs are kept as history, new
    ones are built under new UIDs and cite them as predecessors, and only the new ones are sent."""
    job_id, sources = _read_by_model_1_0(runtime, tmp_path, seed=4)
    job = JobBook(runtime).get(job_id)
    first = ModelIdentity(name="Brain3D", version="1.0", checkpoint_hash="a" * 64, synthetic_demo=False)
    built = build_and_store(runtime, job, sources, first, content_time=utcnow())
    again = build_and_store(runtime, job, sources, first, content_time=utcnow())
    assert [row.id for row in again] == [row.id for row in built], "the same model keeps its bytes"
    upgraded = ModelIdentity(name="Brain3D", version="1.1", checkpoint_hash="b" * 64, synthetic_demo=False)
    with pytest.raises(InvalidReportError, match=r"written by 1\.0, and this worker's model\.path is 1\.1"):
        build_and_store(runtime, job, sources, upgraded, content_time=utcnow())  # a worker set up apart
    with runtime.database.session() as session:  # the retry: the upgraded model read the series
        session.execute(update(Job).where(Job.id == job_id).values(model_version="1.1"))
    job = JobBook(runtime).get(job_id)
    rebuilt = build_and_store(runtime, job, sources, upgraded, content_time=utcnow())
    assert {row.sop_instance_uid for row in rebuilt}.isdisjoint(row.sop_instance_uid for row in built)
    assert [row.id for row in reports_of(runtime, job)] == [row.id for row in rebuilt]
    narrative = pydicom.dcmread(next(row.path for row in rebuilt if row.kind == NARRATIVE_KIND))
    cited = {
        item.ReferencedSOPInstanceUID
        for study in narrative.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert cited == {row.sop_instance_uid for row in built}


def test_an_sr_rebuilt_after_its_file_was_lost_is_the_same_object(runtime, tmp_path):
    """One SR of a pair lost from the reports folder: the pair is built again under the same UIDs
    and must come out as the PACS may already hold it, citing neither itself nor its twin."""
    job_id, sources = _read_by_model_1_0(runtime, tmp_path, seed=5)
    job = JobBook(runtime).get(job_id)
    model = ModelIdentity(name="Brain3D", version="1.0", checkpoint_hash="a" * 64, synthetic_demo=False)
    when = utcnow()
    built = build_and_store(runtime, job, sources, model, content_time=when)
    first_bytes = {row.kind: Path(row.path).read_bytes() for row in built}
    Path(next(row.path for row in built if row.kind == NARRATIVE_KIND)).unlink()
    rebuilt = build_and_store(runtime, job, sources, model, content_time=when)
    assert {row.sop_instance_uid for row in rebuilt} == {row.sop_instance_uid for row in built}
    for row in rebuilt:
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(row.path)
        assert Path(row.path).read_bytes() == first_bytes[row.kind]


def test_a_copy_of_the_demo_checkpoint_is_still_the_demo(tmp_path):
    """What a checkpoint is travels with it (its configuration says it was trained on synthetic
    data), so a copy elsewhere keeps the demo disclaimer and the loopback guard."""
    committed = ModelSettings()  # the node's default model: the committed demo
    copied = shutil.copytree(committed.path, tmp_path / "models" / "brain3d")
    identity = identify_model(ModelSettings(path=copied))
    assert identity == identify_model(committed), "same content, same identity"
    assert identity.synthetic_demo and identity.name == "Brain3D-demo"


def _spooled(paths: list) -> list:
    """The files moved into the spool's layout, ``<study>/<series>/<SOP>.dcm`` under their folder."""
    moved = []
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        target = (
            path.parent / header.StudyInstanceUID / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        moved.append(path.rename(target))
    return moved


def test_no_sr_is_built_on_an_instance_whose_header_names_another_study(runtime, tmp_path):
    """The node files an instance by the UIDs its header scan reads on receipt; pydicom, reading
    the whole header, could find a repeated element naming another study. The SR would then be
    filed with another patient's images: it is refused."""
    case = synthesize_case("misfiled", lesional=False, seed=5)
    paths = _spooled(write_series(tmp_path / "series", case.volume, case.affine, preset=FLAIR_2D, seed=5))
    dataset = pydicom.dcmread(paths[3])
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.99.1"  # what a full read finds
    dataset.save_as(paths[3], enforce_file_format=True)
    job_id = _job(runtime, report_text=render(NORMAL), inference_finished_at=utcnow(), model_version="1.0")
    with runtime.database.session() as session:
        series_id = session.get(Job, job_id).series_id
        session.add_all(_instance_row(series_id, path) for path in paths)
    job = JobBook(runtime).get(job_id)
    identity = ModelIdentity(name="Brain3D", version="1.0", checkpoint_hash="a" * 64, synthetic_demo=False)
    with pytest.raises(InvalidReportError, match="names other UIDs than the node received it under"):
        build_and_store(runtime, job, source_instances(runtime, job), identity, content_time=utcnow())
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").rglob("*.dcm"))


def _instance_row(series_id: int, path) -> Instance:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    content = path.read_bytes()
    return Instance(
        sop_instance_uid=header.SOPInstanceUID,
        sop_class_uid=header.SOPClassUID,
        transfer_syntax_uid=header.file_meta.TransferSyntaxUID,
        series_id=series_id,
        path=str(path),
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, where it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.10", 9))  # TEST-NET-1: no packet is sent, a route is chosen
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


def test_the_demo_models_srs_of_every_kind_stay_on_loopback_unless_allowed(runtime, tmp_path):
    """The guard sits where SRs leave the node, so a not-analysed note is held back as a report is;
    allowed, it reaches a PACS on this machine's own non-loopback address."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        remote = DestinationSettings(host=address, port=pacs.port, ae_title="PACS")
        guarded = Runtime(runtime.settings.model_copy(update={"destinations": [remote]}))
        assert guarded.model_identity.synthetic_demo, "the committed checkpoint is the demo model"
        job_id = _job(guarded)
        uid = _sr_file(tmp_path / "note.dcm")
        with guarded.database.session() as session:
            session.add(
                StructuredReport(
                    job_id=job_id,
                    kind=NOT_ANALYSED_KIND,  # the job's outcome: not analysed
                    series_instance_uid="1.2.9",
                    sop_instance_uid=uid,
                    path=str(tmp_path / "note.dcm"),
                    sha256="0" * 64,
                )
            )
        job = JobBook(guarded).get(job_id)
        with pytest.raises(
            DemoModelGuardError, match=rf"PACS@{re.escape(address)}:{pacs.port} \(not loopback\)"
        ):
            deliver(guarded, job)
        assert pacs.received() == [], "nothing left the node"
        allowed = guarded.settings.delivery.model_copy(update={"allow_demo_model": True})
        unguarded = Runtime(guarded.settings.model_copy(update={"delivery": allowed}))
        assert deliver(unguarded, job).complete
        assert [pydicom.dcmread(path).SOPInstanceUID for path in pacs.received()] == [uid]


def test_stale_jobs_resume_at_their_next_step(runtime):
    old = utcnow() - timedelta(seconds=120)
    fresh_running = _job(runtime, state=JobState.RUNNING, heartbeat_at=utcnow())
    lost_queued = _job(runtime, queued_at=old)
    dead_in_inference = _job(runtime, state=JobState.RUNNING, heartbeat_at=old, conversion_finished_at=old)
    dead_in_delivery = _job(
        runtime,
        state=JobState.RUNNING,
        heartbeat_at=old,
        conversion_finished_at=old,
        inference_finished_at=old,
        sr_built_at=old,
    )
    # A series that was not analysed builds and sends its short SR with conversion unfinished: a
    # worker lost in that delivery, or while a retry of it waited, resumes it, not the conversion.
    dead_in_not_analysed_delivery = _job(
        runtime,
        state=JobState.RUNNING,
        heartbeat_at=old,
        conversion_started_at=old,
        sr_built_at=old,
        delivery_started_at=old,
    )
    lost_waiting_for_a_not_analysed_retry = _job(
        runtime, state=JobState.RUNNING, heartbeat_at=old, conversion_started_at=old, sr_built_at=old
    )
    finished = _job(runtime, state=JobState.SUCCEEDED, heartbeat_at=old)
    # Committed without queued_at: the node is sending its message now, or stopped before it did.
    being_sent = _job(runtime, queued_at=None)
    never_sent = _job(runtime, queued_at=None, created_at=old)
    found = dict(stale_jobs(runtime))
    assert found == {
        lost_queued: Step.CONVERT,
        never_sent: Step.CONVERT,
        dead_in_inference: Step.INFER,
        dead_in_delivery: Step.DELIVER,
        dead_in_not_analysed_delivery: Step.DELIVER,
        lost_waiting_for_a_not_analysed_retry: Step.DELIVER,
    }
    assert fresh_running not in found and finished not in found and being_sent not in found


def test_reconciler_resends_each_stale_job_once_per_period(runtime):
    old = utcnow() - timedelta(seconds=120)
    lost = _job(runtime, queued_at=old)
    dead = _job(runtime, state=JobState.RUNNING, heartbeat_at=old, conversion_finished_at=old)
    app = create_app(runtime.settings)
    assert sorted(reconcile_once(runtime, app)) == sorted([lost, dead])
    assert reconcile_once(runtime, app) == [], "a re-sent job waits a full period before it is re-sent again"
    with Connection(runtime.settings.queue.broker_url) as connection:
        cpu = connection.SimpleQueue(CPU_QUEUE)
        gpu = connection.SimpleQueue(GPU_QUEUE)
        messages = [cpu.get(timeout=2), gpu.get(timeout=2)]
        bodies = [message.decode() for message in messages]  # (args, kwargs, embedded chain)
        cpu.close()
        gpu.close()
    sent = {(m.headers["task"], tuple(args)) for m, (args, _, _) in zip(messages, bodies, strict=True)}
    assert sent == {("brain3d.run_job", (lost,)), ("brain3d.infer", (dead,))}
    # The job lost in inference gets the rest of its pipeline after it, as run_job would chain it.
    assert [(task["task"], task["args"]) for task in reversed(bodies[1][2]["chain"])] == [
        ("brain3d.build_reports", [dead]),
        ("brain3d.deliver", [dead]),
    ]


def _requeued_events(runtime: Runtime, job_id: int) -> int:
    with runtime.database.session() as session:
        events = session.query(AuditEvent).filter_by(job_id=job_id, event_type="job-requeued")
        return events.count()


@pytest.mark.parametrize("broker", ["sqlite-transport", "redis"])
def test_a_stale_job_is_resent_only_when_no_message_waits_for_it(runtime, broker, request):
    """A stale job behind a backlog, or held by the worker, is waiting, not lost."""
    if broker == "redis":
        queue = runtime.settings.queue.model_copy(update={"broker_url": request.getfixturevalue("redis_url")})
        runtime = Runtime(runtime.settings.model_copy(update={"queue": queue}))
    old = utcnow() - timedelta(seconds=120)
    behind_backlog = _job(runtime, queued_at=old)
    held_by_worker = _job(runtime, queued_at=old)
    lost_in_inference = _job(runtime, state=JobState.RUNNING, heartbeat_at=old, conversion_finished_at=old)
    app = create_app(runtime.settings)
    app.send_task(RUN_JOB_TASK, args=[_job(runtime)], queue=CPU_QUEUE)  # a fresh job's message waits

    # The CPU queue holds a message: the queued jobs may be behind it. The GPU queue is empty.
    assert reconcile_once(runtime, app, held=lambda: {held_by_worker}) == [lost_in_inference]
    with Connection(runtime.settings.queue.broker_url) as connection:
        cpu = connection.SimpleQueue(CPU_QUEUE)
        cpu.get(timeout=2).ack()  # a worker takes the backlog
        cpu.close()
    assert reconcile_once(runtime, app, held=lambda: {held_by_worker}) == [behind_backlog]
    assert reconcile_once(runtime, app) == [], "the re-sent message waits in the queue"
    counts = [_requeued_events(runtime, job) for job in (behind_backlog, held_by_worker, lost_in_inference)]
    assert counts == [1, 0, 1], "only what was lost is audited as re-enqueued"


def test_a_retried_job_delivers_only_the_srs_of_its_current_outcome(runtime):
    """A job first not analysed (its short SR sent), then retried and read by the model, holds
    SRs of both kinds; delivery must send the two reports, and the job end succeeded."""
    job_id = _job(runtime)
    with runtime.database.session() as session:
        for number, kind in enumerate((NOT_ANALYSED_KIND, NARRATIVE_KIND, MEASUREMENT_KIND)):
            session.add(
                StructuredReport(
                    job_id=job_id,
                    kind=kind,
                    series_instance_uid="1.2.9",
                    sop_instance_uid=f"1.2.9.{job_id}.{number}",
                    path=f"/reports/{number}.dcm",
                    sha256="0" * 64,
                )
            )
    book = JobBook(runtime)
    assert [row.kind for row in reports_of(runtime, book.get(job_id))] == [NOT_ANALYSED_KIND]
    book.claim(job_id)
    assert book.complete(job_id, Step.INFER)
    assert [row.kind for row in reports_of(runtime, book.get(job_id))] == [NARRATIVE_KIND, MEASUREMENT_KIND]


def test_failure_reasons_never_quote_header_values():
    quoted = ValueError("Unable to convert '1970-01-31' to 'DA' object")
    assert "1970" not in failure_reason(Step.BUILD_REPORTS, quoted)
    assert failure_reason(Step.BUILD_REPORTS, quoted).startswith("build_reports: ValueError")
    worded = InvalidReportError("narrative SR failed validation: dciodvfy: Error - <value withheld>")
    assert failure_reason(Step.BUILD_REPORTS, worded).endswith("<value withheld>"), (
        "own errors keep their words"
    )


def _runtime_with(database_url, tmp_path, **sections) -> Runtime:
    """A runtime like the ``runtime`` fixture's, with some sections replaced."""
    upgrade(database_url)
    defaults = {
        "database": {"url": database_url, "audit_key_file": tmp_path / "audit.key"},
        "queue": {
            "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "result_backend": f"db+sqlite:///{tmp_path / 'results.db'}",
        },
        "storage": {"work_dir": tmp_path / "work", "reports_dir": tmp_path / "reports"},
    }
    return Runtime(load_settings(**{**defaults, **sections}))


def test_the_heartbeat_beats_while_its_body_runs_and_stops_after(database_url, tmp_path):
    """Whatever the machine's speed: the beats are read from SQL, and staleness is judged at
    chosen moments (``stale_jobs(now=...)``), not against the clock of a loaded machine."""
    runtime = _runtime_with(database_url, tmp_path, worker={"heartbeat_s": 0.1, "stale_after_s": 30})
    stale_after = timedelta(seconds=30)
    long_ago = utcnow() - timedelta(hours=1)
    job_id = _job(runtime, state=JobState.RUNNING, heartbeat_at=long_ago)
    book = JobBook(runtime)
    assert job_id in dict(stale_jobs(runtime))
    with book.heartbeat(job_id):
        wait_for(lambda: book.get(job_id).heartbeat_at != long_ago, 30)
        first = book.get(job_id).heartbeat_at
        wait_for(lambda: book.get(job_id).heartbeat_at != first, 30)  # it keeps beating
        assert job_id not in dict(stale_jobs(runtime)), "a step that beats is alive, however long it runs"
    last = book.get(job_id).heartbeat_at
    time.sleep(0.5)  # five beats' time: a beat still running would have moved it
    assert book.get(job_id).heartbeat_at == last, "silent once its body ended"
    assert job_id in dict(stale_jobs(runtime, now=as_utc(last) + stale_after + timedelta(seconds=1)))


def _sr_file(path) -> str:
    ds = pydicom.Dataset()
    ds.SOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def test_delivery_to_a_pacs_that_stays_down_ends_failed_after_its_retries(
    database_url, tmp_path, monkeypatch
):
    from worker import runtime as runtime_module
    from worker.tasks import deliver_reports

    down = DestinationSettings(host="127.0.0.1", port=free_port(), ae_title="PACS")  # nothing listens
    runtime = _runtime_with(
        database_url,
        tmp_path,
        destinations=[down],
        delivery={"max_retries": 2, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.01},
    )
    monkeypatch.setattr(runtime_module, "_runtime", runtime)  # the task's process runtime
    book, job_id = _at(runtime, Step.DELIVER)
    uid = _sr_file(tmp_path / "sr.dcm")
    with runtime.database.session() as session:
        session.add(
            StructuredReport(
                job_id=job_id,
                kind=NARRATIVE_KIND,  # the job's outcome: the model read it
                series_instance_uid="1.2.9",
                sop_instance_uid=uid,
                path=str(tmp_path / "sr.dcm"),
                sha256="0" * 64,
            )
        )
    deliver_reports.apply(args=[job_id])  # eager: each retry runs at once
    job = book.get(job_id)
    assert job.state == JobState.FAILED and job.delivered_at is None
    assert job.error_reason.startswith("delivery failed after 3 attempts:"), job.error_reason
    with runtime.database.session() as session:
        attempts = session.scalars(select(Delivery.attempt).where(Delivery.job_id == job_id)).all()
        exports = session.scalars(
            select(AuditEvent.outcome).where(AuditEvent.job_id == job_id, AuditEvent.event_id == "110106")
        ).all()
    assert sorted(attempts) == [1, 2, 3], "one delivery row per attempt"
    assert len(exports) == 3 and all(outcome != 0 for outcome in exports), "each failed export audited"


def test_jobs_retry_requeues_a_failed_job_and_refuses_the_others(database_url, tmp_path):
    from typer.testing import CliRunner

    from worker.cli import app

    runtime = _runtime_with(database_url, tmp_path)
    config = tmp_path / "node.toml"
    settings = runtime.settings
    config.write_text(
        f'[database]\nurl = "{settings.database.url}"\naudit_key_file = "{tmp_path / "audit.key"}"\n'
        f'[queue]\nbroker_url = "{settings.queue.broker_url}"\n'
        f'result_backend = "{settings.queue.result_backend}"\n'
    )
    failed = _job(
        runtime,
        state=JobState.FAILED,
        attempts=2,
        error_reason="infer: RuntimeError",
        conversion_finished_at=utcnow(),
        finished_at=utcnow(),
    )
    running = _job(runtime, state=JobState.RUNNING)
    succeeded = _job(runtime, state=JobState.SUCCEEDED, finished_at=utcnow())
    runner = CliRunner()

    result = runner.invoke(app, ["jobs", "retry", str(failed), "--config", str(config)])
    assert result.exit_code == 0, result.output
    job = JobBook(runtime).get(failed)
    assert (job.state, job.attempts, job.error_reason) == (JobState.QUEUED, 0, None)
    assert job.conversion_finished_at is None and job.finished_at is None, "it runs again from the start"
    with runtime.database.session() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.job_id == failed, AuditEvent.event_type == "job-retry")
        ).one()
    assert json.loads(event.document)["detail"]["previous_state"] == "failed"
    with Connection(settings.queue.broker_url) as connection:
        cpu = connection.SimpleQueue(CPU_QUEUE)
        args, _, _ = cpu.get(timeout=2).decode()
        cpu.close()
    assert args == [failed]

    for refused in (running, succeeded, 999_999):
        result = runner.invoke(app, ["jobs", "retry", str(refused), "--config", str(config)])
        assert result.exit_code == 2, result.output
    assert JobBook(runtime).get(running).state == JobState.RUNNING
    assert JobBook(runtime).get(succeeded).state == JobState.SUCCEEDED
