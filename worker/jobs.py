"""Job bookkeeping in SQL: claims, step timestamps, heartbeats, attempts and final states.

SQL is the source of truth, not the broker: every transition is a conditional UPDATE, so
a duplicate or redelivered message can never move a job backwards or run a finished one.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, or_, select, update

from dicom_node.audit import Action, EventID, Outcome
from dicom_node.db import Database, Job, JobState, Series
from dicom_node.db.models import FINAL_JOB_STATES, utcnow
from worker.runtime import Runtime

logger = logging.getLogger("brain3d.worker")


class Step(enum.StrEnum):
    """The stages of a job, in order; each is one Celery task on its queue."""

    CONVERT = "convert"
    INFER = "infer"
    BUILD_REPORTS = "build_reports"
    DELIVER = "deliver"


# The timestamps that say a step started and finished. Delivery's start mark is cleared while
# one of its own retries waits (``JobBook.await_retry``): a scheduled retry is no interruption.
_STEP_COLUMNS: dict[Step, tuple[str, str]] = {
    Step.CONVERT: ("conversion_started_at", "conversion_finished_at"),
    Step.INFER: ("inference_started_at", "inference_finished_at"),
    Step.BUILD_REPORTS: ("sr_build_started_at", "sr_built_at"),
    Step.DELIVER: ("delivery_started_at", "delivered_at"),
}


def next_step(job: Job) -> Step:
    """The first step of ``job`` that has not finished; delivery once its SRs are built (a series
    that was not analysed builds and delivers its SR with conversion unfinished)."""
    if job.sr_built_at is not None:
        return Step.DELIVER
    for step in Step:
        if getattr(job, _STEP_COLUMNS[step][1]) is None:
            return step
    return Step.DELIVER


def lost_run_values(step: Step) -> dict[str, Any]:
    """The UPDATE values that record a lost run of ``step`` (for the reconciler, which judges
    it lost): its start mark cleared, so the step can begin again, and an attempt counted
    where it had started."""
    started = getattr(Job, _STEP_COLUMNS[step][0])
    return {
        _STEP_COLUMNS[step][0]: None,
        "attempts": case((started.is_not(None), Job.attempts + 1), else_=Job.attempts),
    }


def analysed(job: Job) -> bool:
    """Whether the model read this run of the job (a retry clears it); else only a not-analysed SR
    can be sent."""
    return job.inference_finished_at is not None


class JobBook:
    """Reads and moves jobs for one worker process, auditing every transition."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.worker

    def get(self, job_id: int) -> Job:
        with self.runtime.database.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} does not exist")
            session.expunge(job)
            return job

    def series_of(self, job: Job) -> Series:
        with self.runtime.database.session() as session:
            series = session.get(Series, job.series_id)
            assert series is not None
            _ = series.study
            session.expunge_all()
            return series

    def claim(self, job_id: int) -> bool:
        """Take a queued job for this worker; False when another worker has it or it ended."""
        with self.runtime.database.session() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(state=JobState.RUNNING, heartbeat_at=utcnow())
            ).rowcount
        if not claimed:
            logger.info("job %s not claimed: finished or running elsewhere", job_id)
            return False
        self.event(self.get(job_id), "job-started", Outcome.SUCCESS)
        return True

    def begin(self, job_id: int, step: Step) -> Job | None:
        """Mark ``step`` started; None when the job is final, the step already done or started
        (another copy of the task runs it), or the step before it not done.

        A run that was lost (its worker died) keeps its start mark until the reconciler finds
        its heartbeat stale and clears the mark, counting an attempt (:func:`lost_run_values`):
        a duplicate message for a step still running is no interruption. Past ``max_attempts``
        the job fails with that reason. Delivery's scheduled retries are not interruptions;
        ``delivery.max_retries`` caps those.
        """
        started_column, finished_column = _STEP_COLUMNS[step]
        job = self.get(job_id)
        if job.state.is_final or getattr(job, finished_column) is not None:
            return None
        if getattr(job, started_column) is not None or next_step(job) is not step:
            logger.info("job %s: %s running elsewhere, or waiting for the step before", job_id, step.value)
            return None
        values: dict[str, Any] = {
            "state": JobState.RUNNING,
            "heartbeat_at": utcnow(),
            started_column: utcnow(),
        }
        if step is Step.CONVERT:
            values["attempts"] = max(job.attempts, 1)
        # Only if the job is still as read: of two copies of one task, one starts the step, and
        # a copy that read the job before another finished it never moves it back to running.
        with self.runtime.database.session() as session:
            moved = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state.not_in(FINAL_JOB_STATES),
                    getattr(Job, finished_column).is_(None),
                    getattr(Job, started_column).is_(None),
                )
                .values(**values)
            ).rowcount
        if not moved:
            logger.info("job %s: %s taken by another copy of its task, or ended", job_id, step.value)
            return None
        job = self.get(job_id)
        if job.attempts > self.settings.max_attempts:
            self.finish(job_id, JobState.FAILED, f"{step} interrupted {job.attempts - 1} times (worker lost)")
            return None
        return job

    def complete(self, job_id: int, step: Step, **values: Any) -> bool:
        """Record ``step`` finished, with any result columns in ``values``; False (nothing written)
        when the job is no longer running: a result never lands on a job that has ended."""
        values[_STEP_COLUMNS[step][1]] = utcnow()
        with self.runtime.database.session() as session:
            written = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING)
                .values(heartbeat_at=utcnow(), **values)
            ).rowcount
        if not written:
            logger.warning("job %s ended before its %s finished: result not recorded", job_id, step.value)
        return bool(written)

    def finish(
        self, job_id: int, state: JobState, reason: str | None = None, completed: Step | None = None
    ) -> None:
        """End the job in a final state with its reason; a final job is never changed again.

        ``completed``: the step whose end ends the job, recorded in the same UPDATE, so that no
        job is left with its last step done and its state not final."""
        values: dict[str, Any] = {"state": state, "error_reason": reason, "finished_at": utcnow()}
        if completed is not None:
            values[_STEP_COLUMNS[completed][1]] = values["finished_at"]
        with self.runtime.database.session() as session:
            changed = session.execute(
                update(Job).where(Job.id == job_id, Job.state.not_in(FINAL_JOB_STATES)).values(**values)
            ).rowcount
        if changed:
            outcome = {
                JobState.SUCCEEDED: Outcome.SUCCESS,
                JobState.NOT_ANALYSED: Outcome.MINOR_FAILURE,
                JobState.FAILED: Outcome.SERIOUS_FAILURE,
            }[state]
            self.event(
                self.get(job_id), f"job-{state.value}", outcome, {"reason": reason} if reason else None
            )
            logger.info("job %s ended %s%s", job_id, state.value, f": {reason}" if reason else "")

    def event(self, job: Job, what: str, outcome: Outcome, detail: dict[str, Any] | None = None) -> None:
        """Append a job event to the audit trail, naming the series by UID only."""
        series = self.series_of(job)
        self.runtime.audit.record(
            EventID.DICOM_INSTANCES_ACCESSED,
            outcome,
            action=Action.EXECUTE,
            event_type=what,
            study_uid=series.study.study_instance_uid,
            series_uid=series.series_instance_uid,
            job_id=job.id,
            detail=detail,
        )

    def await_retry(self, job_id: int, seconds: float) -> None:
        """Delivery paused for a retry in ``seconds``: no attempt is in progress, and the heartbeat
        is dated ahead so the reconciler leaves the job alone while it waits."""
        with self.runtime.database.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.delivered_at.is_(None))
                .values(delivery_started_at=None, heartbeat_at=utcnow() + timedelta(seconds=seconds))
            )

    @contextmanager
    def heartbeat(self, job_id: int) -> Iterator[None]:
        """Beat ``heartbeat_at`` while the body runs, so the reconciler knows the job is alive."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.settings.heartbeat_s):
                try:
                    with self.runtime.database.session() as session:
                        session.execute(
                            update(Job)
                            .where(Job.id == job_id, Job.state == JobState.RUNNING)
                            .values(heartbeat_at=utcnow())
                        )
                except Exception:  # a missed beat must not kill the step it watches
                    logger.exception("heartbeat of job %s failed", job_id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def queued_before(moment: datetime) -> ColumnElement[bool]:
    """Queued since before ``moment``: handed to the broker then, or, never handed (a node that
    stopped between committing the job and sending its message), created then. A job the node
    is sending right now is not yet stale."""
    return (Job.state == JobState.QUEUED) & (func.coalesce(Job.queued_at, Job.created_at) < moment)


def silent_since(moment: datetime) -> ColumnElement[bool]:
    """Running without a heartbeat since before ``moment``."""
    return (Job.state == JobState.RUNNING) & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < moment)


def stale_since(moment: datetime) -> ColumnElement[bool]:
    """Queued since before ``moment``, or running without a heartbeat since then."""
    return or_(queued_before(moment), silent_since(moment))


def stale_cutoff(runtime: Runtime, now: datetime | None = None) -> datetime:
    """The moment ``stale_after_s`` before ``now`` (default: the present)."""
    return (now or utcnow()) - timedelta(seconds=runtime.settings.worker.stale_after_s)


def stale_jobs(runtime: Runtime, now: datetime | None = None) -> list[tuple[int, Step]]:
    """Jobs SQL holds as queued, or running without a recent heartbeat, with the step to resume.

    A queued job counts once it has waited longer than ``stale_after_s``: its message may
    have been lost by the broker (Redis restarted, or kombu's SQL transport fetched and lost it).
    """
    with runtime.database.session() as session:
        jobs = session.scalars(select(Job).where(stale_since(stale_cutoff(runtime, now)))).all()
        return [(job.id, Step.CONVERT if job.state == JobState.QUEUED else next_step(job)) for job in jobs]


def latest_job(database: Database, series_uid: str) -> Job | None:
    """The newest job of a series (by SeriesInstanceUID), detached from its session."""
    with database.session() as session:
        job = session.scalars(
            select(Job).join(Series).where(Series.series_instance_uid == series_uid).order_by(Job.id.desc())
        ).first()
        if job is not None:
            session.expunge(job)
        return job


def wait_for_final_job(database: Database, series_uid: str, timeout_s: float, poll_s: float = 0.1) -> Job:
    """The series' newest job once it has ended, polled from SQL (the source of truth)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = latest_job(database, series_uid)
        if job is not None and job.state.is_final:
            return job
        time.sleep(poll_s)
    raise TimeoutError(f"the job of series {series_uid} did not end within {timeout_s:.0f} s")
