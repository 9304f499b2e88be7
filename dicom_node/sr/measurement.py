"""The coded report: TID 1500 "Measurement Report" with highdicom's ``MeasurementReport``.

One measurement group (TID 1501, ``MeasurementsAndQualitativeEvaluations``) carries what a
FLAIR series can show, as qualitative evaluations (name = present / absent): lesion, edema,
necrosis, ventricular compression, midline shift; one finding site per lobe with its
laterality (SNOMED CT, CID 244); the algorithm (TID 4019: name, version, checkpoint hash);
and the AI / demo disclaimers as TEXT comments. Contrast enhancement and size are left to
the narrative: FLAIR without contrast cannot show enhancement, and size is not measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset

from dicom_node.sr import codes as sr_codes
from inference.report_schema import Findings, Lobe

TRACKING_IDENTIFIER = "Brain3D FLAIR findings"


def _finding_sites(findings: Findings) -> list[hd.sr.FindingSite]:
    if not findings.abnormal:
        return []
    laterality = sr_codes.SIDE_CODES[findings.side] if findings.side else None
    locations = [sr_codes.LOBE_CODES[lobe] for lobe in Lobe if lobe in findings.lobes] or [sr_codes.BRAIN]
    return [hd.sr.FindingSite(anatomic_location=location, laterality=laterality) for location in locations]


def _evaluations(findings: Findings) -> list[hd.sr.QualitativeEvaluation]:
    return [
        hd.sr.QualitativeEvaluation(
            name=name, value=sr_codes.PRESENT if getattr(findings, field) else sr_codes.ABSENT
        )
        for field, name in sr_codes.PRESENCE_CODES.items()
    ]


def measurement_report(
    *,
    findings: Findings,
    observation_context: hd.sr.ObservationContext,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: str,
    disclaimers: Sequence[str],
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree for ``findings`` (coded from the parsed generated text)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=TRACKING_IDENTIFIER),
        finding_type=sr_codes.LESION if findings.abnormal else None,
        algorithm_id=algorithm,
        finding_sites=_finding_sites(findings),
        qualitative_evaluations=_evaluations(findings),
    )
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(
            name=sr_codes.COMMENT, value=line, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for line in disclaimers
    )
    return hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=sr_codes.PROCEDURE_REPORTED,
        imaging_measurements=[group],
        title=sr_codes.IMAGING_MEASUREMENT_REPORT,
    )


def read_coded_findings(dataset: Dataset) -> Findings:
    """The findings a TID 1500 SR codes, read back through highdicom's typed objects.

    Only what the SR codes comes back: ``enhancement`` stays False and ``size`` None.
    """
    document = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    report = document.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 measurement report")
    groups = report.get_image_measurement_groups(tracking_uid=None)
    if len(groups) != 1:
        raise ValueError(f"expected one measurement group, found {len(groups)}")
    group = groups[0]
    present = {field: _is_present(group, name) for field, name in sr_codes.PRESENCE_CODES.items()}
    sides = {site.laterality for site in group.finding_sites if site.laterality is not None}
    if len(sides) > 1:
        raise ValueError("finding sites disagree on laterality")
    side = next((s for s, code in sr_codes.SIDE_CODES.items() if code in sides), None)
    lobes = frozenset(
        lobe
        for lobe, code in sr_codes.LOBE_CODES.items()
        if any(site.value == code for site in group.finding_sites)
    )
    return Findings(
        abnormal=present["abnormal"],
        side=side,
        lobes=lobes,
        edema=present["edema"],
        necrosis=present["necrosis"],
        ventricular_compression=present["ventricular_compression"],
        midline_shift=present["midline_shift"],
    )


def _is_present(group: hd.sr.MeasurementsAndQualitativeEvaluations, name) -> bool:
    evaluations = group.get_qualitative_evaluations(name=name)
    if len(evaluations) != 1:
        raise ValueError(f"expected one evaluation of {name.meaning}, found {len(evaluations)}")
    value = evaluations[0].value
    if value == sr_codes.PRESENT:
        return True
    if value == sr_codes.ABSENT:
        return False
    raise ValueError(f"{name.meaning}: unexpected value {value.meaning}")
