"""series_to_nifti: exact round trips through dicom2nifti, typed errors, the affine cross-check."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_node.conversion import ConversionError, GeometryError, _check_affine, series_to_nifti
from dicom_node.series_writer import write_series

#: RAS-canonical input, 2 x 2.5 x 3 mm, so the converted canonical array must equal it.
AFFINE = np.array([[2.0, 0, 0, -24], [0, 2.5, 0, -30], [0, 0, 3.0, -27], [0, 0, 0, 1]])


def _volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, size=(24, 22, 18)).astype(np.uint16)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"orientation": "sagittal", "reverse_slices": True},
        {"orientation": "coronal", "flip_rows": True, "flip_columns": True},
        {"patient_position": "FFP"},
        {"enhanced": True},
        {"enhanced": True, "orientation": "coronal", "reverse_slices": True},
    ],
    ids=[
        "axial",
        "sagittal-descending",
        "coronal-flipped",
        "axial-FFP",
        "enhanced-axial",
        "enhanced-coronal-desc",
    ],
)
def test_round_trip_is_exact_for_unrotated_planes(tmp_path, options) -> None:
    volume = _volume()
    files = write_series(tmp_path / "dicom", volume, AFFINE, seed=1, **options)
    image = series_to_nifti(files, tmp_path / "work")
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume)
    assert (tmp_path / "work" / "series.nii.gz").is_file()


@pytest.mark.parametrize("manufacturer", ["GE MEDICAL SYSTEMS", "SIEMENS", "Philips Medical Systems"])
def test_an_enhanced_series_converts_whatever_its_vendor(tmp_path, manufacturer: str) -> None:
    """dicom2nifti's GE converter reads no multi-frame instance; its Siemens and Philips ones hand
    an anatomical one to the generic converter, which every vendor's now goes through."""
    volume = _volume()
    (path,) = write_series(tmp_path / "dicom", volume, AFFINE, seed=1, enhanced=True)
    dataset = pydicom.dcmread(path)
    dataset.Manufacturer = manufacturer
    dataset.save_as(path)
    image = series_to_nifti([path], tmp_path / "work")
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume)


def test_rescaled_intensities_come_back(tmp_path) -> None:
    volume = np.linspace(-1.0, 3.0, 24 * 22 * 18).reshape(24, 22, 18)
    files = write_series(tmp_path / "dicom", volume, AFFINE, seed=1, rescale=True)
    image = series_to_nifti(files, tmp_path / "work")
    np.testing.assert_allclose(image.get_fdata(), volume, atol=0.51 * 4.0 / 4095 + 1e-6)


def test_geometry_gate_runs_first_and_is_typed(tmp_path) -> None:
    files = write_series(tmp_path / "dicom", _volume(), AFFINE, seed=1)
    with pytest.raises(GeometryError) as caught:
        series_to_nifti([*files[:5], *files[6:]], tmp_path / "work")
    assert caught.value.reason.startswith("missing_slices")
    assert isinstance(caught.value, ConversionError)
    assert not (tmp_path / "work" / "series.nii.gz").exists()


def test_mixed_series_and_unreadable_files_are_conversion_errors(tmp_path) -> None:
    first = write_series(tmp_path / "a", _volume(), AFFINE, seed=1)
    second = write_series(tmp_path / "b", _volume(), AFFINE, seed=2)
    with pytest.raises(ConversionError, match="mixed_series"):
        series_to_nifti([*first, *second[:1]], tmp_path / "work")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ConversionError, match="unreadable"):
        series_to_nifti([*first, junk], tmp_path / "work")
    with pytest.raises(ConversionError, match="no_instances"):
        series_to_nifti([], tmp_path / "work")
    # An I/O error is no verdict on the series: it propagates, so the job fails and can be retried.
    with pytest.raises(OSError) as caught:
        series_to_nifti([*first, tmp_path / "vanished.dcm"], tmp_path / "work")
    assert not isinstance(caught.value, ConversionError)


def test_affine_cross_check_rejects_a_mirrored_affine(tmp_path) -> None:
    files = write_series(tmp_path / "dicom", _volume(), AFFINE, seed=1)
    datasets = [pydicom.dcmread(path) for path in files]
    # dicom2nifti's affine for an axial HFS series: rows run to the patient's left (RAS -x).
    good = np.array([[-2.0, 0, 0, 22], [0, -2.5, 0, 22.5], [0, 0, 3.0, -27], [0, 0, 0, 1]])
    array = np.zeros((24, 22, 18), dtype=np.uint16)
    _check_affine(nib.Nifti1Image(array, good), datasets)
    mirrored = good.copy()
    mirrored[0, 0], mirrored[0, 3] = 2.0, -24
    with pytest.raises(ConversionError, match="affine_mismatch"):
        _check_affine(nib.Nifti1Image(array, mirrored), datasets)
    # Half the frames, with positions extrapolated along the same axis, is no volume either.
    with pytest.raises(ConversionError, match="slice_count_mismatch: dicom2nifti made 9 slices of the 18"):
        _check_affine(nib.Nifti1Image(array[:, :, :9], good), datasets)


def test_an_enhanced_series_split_over_two_instances_is_refused_not_halved(tmp_path) -> None:
    """dicom2nifti reads one multi-frame instance: a series sent as two would become half a brain."""
    (whole,) = write_series(tmp_path / "dicom", _volume(), AFFINE, seed=1, enhanced=True)
    dataset = pydicom.dcmread(whole)
    frames, half = int(dataset.NumberOfFrames), int(dataset.NumberOfFrames) // 2
    parts = []
    for number, (start, stop) in enumerate([(0, half), (half, frames)], start=1):
        part = copy.deepcopy(dataset)
        part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.77.{number}"
        part.PerFrameFunctionalGroupsSequence = dataset.PerFrameFunctionalGroupsSequence[start:stop]
        part.NumberOfFrames = stop - start
        part.PixelData = np.ascontiguousarray(dataset.pixel_array[start:stop]).tobytes()
        part.InstanceNumber = number
        parts.append(tmp_path / f"part{number}.dcm")
        part.save_as(parts[-1], enforce_file_format=True)
    with pytest.raises(ConversionError, match="split_multiframe: 2 instances, multi-frame among them"):
        series_to_nifti(parts, tmp_path / "work")
