"""MR acquisition presets: the header physics a scanner would write for each sequence.

The values are typical of 1.5 T / 3 T brain protocols (Siemens-style coded
attributes). The router classifies FLAIR from exactly these attributes, so each
preset documents what the router is expected to decide (``expected_route``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class AcquisitionPreset:
    """The acquisition attributes of one MR sequence, as written in its headers."""

    name: str
    series_description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    mr_acquisition_type: Literal["2D", "3D"]
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    flip_angle: float
    sequence_name: str
    echo_train_length: int = 1
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    #: Enhanced MR Image Type value 3 (image flavor).
    image_flavor: str = "VOLUME"
    #: Enhanced MR Pulse Sequence module: SPIN, GRADIENT or BOTH.
    echo_pulse_sequence: Literal["SPIN", "GRADIENT", "BOTH"] = "SPIN"
    contrast_agent: str | None = None
    magnetic_field_strength: float = 3.0
    #: The router's verdict on this preset: "eligible" or the reason code it must give.
    expected_route: str = field(default="ineligible", compare=False)

    @property
    def is_inversion_recovery(self) -> bool:
        return "IR" in self.scanning_sequence


FLAIR_2D = AcquisitionPreset(
    name="FLAIR_2D",
    series_description="t2_tirm_tra_dark-fluid",
    scanning_sequence=("SE", "IR"),
    sequence_variant=("SK", "SP", "MP"),
    scan_options=("IR",),
    mr_acquisition_type="2D",
    repetition_time=9000.0,
    echo_time=81.0,
    inversion_time=2500.0,
    flip_angle=150.0,
    sequence_name="*tir2d1_16",
    echo_train_length=16,
    expected_route="eligible",
)

FLAIR_3D = AcquisitionPreset(
    name="FLAIR_3D",
    series_description="t2_space_dark-fluid_sag_p2_iso",
    scanning_sequence=("SE", "IR"),
    sequence_variant=("SK", "SP", "MP"),
    scan_options=("IR",),
    mr_acquisition_type="3D",
    repetition_time=5000.0,
    echo_time=387.0,
    inversion_time=1800.0,
    flip_angle=120.0,
    sequence_name="*spcir_278ns",
    echo_train_length=278,
    expected_route="eligible",
)

T1 = AcquisitionPreset(
    name="T1",
    series_description="t1_se_tra",
    scanning_sequence=("SE",),
    sequence_variant=("SK", "SP"),
    scan_options=(),
    mr_acquisition_type="2D",
    repetition_time=550.0,
    echo_time=10.0,
    inversion_time=None,
    flip_angle=90.0,
    sequence_name="*se2d1",
    expected_route="not_inversion_recovery",
)

T1_POST_CONTRAST = AcquisitionPreset(
    name="T1_POST_CONTRAST",
    series_description="t1_se_tra_post_gd",
    scanning_sequence=("SE",),
    sequence_variant=("SK", "SP"),
    scan_options=(),
    mr_acquisition_type="2D",
    repetition_time=550.0,
    echo_time=10.0,
    inversion_time=None,
    flip_angle=90.0,
    sequence_name="*se2d1",
    contrast_agent="Gadobutrol",
    expected_route="not_inversion_recovery",
)

T2 = AcquisitionPreset(
    name="T2",
    series_description="t2_tse_tra",
    scanning_sequence=("SE",),
    sequence_variant=("SK", "SP"),
    scan_options=(),
    mr_acquisition_type="2D",
    repetition_time=5000.0,
    echo_time=100.0,
    inversion_time=None,
    flip_angle=150.0,
    sequence_name="*tse2d1_15",
    echo_train_length=15,
    expected_route="not_inversion_recovery",
)

T1_FLAIR = AcquisitionPreset(
    name="T1_FLAIR",
    series_description="Ax T1 FLAIR",
    scanning_sequence=("SE", "IR"),
    sequence_variant=("SK", "SP", "MP"),
    scan_options=("IR",),
    mr_acquisition_type="2D",
    repetition_time=2000.0,
    echo_time=9.0,
    inversion_time=860.0,
    flip_angle=90.0,
    sequence_name="*tir2d1_7",
    echo_train_length=7,
    expected_route="t1_flair",
)

STIR = AcquisitionPreset(
    name="STIR",
    series_description="t2_tirm_cor_stir",
    scanning_sequence=("SE", "IR"),
    sequence_variant=("SK", "SP", "MP"),
    scan_options=("IR",),
    mr_acquisition_type="2D",
    repetition_time=5000.0,
    echo_time=60.0,
    inversion_time=180.0,
    flip_angle=150.0,
    sequence_name="*tir2d1_13",
    echo_train_length=13,
    expected_route="stir",
)

MPRAGE = AcquisitionPreset(
    name="MPRAGE",
    series_description="t1_mprage_sag_p2_iso",
    scanning_sequence=("GR", "IR"),
    sequence_variant=("SK", "SP", "MP"),
    scan_options=("IR",),
    mr_acquisition_type="3D",
    repetition_time=2300.0,
    echo_time=2.98,
    inversion_time=900.0,
    flip_angle=9.0,
    sequence_name="*tfl3d1_16ns",
    echo_pulse_sequence="GRADIENT",
    expected_route="mprage",
)

LOCALIZER = AcquisitionPreset(
    name="LOCALIZER",
    series_description="localizer",
    scanning_sequence=("GR",),
    sequence_variant=("SP", "OSP"),
    scan_options=(),
    mr_acquisition_type="2D",
    repetition_time=8.6,
    echo_time=4.0,
    inversion_time=None,
    flip_angle=20.0,
    sequence_name="*fl2d1",
    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    image_flavor="LOCALIZER",
    echo_pulse_sequence="GRADIENT",
    expected_route="localizer",
)

PRESETS: dict[str, AcquisitionPreset] = {
    preset.name: preset
    for preset in (FLAIR_2D, FLAIR_3D, T1, T1_POST_CONTRAST, T2, T1_FLAIR, STIR, MPRAGE, LOCALIZER)
}
