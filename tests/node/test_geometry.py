"""The geometry gate, each way a series can fail it, on classic and Enhanced MR."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.uid import generate_uid

from dicom_node.acquisition import FLAIR_2D, LOCALIZER
from dicom_node.geometry import check_series_geometry
from dicom_node.series_writer import build_series

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _series(slices: int = 20, **options):
    volume = np.arange(12 * 12 * slices, dtype=np.float32).reshape(12, 12, slices)
    return build_series(volume, AFFINE, preset=options.pop("preset", FLAIR_2D), seed=4, **options)


def _shift(ds, offset) -> None:
    ds.ImagePositionPatient = [
        float(v) + float(d) for v, d in zip(ds.ImagePositionPatient, offset, strict=True)
    ]


@pytest.mark.parametrize(
    "options", [{}, {"orientation": "sagittal", "oblique_degrees": 15.0}, {"enhanced": True}]
)
def test_regular_stacks_pass(options) -> None:
    verdict = check_series_geometry(_series(**options))
    assert verdict.ok, verdict.reason
    assert verdict.code == "ok"
    assert verdict.slice_spacing == pytest.approx(3.0 if "orientation" not in options else 2.0)


def test_missing_slice_against_the_declared_count() -> None:
    series = _series()
    del series[7]
    verdict = check_series_geometry(series)
    assert (verdict.ok, verdict.code) == (False, "missing_slices")
    assert "19 of 20" in verdict.reason


def test_missing_slice_from_the_positions_when_no_count_is_declared() -> None:
    series = _series()
    for ds in series:
        del ds.ImagesInAcquisition
    assert check_series_geometry(series).ok
    del series[7]
    verdict = check_series_geometry(series)
    assert verdict.code == "missing_slices"
    assert "about 1 slice" in verdict.reason


def _every_other_slice(series):
    kept = series[::2]
    for ds in kept:
        del ds.ImagesInAcquisition
    return kept


@pytest.mark.parametrize(
    ("only_header", "code", "reason"),
    [
        ("SpacingBetweenSlices", "missing_slices", "6.00 mm apart where SpacingBetweenSlices states 3.00 mm"),
        ("SliceThickness", "sparse_slices", "6.00 mm apart but 3.00 mm thick"),
    ],
)
def test_every_other_slice_missing_against_either_header(only_header: str, code: str, reason: str) -> None:
    """Regular positions at twice the spacing: the one header left tells the gap."""
    series = _every_other_slice(_series(slices=40))
    for ds in series:
        delattr(ds, ({"SpacingBetweenSlices", "SliceThickness"} - {only_header}).pop())
    verdict = check_series_geometry(series)
    assert (verdict.ok, verdict.code) == (False, code)
    assert reason in verdict.reason


@pytest.mark.parametrize(
    ("thickness", "declared"),
    [
        (2.5, 3.0),  # a 2D stack with a gap between its slices
        (6.0, 3.0),  # overlapping slices, as 3D sequences reconstruct them
        (2.0, 1.0),  # an older writer's SpacingBetweenSlices: the gap, not centre to centre
        (1.6, None),
    ],
)
def test_gapped_and_overlapping_stacks_that_cover_the_brain_pass(thickness, declared) -> None:
    series = _series()
    for ds in series:
        ds.SliceThickness = thickness
        if declared is None:
            del ds.SpacingBetweenSlices
        else:
            ds.SpacingBetweenSlices = declared
    verdict = check_series_geometry(series)
    assert verdict.ok, verdict.reason


def test_sparse_enhanced_stack_from_its_pixel_measures() -> None:
    (enhanced,) = _series(enhanced=True)
    measures = enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = 1.5
    assert check_series_geometry([enhanced]).code == "missing_slices"
    measures.SpacingBetweenSlices = 3.0
    measures.SliceThickness = 1.5
    assert check_series_geometry([enhanced]).code == "sparse_slices"


def test_duplicate_slice() -> None:
    series = _series()
    twin = copy.deepcopy(series[5])
    twin.SOPInstanceUID = generate_uid()
    for ds in series:
        ds.ImagesInAcquisition = 21
    verdict = check_series_geometry([*series, twin])
    assert verdict.code == "duplicate_slices"


def test_uneven_spacing() -> None:
    series = _series()
    _shift(series[10], (0, 0, 0.4))
    assert check_series_geometry(series).code == "uneven_spacing"
    _shift(series[10], (0, 0, -0.4 + 0.1))  # 0.1 mm of 3 mm stays within the 5 % tolerance
    assert check_series_geometry(series).ok


def test_mixed_orientations() -> None:
    series = _series()
    series[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]
    assert check_series_geometry(series).code == "mixed_orientations"


def test_mixed_orientations_in_enhanced_per_frame_groups() -> None:
    (enhanced,) = _series(enhanced=True)
    shared_orientation = enhanced.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    enhanced.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence = copy.deepcopy(shared_orientation)
    assert check_series_geometry([enhanced]).ok
    plane = enhanced.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert check_series_geometry([enhanced]).code == "mixed_orientations"


def test_duplicate_frames_in_enhanced() -> None:
    (enhanced,) = _series(enhanced=True)
    frames = enhanced.PerFrameFunctionalGroupsSequence
    frames[4].PlanePositionSequence = copy.deepcopy(frames[3].PlanePositionSequence)
    assert check_series_geometry([enhanced]).code == "duplicate_slices"


def test_localizer() -> None:
    assert check_series_geometry(_series(preset=LOCALIZER)).code == "localizer"


def test_too_few_slices_with_a_configurable_minimum() -> None:
    series = _series(slices=10)
    assert check_series_geometry(series).code == "too_few_slices"
    assert check_series_geometry(series, min_slices=8).ok


def test_skewed_stack_like_a_gantry_tilt() -> None:
    series = _series()
    for index, ds in enumerate(series):
        _shift(ds, (0, 0.6 * index, 0))
    assert check_series_geometry(series).code == "skewed_stack"


def test_missing_geometry_and_empty_series() -> None:
    series = _series()
    del series[4].ImageOrientationPatient
    assert check_series_geometry(series).code == "missing_geometry"
    assert check_series_geometry([]).code == "no_instances"


@pytest.mark.parametrize(
    ("keyword", "value", "code"),
    [
        ("PixelSpacing", [2.0, -2.0], "missing_geometry"),  # a negative spacing mirrors the image
        ("PixelSpacing", [0.0, 0.0], "missing_geometry"),
        ("PixelSpacing", 2.0, "missing_geometry"),  # one value
        ("ImagePositionPatient", [0.0, 0.0], "missing_geometry"),
        ("ImageOrientationPatient", [2.0, 0.0, 0.0, 0.0, 2.0, 0.0], "invalid_orientation"),
        ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.6, 0.8, 0.0], "invalid_orientation"),
    ],
)
def test_malformed_geometry_is_a_reason_not_a_crash(keyword: str, value: object, code: str) -> None:
    series = _series()
    for ds in series:
        setattr(ds, keyword, value)
    assert check_series_geometry(series).code == code
