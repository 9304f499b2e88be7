"""prepare(): orientation (RAS and LPS storage), voxel-size and intensity invariance, skull."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from data_fixtures import as_lps_stored, phantom_head

from inference.convention import LEFT_RIGHT_AXIS
from inference.preprocessing import foreground_mask, prepare, prepare_with_mask

GRID = (16, 32, 32)


def _blob_width_index(tensor: torch.Tensor) -> float:
    """Mean W index of the brightest voxels (the blob)."""
    bright = (tensor[0] > 0.95).nonzero()
    return bright[:, 2].float().mean().item()


@pytest.mark.parametrize("side_mm", [-30.0, 30.0])
def test_patient_left_lands_at_small_w_for_ras_and_lps_storage(side_mm: float) -> None:
    volume, affine = phantom_head(blob_offset_mm=(side_mm, 10.0, 15.0))
    ras = prepare(nib.Nifti1Image(volume, affine), GRID)
    lps = prepare(as_lps_stored(volume, affine), GRID)
    assert ras.shape == (1, *GRID)
    torch.testing.assert_close(ras, lps)
    width_index = _blob_width_index(ras)
    if side_mm < 0:  # patient's left
        assert width_index < GRID[2] / 2 - 3
    else:
        assert width_index > GRID[2] / 2 + 3


@pytest.mark.parametrize("side_mm", [-30.0, 30.0])
def test_a_lesion_mask_lands_on_its_lesion_for_ras_and_lps_storage(side_mm: float) -> None:
    """The mask comes through the same reorientation and cells as the image: the lesion's cells
    are the bright ones, on the patient's side, whichever way the file is stored."""
    volume, affine = phantom_head(blob_offset_mm=(side_mm, 10.0, 15.0))
    lesion = volume > 1200  # the blob (1400) above scalp (800) and noise (sigma 10)
    ras, ras_mask = prepare_with_mask(nib.Nifti1Image(volume, affine), lesion, GRID)
    lps, lps_mask = prepare_with_mask(as_lps_stored(volume, affine), lesion[::-1, ::-1, :].copy(), GRID)
    torch.testing.assert_close(ras, prepare(nib.Nifti1Image(volume, affine), GRID))
    torch.testing.assert_close(ras, lps)
    assert ras_mask.dtype == torch.bool and ras_mask.shape == ras.shape
    assert torch.equal(ras_mask, lps_mask)
    assert ras_mask.sum() > 20
    assert ras[ras_mask].mean() > 0.7 and ras[~ras_mask].mean() < 0.5  # brain 0.4, scalp 0.53
    width_index = ras_mask[0].nonzero()[:, 2].float().mean().item()
    assert (width_index < GRID[2] / 2 - 3) if side_mm < 0 else (width_index > GRID[2] / 2 + 3)
    with pytest.raises(ValueError, match="mask shape"):
        prepare_with_mask(nib.Nifti1Image(volume, affine), lesion[1:], GRID)


def test_mirrored_patient_gives_mirrored_tensor() -> None:
    volume, affine = phantom_head(blob_offset_mm=(-30.0, 10.0, 15.0), seed=1)
    left = prepare(nib.Nifti1Image(volume, affine), GRID)
    right = prepare(nib.Nifti1Image(volume[::-1].copy(), affine), GRID)
    torch.testing.assert_close(left.flip(LEFT_RIGHT_AXIS), right)


def test_voxel_size_does_not_change_the_result_beyond_resampling() -> None:
    coarse, coarse_affine = phantom_head(shape=(60, 72, 60), spacing=3.0)
    fine, fine_affine = phantom_head(shape=(120, 144, 120), spacing=1.5)
    a = prepare(nib.Nifti1Image(coarse, coarse_affine), GRID)
    b = prepare(nib.Nifti1Image(fine, fine_affine), GRID)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.97
    assert abs(_blob_width_index(a) - _blob_width_index(b)) < 1.0


def test_intensity_scale_and_offset_do_not_matter() -> None:
    volume, affine = phantom_head()
    a = prepare(nib.Nifti1Image(volume, affine), GRID)
    b = prepare(nib.Nifti1Image(volume * 3.7 + 25.0, affine), GRID)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a.min() >= 0 and a.max() <= 1


def test_foreground_mask_covers_the_head_including_the_dark_skull() -> None:
    volume, _ = phantom_head(blob_offset_mm=None)
    mask = foreground_mask(volume)
    center = tuple(n // 2 for n in volume.shape)
    assert mask[center]
    assert not mask[0, 0, 0]
    head = volume > 300
    assert mask.sum() > head.sum()  # the skull shell and brain are inside
    assert np.all(mask[head])


def test_the_mask_fills_enclosed_dark_regions_only_where_the_volume_cuts_the_head() -> None:
    """A dark cavity inside the head is head; one opening to the volume's edge, where the field of
    view cuts the head, is not (the holes are filled within the head's box, checked here at its
    edge)."""
    shape = (48, 40, 36)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    head = ((z - 4) / 30) ** 2 + ((y - 20) / 16) ** 2 + ((x - 18) / 14) ** 2 < 1  # cut at z = 0
    cavity = ((z - 12) / 4) ** 2 + ((y - 20) / 4) ** 2 + ((x - 12) / 4) ** 2 < 1
    channel = (z < 12) & (abs(y - 20) < 4) & (abs(x - 24) < 4)  # open at the cut
    volume = np.where(head, 300.0, 2.0).astype(np.float32)
    volume[cavity | channel] = 2.0
    mask = foreground_mask(volume)
    assert mask[cavity].all(), "an enclosed cavity is inside the head"
    # Closing rounds the channel's corners; its core stays open.
    core = channel & (abs(y - 20) < 2) & (abs(x - 24) < 2)
    assert not mask[core].any(), "a channel open at the volume's edge is outside"
    assert mask[head & ~channel & (z > 2)].all(), "the head (closing may erode its cut face)"


@pytest.mark.parametrize("where", ["inside the head", "in a corner"])
def test_a_few_voxels_far_brighter_than_the_head_are_refused_not_read_as_empty(where: str) -> None:
    """Otsu's threshold then separates the hot spot from everything else: the "head" would be a
    speck and the model's input all zeros, which reads as a normal study."""
    volume, affine = phantom_head(blob_offset_mm=None)
    spot = tuple(np.array(volume.shape) // 2) if where == "inside the head" else (0, 0, 0)
    volume[spot] = volume.max() * 1e4
    with pytest.raises(ValueError, match="not a head: a few voxels far brighter than the rest"):
        prepare(nib.Nifti1Image(volume, affine), GRID)


def test_constant_volume_is_refused() -> None:
    with pytest.raises(ValueError, match="constant"):
        prepare(nib.Nifti1Image(np.ones((10, 10, 10), dtype=np.float32), np.eye(4)), GRID)


def test_a_nifti_without_orientation_is_refused() -> None:
    """qform and sform codes 0: nibabel would guess the left-right sense; prepare refuses to."""
    volume = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="states no orientation"):
        prepare(nib.Nifti1Image(volume, None), GRID)
    oriented = nib.Nifti1Image(volume, None)
    oriented.set_qform(np.diag([-1.0, 1.0, 1.0, 1.0]), code=1)  # scanner qform only: accepted
    assert prepare(oriented, GRID).shape == (1, *GRID)


def test_grid_comes_from_a_config_object() -> None:
    class Config:
        input_grid = (8, 16, 24)

    volume, affine = phantom_head()
    assert prepare(nib.Nifti1Image(volume, affine), Config()).shape == (1, 8, 16, 24)
