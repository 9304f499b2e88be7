"""Build the two Structured Reports of an analysed series, and the short "not analysed" one.

``build_reports(sources, report_text, findings, algorithm, *, input_hash, content_datetime,
synthetic_demo, predecessors=()) -> ReportPair(narrative, measurement)``

- ``sources``: the series' instances (headers suffice: read with ``stop_before_pixels``);
  the SRs join their study, copy their patient module and list exactly them as evidence.
- ``findings``: ``parse(report_text)``, never a second model output, so text and codes agree.
- ``content_datetime``: when the report was made (the job's inference time). It becomes
  ContentDate/Time and every other date the SR carries, so the same inputs give the same bytes.
  It is written in the study's time: the offset the source states (and the SR states again),
  else the node's local time with no offset, as the copied StudyDate/Time are (an offset
  applies to every date and time of an instance, PS3.3 C.12.1.1.8).
- ``predecessors``: earlier SRs of the same series (re-processing after late instances),
  cited in PredecessorDocumentsSequence.

Series and SOP Instance UIDs are derived from the source series UID, the model version and
checkpoint hash, and the input content hash (``report_uids``): re-running a job re-creates
the same objects, so a PACS stores each SR once however often it is delivered.
"""

from __future__ import annotations

import io
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import highdicom as hd
from pydicom import DataElement, Dataset, dcmwrite
from pydicom import config as pydicom_config
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM, validate_value

from dicom_node.identity import MANUFACTURER, SOFTWARE_VERSION, derived_uid
from dicom_node.sr import codes as sr_codes
from dicom_node.sr.measurement import measurement_report
from dicom_node.sr.narrative import impression_for, narrative_content
from inference.report_schema import Findings

AI_DISCLAIMER = "AI-generated report, not reviewed by a radiologist."
DEMO_DISCLAIMER = "Synthetic demo model - not for clinical use."
SERIES_DESCRIPTION = "Brain3D AI report (unverified)"
NARRATIVE_INSTANCE_NUMBER = 1
MEASUREMENT_INSTANCE_NUMBER = 2

# Type 2 attributes highdicom reads from the first source; absent ones are written empty.
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_TEMPORAL_VRS = {"DA": DA, "DT": DT, "TM": TM}
_PATIENT_SEXES = {"M", "F", "O"}  # PS3.3 C.7.1.1, the enumerated values highdicom accepts
_UTC_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Which model wrote the report (TID 4019 and the device observer)."""

    name: str
    version: str
    checkpoint_sha256: str


@dataclass(frozen=True)
class ReportUIDs:
    """The derived identity of one series' SRs."""

    series: str
    narrative: str
    measurement: str
    not_analysed: str
    tracking: str


@dataclass(frozen=True)
class ReportPair:
    narrative: Dataset
    measurement: Dataset


def report_uids(source_series_uid: str, algorithm: AlgorithmIdentity, input_hash: str) -> ReportUIDs:
    """UIDs from source series + model version + checkpoint + input content: same inputs, same UIDs."""
    parts = (source_series_uid, algorithm.name, algorithm.version, algorithm.checkpoint_sha256, input_hash)
    return ReportUIDs(
        series=derived_uid("sr-series", *parts),
        narrative=derived_uid("sr-narrative", *parts),
        measurement=derived_uid("sr-measurement", *parts),
        not_analysed=derived_uid("sr-not-analysed", *parts),
        tracking=derived_uid("sr-tracking", *parts),
    )


def printable_text(text: str) -> str:
    """``text`` without the characters a DICOM text value may not hold (controls other than
    line breaks and tabs, unassigned or private code points, U+FFFD from undecodable bytes).

    A model's output is untrusted text: an SR must stay valid whatever it generates.
    """
    kept = (
        character
        for character in text
        if character in "\n\t" or (unicodedata.category(character)[0] != "C" and character != "\ufffd")
    )
    return "".join(kept).strip()


