"""The read-only queries behind ``brain3d audit series|jobs|events``, and their table layout.

Each query returns plain JSON-ready dictionaries, so ``--json`` prints exactly what the
table shows (and more); times are UTC ISO 8601 with a ``Z``, durations are seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.db.models import AuditEvent, Delivery, Instance, Job, Series, Study, as_utc

#: The steps of a job in order, each as (name, start column, end column).
JOB_STEPS: tuple[tuple[str, str, str], ...] = (
    ("completion", "last_instance_received_at", "series_complete_at"),
    ("queue_wait", "queued_at", "conversion_started_at"),
    ("conversion", "conversion_started_at", "conversion_finished_at"),
    ("inference", "inference_started_at", "inference_finished_at"),
    ("sr_build", "inference_finished_at", "sr_built_at"),
    ("delivery", "sr_built_at", "delivered_at"),
)
JOB_TIMESTAMPS: tuple[str, ...] = (
    "created_at",
    "last_instance_received_at",
    "series_complete_at",
    "queued_at",
    "conversion_started_at",
    "conversion_finished_at",
    "inference_started_at",
    "inference_finished_at",
    "sr_built_at",
    "delivered_at",
    "finished_at",
    "heartbeat_at",
)


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def _iso(moment: datetime | None) -> str | None:
    moment = _utc(moment)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    start, end = _utc(start), _utc(end)
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def series_overview(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest series first: completeness, routing decision and instance count."""
    instance_count = (
        select(Instance.series_id, func.count(func.distinct(Instance.sop_instance_uid)).label("instances"))
        .group_by(Instance.series_id)
        .subquery()
    )
    rows = session.execute(
        select(Series, Study.study_instance_uid, instance_count.c.instances)
        .join(Study, Series.study_id == Study.id)
        .outerjoin(instance_count, instance_count.c.series_id == Series.id)
        .order_by(Series.last_received_at.desc(), Series.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": series.id,
            "study_instance_uid": study_uid,
            "series_instance_uid": series.series_instance_uid,
            "modality": series.modality,
            "series_number": series.series_number,
            "series_description": series.series_description,
            "state": str(series.state),
            "generation": series.generation,
            "instances": instances or 0,
            "expected_instances": series.expected_instances,
            "completion_reason": series.completion_reason,
            "first_received_at": _iso(series.first_received_at),
            "last_received_at": _iso(series.last_received_at),
            "completed_at": _iso(series.completed_at),
            "eligible": series.eligible,
            "routing_reason": series.routing_reason,
            "produced_by_node": series.produced_by_node,
        }
        for series, study_uid, instances in rows
    ]


def jobs_overview(session: Session, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest jobs first, with every step's timestamps and durations."""
    delivered = (
        select(
            Delivery.job_id,
            func.count().label("attempts"),
            func.count().filter(Delivery.succeeded.is_(True)).label("succeeded"),
        )
        .group_by(Delivery.job_id)
        .subquery()
    )
    query = (
        select(Job, Series.series_instance_uid, delivered.c.attempts, delivered.c.succeeded)
        .join(Series, Job.series_id == Series.id)
        .outerjoin(delivered, delivered.c.job_id == Job.id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(Job.state == state)
    result = []
    for job, series_uid, delivery_attempts, deliveries_succeeded in session.execute(query).all():
        durations = {name: _seconds(getattr(job, start), getattr(job, end)) for name, start, end in JOB_STEPS}
        durations["total"] = _seconds(job.last_instance_received_at, job.delivered_at or job.finished_at)
        result.append(
            {
                "id": job.id,
                "series_instance_uid": series_uid,
                "series_generation": job.series_generation,
                "state": str(job.state),
                "attempts": job.attempts,
                "error_reason": job.error_reason,
                "model_version": job.model_version,
                "deliveries": {"attempts": delivery_attempts or 0, "succeeded": deliveries_succeeded or 0},
                "timestamps": {name: _iso(getattr(job, name)) for name in JOB_TIMESTAMPS},
                "durations_s": durations,
            }
        )
    return result


def audit_events(
    session: Session,
    *,
    event_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest audit events first, filtered on the indexed columns; each with its document."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if event_id is not None:
        query = query.where(AuditEvent.event_id == event_id)
    if study_uid is not None:
        query = query.where(AuditEvent.study_instance_uid == study_uid)
    if series_uid is not None:
        query = query.where(AuditEvent.series_instance_uid == series_uid)
    if job_id is not None:
        query = query.where(AuditEvent.job_id == job_id)
    events = []
    for event in session.scalars(query):
        try:
            document = json.loads(event.document)
        except ValueError:
            document = None  # `audit verify` reports it; listing still shows the row
        events.append(
            {
                "id": event.id,
                "recorded_at": _iso(event.recorded_at),
                "event_id": event.event_id,
                "event_type": event.event_type,
                "outcome": event.outcome,
                "study_instance_uid": event.study_instance_uid,
                "series_instance_uid": event.series_instance_uid,
                "job_id": event.job_id,
                "chain_hash": event.chain_hash,
                "document": document,
            }
        )
    return events


def _role_word(meaning: str) -> str:
    return meaning.removesuffix(" Role ID").lower().replace(" ", "-")


def summarise_event(event: dict[str, Any]) -> str:
    """One human line for an event: its meaning, the AE titles involved and its detail."""
    document = event["document"] or {}
    meaning = (document.get("event_id") or {}).get("meaning", "")
    event_type = (document.get("event_type") or {}).get("meaning")
    parts = [f"{meaning} / {event_type}" if event_type else meaning]
    participants = [
        f"{_role_word(p['role']['meaning'])}={p.get('ae_title') or p.get('user_id') or '?'}"
        for p in document.get("participants", [])
    ]
    if participants:
        parts.append(" ".join(participants))
    if document.get("detail"):
        parts.append(json.dumps(document["detail"], sort_keys=True, separators=(",", ":")))
    return "; ".join(parts)


def render_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, width: int = 48
) -> str:
    """A plain fixed-width table of ``columns`` (key, heading); long cells are shortened."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        text = str(value)
        return text if len(text) <= width else text[: width - 1] + "…"

    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headings = [heading for _, heading in columns]
    widths = [max([len(heading)] + [len(line[i]) for line in cells]) for i, heading in enumerate(headings)]
    lines = [
        "  ".join(text.ljust(widths[i]) for i, text in enumerate(line)).rstrip()
        for line in [headings, *cells]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
