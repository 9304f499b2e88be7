"""Series to NIfTI: the geometry gate, then dicom2nifti, then independent affine and pixel checks.

dicom2nifti builds the NIfTI affine in RAS+ from the DICOM LPS headers (it negates
the x and y rows of the LPS slice affine). Because a left-right error is the worst
failure of this product, what it returns is checked against the headers alone: its
affine against one computed here (IOP, IPP, PixelSpacing; a disagreement of more than
a tenth of a millimetre), and every frame's pixels against the slice that affine puts
the frame's position at. Either failing raises :class:`ConversionError` rather than
pass a possibly mirrored volume on.

dicom2nifti places classic slices by InstanceNumber and Enhanced MR frames by
InStackPositionNumber, but takes the slice direction from positions; neither number is
tied to position by the standard. So the slices are handed to it numbered by position
along the normal (and an Enhanced MR instance's frames stored in that order). The
returned image is RAS-canonical (``nibabel.as_closest_canonical``), the layout
``inference.prepare`` expects.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import dicom2nifti
import dicom2nifti.settings
import nibabel as nib
import numpy as np
import pydicom
from dicom2nifti import convert_generic
from dicom2nifti.exceptions import ConversionError as Dicom2niftiConversionError
from dicom2nifti.exceptions import ConversionValidationError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.geometry import (
    DEFAULT_MIN_SLICES,
    LPS_TO_RAS,
    GeometryVerdict,
    check_series_geometry,
    frames_of,
)

log = logging.getLogger(__name__)

#: Largest disagreement (mm) tolerated between dicom2nifti's affine and ours: positions written
#: to a tenth of a millimetre must pass; a mirrored or reversed stack is off by centimetres.
AFFINE_TOLERANCE_MM = 0.1


class ConversionError(Exception):
    """The series cannot be turned into a volume; ``reason`` goes to the job and the audit trail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GeometryError(ConversionError):
    """The geometry gate refused the series before conversion."""

    def __init__(self, verdict: GeometryVerdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def _configure_dicom2nifti() -> None:
    """Validation on, resampling off: an irregular stack is refused, never silently reshaped."""
    dicom2nifti.settings.enable_validate_slicecount()
    dicom2nifti.settings.enable_validate_orientation()
    dicom2nifti.settings.enable_validate_orthogonal()
    dicom2nifti.settings.enable_validate_slice_increment()
    dicom2nifti.settings.disable_resampling()


def _read(files: Sequence[Path]) -> list[Dataset]:
    """The datasets of ``files``. A file that is not DICOM is a conversion error (the series is not
    analysed); an I/O error (a shared spool gone for a moment) is not, and propagates: the job
    fails with it and can be retried."""
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, ValueError) as exc:
            raise ConversionError(f"unreadable: {Path(path).name}: {exc}") from None
    return datasets


def _check_affine(image: nib.Nifti1Image, datasets: Sequence[Dataset]) -> None:
    """dicom2nifti's image must hold every frame, and its affine put voxel (0, 0, k) on the first
    pixel of the k-th frame, in RAS.

    Array axis 0 runs along the image rows (IOP's first triplet), axis 1 down the
    columns, axis 2 through the frames in stack order along the slice normal, one
    way or the other (dicom2nifti sorts classic slices by their largest coordinate
    and Enhanced frames by in-stack position).
    """
    frames = [frame for ds in datasets for frame in frames_of(ds)]  # complete: the gate checked them
    if image.shape[2] != len(frames):
        raise ConversionError(
            f"slice_count_mismatch: dicom2nifti made {image.shape[2]} slices of the {len(frames)} received"
        )
    affine = image.affine
    iop, spacing = frames[0].orientation, frames[0].pixel_spacing
    assert iop is not None and spacing is not None
    row_spacing, column_spacing = spacing
    normal = np.cross(iop[:3], iop[3:])
    expected_axes = np.stack(
        [LPS_TO_RAS @ iop[:3] * column_spacing, LPS_TO_RAS @ iop[3:] * row_spacing], axis=1
    )
    if not np.allclose(affine[:3, :2], expected_axes, atol=1e-4):
        raise ConversionError("affine_mismatch: dicom2nifti's in-plane axes disagree with the headers")
    stack = np.array(sorted((frame.position for frame in frames), key=lambda p: float(p @ normal)))
    slice_index = np.arange(len(stack))[:, None]
    converted = slice_index * affine[:3, 2] + affine[:3, 3]
    for order in (stack, stack[::-1]):
        if np.abs(converted - order @ LPS_TO_RAS).max() <= AFFINE_TOLERANCE_MM:
            return
    raise ConversionError("affine_mismatch: dicom2nifti's slice positions disagree with the headers")


def _check_pixels(image: nib.Nifti1Image, datasets: Sequence[Dataset]) -> None:
    """Every frame's pixels must be, up to a linear rescale, the slice that ``image``'s affine
    puts the frame's position at: this catches a stack whose pixels run one way and whose
    affine the other, which no header check sees."""
    data = np.asarray(image.dataobj)
    to_voxels = np.linalg.inv(image.affine)
    for ds in datasets:
        planes = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
        for frame, plane in zip(frames_of(ds), planes, strict=True):
            assert frame.position is not None  # the gate checked it
            index = to_voxels @ np.append(LPS_TO_RAS @ frame.position, 1.0)
            k = int(np.rint(index[2]))
            stored = plane.astype(np.float64).ravel()
            if not 0 <= k < data.shape[2]:
                raise ConversionError("pixel_mismatch: a frame's position lies outside the converted volume")
            if stored.std() == 0:
                continue  # a constant frame cannot be told from another
            converted = data[:, :, k].T.astype(np.float64).ravel()
            slope, intercept = np.polyfit(stored, converted, 1)
            residual = float(np.sqrt(np.mean((converted - slope * stored - intercept) ** 2)))
            if slope <= 0 or residual > max(0.5, 1e-3 * float(converted.std())):
                raise ConversionError(
                    f"pixel_mismatch: slice {k} of the converted volume does not hold the pixels of the "
                    "frame its affine puts there (slices reversed or reordered)"
                )