def build_reports(
    sources: Sequence[Dataset],
    report_text: str,
    findings: Findings,
    algorithm: AlgorithmIdentity,
    *,
    input_hash: str,
    content_datetime: datetime,
    synthetic_demo: bool,
    predecessors: Sequence[Dataset] = (),
) -> ReportPair:
    """The narrative (TID 2000, Comprehensive SR) and coded (TID 1500, Comprehensive 3D SR) SRs."""
    report_text = printable_text(report_text)
    evidence = _evidence(sources)
    uids = report_uids(evidence[0].SeriesInstanceUID, algorithm, input_hash)
    disclaimers = _disclaimers(synthetic_demo)
    context = _observation_context(algorithm)
    narrative_root = narrative_content(
        findings_text=report_text,
        impression=impression_for(findings),
        disclaimers=disclaimers,
        observation_context=context,
    )
    narrative = _document(
        hd.sr.ComprehensiveSR,
        evidence,
        narrative_root,
        uids.series,
        uids.narrative,
        NARRATIVE_INSTANCE_NUMBER,
        algorithm,
        content_datetime,
        predecessors,
    )
    coded = measurement_report(
        findings=findings,
        observation_context=context,
        algorithm=hd.sr.AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[f"checkpoint sha256 {algorithm.checkpoint_sha256}", f"input sha256 {input_hash}"],
            manufacturer=MANUFACTURER,
        ),
        tracking_uid=uids.tracking,
        disclaimers=disclaimers,
    )
    measurement = _document(
        hd.sr.Comprehensive3DSR,
        evidence,
        coded,
        uids.series,
        uids.measurement,
        MEASUREMENT_INSTANCE_NUMBER,
        algorithm,
        content_datetime,
        predecessors,
    )
    return ReportPair(narrative=narrative, measurement=measurement)


def not_analysed_report(
    sources: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmIdentity,
    *,
    input_hash: str,
    content_datetime: datetime,
    synthetic_demo: bool = False,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """A short TID 2000 SR saying the series was not analysed, and why."""
    evidence = _evidence(sources)
    uids = report_uids(evidence[0].SeriesInstanceUID, algorithm, input_hash)
    root = narrative_content(
        findings_text=f"This series was not analysed: {reason}",
        impression="Not analysed by the AI model; no findings are reported.",
        disclaimers=_disclaimers(synthetic_demo),
        observation_context=_observation_context(algorithm),
    )
    return _document(
        hd.sr.ComprehensiveSR,
        evidence,
        root,
        uids.series,
        uids.not_analysed,
        NARRATIVE_INSTANCE_NUMBER,
        algorithm,
        content_datetime,
        predecessors,
    )


def sr_bytes(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of an SR: what is persisted, delivered and re-delivered."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _disclaimers(synthetic_demo: bool) -> list[str]:
    return [AI_DISCLAIMER, DEMO_DISCLAIMER] if synthetic_demo else [AI_DISCLAIMER]


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources, one per SOP Instance UID, in a stable order, with Type 2 gaps filled."""
    if not sources:
        raise ValueError("an SR needs at least one source instance")
    series = {ds.SeriesInstanceUID for ds in sources}
    if len(series) != 1:
        raise ValueError(f"sources span {len(series)} series; an SR reports on one")
    unique = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = sorted(unique.values(), key=lambda ds: (int(ds.get("InstanceNumber") or 0), ds.SOPInstanceUID))
    first = Dataset()
    first.update(ordered[0])
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in first or first[keyword].value is None or not _conforms(first[keyword]):
            if keyword in first:
                del first[keyword]  # its element is shared with the caller's dataset
            setattr(first, keyword, "")
    for element in list(first):
        if _optional(element) and not _valid_for_its_vr(element):
            # An age "45Y", a weight "72,5", a 70-character admitting diagnosis: highdicom copies
            # the Patient and study modules' attributes, and the SR would fail validation.
            del first[element.tag]
    if first.get("SpecificCharacterSet"):
        # Every value, in sequences too, read (decoded in the source's character set) before
        # the label changes: a value never read is written back as its raw bytes, under the new
        # label. (``Dataset.decode`` would re-encode values set in memory, garbling them.)
        for _element in first.iterall():
            pass
        # UTF-8 holds them all, where highdicom refuses common declarations (Japanese
        # "\\ISO 2022 IR 87", "ISO_IR 6").
        del first.SpecificCharacterSet  # its element is shared with the caller's dataset
        first.SpecificCharacterSet = "ISO_IR 192"
    return [first, *ordered[1:]]


def _optional(element: DataElement) -> bool:
    """A root attribute the SR may lose: not one of the Type 2 values filled above, not a UID,
    not a sequence. Only those highdicom copies (the Patient and study modules) reach the SR."""
    return element.keyword not in _PATIENT_STUDY_TYPE2 and element.VR not in ("SQ", "UI")


def _valid_for_its_vr(element: DataElement) -> bool:
    try:
        validate_value(element.VR, element.value, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    if element.VR == "PN":  # what pydicom leaves to the validators: 64 characters, 5 components a group
        values = element.value if element.VM > 1 else [element.value]
        groups = [group for value in values for group in str(value or "").split("=")]
        return all(len(group) <= 64 and group.count("^") <= 4 for group in groups)
    return True


def _conforms(element: DataElement) -> bool:
    """Whether a date or time value parses and a patient's sex is one of its enumerated values:
    scanners send the odd ``1970-01-31`` birth date or ``Female``, which highdicom refuses to
    copy; such a Type 2 value is left empty rather than failing the report."""
    if not element.value:
        return True
    if element.keyword == "PatientSex":
        return element.value in _PATIENT_SEXES
    parse = _TEMPORAL_VRS.get(element.VR)
    if parse is None:
        return True
    try:
        parse(element.value)
    except ValueError:
        return False
    return True


def _observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    """TID 1001/1002/1004: the device observer is the model, named by its exact checkpoint."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device-observer", algorithm.name, algorithm.version, algorithm.checkpoint_sha256),
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _series_number(source: Dataset) -> int:
    """Beside the source series in a viewer's list: 9000 + the source's number."""
    return 9000 + int(source.get("SeriesNumber") or 0) % 1000


def _document(
    sop_class: type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR],
    evidence: list[Dataset],
    content: Dataset,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    algorithm: AlgorithmIdentity,
    content_datetime: datetime,
    predecessors: Sequence[Dataset],
) -> Dataset:
    content_datetime, utc_offset = _in_study_time(content_datetime, evidence[0])
    with warnings.catch_warnings():
        # highdicom quotes a patient's name it finds unusual (a single-part name is legal DICOM).
        warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
        document = sop_class(
            evidence=evidence,
            content=content,
            series_instance_uid=series_uid,
            series_number=_series_number(evidence[0]),
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=list(predecessors) or None,
            record_evidence=True,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            series_date=content_datetime.date(),
            series_time=content_datetime.time(),
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=f"{algorithm.name} {algorithm.version}",
            software_versions=SOFTWARE_VERSION,
        )
    _pin_times(document, content_datetime)
    if utc_offset is not None:
        document.TimezoneOffsetFromUTC = utc_offset
    if not _is_ascii(document):
        # The model's text or the copied patient module holds characters beyond ASCII.
        document.SpecificCharacterSet = "ISO_IR 192"
    if any(code.scheme_designator == sr_codes.LOCAL_SCHEME for code in _codes_in(document)):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = sr_codes.LOCAL_SCHEME
        scheme.CodingSchemeName = sr_codes.LOCAL_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        document.CodingSchemeIdentificationSequence = [scheme]
    return document


