"""Helpers shared by the data tests, imported explicitly (the conftest here is the model tests')."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def phantom_head(
    shape: tuple[int, int, int] = (60, 72, 60),
    spacing: float = 3.0,
    blob_offset_mm: tuple[float, float, float] | None = (-30.0, 10.0, 15.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A RAS-stored head: bright scalp shell, dark skull, brain, optional bright blob.

    ``blob_offset_mm`` is the blob's (x, y, z) in RAS millimetres from the head centre:
    negative x is the patient's left. Returns (array, affine)."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * spacing for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((x / 75) ** 2 + (y / 95) ** 2 + (z / 80) ** 2)
    volume = np.zeros(shape, dtype=np.float32)
    volume[radius < 1.0] = 800.0  # scalp
    volume[radius < 0.93] = 40.0  # skull
    volume[radius < 0.87] = 600.0  # brain
    if blob_offset_mm is not None:
        bx, by, bz = blob_offset_mm
        volume[(x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2 < 15.0**2] = 1400.0
    volume += rng.normal(0, 10, shape).astype(np.float32)
    volume = np.abs(volume)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * spacing for n in shape]
    return volume, affine


def as_lps_stored(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The same object stored with the first two array axes reversed (a DICOM-style LPS file)."""
    flipped = volume[::-1, ::-1, :].copy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = volume.shape[0] - 1
    flip[1, 3] = volume.shape[1] - 1
    return nib.Nifti1Image(flipped, affine @ flip)
