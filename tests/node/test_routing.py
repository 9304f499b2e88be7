"""The FLAIR router on vendor-like headers written by hand, and on the writer's presets.

The header table is deliberately independent of ``dicom_node.series_writer``:
values are typical of what Siemens, GE and Philips scanners write.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicom_node.acquisition import PRESETS
from dicom_node.config import RoutingRule, RoutingSettings
from dicom_node.routing import RoutingDecision, route_series
from dicom_node.series_writer import build_series

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def header(**attributes: Any) -> Dataset:
    """A Dataset from keyword=value pairs; lists of dicts become sequences."""
    ds = Dataset()
    for keyword, value in attributes.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = [header(**item) for item in value]
        setattr(ds, keyword, value)
    return ds


def mr(**attributes: Any) -> Dataset:
    base: dict[str, Any] = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}
    base.update(attributes)
    return header(**base)


SIEMENS_2D_FLAIR = dict(
    Manufacturer="SIEMENS",
    BodyPartExamined="HEAD",
    SeriesDescription="t2_tirm_tra_dark-fluid",
    ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
    ScanningSequence=["SE", "IR"],
    SequenceVariant=["SK", "SP", "MP"],
    ScanOptions="IR",
    MRAcquisitionType="2D",
    SequenceName="*tir2d1_16",
    RepetitionTime="9000",
    EchoTime="81",
    InversionTime="2500",
)

CASES: list[tuple[str, dict[str, Any], bool, str, str]] = [
    ("siemens 2D FLAIR tirm dark-fluid", SIEMENS_2D_FLAIR, True, "flair", "FLAIR"),
    (
        "siemens 3D SPACE FLAIR",
        dict(
            Manufacturer="SIEMENS",
            BodyPartExamined="HEAD",
            SeriesDescription="t2_space_dark-fluid_sag_p2_iso",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            ScanOptions=["IR", "PFP"],
            MRAcquisitionType="3D",
            SequenceName="*spcir_278ns",
            RepetitionTime="5000",
            EchoTime="387",
            InversionTime="1800",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "GE 3D CUBE FLAIR",
        dict(
            Manufacturer="GE MEDICAL SYSTEMS",
            BodyPartExamined="HEAD",
            SeriesDescription="Sag CUBE T2 FLAIR",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "MP", "OSP"],
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "IR_GEMS", "ACC_GEMS"],
            MRAcquisitionType="3D",
            SequenceName="3DFSE",
            RepetitionTime="6000",
            EchoTime="130.6",
            InversionTime="1879",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "GE 2D Ax T2 FLAIR",
        dict(
            Manufacturer="GE MEDICAL SYSTEMS",
            BodyPartExamined="BRAIN",
            SeriesDescription="Ax T2 FLAIR",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SS"],
            ScanOptions=["FAST_GEMS", "IR_GEMS", "FILTERED_GEMS"],
            MRAcquisitionType="2D",
            RepetitionTime="9000",
            EchoTime="140",
            InversionTime="2250",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "Philips 3D VISTA FLAIR, Enhanced MR, body part absent, head coil",
        dict(
            SOPClassUID=ENHANCED_MR,
            Manufacturer="Philips",
            SeriesDescription="3D_Brain_VIEW_FLAIR SENSE",
            ImageType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
            EchoPulseSequence="SPIN",
            MRAcquisitionType="3D",
            PulseSequenceName="TSE",
            SharedFunctionalGroupsSequence=[
                dict(
                    MRTimingAndRelatedParametersSequence=[dict(RepetitionTime=4800.0, FlipAngle=90.0)],
                    MREchoSequence=[dict(EffectiveEchoTime=340.0)],
                    MRModifierSequence=[dict(InversionRecovery="YES", InversionTimes=[1650.0])],
                    MRReceiveCoilSequence=[dict(ReceiveCoilName="HEAD 32")],
                )
            ],
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "Philips 2D T2W_FLAIR classic",
        dict(
            Manufacturer="Philips Medical Systems",
            BodyPartExamined="HEAD",
            SeriesDescription="T2W_FLAIR",
            ScanningSequence="IR",
            SequenceVariant="SK",
            ScanOptions="FS",
            MRAcquisitionType="2D",
            RepetitionTime="11000",
            EchoTime="125",
            InversionTime="2800",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "GE Ax T1 FLAIR",
        dict(
            Manufacturer="GE MEDICAL SYSTEMS",
            BodyPartExamined="HEAD",
            SeriesDescription="Ax T1 FLAIR",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SS"],
            ScanOptions=["FAST_GEMS", "IR_GEMS"],
            MRAcquisitionType="2D",
            RepetitionTime="2250",
            EchoTime="24",
            InversionTime="860",
        ),
        False,
        "t1_flair",
        "T1_FLAIR",
    ),
    (
        "Siemens STIR",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="t2_tirm_cor_stir",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            ScanOptions="IR",
            MRAcquisitionType="2D",
            RepetitionTime="5000",
            EchoTime="60",
            InversionTime="180",
        ),
        False,
        "stir",
        "STIR",
    ),
    (
        "Siemens MPRAGE",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="t1_mprage_sag_p2_iso",
            ScanningSequence=["GR", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            ScanOptions="IR",
            MRAcquisitionType="3D",
            SequenceName="*tfl3d1_16ns",
            RepetitionTime="2300",
            EchoTime="2.98",
            InversionTime="900",
        ),
        False,
        "mprage",
        "MPRAGE",
    ),
    (
        "Siemens DWI trace",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="ep2d_diff_3scan_trace_p2",
            ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "NORM"],
            ScanningSequence="EP",
            SequenceVariant=["SK", "SP"],
            MRAcquisitionType="2D",
            SequenceName="*ep_b1000t",
            RepetitionTime="5000",
            EchoTime="89",
        ),
        False,
        "diffusion",
        "DWI",
    ),
    (
        "Siemens ADC map (derived)",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="ep2d_diff_3scan_trace_p2_ADC",
            ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"],
            ScanningSequence="EP",
            RepetitionTime="5000",
            EchoTime="89",
        ),
        False,
        "derived",
        "DERIVED",
    ),
    (
        "GE 3-plane localizer",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="3-Plane Loc",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
            ScanningSequence="GR",
            RepetitionTime="5.1",
            EchoTime="1.6",
        ),
        False,
        "localizer",
        "LOCALIZER",
    ),
    (
        "Siemens T2 TSE",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="t2_tse_tra_p2",
            ScanningSequence="SE",
            SequenceVariant=["SK", "SP", "OSP"],
            MRAcquisitionType="2D",
            RepetitionTime="5000",
            EchoTime="100",
        ),
        False,
        "not_inversion_recovery",
        "T2",
    ),
    (
        "Siemens SWI magnitude",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="t2_swi_tra_p2_2mm_Mag",
            ScanningSequence="GR",
            SequenceVariant=["SP", "OSP"],
            MRAcquisitionType="3D",
            RepetitionTime="27",
            EchoTime="20",
        ),
        False,
        "not_inversion_recovery",
        "SWI",
    ),
    (
        "GE post-contrast T1",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="Ax T1 SE +C",
            ContrastBolusAgent="Gadavist",
            ScanningSequence="SE",
            SequenceVariant="SK",
            MRAcquisitionType="2D",
            RepetitionTime="500",
            EchoTime="10",
        ),
        False,
        "not_inversion_recovery",
        "T1_POST_CONTRAST",
    ),
    (
        "SPACE FLAIR transverse MPR (derived)",
        dict(
            SIEMENS_2D_FLAIR,
            ImageType=["DERIVED", "SECONDARY", "MPR"],
            SeriesDescription="t2_space_FLAIR_MPR_tra",
        ),
        False,
        "derived",
        "DERIVED",
    ),
    (
        "FLAIR description on T2 physics",
        dict(
            BodyPartExamined="HEAD",
            SeriesDescription="AX FLAIR",
            ScanningSequence="SE",
            MRAcquisitionType="2D",
            RepetitionTime="4000",
            EchoTime="100",
        ),
        False,
        "description_physics_mismatch",
        "T2",
    ),
    (
        "FLAIR physics of the spine",
        dict(SIEMENS_2D_FLAIR, BodyPartExamined="CSPINE"),
        False,
        "not_head",
        "UNKNOWN",
    ),
    (
        "FLAIR description, physics stripped",
        dict(BodyPartExamined="HEAD", SeriesDescription="AX FLAIR"),
        False,
        "physics_missing",
        "UNKNOWN",
    ),
    (
        "inversion recovery without TI, FLAIR TE/TR and description",
        dict(SIEMENS_2D_FLAIR, InversionTime=None, SeriesDescription="Ax FLAIR"),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "inversion recovery without TI nor FLAIR description",
        dict(SIEMENS_2D_FLAIR, InversionTime=None, SeriesDescription="t2_tirm_tra"),
        False,
        "inversion_time_missing",
        "IR_OTHER",
    ),
    ("CT head", dict(SIEMENS_2D_FLAIR, Modality="CT"), False, "not_mr", "NON_MR"),
    (
        "body part absent, brain in the study description",
        dict(SIEMENS_2D_FLAIR, BodyPartExamined=None, StudyDescription="MRI BRAIN W/O"),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "body part absent, no head hint",
        dict(SIEMENS_2D_FLAIR, BodyPartExamined=None, SeriesDescription="t2_tirm_tra_dark-fluid"),
        False,
        "not_head",
        "UNKNOWN",
    ),
    (
        "MP2RAGE second inversion: long TI, short TE",
        dict(
            SIEMENS_2D_FLAIR,
            SeriesDescription="mp2rage_INV2",
            ScanningSequence=["GR", "IR"],
            MRAcquisitionType="3D",
            RepetitionTime="5000",
            EchoTime="2.9",
            InversionTime="2500",
        ),
        False,
        "echo_time_too_short",
        "IR_OTHER",
    ),
    (
        "Enhanced double inversion recovery",
        dict(
            SOPClassUID=ENHANCED_MR,
            BodyPartExamined="BRAIN",
            SeriesDescription="3D DIR",
            ImageType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
            EchoPulseSequence="SPIN",
            MRAcquisitionType="3D",
            SharedFunctionalGroupsSequence=[
                dict(
                    MRTimingAndRelatedParametersSequence=[dict(RepetitionTime=7500.0)],
                    MREchoSequence=[dict(EffectiveEchoTime=300.0)],
                    MRModifierSequence=[dict(InversionRecovery="YES", InversionTimes=[3000.0, 450.0])],
                )
            ],
        ),
        False,
        "double_inversion_recovery",
        "DIR",
    ),
    *[
        (
            f"Classic double inversion recovery named {name!r}",
            dict(
                BodyPartExamined="BRAIN",
                SeriesDescription=name,
                ScanningSequence=["SE", "IR"],
                MRAcquisitionType="3D",
                RepetitionTime="7500",
                EchoTime="300",
                InversionTime="3000",
            ),
            False,
            "double_inversion_recovery",
            "DIR",
        )
        for name in ("Sag 3D Double IR", "t2_spc_DoubleIR_sag", "3D dual inversion")
    ],
    (
        "GE 3D CUBE FLAIR in research mode (ScanningSequence RM), FLAIR named in its options",
        dict(
            Manufacturer="GE MEDICAL SYSTEMS",
            BodyPartExamined="HEAD",
            SeriesDescription="Sag CUBE T2 FLAIR",
            ScanningSequence="RM",
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "T2FLAIR_GEMS"],
            MRAcquisitionType="3D",
            RepetitionTime="6000",
            EchoTime="130",
            InversionTime="1879",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "GE 2D T2 FLAIR coded SE with T2FLAIR_GEMS",
        dict(
            Manufacturer="GE MEDICAL SYSTEMS",
            BodyPartExamined="BRAIN",
            SeriesDescription="Ax T2 FLAIR",
            ScanningSequence="SE",
            ScanOptions=["FAST_GEMS", "T2FLAIR_GEMS", "FILTERED_GEMS"],
            MRAcquisitionType="2D",
            RepetitionTime="9000",
            EchoTime="120",
            InversionTime="2250",
        ),
        True,
        "flair",
        "FLAIR",
    ),
    (
        "spine FLAIR without BodyPartExamined, head/neck/spine coil",
        dict(
            SIEMENS_2D_FLAIR,
            BodyPartExamined=None,
            SeriesDescription="t2_tirm_sag_dark-fluid",
            ReceiveCoilName="HE1-4;NE1,2;SP1",
        ),
        False,
        "not_head",
        "UNKNOWN",
    ),
    (
        "spine FLAIR without BodyPartExamined in a brain and spine study",
        dict(
            SIEMENS_2D_FLAIR,
            BodyPartExamined=None,
            SeriesDescription="Sag C-spine FLAIR",
            StudyDescription="MRI Brain and C-Spine",
        ),
        False,
        "not_head",
        "UNKNOWN",
    ),
    (
        "Classic double inversion recovery: one TI in the header, FLAIR-like physics, named",
        dict(
            BodyPartExamined="BRAIN",
            SeriesDescription="t2_spc_DIR_sag",
            ScanningSequence=["SE", "IR"],
            MRAcquisitionType="3D",
            RepetitionTime="7500",
            EchoTime="320",
            InversionTime="3000",
        ),
        False,
        "double_inversion_recovery",
        "DIR",
    ),
]


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}


@pytest.mark.parametrize(
    ("attributes", "eligible", "code", "sequence"),
    [pytest.param(_clean(a), e, c, s, id=name) for name, a, e, c, s in CASES],
)
def test_vendor_headers_are_routed_by_physics(attributes, eligible, code, sequence) -> None:
    decision = route_series(mr(**attributes), RoutingSettings())
    assert isinstance(decision, RoutingDecision)
    assert (decision.eligible, decision.code, decision.sequence) == (eligible, code, sequence), (
        decision.reason
    )


def test_the_table_covers_at_least_fifteen_vendor_header_sets() -> None:
    assert len(CASES) >= 15
    assert sum(eligible for _, _, eligible, _, _ in CASES) >= 5


def test_thresholds_come_from_the_settings() -> None:
    stricter = RoutingSettings(min_inversion_time_ms=2600.0)
    decision = route_series(mr(**SIEMENS_2D_FLAIR), stricter)
    assert not decision.eligible
    assert decision.code == "inversion_time_too_short"
    long_te = RoutingSettings(min_echo_time_ms=90.0)
    assert route_series(mr(**SIEMENS_2D_FLAIR), long_te).code == "echo_time_too_short"
    long_tr = RoutingSettings(min_repetition_time_ms=10000.0)
    assert route_series(mr(**SIEMENS_2D_FLAIR), long_tr).code == "repetition_time_too_short"


def test_exclude_rule_overrides_eligible_physics_and_keeps_the_sequence() -> None:
    settings = RoutingSettings(
        rules=[
            RoutingRule(
                action="exclude", match={"SeriesDescription": "*dark-fluid*"}, reason="research protocol"
            )
        ]
    )
    decision = route_series(mr(**SIEMENS_2D_FLAIR), settings)
    assert (decision.eligible, decision.code, decision.sequence) == (False, "rule_exclude", "FLAIR")
    assert "research protocol" in decision.reason


def test_include_rule_accepts_what_physics_cannot_decide() -> None:
    stripped = mr(BodyPartExamined="HEAD", SeriesDescription="AX FLAIR", StationName="MR1")
    assert not route_series(stripped, RoutingSettings()).eligible
    settings = RoutingSettings(
        rules=[RoutingRule(action="include", match={"SeriesDescription": "ax flair", "StationName": "MR1"})]
    )
    decision = route_series(stripped, settings)
    assert (decision.eligible, decision.code) == (True, "rule_include")
    other_station = mr(BodyPartExamined="HEAD", SeriesDescription="AX FLAIR", StationName="MR2")
    assert route_series(other_station, settings).code == "physics_missing"


def test_first_matching_rule_wins() -> None:
    settings = RoutingSettings(
        rules=[
            RoutingRule(action="include", match={"ScanningSequence": "SE\\IR"}),
            RoutingRule(action="exclude", match={"SeriesDescription": "t2_tirm*"}),
        ]
    )
    assert route_series(mr(**SIEMENS_2D_FLAIR), settings).code == "rule_include"
    reversed_rules = RoutingSettings(rules=list(reversed(settings.rules)))
    assert route_series(mr(**SIEMENS_2D_FLAIR), reversed_rules).code == "rule_exclude"


def test_rule_on_a_missing_attribute_matches_only_the_empty_pattern() -> None:
    settings = RoutingSettings(rules=[RoutingRule(action="exclude", match={"StationName": ""})])
    assert route_series(mr(**SIEMENS_2D_FLAIR), settings).code == "rule_exclude"
    assert route_series(mr(**SIEMENS_2D_FLAIR, StationName="MR1"), settings).code == "flair"


def test_a_rule_on_a_misspelt_keyword_is_refused_with_the_keyword_named() -> None:
    # Read as an absent attribute, "SeriesDescripton": "*" would match every series.
    with pytest.raises(ValidationError, match="SeriesDescripton: not a DICOM keyword"):
        RoutingRule(action="include", match={"SeriesDescripton": "*", "StationName": "MR1"})


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_writer_presets_are_routed_as_documented(preset, enhanced) -> None:
    volume = np.arange(6 * 6 * 4, dtype=np.float32).reshape(6, 6, 4)
    datasets = build_series(volume, np.eye(4), preset=preset, enhanced=enhanced, seed=3)
    decision = route_series(datasets[0], RoutingSettings())
    expected_code = "flair" if preset.expected_route == "eligible" else preset.expected_route
    assert decision.eligible == (preset.expected_route == "eligible"), decision.reason
    assert decision.code == expected_code, decision.reason