def _is_multi_frame(dataset: Dataset) -> bool:
    return int(dataset.get("NumberOfFrames") or 1) > 1


def _along_normal(frames: Sequence) -> np.ndarray:  # type: ignore[type-arg]
    """Each frame's rank along the slice normal (0 for the first)."""
    orientation = frames[0].orientation
    normal = np.cross(orientation[:3], orientation[3:])
    return np.argsort(np.argsort([float(frame.position @ normal) for frame in frames], kind="stable"))


def _numbered_by_position(datasets: list[Dataset]) -> list[Dataset]:
    """The classic slices with InstanceNumber set to their rank along the normal (in memory)."""
    ranks = _along_normal([frames_of(ds)[0] for ds in datasets])
    for ds, rank in zip(datasets, ranks, strict=True):
        ds.InstanceNumber = int(rank) + 1
    return datasets


def _frames_in_stack_order(dataset: Dataset) -> Dataset:
    """A copy of an Enhanced MR instance with its frames (pixels and per-frame groups) stored in
    order along the normal and numbered so, and a shared pixel value transformation given to
    every frame (dicom2nifti reads it per frame only)."""
    frames = frames_of(dataset)
    ranks = _along_normal(frames)
    order = np.argsort(ranks)
    ordered = copy.deepcopy(dataset)
    groups = [ordered.PerFrameFunctionalGroupsSequence[int(i)] for i in order]
    shared = ordered.get("SharedFunctionalGroupsSequence")
    shared_rescale = shared[0].get("PixelValueTransformationSequence") if shared else None
    for rank, group in enumerate(groups):
        if "FrameContentSequence" not in group:
            group.FrameContentSequence = [Dataset()]
        group.FrameContentSequence[0].InStackPositionNumber = rank + 1
        if shared_rescale is not None and "PixelValueTransformationSequence" not in group:
            group.PixelValueTransformationSequence = copy.deepcopy(shared_rescale)
    ordered.PerFrameFunctionalGroupsSequence = groups
    if (order != np.arange(len(order))).any():
        ordered.set_pixel_data(
            dataset.pixel_array[order],
            str(dataset.PhotometricInterpretation),
            int(dataset.BitsStored),
            generate_instance_uid=False,
        )
    return ordered


def series_to_nifti(
    files: Sequence[Path],
    work_dir: Path | str,
    *,
    min_slices: int = DEFAULT_MIN_SLICES,
) -> nib.Nifti1Image:
    """Convert one series (classic MR slices or one Enhanced MR instance) to a RAS-canonical volume.

    Raises :class:`GeometryError` when the gate refuses the series and
    :class:`ConversionError` for anything else; both carry ``reason``. The NIfTI
    file dicom2nifti writes is kept as ``work_dir/series.nii.gz`` for inspection.
    """
    if not files:
        raise ConversionError("no_instances: no files given")
    datasets = _read(files)
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise ConversionError(f"mixed_series: {len(series_uids)} SeriesInstanceUIDs in one conversion")
    (series_uid,) = series_uids
    verdict = check_series_geometry(datasets, min_slices=min_slices)
    if not verdict.ok:
        log.info("geometry gate refused series %s: %s", series_uid, verdict.reason)
        raise GeometryError(verdict)
    if any("PixelData" not in ds for ds in datasets):
        raise ConversionError("no_pixel_data: an instance carries no pixel data")
    if len(datasets) > 1 and any(_is_multi_frame(ds) for ds in datasets):
        raise ConversionError(
            f"split_multiframe: {len(datasets)} instances, multi-frame among them (dicom2nifti reads "
            "a multi-frame series only as one instance)"
        )
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    nifti_path = out / "series.nii.gz"
    _configure_dicom2nifti()
    try:
        if _is_multi_frame(datasets[0]):  # then the only instance: checked above
            # What dicom2nifti's Siemens, Philips and generic converters do with an anatomical
            # multi-frame instance; its GE converter reads none.
            result = convert_generic.multiframe_to_nifti(
                [_frames_in_stack_order(datasets[0])], str(nifti_path)
            )
        else:
            result = dicom2nifti.convert_dicom.dicom_array_to_nifti(
                _numbered_by_position(datasets), str(nifti_path), reorient_nifti=False
            )
    except (Dicom2niftiConversionError, ConversionValidationError) as exc:
        raise ConversionError(f"dicom2nifti: {exc}") from None
    except OSError:
        raise  # the disk, not the series: the job fails and may be retried
    except Exception as exc:  # anything else the series' content provokes: not analysed, with why
        raise ConversionError(f"dicom2nifti: {type(exc).__name__}: {exc}") from None
    image = result["NII"]
    if image.ndim != 3:
        raise ConversionError(f"not_3d: dicom2nifti produced shape {image.shape}")
    _check_affine(image, datasets)
    _check_pixels(image, datasets)
    canonical = nib.as_closest_canonical(image)
    log.info(
        "converted series %s to %s voxels %s", series_uid, canonical.shape, nib.aff2axcodes(canonical.affine)
    )
    return canonical
