"""The Structured Reports: valid per dciodvfy and dsrdump, coded = text = truth, exact evidence,
deterministic bytes and UIDs, predecessors, and the not-analysed report."""

from __future__ import annotations

import io
import random
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pacs import enhanced_mr, mr_series
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.identity import MANUFACTURER, is_produced_by_node
from dicom_node.sr import (
    AI_DISCLAIMER,
    DEMO_DISCLAIMER,
    AlgorithmIdentity,
    ReportPair,
    build_reports,
    not_analysed_report,
    read_coded_findings,
    read_narrative,
    report_uids,
    sr_bytes,
)
from dicom_node.sr.validate import validate_sr, warnings_of
from inference.report_schema import NORMAL, Findings, Lobe, Side, parse, render

pytestmark = pytest.mark.dcmtk

ALGORITHM = AlgorithmIdentity(name="Brain3D", version="0.1.0", checkpoint_sha256="a1" * 32)
INPUT_HASH = "b2" * 32
WHEN = datetime(2024, 5, 6, 10, 30, 15, 250000)

LEFT_FRONTAL = Findings(
    abnormal=True, side=Side.LEFT, lobes=frozenset({Lobe.FRONTAL}), edema=True, ventricular_compression=True
)
RIGHT_TEMPOROPARIETAL = Findings(
    abnormal=True,
    side=Side.RIGHT,
    lobes=frozenset({Lobe.TEMPORAL, Lobe.PARIETAL}),
    necrosis=True,
    midline_shift=True,
)
BILATERAL_OCCIPITAL = Findings(
    abnormal=True, side=Side.BILATERAL, lobes=frozenset({Lobe.OCCIPITAL}), edema=True
)
LEFT_CEREBELLUM = Findings(abnormal=True, side=Side.LEFT, lobes=frozenset({Lobe.CEREBELLUM}))

CASES = {
    "left": LEFT_FRONTAL,
    "right": RIGHT_TEMPOROPARIETAL,
    "bilateral": BILATERAL_OCCIPITAL,
    "left-cerebellum": LEFT_CEREBELLUM,
    "healthy": NORMAL,
}


@pytest.fixture(scope="module", autouse=True)
def _validators_installed() -> None:
    from conftest import require_tool

    require_tool("dciodvfy")
    require_tool("dsrdump")


def _coded_subset(findings: Findings) -> Findings:
    """What the TID 1500 report codes of ``findings`` (enhancement and size stay in the text)."""
    return Findings(
        abnormal=findings.abnormal,
        side=findings.side,
        lobes=findings.lobes,
        edema=findings.edema,
        necrosis=findings.necrosis,
        ventricular_compression=findings.ventricular_compression,
        midline_shift=findings.midline_shift,
    )


def _reports(sources: list[Dataset], findings: Findings = LEFT_FRONTAL) -> ReportPair:
    """Both SRs of ``findings`` (rendered as the report text) on ``sources``, clinical model."""
    return build_reports(
        sources,
        render(findings),
        findings,
        ALGORITHM,
        input_hash=INPUT_HASH,
        content_datetime=WHEN,
        synthetic_demo=False,
    )


