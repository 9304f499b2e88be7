"""Re-enqueue what the broker lost, from SQL, the source of truth.

Redis may restart with its queue gone; kombu's SQL and filesystem transports never
redeliver a message once fetched. Every ``reconcile_every_s`` the reconciler finds jobs
SQL holds as queued, or running without a fresh heartbeat, and sends the task of the
stage each must resume. Tasks re-check SQL, so a job re-sent twice still runs once.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery
from sqlalchemy import or_, update

from dicom_node.audit import Outcome
from dicom_node.db import Job, JobState
from dicom_node.db.models import utcnow
from worker.app import BUILD_REPORTS_TASK, DELIVER_TASK, INFER_TASK, RUN_JOB_TASK, TASK_QUEUES
from worker.jobs import JobBook, Step, stale_jobs
from worker.runtime import Runtime

logger = logging.getLogger("brain3d.reconciler")

STEP_TASKS = {
    Step.CONVERT: RUN_JOB_TASK,
    Step.INFER: INFER_TASK,
    Step.BUILD_REPORTS: BUILD_REPORTS_TASK,
    Step.DELIVER: DELIVER_TASK,
}


def reconcile_once(runtime: Runtime, app: Celery) -> list[int]:
    """Re-send every stale job's next task; returns the job ids re-sent.

    A stale job still converting goes back to ``queued`` and gets a new ``run_job``; a job
    in a later stage gets its heartbeat dated now and the task of that stage. Each UPDATE
    re-checks staleness, so a job that just came alive is left alone.
    """
    book = JobBook(runtime)
    stale_before = utcnow() - timedelta(seconds=runtime.settings.worker.stale_after_s)
    resent = []
    for job_id, step in stale_jobs(runtime):
        now = utcnow()
        if step is Step.CONVERT:
            values = {"state": JobState.QUEUED, "queued_at": now}
            still_stale = or_(
                (Job.state == JobState.QUEUED) & or_(Job.queued_at.is_(None), Job.queued_at < stale_before),
                (Job.state == JobState.RUNNING)
                & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
            )
        else:
            values = {"heartbeat_at": now}
            still_stale = (Job.state == JobState.RUNNING) & or_(
                Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before
            )
        with runtime.database.session() as session:
            if not session.execute(
                update(Job).where(Job.id == job_id, still_stale).values(**values)
            ).rowcount:
                continue
        task = STEP_TASKS[step]
        app.send_task(task, args=[job_id], queue=TASK_QUEUES[task])
        book.event(
            book.get(job_id), "job-requeued", Outcome.MINOR_FAILURE, {"step": step.value, "task": task}
        )
        logger.warning("job %s re-enqueued at %s: queued or heartbeat stale", job_id, step.value)
        resent.append(job_id)
    return resent


class Reconciler(threading.Thread):
    """A daemon thread running :func:`reconcile_once` periodically until stopped."""

    def __init__(self, runtime: Runtime, app: Celery) -> None:
        super().__init__(name="brain3d-reconciler", daemon=True)
        self.runtime = runtime
        self.app = app
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.runtime.settings.worker.reconcile_every_s):
            try:
                reconcile_once(self.runtime, self.app)
            except Exception:  # the next round tries again; the database may be restarting
                logger.exception("reconciliation round failed")

    def stop(self) -> None:
        self._stop_event.set()
