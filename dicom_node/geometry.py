"""The geometry gate: is a series one regular 3D stack the model may read?

Checked before conversion, from headers only, so a series that would convert into
a wrong or distorted volume ends ``not_analysed`` with a reason instead:
localizers, missing geometry, mixed orientations or image sizes, duplicate
slices, too few slices, gaps (missing slices), uneven spacing, stacks whose
slices are not stacked along their normal (gantry tilt, shear), and sparse stacks:
slices farther apart than the headers' SpacingBetweenSlices says (every other slice
missing, which leaves the spacing regular) or about twice their thickness apart or more
(half the brain between slices never imaged). Multi-frame
Enhanced MR is read through its functional groups (Plane Position / Plane
Orientation / Pixel Measures, per frame or shared).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Fewer slices than this is not a brain volume (a localizer or a partial series).
DEFAULT_MIN_SLICES = 16
#: Relative tolerance on slice spacing (5 %, dicom2nifti's own is similar).
DEFAULT_SPACING_TOLERANCE = 0.05
#: Direction cosines may differ this much between slices of one stack.
ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class GeometryVerdict:
    """The gate's verdict; ``reason`` starts with a stable code, then the details."""

    ok: bool
    reason: str
    slices: int = 0
    slice_spacing: float | None = None
    orientation: tuple[float, ...] | None = None

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


#: Flips DICOM's LPS patient axes to RAS and back (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Frame:
    """One image plane's geometry as its headers state it; ``None`` where absent or unreadable."""

    orientation: np.ndarray | None
    position: np.ndarray | None
    pixel_spacing: tuple[float, ...] | None
    size: tuple[int, int]
    thickness: float | None = None
    declared_spacing: float | None = None  # SpacingBetweenSlices, centre to centre


def _macro(groups: Dataset | None, keyword: str) -> Dataset | None:
    if groups is None:
        return None
    sequence = groups.get(keyword)
    return sequence[0] if sequence else None


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _vector(value: object, size: int) -> np.ndarray | None:
    """``size`` finite numbers (a single DS reads as one), else None: a malformed header is an
    absent one, so the gate answers with a reason rather than crash."""
    if value is None:
        return None
    values = value if isinstance(value, list | tuple | MultiValue) else [value]
    try:
        vector = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        return None
    return vector if vector.size == size and np.isfinite(vector).all() else None


def _pixel_spacing(value: object) -> tuple[float, float] | None:
    """Row and column spacing, both positive: a negative one would mirror the image."""
    vector = _vector(value, 2)
    if vector is None or (vector <= 0).any():
        return None
    return float(vector[0]), float(vector[1])


def frames_of(ds: Dataset) -> list[Frame]:
    """One entry per image plane: each classic instance, each Enhanced MR frame."""
    size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return [
            Frame(
                _vector(ds.get("ImageOrientationPatient"), 6),
                _vector(ds.get("ImagePositionPatient"), 3),
                _pixel_spacing(ds.get("PixelSpacing")),
                size,
                _positive(ds.get("SliceThickness")),
                _positive(ds.get("SpacingBetweenSlices")),
            )
        ]
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else None
    frames = []
    for groups in per_frame:
        orientation = _macro(groups, "PlaneOrientationSequence") or _macro(shared, "PlaneOrientationSequence")
        position = _macro(groups, "PlanePositionSequence") or _macro(shared, "PlanePositionSequence")
        measures = _macro(groups, "PixelMeasuresSequence") or _macro(shared, "PixelMeasuresSequence")
        frames.append(
            Frame(
                _vector(orientation.get("ImageOrientationPatient"), 6) if orientation is not None else None,
                _vector(position.get("ImagePositionPatient"), 3) if position is not None else None,
                _pixel_spacing(measures.get("PixelSpacing")) if measures is not None else None,
                size,
                _positive(measures.get("SliceThickness")) if measures is not None else None,
                _positive(measures.get("SpacingBetweenSlices")) if measures is not None else None,
            )
        )
    return frames


def _is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in image_type


