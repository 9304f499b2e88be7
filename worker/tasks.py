"""The Celery tasks: thin glue from a message to one stage of a job.

``brain3d.run_job`` (queue ``cpu``) claims the job and converts the series, then chains
``brain3d.infer`` (``gpu``) -> ``brain3d.build_reports`` (``cpu``) -> ``brain3d.deliver``
(``cpu``). Every task re-reads the job from SQL first and does nothing for a job that is
final or a stage already done, so duplicates, redeliveries and the reconciler are harmless.
"""

from __future__ import annotations

import logging
import os
import traceback

from celery import current_app, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded

from dicom_node.audit import Outcome
from dicom_node.conversion import ConversionError, GeometryError
from dicom_node.db import JobState
from dicom_node.db.models import as_utc, utcnow
from worker.app import BUILD_REPORTS_TASK, DELIVER_TASK, GPU_QUEUE, INFER_TASK, RUN_JOB_TASK
from worker.convert import SourceInstances, convert, converted_sources, load_volume, source_instances
from worker.delivery import DemoModelGuardError, deliver
from worker.inference import generate_report
from worker.jobs import JobBook, Step, analysed
from worker.reconciler import stages_from
from worker.reports import InvalidReportError, build_and_store, build_not_analysed, findings_to_json
from worker.runtime import get_runtime

logger = logging.getLogger("brain3d.worker")

#: Set by ``brain3d worker`` to the queues this worker consumes.
QUEUES_ENV = "BRAIN3D_WORKER_QUEUES"


@signals.worker_process_init.connect
def _warm_model(**_: object) -> None:
    """Load the model once per process that serves inference, before the first job arrives."""
    if GPU_QUEUE in os.environ.get(QUEUES_ENV, GPU_QUEUE).split(","):
        get_runtime().model()


#: Errors whose messages this project writes from UIDs, paths of UIDs and validator findings only.
_WORDED_HERE = (ConversionError, InvalidReportError, DemoModelGuardError, OSError)


def failure_reason(step: Step, error: BaseException) -> str:
    """What the job row, the audit trail and the log say about a failed step.

    Any other error is named by its type alone: its message may quote header values (highdicom's
    "Unable to convert '1970-01-31' to 'DA'" quotes a birth date), and those never leave the node's
    spool. The traceback, which holds code and no values, goes to the worker log."""
    if isinstance(error, SoftTimeLimitExceeded):
        return f"{step}: time limit exceeded"
    if isinstance(error, _WORDED_HERE):
        return f"{step}: {error}"[:2000]
    return f"{step}: {type(error).__name__} (message withheld: it may quote header values)"


class JobFailedError(RuntimeError):
    """Raised in place of a step's error once the job is recorded failed, so that Celery logs the
    failure with the withheld reason and not the original message."""


def _fail(book: JobBook, job_id: int, step: Step, error: BaseException, context: str = "") -> str:
    """Record the job failed; returns the reason recorded."""
    reason = context + failure_reason(step, error)
    traceback_text = "".join(traceback.format_tb(error.__traceback__))
    logger.error("job %s failed: %s\n%s", job_id, reason, traceback_text)
    book.finish(job_id, JobState.FAILED, reason)
    return reason


@shared_task(name=RUN_JOB_TASK)
def run_job(job_id: int) -> None:
    """Claim the job, convert its series, and chain the remaining stages."""
    book = JobBook(get_runtime())
    if not book.claim(job_id):
        return
    job = book.begin(job_id, Step.CONVERT)
    if job is not None:
        sources = source_instances(book.runtime, job)  # what this job reads, whatever arrives later
        try:
            with book.heartbeat(job_id):
                convert(book.runtime, job, sources)
        except (GeometryError, ConversionError) as error:
            _not_analysed(book, job_id, str(error), sources)
            return
        except Exception as error:
            _fail(book, job_id, Step.CONVERT, error)
            return
        if not book.complete(job_id, Step.CONVERT, input_hash=sources.input_hash):
            return
        book.event(job, "conversion", Outcome.SUCCESS, {"instances": len(sources.paths)})
    else:
        current = book.get(job_id)
        if current.state.is_final or current.conversion_finished_at is None:
            return  # ended (e.g. too many interrupted conversions), or another copy converts it
    stages_from(current_app, job_id, Step.INFER).apply_async()


