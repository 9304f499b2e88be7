"""Re-enqueue what the broker lost, from SQL, the source of truth.

Redis may restart with its queue gone; kombu's SQL and filesystem transports never
redeliver a message once fetched. Every ``reconcile_every_s`` the reconciler finds jobs
SQL holds as queued, or running without a fresh heartbeat, and sends the tasks of the
stages each has left, from the one it must resume. Tasks re-check SQL, so a job re-sent
twice still runs once.

A job that only waits is not lost: while the queue of its next task holds messages (a
backlog behind a busy worker), or while this worker holds its message (reserved while the
pool's child still loads the model), it is left alone. A lost job is re-sent once its queue
has drained.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

from celery import Celery, Signature, chain
from celery.worker import state as worker_state
from kombu.exceptions import ChannelError
from sqlalchemy import update

from dicom_node.audit import Outcome
from dicom_node.db import Job, JobState
from dicom_node.db.models import utcnow
from worker.app import BUILD_REPORTS_TASK, DELIVER_TASK, INFER_TASK, RUN_JOB_TASK, TASK_QUEUES
from worker.jobs import JobBook, Step, lost_run_values, silent_since, stale_cutoff, stale_jobs, stale_since
from worker.runtime import Runtime

logger = logging.getLogger("brain3d.reconciler")

STEP_TASKS = {
    Step.CONVERT: RUN_JOB_TASK,
    Step.INFER: INFER_TASK,
    Step.BUILD_REPORTS: BUILD_REPORTS_TASK,
    Step.DELIVER: DELIVER_TASK,
}


def stages_from(app: Celery, job_id: int, step: Step) -> Signature:
    """The tasks of ``step`` and of every later stage, chained, each on its queue (``run_job``
    chains the stages after conversion itself)."""
    steps = [Step.CONVERT] if step is Step.CONVERT else list(Step)[list(Step).index(step) :]
    return chain(
        *(
            app.signature(STEP_TASKS[s], args=[job_id], queue=TASK_QUEUES[STEP_TASKS[s]], immutable=True)
            for s in steps
        )
    )


def queues_with_messages(app: Celery, queues: Collection[str]) -> set[str]:
    """Those of ``queues`` that hold messages no worker has taken yet, asked over one connection."""
    busy = set()
    with app.connection_for_read() as connection:
        for queue in queues:
            try:
                if connection.default_channel.queue_declare(queue=queue, passive=True).message_count:
                    busy.add(queue)
            except ChannelError:  # Redis keeps no key for an empty queue
                pass
    return busy


def jobs_held_by_this_worker() -> set[int]:
    """Jobs whose task message this worker process has taken and not finished: reserved,
    running, or waiting for a countdown (Celery's own record, as ``celery inspect`` reads it).

    The record is a dict the consumer thread changes; ``dict.copy`` takes it whole, where
    iterating it from this thread could see it change size."""
    requests = worker_state.requests.copy().values()
    return {int(r.args[0]) for r in requests if r.task_name in STEP_TASKS.values() and r.args}


def reconcile_once(
    runtime: Runtime, app: Celery, held: Callable[[], Collection[int]] = frozenset
) -> list[int]:
    """Re-send every lost job's next task; returns the job ids re-sent.

    A job is lost when SQL holds it stale (:func:`~worker.jobs.stale_jobs`), no message waits
    in its next task's queue, and ``held()`` (the jobs the calling worker holds, asked after
    the broker, so that a message taken in between is seen) does not name it. The lost run of
    its step loses its start mark and counts as an attempt (:func:`~worker.jobs.lost_run_values`),
    so the step can begin again. A lost job still converting goes back to ``queued`` and gets a
    new ``run_job``; one in a later stage gets its heartbeat dated now and the tasks of that
    stage and the ones after it (:func:`stages_from`). Each UPDATE re-checks staleness, so a
    job that just came alive is left alone.
    """
    book = JobBook(runtime)
    started = utcnow()
    stale_before = stale_cutoff(runtime, started)
    stale = stale_jobs(runtime, started)
    if not stale:
        return []
    busy_queues = queues_with_messages(app, {TASK_QUEUES[STEP_TASKS[step]] for _, step in stale})
    held_jobs = held()
    resent = []
    for job_id, step in stale:
        task = STEP_TASKS[step]
        queue = TASK_QUEUES[task]
        if job_id in held_jobs or queue in busy_queues:
            logger.debug("job %s stale at %s but not lost: its message is queued or held", job_id, step.value)
            continue
        now = utcnow()
        if step is Step.CONVERT:
            values = {"state": JobState.QUEUED, "queued_at": now, **lost_run_values(step)}
            still_stale = stale_since(stale_before)
        else:
            values = {"heartbeat_at": now, **lost_run_values(step)}
            still_stale = silent_since(stale_before)
        with runtime.database.session() as session:
            if not session.execute(
                update(Job).where(Job.id == job_id, still_stale).values(**values)
            ).rowcount:
                continue
        stages_from(app, job_id, step).apply_async()
        book.event(
            book.get(job_id), "job-requeued", Outcome.MINOR_FAILURE, {"step": step.value, "task": task}
        )
        logger.warning("job %s re-enqueued at %s: stale, and no message queued or held", job_id, step.value)
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
                reconcile_once(self.runtime, self.app, jobs_held_by_this_worker)
            except Exception:  # the next round tries again; the database may be restarting
                logger.exception("reconciliation round failed")

    def stop(self) -> None:
        self._stop_event.set()
