"""The input convention of Brain3D, written once.

A volume is a float tensor ``(batch, 1, D, H, W)`` taken from the RAS-canonical
array (nibabel's ``as_closest_canonical``, whose array axes run i = left to right,
j = posterior to anterior, k = inferior to superior), transposed so that:

- D runs inferior to superior (the RAS array's third axis),
- H runs posterior to anterior (its second axis),
- W runs from the patient's left to the patient's right (its first axis).

So ``volume[..., w]`` with a small ``w`` is the patient's left side, and a left-right
mirror of the patient is ``volume.flip(-1)``. For an oblique image the canonical array's
axes only approximate the patient's; ``inference.preprocessing.prepare`` samples its grid
along the patient's own axes, so the model's D, H and W are exactly these directions.
"""

from __future__ import annotations

import numpy as np

#: Order in which the RAS-canonical array's axes (i, j, k) appear in (D, H, W).
RAS_TO_DHW = (2, 1, 0)
#: Axis of the patient's left-right direction in a ``(..., D, H, W)`` tensor.
LEFT_RIGHT_AXIS = -1


def ras_array_to_dhw(ras_array: np.ndarray) -> np.ndarray:
    """Reorder a RAS-canonical ``(i, j, k)`` array to the model's ``(D, H, W)`` layout."""
    if ras_array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {ras_array.shape}")
    return np.ascontiguousarray(np.transpose(ras_array, RAS_TO_DHW))
