"""Knowing when a series is complete, then routing it and handing eligible ones on.

A series completes at once when its headers state how many instances it has
(``InstanceHeaders.expected_instances``: ImagesInAcquisition, an Enhanced MR's frames
in one instance, InConcatenationTotalNumber), or a site's ``completion.count_rules``
state it for series whose headers do not, that many distinct SOP Instance UIDs are
present, and every association that sent some of them was released; otherwise after
``completion.stable_seconds`` without new content. The wait for the senders is there
because ImagesInAcquisition counts one acquisition: a series of two acquisitions
reaches it halfway, and the rest follows in the same association. A sender that
aborted may send again, and a series open at a restart may have lost its sender: both
are left to the timer, until an association sends to the series again. Anchors use
only timers (60 s in mercure and Orthanc) and split series of slow senders.

A series re-opened by new content after hand-off (generation > 0) completes on the
timer only: its count was already reached, so it can no longer tell when the re-send
ends, and a job per late instance would be a storm. Open series and their timers live
in SQL (state ``receiving``, ``last_received_at``) and are rebuilt at start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pydicom
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from dicom_node.audit import AuditTrail, EventID, Outcome
from dicom_node.config import CompletionSettings, RoutingSettings
from dicom_node.db.models import Instance, Job, JobState, Series, SeriesState, as_utc
from dicom_node.db.session import Database
from dicom_node.handoff import HandOff
from dicom_node.ingest import AssociationEnded, Batch, Ingest, IngestEvent, InstanceRecorded
from dicom_node.routing import RoutingDecision, route_series

log = logging.getLogger(__name__)

ROUTING_EVENT_TYPE = "series routed"
#: Ended associations remembered (for instances recorded after their association's close).
ENDED_ASSOCIATIONS_KEPT = 4096


@dataclass
class OpenSeries:
    """A series still receiving, as the tracker sees it."""

    series_uid: str
    expected_instances: int | None
    distinct_instances: int
    last_received_at: datetime
    generation: int
    senders: set[int] = field(default_factory=set)  # associations that sent some and are still open
    # A sender aborted, or the node restarted while it received: what was sent may be re-sent
    # or completed, so the timer decides, unless an association sends to it again.
    timer_only: bool = False

    @property
    def count_reached(self) -> bool:
        """The stated count is present and every association that sent part of it was released."""
        return (
            self.generation == 0
            and not self.timer_only
            and self.expected_instances is not None
            and self.distinct_instances >= self.expected_instances
            and not self.senders
        )


@dataclass(frozen=True)
class Completion:
    """What completing one series decided."""

    series_uid: str
    study_uid: str
    generation: int
    reason: str  # "count" or "stable"
    instances: int
    decision: RoutingDecision
    job_id: int | None


def _representative_path(session: Session, series_id: int) -> str | None:
    """The file of the series' first instance (lowest instance number): the router's input."""
    return session.execute(
        select(Instance.path)
        .where(Instance.series_id == series_id)
        .order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id)
        .limit(1)
    ).scalar_one_or_none()


class CompletenessTracker:
    """Owns the open-series table and a thread that completes, routes and hands on."""

    def __init__(
        self,
        ingest: Ingest,
        completion: CompletionSettings,
        routing: RoutingSettings,
        handoff: HandOff,
        audit: AuditTrail,
    ) -> None:
        self.ingest = ingest
        self.database: Database = ingest.database
        self.completion = completion
        self.routing = routing
        self.handoff = handoff
        self.audit = audit
        self._open: dict[str, OpenSeries] = {}
        self._ready: set[str] = set()
        self._series_of_sender: dict[int, set[str]] = {}  # open association -> its open series
        # Associations seen ending, the latest first out: an instance recorded after its
        # association's close (a C-STORE still stalled when the close stopped waiting) must not
        # make that association a sender again.
        self._ended: dict[int, None] = {}
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="completeness", daemon=True)
        ingest.add_listener(self.on_event)

    # -- state ----------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Reload open series and their timers from SQL (after a restart)."""
        with self.database.session() as session:
            rows = session.execute(
                select(
                    Series.series_instance_uid,
                    Series.expected_instances,
                    Series.generation,
                    Series.last_received_at,
                    func.count(func.distinct(Instance.sop_instance_uid)),
                )
                .join(Instance, Instance.series_id == Series.id, isouter=True)
                .where(Series.state == SeriesState.RECEIVING)
                .group_by(Series.id)
            ).all()
        with self._condition:
            for uid, expected, generation, last_received_at, distinct in rows:
                self._open[uid] = OpenSeries(
                    uid, expected, distinct, as_utc(last_received_at), generation, timer_only=True
                )
            self._condition.notify()
        log.info("rebuilt %d open series from SQL", len(rows))
        return len(rows)

    def on_event(self, event: IngestEvent) -> None:
        """Called by the writer thread after an instance's or an association's row committed."""
        if isinstance(event, AssociationEnded):
            self._on_sender_ended(event.association_id, event.released)
        else:
            self._on_instance(event)

    def _on_instance(self, event: InstanceRecorded) -> None:
        series = event.series
        with self._condition:
            entry = self._open.get(series.series_uid)
            if entry is None or event.reopened or entry.generation != series.generation:
                if entry is not None:
                    self._forget_senders(entry)
                entry = OpenSeries(
                    series.series_uid, series.expected_instances, 0, event.received_at, series.generation
                )
                self._open[series.series_uid] = entry
            entry.expected_instances = series.expected_instances
            entry.distinct_instances += event.new_uid
            entry.last_received_at = max(entry.last_received_at, event.received_at)
            sender = event.association_id
            if sender is not None and sender not in self._ended:
                entry.senders.add(sender)
                self._series_of_sender.setdefault(sender, set()).add(series.series_uid)
                self._ready.discard(series.series_uid)  # marked when an earlier sender ended
                entry.timer_only = False  # this sender's release will tell
            if entry.count_reached:
                self._ready.add(series.series_uid)
                self._condition.notify()

    def _on_sender_ended(self, association_id: int, released: bool) -> None:
        with self._condition:
            self._ended[association_id] = None
            if len(self._ended) > ENDED_ASSOCIATIONS_KEPT:
                del self._ended[next(iter(self._ended))]
            for series_uid in self._series_of_sender.pop(association_id, ()):
                entry = self._open.get(series_uid)
                if entry is None:
                    continue
                entry.senders.discard(association_id)
                entry.timer_only |= not released
                if entry.count_reached:
                    self._ready.add(series_uid)
                    self._condition.notify()

    def _forget_senders(self, entry: OpenSeries) -> None:
        """Unlink a series that leaves the open table (or is replaced) from its senders."""
        for sender in entry.senders:
            series_of_sender = self._series_of_sender.get(sender, set())
            series_of_sender.discard(entry.series_uid)
            if not series_of_sender:
                self._series_of_sender.pop(sender, None)
        entry.senders.clear()

    # -- thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout)

    def _due(self) -> list[tuple[OpenSeries, str]]:
        """Series to complete now, with the reason; removed from the open table."""
        now = datetime.now(UTC)
        stable = timedelta(seconds=self.completion.stable_seconds)
        due: list[tuple[OpenSeries, str]] = []
        for uid, entry in list(self._open.items()):
            if uid in self._ready and entry.count_reached:
                due.append((entry, "count"))
            elif now - entry.last_received_at >= stable:
                due.append((entry, "stable"))
            else:
                continue
            del self._open[uid]
            self._forget_senders(entry)  # a long-lived association, completed by the timer
        self._ready.clear()
        return due

    def _run(self) -> None:
        while True:
            with self._condition:
                if not self._ready and not self._stopping:
                    self._condition.wait(self.completion.check_interval)
                if self._stopping:
                    return
                due = self._due()
            for entry, reason in due:
                try:
                    self.complete(entry.series_uid, reason)
                except Exception:
                    log.exception(
                        "completing series %s failed; retried after the stable time", entry.series_uid
                    )
                    entry.last_received_at = datetime.now(UTC)
                    with self._condition:
                        self._open.setdefault(entry.series_uid, entry)

    # -- completion -----------------------------------------------------------------------

    def complete(self, series_uid: str, reason: str) -> Completion | None:
        """Route (reading a header), then mark complete and create the job (one SQL batch), then
        enqueue and audit. The header is read before the batch: every C-STORE answer waiting on
        that batch's commit would otherwise wait on the file read too."""
        decision = self._route(series_uid)
        completion = self.ingest.committer.submit(
            lambda batch: self._complete_in_batch(batch, series_uid, reason, decision)
        )
        result = completion.result()
        if result is None:
            return None
        decision = result.decision
        log.info(
            "series %s complete (%s, %d instances, generation %d): %s",
            series_uid,
            reason,
            result.instances,
            result.generation,
            decision.reason,
        )
        self._audit_decision(result)
        if result.job_id is not None:
            try:
                self.handoff.enqueue(result.job_id)
            except Exception:
                # The job row is queued in SQL without queued_at: sent again at start / by the reconciler.
                log.exception("job %d could not be enqueued now", result.job_id)
        return result

    def _complete_in_batch(
        self, batch: Batch, series_uid: str, reason: str, decision: RoutingDecision
    ) -> Completion | None:
        record = self.ingest.series_record(batch, series_uid)
        if record is None or record.state != SeriesState.RECEIVING:
            return None  # completed meanwhile (e.g. count and timer both fired)
        connection = batch.connection
        last_received_at, instances = connection.execute(
            select(Series.last_received_at, func.count(func.distinct(Instance.sop_instance_uid)))
            .join(Instance, Instance.series_id == Series.id, isouter=True)
            .where(Series.id == record.id)
            .group_by(Series.id)
        ).one()
        now = datetime.now(UTC)
        connection.execute(
            update(Series)
            .where(Series.id == record.id)
            .values(
                state=SeriesState.COMPLETE,
                completed_at=now,
                completion_reason=reason,
                eligible=decision.eligible,
                routing_reason=decision.reason,
            )
        )
        record.state = SeriesState.COMPLETE
        job_id = None
        if decision.eligible:
            job_id = connection.execute(
                insert(Job)
                .values(
                    series_id=record.id,
                    series_generation=record.generation,
                    state=JobState.QUEUED,
                    created_at=now,
                    last_instance_received_at=last_received_at,
                    series_complete_at=now,
                )
                .returning(Job.id)
            ).scalar_one()
        return Completion(
            series_uid=series_uid,
            study_uid=record.study_uid,
            generation=record.generation,
            reason=reason,
            instances=instances,
            decision=decision,
            job_id=job_id,
        )

    def _route(self, series_uid: str) -> RoutingDecision:
        with self.database.session() as session:
            row = session.execute(
                select(Series.id, Series.produced_by_node).where(Series.series_instance_uid == series_uid)
            ).first()
            path = _representative_path(session, row.id) if row is not None else None
        if row is not None and row.produced_by_node:
            return RoutingDecision(False, "produced_by_node: an SR this node wrote, routed back", "SR")
        if path is None:
            return RoutingDecision(False, "no_instances: every instance was refused", "unknown")
        try:
            headers = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            return RoutingDecision(False, f"unreadable: {type(exc).__name__}", "unknown")
        return route_series(headers, self.routing)

    def _audit_decision(self, result: Completion) -> None:
        try:
            self.audit.record(
                EventID.APPLICATION_ACTIVITY,
                Outcome.SUCCESS,
                event_type=ROUTING_EVENT_TYPE,
                study_uid=result.study_uid,
                series_uid=result.series_uid,
                job_id=result.job_id,
                detail={
                    "completion": result.reason,
                    "eligible": result.decision.eligible,
                    "generation": result.generation,
                    "instances": result.instances,
                    "reason": result.decision.reason,
                    "sequence": result.decision.sequence,
                },
            )
        except Exception:
            log.exception("routing decision of series %s could not be audited", result.series_uid)