def _not_analysed(book: JobBook, job_id: int, reason: str, sources: SourceInstances) -> None:
    """End a job whose series the model must not read; optionally send an SR saying why."""
    runtime = book.runtime
    if not runtime.settings.delivery.not_analysed_report:
        book.finish(job_id, JobState.NOT_ANALYSED, reason)
        return
    job = book.get(job_id)
    try:
        with book.heartbeat(job_id):
            build_not_analysed(runtime, job, sources, runtime.model_identity, reason, content_time=utcnow())
    except Exception as error:
        _fail(book, job_id, Step.BUILD_REPORTS, error, context=f"not analysed ({reason}), and its SR: ")
        return
    if book.complete(job_id, Step.BUILD_REPORTS, error_reason=reason):  # the reason it will end with
        deliver_reports.delay(job_id)


@shared_task(name=INFER_TASK)
def infer(job_id: int) -> None:
    """Run Brain3D on the prepared volume and record the report text and its parsed findings."""
    from inference.report_schema import parse

    book = JobBook(get_runtime())
    job = book.begin(job_id, Step.INFER)
    if job is None:
        return
    try:
        with book.heartbeat(job_id):
            loaded = book.runtime.model()
            text, timings = generate_report(loaded, load_volume(book.runtime, job_id))
    except Exception as error:
        raise JobFailedError(_fail(book, job_id, Step.INFER, error)) from None
    if not book.complete(
        job_id,
        Step.INFER,
        report_text=text,
        findings_json=findings_to_json(parse(text)),
        model_version=loaded.identity.version,
    ):
        return
    book.event(job, "inference", Outcome.SUCCESS, {"model": loaded.identity.version, "timings": timings})


@shared_task(name=BUILD_REPORTS_TASK)
def build_reports(job_id: int) -> None:
    """Build, validate and persist the narrative and TID 1500 SRs."""
    book = JobBook(get_runtime())
    job = book.begin(job_id, Step.BUILD_REPORTS)
    if job is None:
        return
    try:
        with book.heartbeat(job_id):  # two validators per SR: not to be taken for a lost worker
            rows = build_and_store(
                book.runtime,
                job,
                converted_sources(book.runtime, job),
                book.runtime.model_identity,
                content_time=as_utc(job.inference_finished_at or utcnow()),
            )
    except Exception as error:
        raise JobFailedError(_fail(book, job_id, Step.BUILD_REPORTS, error)) from None
    if not book.complete(job_id, Step.BUILD_REPORTS):
        return
    book.event(
        job, "reports-built", Outcome.SUCCESS, {"sop_instance_uids": [row.sop_instance_uid for row in rows]}
    )


@shared_task(name=DELIVER_TASK, bind=True)
def deliver_reports(self, job_id: int) -> None:
    """Send the SRs to every destination, retrying with backoff while any is unreachable."""
    runtime = get_runtime()
    book = JobBook(runtime)
    job = book.begin(job_id, Step.DELIVER)
    if job is None:
        return
    settings = runtime.settings.delivery
    # A series that was not analysed keeps that state and its reason once its short SR is out.
    if analysed(job):
        final_state, final_reason = JobState.SUCCEEDED, None
    else:
        final_state, final_reason = JobState.NOT_ANALYSED, job.error_reason
    if settings.shadow_mode or not runtime.settings.destinations:
        book.finish(
            job_id,
            final_state,
            final_reason or ("shadow mode: SRs kept locally" if settings.shadow_mode else None),
            completed=Step.DELIVER,
        )
        return
    try:
        with book.heartbeat(job_id):  # a PACS that times out can hold one attempt for minutes
            result = deliver(runtime, job)
    except Exception as error:
        raise JobFailedError(_fail(book, job_id, Step.DELIVER, error)) from None
    if result.complete:
        book.finish(job_id, final_state, final_reason, completed=Step.DELIVER)
        return
    if self.request.retries >= settings.max_retries:
        reason = f"delivery failed after {self.request.retries + 1} attempts: " + "; ".join(result.failures)
        book.finish(job_id, JobState.FAILED, reason)
        return
    countdown = min(settings.retry_backoff_s * 2**self.request.retries, settings.retry_backoff_max_s)
    logger.warning(
        "job %s delivery incomplete (%s); retrying in %.0f s", job_id, result.failures[0], countdown
    )
    book.await_retry(job_id, countdown)
    raise self.retry(countdown=countdown, max_retries=settings.max_retries)
