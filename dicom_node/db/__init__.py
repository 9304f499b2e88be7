"""The node's SQL database: models, engine and sessions."""

from dicom_node.db.models import (
    Association,
    AuditEvent,
    Base,
    Delivery,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    StructuredReport,
    Study,
)
from dicom_node.db.session import Database

__all__ = [
    "Association",
    "AuditEvent",
    "Base",
    "Database",
    "Delivery",
    "Instance",
    "Job",
    "JobState",
    "Series",
    "SeriesState",
    "StructuredReport",
    "Study",
]