def check_series_geometry(
    datasets: Sequence[Dataset],
    *,
    min_slices: int = DEFAULT_MIN_SLICES,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
) -> GeometryVerdict:
    """Accept a series only if its planes form one regular stack of at least ``min_slices``."""
    if not datasets:
        return GeometryVerdict(False, "no_instances: the series has no instances")
    if any(_is_localizer(ds) for ds in datasets):
        return GeometryVerdict(False, "localizer: ImageType LOCALIZER/SCOUT in the series")
    frames = [frame for ds in datasets for frame in frames_of(ds)]
    if any(f.orientation is None or f.position is None for f in frames):
        return GeometryVerdict(
            False,
            "missing_geometry: ImageOrientationPatient (6 numbers) or ImagePositionPatient (3) absent "
            "or malformed",
        )
    if any(f.pixel_spacing is None for f in frames):
        return GeometryVerdict(False, "missing_geometry: PixelSpacing absent, or not two positive numbers")
    orientations = np.array([f.orientation for f in frames], dtype=float)
    row, column = orientations[0, :3], orientations[0, 3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
        or abs(row @ column) > ORIENTATION_TOLERANCE
    ):
        return GeometryVerdict(
            False, "invalid_orientation: ImageOrientationPatient is not two orthogonal unit vectors"
        )
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        distinct = {tuple(np.round(o, 3)) for o in orientations}
        return GeometryVerdict(False, f"mixed_orientations: {len(distinct)} image orientations in one series")
    if len({(f.size, f.pixel_spacing) for f in frames}) > 1:
        return GeometryVerdict(
            False, "mixed_image_size: rows, columns or pixel spacing differ between slices"
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    positions = np.array([f.position for f in frames], dtype=float)
    along = positions @ normal
    order = np.argsort(along)
    sorted_along = along[order]
    orientation = tuple(float(v) for v in orientations[0])
    steps = np.diff(sorted_along)
    duplicates = int(np.sum(steps < 1e-3))
    if duplicates:
        return GeometryVerdict(
            False,
            f"duplicate_slices: {duplicates} slice position(s) occur twice",
            len(frames),
            None,
            orientation,
        )
    count = len(frames)
    expected = _declared_count(datasets)
    if expected is not None and expected > count:
        return GeometryVerdict(
            False, f"missing_slices: {count} of {expected} declared images present", count, None, orientation
        )
    if count < min_slices:
        return GeometryVerdict(
            False, f"too_few_slices: {count} slices, at least {min_slices} needed", count, None, orientation
        )
    spacing = float(np.median(steps))
    gaps = steps > spacing * 1.5
    if gaps.any():
        missing = int(np.round(steps[gaps] / spacing).sum() - gaps.sum())
        return GeometryVerdict(
            False,
            f"missing_slices: about {missing} slice(s) missing, largest gap {steps.max():.2f} mm "
            f"for a spacing of {spacing:.2f} mm",
            count,
            spacing,
            orientation,
        )
    deviation = float(np.abs(steps - spacing).max())
    if deviation > max(spacing_tolerance * spacing, 0.01):
        return GeometryVerdict(
            False,
            f"uneven_spacing: slice spacing varies by {deviation:.3f} mm around {spacing:.3f} mm",
            count,
            spacing,
            orientation,
        )
    sparse = _sparse_stack(frames, spacing, spacing_tolerance)
    if sparse is not None:
        return GeometryVerdict(False, sparse, count, spacing, orientation)
    sorted_positions = positions[order]
    in_plane_drift = (sorted_positions[-1] - sorted_positions[0]) - (
        sorted_along[-1] - sorted_along[0]
    ) * normal
    if np.linalg.norm(in_plane_drift) > max(spacing_tolerance * spacing, 0.01) * count:
        return GeometryVerdict(
            False,
            f"skewed_stack: slices shift {np.linalg.norm(in_plane_drift):.2f} mm in-plane across the stack "
            "(gantry tilt or shear)",
            count,
            spacing,
            orientation,
        )
    return GeometryVerdict(True, f"ok: {count} slices, spacing {spacing:.3f} mm", count, spacing, orientation)


def _stated(values: list[float | None], tolerance: float) -> float | None:
    """The value every frame states (within ``tolerance``), else None."""
    if not values or any(v is None for v in values):
        return None
    known = np.array(values, dtype=float)
    return float(known[0]) if np.abs(known - known[0]).max() <= tolerance * known[0] else None


def _sparse_stack(frames: Sequence[Frame], spacing: float, tolerance: float) -> str | None:
    """Why a regular stack still leaves brain unimaged between its slices, or None.

    A series missing every other slice is as regular as a complete one, so the positions
    alone cannot tell; the headers' own SpacingBetweenSlices and SliceThickness can. Some
    older writers put the gap between slices in SpacingBetweenSlices, so a measured
    spacing of thickness plus that gap is taken as that convention, not as missing slices.
    """
    thickness = _stated([f.thickness for f in frames], tolerance)
    declared = _stated([f.declared_spacing for f in frames], tolerance)
    if declared is not None:
        multiple = round(spacing / declared)
        gap_convention = thickness is not None and abs(thickness + declared - spacing) <= tolerance * spacing
        if multiple >= 2 and abs(spacing - multiple * declared) <= tolerance * spacing and not gap_convention:
            return (
                f"missing_slices: slices {spacing:.2f} mm apart where SpacingBetweenSlices states "
                f"{declared:.2f} mm (about {multiple - 1} of every {multiple} slices missing)"
            )
    if thickness is not None and spacing >= 2 * thickness * (1 - tolerance):  # within the tolerance
        return (
            f"sparse_slices: slices {spacing:.2f} mm apart but {thickness:.2f} mm thick, so about half "
            "of the brain or more between them is not imaged"
        )
    return None


def _declared_count(datasets: Sequence[Dataset]) -> int | None:
    """ImagesInAcquisition of classic instances, when every instance states the same count."""
    if any(ds.get("PerFrameFunctionalGroupsSequence") for ds in datasets):
        return None
    declared = {ds.get("ImagesInAcquisition") for ds in datasets}
    if len(declared) != 1:
        return None
    (value,) = declared
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
