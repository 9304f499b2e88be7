"""Laterality matrix: a one-sided lesion stays on its side through DICOM and back.

A synthetic head (ellipsoid) with a bright blob in the patient's right or left
hemisphere is written by the series writer in every orientation, slice order,
flip, oblique and patient position, converted by ``series_to_nifti`` and made
RAS-canonical. The blob's centre of mass, in world coordinates, must land on the
true side. RAS+ world coordinates: +x points to the patient's RIGHT, so a
right-sided lesion has x > 0 and a left-sided one x < 0 (DICOM LPS is the
opposite: +x to the patient's left). In the model's layout (inference/convention)
the patient's right is at large W.

Negative control: the same DICOM with its pixel data mirrored left-right and its
headers unchanged must put the blob on the other side, showing the assertions can
fail.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.conversion import series_to_nifti
from dicom_node.series_writer import write_series
from inference.convention import ras_array_to_dhw

SHAPE = (48, 56, 48)
VOXEL_MM = 3.5
AFFINE = np.array(
    [
        [VOXEL_MM, 0, 0, -VOXEL_MM * (SHAPE[0] - 1) / 2],
        [0, VOXEL_MM, 0, -VOXEL_MM * (SHAPE[1] - 1) / 2],
        [0, 0, VOXEL_MM, -VOXEL_MM * (SHAPE[2] - 1) / 2],
        [0, 0, 0, 1],
    ]
)
#: Lesion centres in RAS mm: patient's right is +x.
LESIONS = {"right": np.array([40.0, 12.0, 18.0]), "left": np.array([-40.0, 12.0, 18.0])}
LESION_VALUE, HEAD_VALUE = 3000.0, 600.0


def _phantom(side: str) -> np.ndarray:
    """Ellipsoid head (semi-axes 70 x 85 x 75 mm) with a 9 mm-radius bright blob."""
    ijk = np.indices(SHAPE).reshape(3, -1).T
    world = ijk * VOXEL_MM + AFFINE[:3, 3]
    head = ((world / np.array([70.0, 85.0, 75.0])) ** 2).sum(axis=1) <= 1.0
    blob = np.linalg.norm(world - LESIONS[side], axis=1) <= 9.0
    volume = np.where(blob, LESION_VALUE, np.where(head, HEAD_VALUE, 0.0))
    return volume.reshape(SHAPE).astype(np.float32)


PHANTOMS = {side: _phantom(side) for side in LESIONS}


def _lesion_centre_ras(image) -> np.ndarray:
    data = np.asarray(image.dataobj, dtype=np.float32)
    threshold = (LESION_VALUE + HEAD_VALUE) / 2
    weights = np.where(data > threshold, data, 0.0)
    ijk = np.array(np.nonzero(weights)).T
    centre = (ijk * weights[weights > 0][:, None]).sum(axis=0) / weights.sum()
    return (image.affine @ np.append(centre, 1.0))[:3]


VARIANTS = []
for orientation in ("axial", "sagittal", "coronal"):
    for reverse in (False, True):
        VARIANTS.append(
            pytest.param(
                dict(orientation=orientation, reverse_slices=reverse),
                id=f"{orientation}-{'desc' if reverse else 'asc'}",
            )
        )
    VARIANTS.append(
        pytest.param(dict(orientation=orientation, flip_rows=True), id=f"{orientation}-flip-rows")
    )
    VARIANTS.append(
        pytest.param(dict(orientation=orientation, flip_columns=True), id=f"{orientation}-flip-columns")
    )
    for degrees in (5.0, 15.0):
        VARIANTS.append(
            pytest.param(
                dict(orientation=orientation, oblique_degrees=degrees),
                id=f"{orientation}-oblique-{degrees:g}",
            )
        )
    for position in ("HFP", "FFS", "FFP"):
        VARIANTS.append(
            pytest.param(
                dict(orientation=orientation, patient_position=position), id=f"{orientation}-{position}"
            )
        )
VARIANTS += [
    pytest.param(
        dict(orientation="sagittal", enhanced=True, reverse_slices=True), id="enhanced-sagittal-desc"
    ),
    pytest.param(
        dict(orientation="axial", enhanced=True, oblique_degrees=15.0, patient_position="FFP"),
        id="enhanced-axial-oblique-FFP",
    ),
]


@pytest.mark.parametrize("side", sorted(LESIONS))
@pytest.mark.parametrize("options", VARIANTS)
def test_lesion_lands_in_the_true_hemisphere(tmp_path, side, options) -> None:
    files = write_series(tmp_path / "dicom", PHANTOMS[side], AFFINE, seed=11, **options)
    image = series_to_nifti(files, tmp_path / "work")
    centre = _lesion_centre_ras(image)
    truth = LESIONS[side]
    assert np.sign(centre[0]) == np.sign(truth[0]), f"{side} lesion converted to RAS x = {centre[0]:.1f} mm"
    assert np.linalg.norm(centre - truth) < VOXEL_MM, f"centre {centre.round(1)} vs truth {truth}"
    # And in the model's layout: the patient's right is the upper half of W.
    dhw = ras_array_to_dhw(np.asarray(image.dataobj, dtype=np.float32))
    lesion_w = np.nonzero(dhw > (LESION_VALUE + HEAD_VALUE) / 2)[2].mean()
    assert (lesion_w > dhw.shape[2] / 2) == (side == "right")


def _mirror_columns(path) -> None:
    """Axial and coronal rows run left-right: reverse every row, keep the headers."""
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(path)


def _mirror_sagittal_stack(paths) -> None:
    """Sagittal slices step along left-right: swap the pixel data of slice k and n-1-k."""
    datasets = [pydicom.dcmread(path) for path in paths]
    pixels = [ds.PixelData for ds in datasets]
    for ds, path, data in zip(datasets, paths, reversed(pixels), strict=True):
        ds.PixelData = data
        ds.save_as(path)


@pytest.mark.parametrize("side", sorted(LESIONS))
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_negative_control_mirrored_pixels_flip_the_side(tmp_path, side, orientation) -> None:
    files = write_series(tmp_path / "dicom", PHANTOMS[side], AFFINE, seed=11, orientation=orientation)
    if orientation == "sagittal":
        _mirror_sagittal_stack(files)
    else:
        for path in files:
            _mirror_columns(path)
    centre = _lesion_centre_ras(series_to_nifti(files, tmp_path / "work"))
    assert np.sign(centre[0]) == -np.sign(LESIONS[side][0])


def _enhanced_reversed(path) -> None:
    """Frames stored last to first, each with its own functional groups."""
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.save_as(path)


def _enhanced_counted_from_the_other_end(path) -> None:
    """InStackPositionNumber counted from the last frame (the standard ties it to no direction)."""
    ds = pydicom.dcmread(path)
    frames = int(ds.NumberOfFrames)
    for groups in ds.PerFrameFunctionalGroupsSequence:
        content = groups.FrameContentSequence[0]
        content.InStackPositionNumber = frames + 1 - content.InStackPositionNumber
        content.DimensionIndexValues = [1, content.InStackPositionNumber]
    ds.save_as(path)


def _enhanced_interleaved(path) -> None:
    """Frames stored in acquisition order: odd slices, then even ones."""
    ds = pydicom.dcmread(path)
    frames = int(ds.NumberOfFrames)
    order = [*range(0, frames, 2), *range(1, frames, 2)]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[order]).tobytes()
    ds.save_as(path)


def _classic_numbered(order: str):  # type: ignore[no-untyped-def]
    def renumber(paths) -> None:
        count = len(paths)
        numbers = {
            "interleaved": [*range(1, count + 1, 2), *range(2, count + 1, 2)],
            "shuffled": list(np.random.default_rng(5).permutation(count) + 1),
        }.get(order)
        for index, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            if numbers is None:
                del ds.InstanceNumber
            else:
                ds.InstanceNumber = int(numbers[index])
            ds.save_as(path)

    return renumber


STORAGE_ORDERS = {
    "enhanced-reversed": (True, lambda paths: _enhanced_reversed(paths[0])),
    "enhanced-counted-from-the-other-end": (
        True,
        lambda paths: _enhanced_counted_from_the_other_end(paths[0]),
    ),
    "enhanced-interleaved": (True, lambda paths: _enhanced_interleaved(paths[0])),
    "classic-interleaved-numbers": (False, _classic_numbered("interleaved")),
    "classic-shuffled-numbers": (False, _classic_numbered("shuffled")),
    "classic-no-numbers": (False, _classic_numbered("none")),
}


@pytest.mark.parametrize("side", sorted(LESIONS))
@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
@pytest.mark.parametrize("storage", sorted(STORAGE_ORDERS))
def test_storage_order_and_numbering_do_not_move_the_lesion(tmp_path, side, orientation, storage) -> None:
    """The standard ties neither the frames' storage order nor InstanceNumber or InStackPositionNumber
    to position; dicom2nifti places slices by those numbers. Each way: the lesion stays on its side."""
    enhanced, rewrite = STORAGE_ORDERS[storage]
    files = write_series(
        tmp_path / "dicom", PHANTOMS[side], AFFINE, seed=11, orientation=orientation, enhanced=enhanced
    )
    rewrite(files)
    centre = _lesion_centre_ras(series_to_nifti(files, tmp_path / "work"))
    assert np.linalg.norm(centre - LESIONS[side]) < VOXEL_MM, f"{side} lesion converted to {centre.round(1)}"


def test_pixels_placed_against_their_affine_are_refused(tmp_path, monkeypatch) -> None:
    """The last check: handed to dicom2nifti unordered (as before the frames were put in stack
    order), a reversed Enhanced MR instance's pixels run against the affine: refused, not mirrored."""
    from dicom_node import conversion

    files = write_series(
        tmp_path / "dicom", PHANTOMS["right"], AFFINE, seed=11, orientation="sagittal", enhanced=True
    )
    _enhanced_reversed(files[0])
    monkeypatch.setattr(conversion, "_frames_in_stack_order", lambda dataset: dataset)
    with pytest.raises(conversion.ConversionError, match="pixel_mismatch"):
        series_to_nifti(files, tmp_path / "work")


