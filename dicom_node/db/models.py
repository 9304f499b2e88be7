"""SQLAlchemy models of the node's database: the source of truth for every instance and job.

One table per thing an admin asks about: associations, studies, series, instances,
jobs, deliveries and the append-only, hash-chained audit trail. Alembic's migrations
in ``migrations/`` create exactly these tables (a test diffs them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time: SQLite returns naive datetimes, and every time this node
    stores is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict] = {datetime: DateTime(timezone=True)}


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_ANALYSED = "not_analysed"

    @property
    def is_final(self) -> bool:
        return self in FINAL_JOB_STATES


#: The states a job never leaves.
FINAL_JOB_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.NOT_ANALYSED)


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving, not yet complete
    COMPLETE = "complete"  # handed on to routing (and a job when eligible)


def _enum(kind: type[enum.Enum], name: str) -> Enum:
    return Enum(kind, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Association(Base):
    """One DICOM association accepted (or rejected) by the Storage SCP."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(16), default="open")  # open, released, aborted, rejected
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    """A study seen by the node; patient identity is deliberately not stored here."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series, its completeness and the routing decision taken on it."""

    __tablename__ = "series"
    # The open series rebuilt at start, and retention's pass every minute over complete series
    # whose spool is still there: without it both read every series the node ever received.
    __table_args__ = (Index("ix_series_state_spool_removed_at", "state", "spool_removed_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING
    )
    # Incremented each time late instances re-open a series that was already handed on.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    completion_reason: Mapped[str | None] = mapped_column(String(32))  # "count" or "stable"
    eligible: Mapped[bool | None] = mapped_column(Boolean)
    routing_reason: Mapped[str | None] = mapped_column(Text)
    produced_by_node: Mapped[bool] = mapped_column(Boolean, default=False)
    spool_removed_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance: the raw received bytes live at ``path``."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256", name="uq_instances_uid_content"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # True when another instance row holds different content under the same SOP Instance UID.
    conflicting: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One Brain3D run on one generation of one eligible series."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_generation: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None]
    error_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_received_at: Mapped[datetime | None]
    series_complete_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    conversion_started_at: Mapped[datetime | None]
    conversion_finished_at: Mapped[datetime | None]
    inference_started_at: Mapped[datetime | None]
    inference_finished_at: Mapped[datetime | None]
    sr_build_started_at: Mapped[datetime | None]
    sr_built_at: Mapped[datetime | None]
    #: When the delivery attempt in progress started; cleared while a scheduled retry waits.
    delivery_started_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # What ran and what it said: the SR codes come from parsing report_text, never elsewhere.
    model_version: Mapped[str | None] = mapped_column(String(64))
    input_hash: Mapped[str | None] = mapped_column(String(64))
    report_text: Mapped[str | None] = mapped_column(Text)
    findings_json: Mapped[str | None] = mapped_column(Text)

    series: Mapped[Series] = relationship(back_populates="jobs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")
    reports: Mapped[list[StructuredReport]] = relationship(back_populates="job")


class StructuredReport(Base):
    """An SR the node produced; its bytes are persisted so that re-delivery resends them exactly."""

    __tablename__ = "structured_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # narrative, measurement, not_analysed
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="reports")


class Delivery(Base):
    """One attempt to C-STORE one produced SR to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    """One row of the append-only audit trail (DICOM PS3.15 A.5 vocabulary).

    ``document`` is the canonical UTC JSON of the event; ``chain_hash`` is the HMAC of
    the previous row's ``chain_hash`` and this document, so that an edited, inserted,
    deleted or truncated row breaks the chain (see ``dicom_node.audit``).
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event_id: Mapped[str] = mapped_column(String(16), index=True)  # DCM code, e.g. 110104
    event_type: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[int] = mapped_column(Integer)  # 0 success, 4 minor, 8 serious, 12 major failure
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    document: Mapped[str] = mapped_column(Text)
    previous_hash: Mapped[str] = mapped_column(String(64))
    chain_hash: Mapped[str] = mapped_column(String(64), unique=True)
