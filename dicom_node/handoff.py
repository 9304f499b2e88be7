"""Handing a job to the workers: the SQL row first, then ``brain3d.run_job(job_id)`` on ``cpu``.

The job row is committed (state ``queued``, ``queued_at`` empty) before the message is
sent, and ``queued_at`` is set once the broker took it. A node killed in between leaves
a queued job without ``queued_at``; ``enqueue_pending`` (run at start) and the worker's
reconciler send those again, so SQL, not the broker, decides what must run.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import select, update

from dicom_node.db.models import Job, JobState
from dicom_node.db.session import Database
from worker.app import CPU_QUEUE, send_run_job

log = logging.getLogger(__name__)


class HandOff:
    """Sends jobs by task name only: the node never imports the worker's task code."""

    def __init__(self, database: Database, app: Celery) -> None:
        self.database = database
        self.app = app

    def enqueue(self, job_id: int) -> datetime:
        """Send the job's message and record when; returns ``queued_at``."""
        send_run_job(self.app, job_id)
        queued_at = datetime.now(UTC)
        with self.database.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(queued_at=queued_at))
        log.info("job %d queued on %s", job_id, CPU_QUEUE)
        return queued_at

    def enqueue_pending(self) -> list[int]:
        """Send queued jobs whose message never reached the broker (node killed in between);
        returns those sent. A broker that is down does not keep the node from receiving: what
        is left waits in SQL for the workers' reconciler."""
        with self.database.session() as session:
            job_ids = list(
                session.execute(
                    select(Job.id)
                    .where(Job.state == JobState.QUEUED, Job.queued_at.is_(None))
                    .order_by(Job.id)
                ).scalars()
            )
        sent: list[int] = []
        for job_id in job_ids:
            try:
                self.enqueue(job_id)
            except Exception:
                log.exception(
                    "broker unavailable: %d queued job(s) left to the workers' reconciler",
                    len(job_ids) - len(sent),
                )
                break
            sent.append(job_id)
        return sent