def _written(dataset: Dataset, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(sr_bytes(dataset))
    return path


def _evidence_uids(dataset: Dataset) -> set[str]:
    return {
        item.ReferencedSOPInstanceUID
        for study in dataset.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


@pytest.mark.parametrize("demo", [False, True], ids=["clinical", "demo"])
@pytest.mark.parametrize("case", list(CASES))
def test_reports_are_valid_and_say_what_the_text_says(case: str, demo: bool, tmp_path: Path) -> None:
    truth = CASES[case]
    text = render(truth, random.Random(7))
    parsed = parse(text)
    sources = mr_series(4, with_pixels=False)

    pair = build_reports(
        sources, text, parsed, ALGORITHM, input_hash=INPUT_HASH, content_datetime=WHEN, synthetic_demo=demo
    )

    for name, document in (("narrative", pair.narrative), ("measurement", pair.measurement)):
        path = _written(document, tmp_path, name)
        assert validate_sr(path) == [], name
        back = pydicom.dcmread(path)
        assert back.VerificationFlag == "UNVERIFIED"
        assert back.CompletionFlag == "COMPLETE"
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        assert back.SeriesInstanceUID != sources[0].SeriesInstanceUID
        assert back.PatientID == sources[0].PatientID and back.PatientName == sources[0].PatientName
        assert is_produced_by_node(back.Manufacturer, back.Modality)
        assert _evidence_uids(back) == {ds.SOPInstanceUID for ds in sources}
        assert "PertinentOtherEvidenceSequence" not in back
        assert "PredecessorDocumentsSequence" not in back
        assert (back.ContentDate, back.ContentTime) == ("20240506", "103015.250000")

    measurement = pydicom.dcmread(_written(pair.measurement, tmp_path, "measurement"))
    coded = read_coded_findings(measurement)
    assert coded == _coded_subset(parsed) == _coded_subset(truth)
    assert coded.side == parsed.side == truth.side  # the one field that must never flip

    narrative = read_narrative(pydicom.dcmread(_written(pair.narrative, tmp_path, "narrative")))
    assert narrative.findings == (text,)
    assert parse(narrative.impressions[0]).side == truth.side
    assert parse(narrative.impressions[0]).lobes == truth.lobes
    expected_comments = (AI_DISCLAIMER, DEMO_DISCLAIMER) if demo else (AI_DISCLAIMER,)
    assert narrative.comments == expected_comments


def test_laterality_codes_are_snomed_left_and_right_not_swapped() -> None:
    sources = mr_series(2, with_pixels=False)
    left, right = (
        _reports(sources, f).measurement
        for f in (LEFT_FRONTAL, Findings(abnormal=True, side=Side.RIGHT, lobes=frozenset({Lobe.FRONTAL})))
    )

    def lateralities(document: Dataset) -> set[str]:
        report = hd.sr.Comprehensive3DSR.from_dataset(document).content
        group = report.get_image_measurement_groups()[0]
        return {site.laterality.value for site in group.finding_sites}

    assert lateralities(left) == {codes.SCT.Left.value} == {"7771000"}
    assert lateralities(right) == {codes.SCT.Right.value} == {"24028007"}


def test_round_trip_through_highdicom_srread(tmp_path: Path) -> None:
    pair = _reports(mr_series(3, with_pixels=False), RIGHT_TEMPOROPARIETAL)
    measurement = hd.sr.srread(_written(pair.measurement, tmp_path, "m"))
    narrative = hd.sr.srread(_written(pair.narrative, tmp_path, "n"))

    assert isinstance(measurement, hd.sr.Comprehensive3DSR)
    assert isinstance(measurement.content, hd.sr.MeasurementReport)
    group = measurement.content.get_image_measurement_groups()[0]
    assert group.finding_type == codes.SCT.Lesion
    assert {site.value for site in group.finding_sites} == {codes.SCT.TemporalLobe, codes.SCT.ParietalLobe}
    algorithm = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
    assert f"checkpoint sha256 {ALGORITHM.checkpoint_sha256}" in {item.value for item in algorithm}
    assert isinstance(narrative, hd.sr.ComprehensiveSR)
    assert narrative.content[0].name == codes.LN.DiagnosticImagingReport
    assert narrative.content[0].ContentTemplateSequence[0].TemplateIdentifier == "2000"
    observer = hd.sr.utils.find_content_items(narrative.content[0], name=codes.DCM.DeviceObserverManufacturer)
    assert [item.value for item in observer] == [MANUFACTURER]


def test_same_inputs_give_identical_bytes_and_uids_follow_the_inputs() -> None:
    sources = mr_series(5, with_pixels=False)
    text = render(LEFT_FRONTAL)

    def build(**changes) -> tuple[bytes, bytes, Dataset]:
        arguments = {
            "input_hash": INPUT_HASH,
            "content_datetime": WHEN,
            "synthetic_demo": True,
            "algorithm": ALGORITHM,
            "sources": sources,
        } | changes
        pair = build_reports(
            arguments.pop("sources"), text, LEFT_FRONTAL, arguments.pop("algorithm"), **arguments
        )
        return sr_bytes(pair.narrative), sr_bytes(pair.measurement), pair.measurement

    first, second = build(), build(sources=list(reversed(sources)) + sources[:2])  # order, duplicates
    assert first[:2] == second[:2]
    uids = report_uids(sources[0].SeriesInstanceUID, ALGORITHM, INPUT_HASH)
    assert first[2].SOPInstanceUID == uids.measurement and first[2].SeriesInstanceUID == uids.series

    later = build(content_datetime=datetime(2024, 5, 6, 11, 0, 0))
    assert later[2].SOPInstanceUID == first[2].SOPInstanceUID  # time is not identity
    assert later[:2] != first[:2]
    other_input = build(input_hash="c3" * 32)[2]
    other_model = build(algorithm=AlgorithmIdentity("Brain3D", "0.1.0", "d4" * 32))[2]
    assert len({first[2].SOPInstanceUID, other_input.SOPInstanceUID, other_model.SOPInstanceUID}) == 3
    assert (
        len({first[2].SeriesInstanceUID, other_input.SeriesInstanceUID, other_model.SeriesInstanceUID}) == 3
    )


def test_uids_are_the_same_in_another_process() -> None:
    """Exactly-once delivery rests on this: a worker on another machine derives the same UIDs."""
    import subprocess
    import sys

    program = (
        "from dicom_node.sr import AlgorithmIdentity, report_uids;"
        f"a = AlgorithmIdentity('Brain3D', '0.1.0', '{ALGORITHM.checkpoint_sha256}');"
        "u = report_uids('1.2.3', a, 'h');"
        "print(u.series, u.narrative, u.measurement)"
    )
    there = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    ).stdout.split()
    here = report_uids("1.2.3", ALGORITHM, "h")
    assert there == [here.series, here.narrative, here.measurement]
    for uid in there:
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


@pytest.mark.parametrize("kind", ["narrative", "measurement"])
def test_only_time_fields_differ_between_two_report_times(kind: str) -> None:
    sources = mr_series(2, with_pixels=False)
    a, b = (
        getattr(
            build_reports(
                sources,
                render(LEFT_FRONTAL),
                LEFT_FRONTAL,
                ALGORITHM,
                input_hash=INPUT_HASH,
                content_datetime=t,
                synthetic_demo=False,
            ),
            kind,
        )
        for t in (WHEN, datetime(2025, 1, 1, 0, 0, 0))
    )
    differing = {element.keyword for element in a if element.value != b.get(element.tag).value}
    assert {"ContentDate", "ContentTime"} <= differing, "the report time is the content time"
    assert differing <= {
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContributingEquipmentSequence",
    }


@pytest.mark.parametrize("stated", ["+0200", "-0430", None])
def test_the_report_time_is_written_in_the_study_time_zone(tmp_path: Path, monkeypatch, stated) -> None:
    """An SR's TimezoneOffsetFromUTC applies to every date and time in it, the copied StudyDate and
    StudyTime too: it states the source's own offset, with the report time in that zone, or none,
    with the report time in the node's local time, as the scanner's study time is."""
    monkeypatch.setenv("TZ", "Etc/GMT-3")  # the node's local time: UTC+3
    time.tzset()
    try:
        sources = mr_series(1, with_pixels=False)
        if stated is not None:
            sources[0].TimezoneOffsetFromUTC = stated
        pair = build_reports(
            sources, render(NORMAL), NORMAL, ALGORITHM, input_hash=INPUT_HASH,
            content_datetime=datetime(2024, 5, 6, 10, 30, 15, tzinfo=UTC), synthetic_demo=False,
        )  # fmt: skip
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    expected_time = {"+0200": "123015", "-0430": "060015", None: "133015"}[stated]
    for report in (pair.narrative, pair.measurement):
        assert report.get("TimezoneOffsetFromUTC") == stated
        assert (str(report.ContentDate), str(report.ContentTime)) == ("20240506", expected_time)
        assert report.StudyTime == sources[0].StudyTime  # copied as it was
    assert validate_sr(_written(pair.narrative, tmp_path, "n")) == []


def test_reprocessed_series_cites_its_predecessors(tmp_path: Path) -> None:
    sources = mr_series(3, with_pixels=False)
    first = _reports(sources)
    late = mr_series(
        1, study_uid=sources[0].StudyInstanceUID, series_uid=sources[0].SeriesInstanceUID, with_pixels=False
    )
    late[0].InstanceNumber = 4
    second = build_reports(
        sources + late,
        render(LEFT_FRONTAL),
        LEFT_FRONTAL,
        ALGORITHM,
        input_hash="e5" * 32,
        content_datetime=WHEN,
        synthetic_demo=False,
        predecessors=[first.narrative, first.measurement],
    )
    for name, document in (("n", second.narrative), ("m", second.measurement)):
        path = _written(document, tmp_path, name)
        assert validate_sr(path) == []
        back = pydicom.dcmread(path)
        cited = {
            item.ReferencedSOPInstanceUID
            for study in back.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert cited == {first.narrative.SOPInstanceUID, first.measurement.SOPInstanceUID}
        assert _evidence_uids(back) == {ds.SOPInstanceUID for ds in sources + late}
    assert second.narrative.SeriesInstanceUID != first.narrative.SeriesInstanceUID


def test_not_analysed_report_says_why(tmp_path: Path) -> None:
    sources = mr_series(3, with_pixels=False)
    reason = "duplicate slice positions at 10.0 mm"
    document = not_analysed_report(
        sources, reason, ALGORITHM, input_hash=INPUT_HASH, content_datetime=WHEN, synthetic_demo=True
    )
    path = _written(document, tmp_path, "not-analysed")
    assert validate_sr(path) == []
    text = read_narrative(pydicom.dcmread(path))
    assert reason in text.findings[0]
    assert text.comments == (AI_DISCLAIMER, DEMO_DISCLAIMER)
    assert _evidence_uids(document) == {ds.SOPInstanceUID for ds in sources}
    assert (
        document.SOPInstanceUID
        == report_uids(sources[0].SeriesInstanceUID, ALGORITHM, INPUT_HASH).not_analysed
    )


def test_enhanced_mr_multiframe_source(tmp_path: Path) -> None:
    source = enhanced_mr(10)
    pair = _reports([source], BILATERAL_OCCIPITAL)
    for name, document in (("n", pair.narrative), ("m", pair.measurement)):
        assert validate_sr(_written(document, tmp_path, name)) == []
        assert _evidence_uids(document) == {source.SOPInstanceUID}
        evidence_class = document.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence_class.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert read_coded_findings(pair.measurement).side is Side.BILATERAL


def test_sparse_and_non_ascii_source_headers(tmp_path: Path) -> None:
    sources = mr_series(2, patient_name="Müller^Jörg", with_pixels=False)
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 192"
        del ds.PatientBirthDate, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName
    pair = _reports(sources)
    path = _written(pair.narrative, tmp_path, "n")
    assert validate_sr(path) == []
    assert str(pydicom.dcmread(path).PatientName) == "Müller^Jörg"
    assert "PatientBirthDate" not in sources[0]  # the caller's datasets are not modified


@pytest.mark.parametrize(
    ("character_set", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # Japanese, as PS3.5 H.3 writes it
        (["", "ISO 2022 IR 149"], "Hong^Gildong=홍^길동"),  # Korean
        ("GB18030", "Wang^XiaoDong=王^小东"),
        ("ISO_IR 6", "Doe^John"),  # the default repertoire, declared
    ],
    ids=["japanese", "korean", "chinese", "declared-ascii"],
)
def test_sources_in_any_character_set_give_a_utf8_sr_with_the_same_names(
    tmp_path: Path, character_set: str | list[str], name: str
) -> None:
    """The names as the source decodes them, in UTF-8, where highdicom refuses to copy several
    common declarations (the report would otherwise never be sent for such a site)."""
    sources = []
    for dataset in mr_series(2, patient_name=name, with_pixels=False):
        dataset.SpecificCharacterSet = character_set
        dataset.PatientName = name
        written = _written(dataset, tmp_path, dataset.SOPInstanceUID)  # encoded in that set
        sources.append(pydicom.dcmread(written, stop_before_pixels=True))
    path = _written(_reports(sources).narrative, tmp_path, "n")
    assert validate_sr(path) == []
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == name
    assert sources[0].SpecificCharacterSet == character_set  # the caller's datasets are not modified


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", "1970-01-31"),  # ISO, not DICOM's YYYYMMDD: highdicom refuses it
        ("PatientSex", "Female"),  # not one of M, F, O: highdicom refuses it
    ],
)
def test_a_malformed_type_2_value_is_left_empty_rather_than_failing_the_report(
    tmp_path: Path, keyword: str, value: str
) -> None:
    sources = mr_series(2, with_pixels=False)
    for ds in sources:
        setattr(ds, keyword, value)
    pair = _reports(sources)
    path = _written(pair.measurement, tmp_path, "m")
    assert validate_sr(path) == []
    written = pydicom.dcmread(path)
    assert getattr(written, keyword) == "" and written.PatientID == sources[0].PatientID
    assert getattr(sources[0], keyword) == value  # the caller's datasets are not modified


