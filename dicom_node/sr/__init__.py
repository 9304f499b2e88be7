"""DICOM Structured Reports of Brain3D: a TID 2000 narrative and a TID 1500 coded report."""

from dicom_node.sr.build import (
    AI_DISCLAIMER,
    DEMO_DISCLAIMER,
    AlgorithmIdentity,
    ReportPair,
    ReportUIDs,
    build_reports,
    not_analysed_report,
    printable_text,
    report_uids,
    sr_bytes,
)
from dicom_node.sr.measurement import read_coded_findings
from dicom_node.sr.narrative import NarrativeText, read_narrative

__all__ = [
    "AI_DISCLAIMER",
    "DEMO_DISCLAIMER",
    "AlgorithmIdentity",
    "NarrativeText",
    "ReportPair",
    "ReportUIDs",
    "build_reports",
    "not_analysed_report",
    "printable_text",
    "read_coded_findings",
    "read_narrative",
    "report_uids",
    "sr_bytes",
]