NEAR_MIDLINE = {"right": np.array([14.0, -50.0, 10.0]), "left": np.array([-14.0, -50.0, 10.0])}


def _near_midline_phantom(side: str) -> np.ndarray:
    """The ellipsoid head, textured so that ``prepare`` finds and scales it as it does a brain,
    with a blob 14 mm from the midline, far back: the lesion an oblique's tilted axes would
    carry across the middle of the image."""
    ijk = np.indices(SHAPE).reshape(3, -1).T
    world = ijk * VOXEL_MM + AFFINE[:3, 3]
    head = ((world / np.array([70.0, 85.0, 75.0])) ** 2).sum(axis=1) <= 1.0
    blob = np.linalg.norm(world - NEAR_MIDLINE[side], axis=1) <= 9.0
    texture = np.random.default_rng(3).normal(HEAD_VALUE, 60.0, len(world))
    return np.where(blob, 1.7 * HEAD_VALUE, np.where(head, texture, 0.0)).reshape(SHAPE).astype(np.float32)


@pytest.mark.parametrize("side", sorted(NEAR_MIDLINE))
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_an_oblique_acquisition_gives_the_model_the_upright_input(tmp_path, side, orientation) -> None:
    """The model's W axis is the patient's left-right, not the image's: a 30-degree oblique of the
    same head gives (up to resampling) the input an upright scan gives, the lesion on its side."""
    from inference.preprocessing import prepare

    volume = _near_midline_phantom(side)
    grid = (32, 32, 32)
    upright = prepare(nib.Nifti1Image(volume, AFFINE), grid)[0]
    files = write_series(
        tmp_path / "dicom", volume, AFFINE, seed=11, orientation=orientation, oblique_degrees=30.0
    )
    oblique = prepare(series_to_nifti(files, tmp_path / "work"), grid)[0]
    assert torch.corrcoef(torch.stack([upright.flatten(), oblique.flatten()]))[0, 1] > 0.9
    lesion = np.nonzero(oblique.numpy() > 0.9)
    assert (lesion[2].mean() > grid[2] / 2) == (side == "right"), f"lesion at W {lesion[2].mean():.1f}"