def _in_study_time(moment: datetime, source: Dataset) -> tuple[datetime, str | None]:
    """``moment`` as a wall-clock time in the study's zone, and the offset to state, if any: the
    source's own (written again), else the node's local time and none, as StudyDate/Time are."""
    if moment.tzinfo is None:
        return moment, None
    stated = str(source.get("TimezoneOffsetFromUTC") or "")
    match = _UTC_OFFSET.match(stated)
    if match is None:
        return moment.astimezone().replace(tzinfo=None), None
    sign, hours, minutes = match.groups()
    offset = timedelta(hours=int(hours), minutes=int(minutes)) * (-1 if sign == "-" else 1)
    return moment.astimezone(timezone(offset)).replace(tzinfo=None), stated


def _is_ascii(dataset: Dataset) -> bool:
    """True when every text value of ``dataset`` (nested sequences included) is plain ASCII."""
    for element in dataset.iterall():
        values = element.value if element.VM > 1 else [element.value]
        if element.VR in _TEXT_VRS and not all(str(value).isascii() for value in values if value is not None):
            return False
    return True


def _pin_times(document: Dataset, content_datetime: datetime) -> None:
    """highdicom stamps 'now' in three places; the report's own time replaces it."""
    document.InstanceCreationDate = DA(content_datetime.date())
    document.InstanceCreationTime = TM(content_datetime.time())
    for item in document.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(content_datetime)


def _codes_in(dataset: Dataset):
    for item in dataset.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            yield from item.get(key, [])
        yield from _codes_in(item)
