"""The series writer: headers describe the same physical object in every orientation.

Geometry is checked from the written headers alone (IPP, IOP, PixelSpacing),
without dicom2nifti, so the conversion tests and these tests fail independently.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from conftest import require_tool

from dicom_node.acquisition import FLAIR_2D, FLAIR_3D, LOCALIZER
from dicom_node.series_writer import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    build_series,
    slice_axes,
    write_series,
)

#: 2 x 2.5 x 3 mm voxels; RAS world = affine @ (i, j, k, 1).
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.5, 0, -30], [0, 0, 3.0, -12], [0, 0, 0, 1]])
#: The single bright voxel, at RAS x = 2*3 - 20 = -14 mm: the patient's left (RAS +x is right).
BRIGHT_VOXEL = (3, 9, 5)


def _volume() -> np.ndarray:
    volume = np.full((20, 24, 10), 100.0, dtype=np.float32)
    volume[BRIGHT_VOXEL] = 3000.0
    return volume


def _pixel_to_lps(ds: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: position of pixel (row, column) from the headers."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    spacing_between_rows, spacing_between_columns = (float(v) for v in ds.PixelSpacing)
    return (
        np.array(ds.ImagePositionPatient, dtype=float)
        + column * spacing_between_columns * iop[:3]
        + row * spacing_between_rows * iop[3:]
    )


def _bright_position_lps(datasets: list[pydicom.Dataset]) -> np.ndarray:
    best = max(datasets, key=lambda ds: ds.pixel_array.max())
    row, column = np.unravel_index(int(np.argmax(best.pixel_array)), best.pixel_array.shape)
    return _pixel_to_lps(best, int(row), int(column))


GEOMETRIES = [
    pytest.param(
        dict(orientation=o, reverse_slices=r, flip_rows=fr, flip_columns=fc, patient_position=pp), id=name
    )
    for name, o, r, fr, fc, pp in [
        ("axial", "axial", False, False, False, "HFS"),
        ("axial-descending", "axial", True, False, False, "HFS"),
        ("sagittal", "sagittal", False, False, False, "HFS"),
        ("coronal-descending", "coronal", True, False, False, "HFS"),
        ("axial-flip-rows", "axial", False, True, False, "HFS"),
        ("sagittal-flip-columns", "sagittal", False, False, True, "HFS"),
        ("coronal-HFP", "coronal", False, False, False, "HFP"),
        ("axial-FFS", "axial", False, False, False, "FFS"),
        ("sagittal-FFP-both-flips", "sagittal", True, True, True, "FFP"),
    ]
]


@pytest.mark.parametrize("options", GEOMETRIES)
def test_headers_place_the_bright_voxel_where_it_is(options) -> None:
    datasets = build_series(_volume(), AFFINE, seed=1, **options)
    truth_ras = (AFFINE @ np.array([*BRIGHT_VOXEL, 1.0]))[:3]
    truth_lps = np.array([-truth_ras[0], -truth_ras[1], truth_ras[2]])
    np.testing.assert_allclose(_bright_position_lps(datasets), truth_lps, atol=1e-3)
    # Unrotated planes on the input's spacing are exact copies, not interpolations.
    assert max(int(ds.pixel_array.max()) for ds in datasets) == 3000


def test_orientations_write_the_expected_direction_cosines() -> None:
    row, col, normal = slice_axes("axial")
    np.testing.assert_allclose([*row, *col, *normal], [1, 0, 0, 0, 1, 0, 0, 0, 1])
    row, col, _ = slice_axes("sagittal")
    np.testing.assert_allclose([*row, *col], [0, 1, 0, 0, 0, -1])
    row, col, _ = slice_axes("coronal", patient_position="HFP")
    np.testing.assert_allclose([*row, *col], [-1, 0, 0, 0, 0, -1])
    row, col, _ = slice_axes("axial", oblique_degrees=15.0)
    assert np.degrees(np.arccos(row @ np.array([1.0, 0, 0]))) > 5.0
    assert abs(row @ col) < 1e-12


def test_descending_order_reverses_positions_along_the_normal() -> None:
    ascending = build_series(_volume(), AFFINE, seed=1)
    descending = build_series(_volume(), AFFINE, seed=1, reverse_slices=True)
    z_up = [float(ds.ImagePositionPatient[2]) for ds in ascending]
    z_down = [float(ds.ImagePositionPatient[2]) for ds in descending]
    assert z_up == sorted(z_up) and z_down == sorted(z_down, reverse=True)
    assert [ds.InstanceNumber for ds in descending] == list(range(1, len(descending) + 1))
    assert float(ascending[0].SpacingBetweenSlices) == pytest.approx(3.0)


@pytest.mark.parametrize("degrees", [5.0, 15.0])
def test_oblique_keeps_the_bright_spot_within_a_voxel(degrees) -> None:
    volume = np.zeros((20, 24, 10), dtype=np.float32)
    volume[2:5, 8:11, 4:7] = 3000.0  # a 3-voxel cube survives linear interpolation
    datasets = build_series(volume, AFFINE, oblique_degrees=degrees, seed=1)
    truth_ras = (AFFINE @ np.array([3, 9, 5, 1.0]))[:3]
    truth_lps = truth_ras * np.array([-1, -1, 1])
    assert np.linalg.norm(_bright_position_lps(datasets) - truth_lps) < 3.0


def test_series_counts_uids_and_determinism() -> None:
    first = build_series(_volume(), AFFINE, seed=7, series_number=4)
    again = build_series(_volume(), AFFINE, seed=7, series_number=4)
    other = build_series(_volume(), AFFINE)
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert len({ds.SOPInstanceUID for ds in first}) == len(first) == 10
    assert {ds.ImagesInAcquisition for ds in first} == {len(first)}
    assert {ds.SeriesInstanceUID for ds in first} != {ds.SeriesInstanceUID for ds in other}
    assert all(ds.SOPClassUID == MR_IMAGE_STORAGE and ds.file_meta.TransferSyntaxUID for ds in first)
    assert all(ds.pixel_array.dtype == np.uint16 for ds in first)


def test_rescale_recovers_non_integral_intensities() -> None:
    volume = np.linspace(-1.5, 2.5, 20 * 24 * 10, dtype=np.float64).reshape(20, 24, 10)
    datasets = build_series(volume, AFFINE, rescale=True, seed=1)
    ds = datasets[0]
    real = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # Axial rows run anterior to posterior, columns right to left: the RAS array read backwards.
    np.testing.assert_allclose(real, volume[::-1, ::-1, 0].T, atol=0.51 * 4.0 / 4095)
    assert "RescaleSlope" not in build_series(_volume(), AFFINE, seed=1)[0]


def test_enhanced_series_is_one_multiframe_instance_with_per_frame_positions() -> None:
    classic = build_series(_volume(), AFFINE, preset=FLAIR_3D, orientation="sagittal", seed=2)
    (enhanced,) = build_series(
        _volume(), AFFINE, preset=FLAIR_3D, orientation="sagittal", enhanced=True, seed=2
    )
    assert enhanced.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
    assert int(enhanced.NumberOfFrames) == len(classic) == enhanced.pixel_array.shape[0]
    frames = enhanced.PerFrameFunctionalGroupsSequence
    positions = [list(map(float, f.PlanePositionSequence[0].ImagePositionPatient)) for f in frames]
    assert positions == [list(map(float, ds.ImagePositionPatient)) for ds in classic]
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    assert shared.MRModifierSequence[0].InversionTimes == FLAIR_3D.inversion_time
    assert shared.MREchoSequence[0].EffectiveEchoTime == FLAIR_3D.echo_time
    np.testing.assert_array_equal(enhanced.pixel_array[3], classic[3].pixel_array)


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    "options",
    [dict(preset=FLAIR_2D), dict(preset=FLAIR_3D, enhanced=True), dict(preset=LOCALIZER)],
    ids=["classic-flair", "enhanced-flair", "localizer"],
)
def test_written_instances_pass_dciodvfy(tmp_path, options) -> None:
    dciodvfy = require_tool("dciodvfy")
    paths = write_series(tmp_path, _volume(), AFFINE, seed=5, oblique_degrees=5.0, **options)
    result = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
    assert (
        pydicom.dcmread(paths[0]).file_meta.MediaStorageSOPInstanceUID
        == pydicom.dcmread(paths[0]).SOPInstanceUID
    )
