"""Removing spooled series the node no longer needs, after ``storage.retention_hours``.

A series is removable once it is complete and either ineligible or every one of its
jobs, of every generation, has ended (succeeded, failed, not analysed), and the last of
those events is older than the retention time. Its instances go, and so do its jobs'
working folders (a full-resolution copy of the images). Its SQL rows stay (they are the
record); ``spool_removed_at`` says the bytes are gone, and each removal is audited. The
SRs in ``storage.reports_dir`` stay: they are what the node sent.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from dicom_node.audit import AuditTrail, EventID, Outcome
from dicom_node.db.models import FINAL_JOB_STATES, Instance, Job, Series, SeriesState, Study, as_utc
from dicom_node.db.session import Database
from dicom_node.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemovedSeries:
    study_uid: str
    series_uid: str


class Retention:
    """One pass (``run_once``) removes every series past its retention time."""

    def __init__(
        self,
        database: Database,
        spool: Spool,
        audit: AuditTrail,
        retention_hours: float,
        guard_seconds: float,
        job_dir: Callable[[int], Path],
    ) -> None:
        self.database = database
        self.spool = spool
        self.audit = audit
        self.job_dir = job_dir  # a job's working folder (``StorageSettings.job_dir``)
        self.retention = timedelta(hours=retention_hours)
        # A folder written to this recently is never removed (an instance may await its commit).
        self.guard_seconds = guard_seconds

    def candidates(self, now: datetime) -> list[tuple[int, str, str]]:
        """(series id, study UID, series UID) of complete series whose retention has run out."""
        cutoff = now - self.retention
        open_jobs = (  # of any generation: an earlier one's job may still read the spool
            select(Job.id).where(Job.series_id == Series.id, Job.state.not_in(FINAL_JOB_STATES)).exists()
        )
        last_job_end = select(func.max(Job.finished_at)).where(Job.series_id == Series.id).scalar_subquery()
        with self.database.session() as session:
            rows = session.execute(
                select(
                    Series.id,
                    Study.study_instance_uid,
                    Series.series_instance_uid,
                    Series.completed_at,
                    last_job_end,
                )
                .join(Study, Study.id == Series.study_id)
                .where(Series.state == SeriesState.COMPLETE, Series.spool_removed_at.is_(None))
                .where(~open_jobs)
            ).all()
        due = []
        for series_id, study_uid, series_uid, completed_at, job_end in rows:
            ended = max(as_utc(moment) for moment in (completed_at, job_end) if moment is not None)
            if ended <= cutoff:
                due.append((series_id, study_uid, series_uid))
        return due

    def _study_folders(self, series_id: int, study_uid: str) -> set[str]:
        """The study folders the series' instances lie in (``<spool>/<study>/<series>/``): its
        study's, and another where an instance re-sent under a corrected study UID was filed."""
        with self.database.session() as session:
            paths = session.execute(select(Instance.path).where(Instance.series_id == series_id)).scalars()
            return {study_uid} | {Path(path).parent.parent.name for path in paths}

    def run_once(self) -> list[RemovedSeries]:
        now = datetime.now(UTC)
        removed: list[RemovedSeries] = []
        for series_id, study_uid, series_uid in self.candidates(now):

            def record_removal(series_id: int = series_id) -> None:
                with self.database.session() as session:
                    session.execute(
                        update(Series)
                        .where(Series.id == series_id, Series.state == SeriesState.COMPLETE)
                        .values(spool_removed_at=now)
                    )

            if not self.spool.remove_series(
                self._study_folders(series_id, study_uid), series_uid, self.guard_seconds, record_removal
            ):
                continue  # written to just now: a late instance re-opens it instead
            removed.append(RemovedSeries(study_uid, series_uid))
            work_folders = self._remove_work_folders(series_id)
            log.info("retention removed series %s: its spool and %d job folder(s)", series_uid, work_folders)
            try:
                self.audit.record(
                    EventID.DICOM_STUDY_DELETED,
                    Outcome.SUCCESS,
                    action="D",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    detail={
                        "reason": "retention",
                        "retention_hours": self.retention.total_seconds() / 3600,
                        "job_folders_removed": work_folders,
                    },
                )
            except Exception:
                log.exception("retention of series %s could not be audited", series_uid)
        return removed

    def _remove_work_folders(self, series_id: int) -> int:
        """Remove the working folders of the series' ended jobs (one retried meanwhile keeps its
        folder: it runs again); how many there were."""
        with self.database.session() as session:
            job_ids = (
                session.execute(
                    select(Job.id).where(Job.series_id == series_id, Job.state.in_(FINAL_JOB_STATES))
                )
                .scalars()
                .all()
            )
        removed = 0
        for job_id in job_ids:
            folder = self.job_dir(job_id)
            if not folder.exists():
                continue
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                log.error("retention could not remove %s", folder)
            else:
                removed += 1
        return removed