def test_malformed_optional_patient_and_study_values_are_left_out(tmp_path: Path) -> None:
    """Type 3 values a scanner got wrong (an age "45Y", a weight "72,5") are not copied: the SR
    would fail validation and never be sent. The identifiers are."""
    sources = mr_series(2, with_pixels=False)
    for ds in sources:
        ds.PatientAge, ds.StudyDescription = "45Y", "MRI BRAIN " * 8  # AS is nnnY; LO holds 64
        ds.AdmittingDiagnosesDescription = "suspected glioma " * 5  # the Patient Study module
        ds.ConsultingPhysicianName = "Doe^A" * 20  # PN: 64 characters, five components
    path = _written(_reports(sources).narrative, tmp_path, "n")
    assert validate_sr(path) == []
    written = pydicom.dcmread(path)
    left_out = {"PatientAge", "StudyDescription", "AdmittingDiagnosesDescription", "ConsultingPhysicianName"}
    assert not left_out & set(written.dir())
    assert (written.PatientID, written.PatientName) == (sources[0].PatientID, sources[0].PatientName)
    assert sources[0].PatientAge == "45Y"  # the caller's datasets are not modified


@pytest.mark.parametrize(
    "name",
    ["DOE^JOHN" + "X" * 70, "DOE<JR>^JOHN" + "X" * 70, "DOE^JOHN\nJR"],
    ids=["plain", "angled", "line-break"],
)
def test_validator_messages_withhold_the_values_they_quote(tmp_path: Path, name: str) -> None:
    """An invalid patient name (longer than PN's 64 characters) fails validation; the message
    names the attribute, not the patient, even where the name holds the brackets it is quoted in."""
    sources = mr_series(2, patient_name=name, with_pixels=False)
    pair = _reports(sources, NORMAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = validate_sr(_written(pair.narrative, tmp_path, "n"))
    assert any("Patient's Name" in error and "<value withheld>" in error for error in errors)
    assert not any(part in error for error in errors for part in ("DOE", "JR", "JOHN"))
    assert not any("DOE" in str(warning.message) for warning in caught)


def test_building_an_sr_warns_with_no_patient_name() -> None:
    """A single-part name is legal DICOM; highdicom warns about it, quoting it, into the worker's log."""
    sources = mr_series(2, patient_name="MUSTERMANN", with_pixels=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = _reports(sources, NORMAL)
    assert str(pair.narrative.PatientName) == "MUSTERMANN"
    assert not any("MUSTERMANN" in str(warning.message) for warning in caught)


def test_a_source_in_latin1_gives_utf8_text_in_copied_sequences_too(tmp_path: Path) -> None:
    """The SR is labelled UTF-8; a copied sequence's text must be re-encoded with it, not written
    back as the source's Latin-1 bytes under the new label."""
    sources = []
    for dataset in mr_series(2, patient_name="Müller^Jörg", with_pixels=False):
        dataset.SpecificCharacterSet = "ISO_IR 100"
        procedure = Dataset()
        procedure.CodeValue, procedure.CodingSchemeDesignator = "MRKOPF", "99LOCAL"
        procedure.CodeMeaning = "MRT Schädel nativ"
        dataset.ProcedureCodeSequence = [procedure]
        dataset.StudyDescription = "Schädel"
        written = _written(dataset, tmp_path, dataset.SOPInstanceUID)  # encoded in Latin-1
        sources.append(pydicom.dcmread(written, stop_before_pixels=True))
    path = _written(_reports(sources).narrative, tmp_path, "n")
    assert validate_sr(path) == []
    raw = path.read_bytes()
    assert "Schädel nativ".encode() in raw and "Schädel".encode("latin-1") not in raw
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.ProcedureCodeSequence[0].CodeMeaning == "MRT Schädel nativ"


def test_sources_from_two_series_are_refused() -> None:
    with pytest.raises(ValueError, match="2 series"):
        build_reports(
            mr_series(1, with_pixels=False) + mr_series(1, with_pixels=False),
            "x",
            NORMAL,
            ALGORITHM,
            input_hash=INPUT_HASH,
            content_datetime=WHEN,
            synthetic_demo=False,
        )


def test_validators_report_errors_of_a_broken_sr(tmp_path: Path) -> None:
    pair = _reports(mr_series(1, with_pixels=False), NORMAL)
    missing_flag = pydicom.dcmread(io.BytesIO(sr_bytes(pair.narrative)))
    del missing_flag.CompletionFlag
    missing_flag.save_as(tmp_path / "flag.dcm")
    errors = validate_sr(tmp_path / "flag.dcm")
    assert any(e.startswith("dciodvfy:") and "CompletionFlag" in e for e in errors)

    bad_relationship = pydicom.dcmread(io.BytesIO(sr_bytes(pair.narrative)))
    bad_relationship.ContentSequence[2].RelationshipType = "HAS PROPERTIES"
    bad_relationship.save_as(tmp_path / "tree.dcm")
    errors = validate_sr(tmp_path / "tree.dcm")
    assert any(e.startswith("dsrdump:") and "Relationship" in e for e in errors)


def test_the_only_warnings_are_the_declared_local_codes(tmp_path: Path) -> None:
    """dciodvfy does not know the private scheme; nothing else may draw a warning."""
    pair = _reports(mr_series(2, with_pixels=False))
    assert warnings_of(_written(pair.narrative, tmp_path, "n")) == []
    measurement_warnings = warnings_of(_written(pair.measurement, tmp_path, "m"))
    assert measurement_warnings and all("<99BRAIN3D>" in warning for warning in measurement_warnings)
    scheme = pair.measurement.CodingSchemeIdentificationSequence[0]
    assert scheme.CodingSchemeDesignator == "99BRAIN3D"


def test_untrusted_model_text_with_control_characters_still_gives_a_valid_sr(tmp_path: Path) -> None:
    garbage = "Lesion in the left\x11 frontal lobe\x00 with edema (Ödem).\ufffd\x7f\nNo necrosis."
    pair = build_reports(
        mr_series(3, with_pixels=False),
        garbage,
        parse(garbage),
        ALGORITHM,
        input_hash=INPUT_HASH,
        content_datetime=WHEN,
        synthetic_demo=False,
    )
    path = _written(pair.narrative, tmp_path, "garbage")
    assert validate_sr(path) == []
    assert read_narrative(pydicom.dcmread(path)).findings[0] == (
        "Lesion in the left frontal lobe with edema (Ödem).\nNo necrosis."
    )


def test_malformed_patient_values_are_never_quoted_in_warnings_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom quotes a malformed value it reads (a birth date, an age) in a warning, which the
    worker logs: the node reads values as they are and never quotes them."""
    import warnings

    sources = []
    for index, ds in enumerate(mr_series(2, with_pixels=False)):
        ds.PatientBirthDate, ds.PatientAge = "1970-01-31", "45 years"
        path = tmp_path / f"source{index}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # writing them is the test's doing, not the node's
            ds.save_as(path, enforce_file_format=True)
        sources.append(path)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level("DEBUG"):
        warnings.simplefilter("always")
        _reports([pydicom.dcmread(path, stop_before_pixels=True) for path in sources])
    said = [str(warning.message) for warning in seen] + [record.getMessage() for record in caplog.records]
    assert not [text for text in said if "1970-01-31" in text or "45 years" in text]
