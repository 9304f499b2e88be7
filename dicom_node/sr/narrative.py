"""The narrative report: TID 2000 "Basic Diagnostic Imaging Report".

highdicom has no TID 2000 class, so the tree is assembled from its content items:

    CONTAINER Diagnostic Imaging Report (LN 18748-4), template 2000
      HAS CONCEPT MOD  Language of Content Item and Descendants (TID 1204)
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name / ... (TID 1001-1004)
      CONTAINS CONTAINER Findings (LN 59776-5, CID 7001)
        CONTAINS TEXT Comment: the AI / demo disclaimers (first, so a reader meets them first)
        CONTAINS TEXT Finding: the generated report text (TID 2002)
      CONTAINS CONTAINER Impressions (LN 19005-8, CID 7001)
        CONTAINS TEXT Impression: a one-line impression derived from the findings
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset

from dicom_node.sr import codes as sr_codes
from inference.report_schema import Findings, Lobe, Side


def _text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _section(heading, items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(
        name=heading, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    section.ContentSequence = hd.sr.ContentSequence(list(items))
    return section


def narrative_content(
    *,
    findings_text: str,
    impression: str,
    disclaimers: Sequence[str],
    observation_context: hd.sr.ObservationContext,
) -> hd.sr.ContainerContentItem:
    """The root container of a TID 2000 document; disclaimers lead the Findings section."""
    root = hd.sr.ContainerContentItem(name=sr_codes.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    findings_items = [_text(sr_codes.COMMENT, line) for line in disclaimers]
    findings_items.append(_text(sr_codes.FINDING, findings_text))
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
            *observation_context,
            _section(sr_codes.FINDINGS_SECTION, findings_items),
            _section(sr_codes.IMPRESSIONS_SECTION, [_text(sr_codes.IMPRESSION, impression)]),
        ]
    )
    return root


def impression_for(findings: Findings) -> str:
    """A one-line impression from the coded findings (so it can never contradict them)."""
    if not findings.abnormal:
        return "No focal FLAIR abnormality."
    where = _location(findings)
    associated = [
        name
        for name, present in (
            ("edema", findings.edema),
            ("necrosis", findings.necrosis),
            ("ventricular compression", findings.ventricular_compression),
            ("midline shift", findings.midline_shift),
        )
        if present
    ]
    tail = f" with {', '.join(associated)}" if associated else ""
    return f"FLAIR-hyperintense lesion in {where}{tail}."


def _location(findings: Findings) -> str:
    cerebral = [lobe.value for lobe in Lobe if lobe in findings.lobes and lobe is not Lobe.CEREBELLUM]
    parts = []
    if cerebral:
        parts.append(" and ".join(cerebral) + (" lobe" if len(cerebral) == 1 else " lobes"))
    if Lobe.CEREBELLUM in findings.lobes:
        parts.append("cerebellum")
    where = " and ".join(parts) if parts else "brain"
    if findings.side is Side.BILATERAL:
        return f"both hemispheres ({where})" if parts else "both hemispheres"
    return f"the {findings.side.value} {where}" if findings.side else f"the {where}"


@dataclass(frozen=True)
class NarrativeText:
    """The text a narrative SR carries, read back from its content tree."""

    findings: tuple[str, ...]
    impressions: tuple[str, ...]
    comments: tuple[str, ...]


def read_narrative(dataset: Dataset) -> NarrativeText:
    """Read a narrative SR (as written, or as received from a PACS) into its texts."""
    document = hd.sr.ComprehensiveSR.from_dataset(dataset)
    root = document.content[0]
    if root.name != sr_codes.DIAGNOSTIC_IMAGING_REPORT:
        raise ValueError(f"not a diagnostic imaging report: {root.name.meaning}")

    def texts(name) -> tuple[str, ...]:
        items = hd.sr.utils.find_content_items(
            root, name=name, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True
        )
        return tuple(item.value for item in items)

    return NarrativeText(
        findings=texts(sr_codes.FINDING),
        impressions=texts(sr_codes.IMPRESSION),
        comments=texts(sr_codes.COMMENT),
    )
