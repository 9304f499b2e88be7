"""Write a 3D volume with its affine as an MR DICOM series, in any orientation.

The volume lives in the voxel space of a nibabel affine (voxel ``(i, j, k)`` to
RAS+ millimetres). The writer chooses the slice grid a scanner would have used
(axial, sagittal or coronal in the scanner's frame, optionally tilted, turned into
patient coordinates by the patient position), samples the volume on that grid
(``scipy.ndimage.map_coordinates``) and writes headers in DICOM's LPS patient
coordinates. Whatever the orientation, slice order or flips, the written
series describes the same physical object: that is what the laterality tests of
the conversion rely on.

Conventions (see ``docs/orientation.md``): DICOM patient coordinates are LPS+
(+x towards the patient's left, +y posterior, +z superior); nibabel world
coordinates are RAS+ (+x towards the patient's right, +y anterior, +z superior),
so ``RAS = diag(-1, -1, 1) @ LPS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy.ndimage import map_coordinates

from dicom_node.acquisition import FLAIR_2D, AcquisitionPreset
from dicom_node.geometry import LPS_TO_RAS
from dicom_node.identity import MANUFACTURER, SOFTWARE_VERSION

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

Orientation = Literal["axial", "sagittal", "coronal"]

#: Image row / column directions of each plane in the scanner (gantry) frame, which
#: equals LPS for a head-first supine patient. Radiological display: patient's left
#: on the image right for axial and coronal, anterior on the left for sagittal.
_PLANE_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}

#: Scanner frame to patient LPS for each patient position (proper rotations): the
#: same gantry plane shows the patient from another side when the patient lies
#: prone or enters feet first, as on a real scanner.
PATIENT_POSITIONS: dict[str, np.ndarray] = {
    "HFS": np.diag([1.0, 1.0, 1.0]),
    "HFP": np.diag([-1.0, -1.0, 1.0]),
    "FFS": np.diag([-1.0, 1.0, -1.0]),
    "FFP": np.diag([1.0, -1.0, -1.0]),
}

#: Stored pixel values span 12 bits, as MR scanners write them.
_STORED_MAX = 4095


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit ``axis``."""
    theta = np.deg2rad(degrees)
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def slice_axes(
    orientation: Orientation,
    *,
    oblique_degrees: float = 0.0,
    flip_rows: bool = False,
    flip_columns: bool = False,
    patient_position: str = "HFS",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and slice-normal directions (LPS) of the written images.

    ``row`` is the direction of increasing column index (IOP's first triplet),
    ``column`` that of increasing row index (IOP's second), ``normal`` their cross
    product. An oblique tilts the plane about the in-plane diagonal, so both the
    left-right and the other in-plane axis mix with the slice direction.
    """
    if orientation not in _PLANE_AXES:
        raise ValueError(f"orientation must be one of {sorted(_PLANE_AXES)}, got {orientation!r}")
    if patient_position not in PATIENT_POSITIONS:
        raise ValueError(f"patient_position must be one of {sorted(PATIENT_POSITIONS)}")
    row_g, col_g = (np.array(v) for v in _PLANE_AXES[orientation])
    tilt = _rotation(row_g + col_g, oblique_degrees)
    to_patient = PATIENT_POSITIONS[patient_position]
    row = to_patient @ tilt @ row_g
    col = to_patient @ tilt @ col_g
    if flip_columns:
        row = -row
    if flip_rows:
        col = -col
    return row, col, np.cross(row, col)


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _closest_voxel_size(affine_lps: np.ndarray, direction: np.ndarray) -> float:
    """The input voxel size along the input axis best aligned with ``direction``."""
    columns = affine_lps[:3, :3]
    sizes = _voxel_sizes(affine_lps)
    cosines = np.abs(direction @ columns) / sizes
    return float(sizes[int(np.argmax(cosines))])


def _format_ds(values: Sequence[float]) -> list[str]:
    """Decimal strings with as many significant digits as DS's 16 characters allow."""
    out = []
    for value in values:
        v = 0.0 if abs(value) < 1e-9 else float(value)
        digits = 12
        while len(text := f"{v:.{digits}g}") > 16:
            digits -= 1
        out.append(text)
    return out


class _Grid:
    """The sampled slice grid: its geometry in LPS and its pixel block."""

    def __init__(
        self,
        volume: np.ndarray,
        affine: np.ndarray,
        row: np.ndarray,
        col: np.ndarray,
        normal: np.ndarray,
        pixel_spacing: tuple[float, float] | None,
        slice_spacing: float | None,
        interpolation_order: int,
    ) -> None:
        affine_lps = np.eye(4)
        affine_lps[:3] = LPS_TO_RAS @ affine[:3]  # the same flip both ways
        # Spacing: between rows (along col), between columns (along row), between slices.
        self.row_spacing, self.column_spacing = pixel_spacing or (
            _closest_voxel_size(affine_lps, col),
            _closest_voxel_size(affine_lps, row),
        )
        self.slice_spacing = slice_spacing or _closest_voxel_size(affine_lps, normal)
        shape = np.array(volume.shape[:3])
        corners = np.array(
            [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
        )
        corners_lps = (affine_lps @ corners.T).T[:, :3]
        basis = np.stack([row, col, normal])  # rows: unit directions
        projected = corners_lps @ basis.T
        low, high = projected.min(axis=0), projected.max(axis=0)
        steps = np.array([self.column_spacing, self.row_spacing, self.slice_spacing])
        counts = np.floor((high - low) / steps + 1e-6).astype(int) + 1
        self.columns, self.rows, self.slices = (int(c) for c in counts)
        self.row, self.col, self.normal = row, col, normal
        self.origin = basis.T @ low  # LPS position of pixel (0, 0) of slice 0
        # LPS position of every sample: (slice, row, column, xyz).
        k = np.arange(self.slices)[:, None, None, None] * self.slice_spacing * normal
        r = np.arange(self.rows)[None, :, None, None] * self.row_spacing * col
        c = np.arange(self.columns)[None, None, :, None] * self.column_spacing * row
        points = self.origin + k + r + c
        voxel = np.linalg.solve(affine_lps[:3, :3], (points - affine_lps[:3, 3]).reshape(-1, 3).T)
        nearest = np.round(voxel)
        voxel = np.where(np.abs(voxel - nearest) < 1e-4, nearest, voxel)
        sampled = map_coordinates(
            np.asarray(volume, dtype=np.float64), voxel, order=interpolation_order, mode="constant", cval=0.0
        )
        self.block = sampled.reshape(self.slices, self.rows, self.columns)

    def position(self, slice_index: int) -> np.ndarray:
        return self.origin + slice_index * self.slice_spacing * self.normal


def _to_stored(block: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
    """uint16 stored values and the (slope, intercept) that map them back.

    Integral data within the uint16 range is stored unchanged. Anything else is
    quantised linearly to 12 bits; with ``rescale`` the slope and intercept are
    written so readers recover the original values.
    """
    finite = np.nan_to_num(block)
    if np.all(finite == np.round(finite)) and finite.min() >= 0 and finite.max() <= 65535:
        return finite.astype(np.uint16), 1.0, 0.0
    low, high = float(finite.min()), float(finite.max())
    slope = (high - low) / _STORED_MAX if high > low else 1.0
    stored = np.clip(np.round((finite - low) / slope), 0, _STORED_MAX).astype(np.uint16)
    return (stored, slope, low) if rescale else (stored, 1.0, 0.0)


def _uid(seed: int | None, *parts: object) -> str:
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=["brain3d-series-writer", str(seed), *map(str, parts)])


def _common_header(
    *,
    preset: AcquisitionPreset,
    patient_id: str,
    patient_name: str,
    accession: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    patient_position: str,
    when: datetime,
    body_part: str | None,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Synthetic MR"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstitutionName = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR BRAIN"
    ds.SeriesDescription = preset.series_description
    ds.ProtocolName = preset.series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    if body_part:
        ds.BodyPartExamined = body_part
    ds.PatientPosition = patient_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.MagneticFieldStrength = preset.magnetic_field_strength
    if preset.contrast_agent:
        ds.ContrastBolusAgent = preset.contrast_agent
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BRAIN3D_" + SOFTWARE_VERSION.replace(".", "")[:8]
    return meta


def _classic_instances(
    base: Dataset,
    preset: AcquisitionPreset,
    grid: _Grid,
    order: list[int],
    stored: np.ndarray,
    slope: float,
    intercept: float,
    seed: int | None,
) -> list[Dataset]:
    datasets = []
    iop = _format_ds([*grid.row, *grid.col])
    window_center, window_width = float(stored.max()) / 2.0, float(max(stored.max(), 1))
    for instance_number, slice_index in enumerate(order, start=1):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(seed, base.SeriesInstanceUID, instance_number)
        ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(preset.image_type)
        ds.ScanningSequence = list(preset.scanning_sequence)
        ds.SequenceVariant = list(preset.sequence_variant)
        ds.ScanOptions = list(preset.scan_options) or ""
        ds.MRAcquisitionType = preset.mr_acquisition_type
        ds.SequenceName = preset.sequence_name
        ds.AngioFlag = "N"
        ds.RepetitionTime = preset.repetition_time
        ds.EchoTime = preset.echo_time
        if preset.inversion_time is not None:
            ds.InversionTime = preset.inversion_time
        ds.EchoTrainLength = preset.echo_train_length
        ds.FlipAngle = preset.flip_angle
        ds.NumberOfAverages = 1
        ds.ImagingFrequency = round(42.576 * preset.magnetic_field_strength, 4)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.SliceThickness = _format_ds([grid.slice_spacing])[0]
        ds.SpacingBetweenSlices = _format_ds([grid.slice_spacing])[0]
        ds.InstanceNumber = instance_number
        ds.ImagesInAcquisition = len(order)
        position = grid.position(slice_index)
        ds.ImagePositionPatient = _format_ds(position)
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = _format_ds([float(position @ grid.normal)])[0]
        ds.PixelSpacing = _format_ds([grid.row_spacing, grid.column_spacing])
        ds.Rows, ds.Columns = grid.rows, grid.columns
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleIntercept = _format_ds([intercept])[0]
            ds.RescaleSlope = _format_ds([slope])[0]
            ds.RescaleType = "US"
        ds.WindowCenter = _format_ds([window_center])[0]
        ds.WindowWidth = _format_ds([window_width])[0]
        ds.PixelData = np.ascontiguousarray(stored[slice_index]).tobytes()
        datasets.append(ds)
    return datasets


def _sequence_item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _sequence_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced_instance(
    base: Dataset,
    preset: AcquisitionPreset,
    grid: _Grid,
    order: list[int],
    stored: np.ndarray,
    slope: float,
    intercept: float,
    seed: int | None,
) -> Dataset:
    """One Enhanced MR Image (multi-frame) with the functional groups readers need.

    Geometry per frame (Plane Position), shared orientation, pixel measures and MR
    physics (timing, echo, modifier with inversion times) in the shared groups,
    frames ordered and indexed by stack position.
    """
    ds = Dataset()
    ds.update(base)
    for keyword in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime"):
        delattr(ds, keyword)
    sop_uid = _uid(seed, base.SeriesInstanceUID, "enhanced")
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", preset.image_flavor, "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1" if preset.echo_time < 30 else "T2"
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionDuration = 0.0
    ds.AcquisitionDateTime = base.ContentDate + base.ContentTime
    ds.ImageComments = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = grid.rows, grid.columns
    ds.AcquisitionContextSequence = []
    # MR Pulse Sequence module.
    ds.PulseSequenceName = preset.sequence_name.lstrip("*")[:16]
    ds.MRAcquisitionType = preset.mr_acquisition_type
    ds.EchoPulseSequence = preset.echo_pulse_sequence
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO" if preset.mr_acquisition_type == "3D" else "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL" if preset.echo_train_length > 1 else "SINGLE"
    ds.CoverageOfKSpace = "FULL" if preset.mr_acquisition_type == "3D" else None
    if ds.CoverageOfKSpace is None:
        del ds.CoverageOfKSpace
    ds.NumberOfKSpaceTrajectories = 1
    # Dimensions: stack ID and in-stack position.
    dimension_uid = _uid(seed, base.SeriesInstanceUID, "dimensions")
    ds.DimensionOrganizationSequence = [_sequence_item(DimensionOrganizationUID=dimension_uid)]
    frame_content_tag = pydicom.tag.Tag("FrameContentSequence")
    ds.DimensionIndexSequence = [
        _sequence_item(
            DimensionOrganizationUID=dimension_uid,
            DimensionIndexPointer=pydicom.tag.Tag("StackID"),
            FunctionalGroupPointer=frame_content_tag,
            DimensionDescriptionLabel="Stack ID",
        ),
        _sequence_item(
            DimensionOrganizationUID=dimension_uid,
            DimensionIndexPointer=pydicom.tag.Tag("InStackPositionNumber"),
            FunctionalGroupPointer=frame_content_tag,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    ]
    shared = Dataset()
    shared.PixelMeasuresSequence = [
        _sequence_item(
            PixelSpacing=_format_ds([grid.row_spacing, grid.column_spacing]),
            SliceThickness=_format_ds([grid.slice_spacing])[0],
            SpacingBetweenSlices=_format_ds([grid.slice_spacing])[0],
        )
    ]
    shared.PlaneOrientationSequence = [
        _sequence_item(ImageOrientationPatient=_format_ds([*grid.row, *grid.col]))
    ]
    shared.FrameAnatomySequence = [
        _sequence_item(
            AnatomicRegionSequence=[_code("12738006", "SCT", "Brain")],
            FrameLaterality="B",
        )
    ]
    shared.PixelValueTransformationSequence = [
        _sequence_item(
            RescaleIntercept=_format_ds([intercept])[0],
            RescaleSlope=_format_ds([slope])[0],
            RescaleType="US",
        )
    ]
    shared.FrameVOILUTSequence = [
        _sequence_item(
            WindowCenter=_format_ds([float(stored.max()) / 2.0])[0],
            WindowWidth=_format_ds([float(max(stored.max(), 1))])[0],
        )
    ]
    shared.MRImageFrameTypeSequence = [
        _sequence_item(
            FrameType=["ORIGINAL", "PRIMARY", preset.image_flavor, "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE",
            AcquisitionContrast=ds.AcquisitionContrast,
        )
    ]
    shared.MRTimingAndRelatedParametersSequence = [
        _sequence_item(
            RepetitionTime=preset.repetition_time,
            FlipAngle=preset.flip_angle,
            EchoTrainLength=preset.echo_train_length,
            RFEchoTrainLength=preset.echo_train_length if preset.echo_pulse_sequence != "GRADIENT" else 0,
            GradientEchoTrainLength=1 if preset.echo_pulse_sequence != "SPIN" else 0,
            GradientOutputType="DB_DT",
            GradientOutput=0.0,
            OperatingModeSequence=[
                _sequence_item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                for kind in ("STATIC FIELD", "RF", "GRADIENT")
            ],
            SpecificAbsorptionRateSequence=[
                _sequence_item(
                    SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.0
                )
            ],
        )
    ]
    shared.MRFOVGeometrySequence = [
        _sequence_item(
            InPlanePhaseEncodingDirection="ROW",
            MRAcquisitionFrequencyEncodingSteps=grid.columns,
            MRAcquisitionPhaseEncodingStepsInPlane=grid.rows,
            PercentSampling=100.0,
            PercentPhaseFieldOfView=100.0,
            **(
                {"MRAcquisitionPhaseEncodingStepsOutOfPlane": len(order)}
                if preset.mr_acquisition_type == "3D"
                else {}
            ),
        )
    ]
    shared.MREchoSequence = [_sequence_item(EffectiveEchoTime=preset.echo_time)]
    shared.MRModifierSequence = [
        _sequence_item(
            InversionRecovery="YES" if preset.is_inversion_recovery else "NO",
            **({"InversionTimes": [preset.inversion_time]} if preset.is_inversion_recovery else {}),
            FlowCompensation="NONE",
            T2Preparation="NO",
            SpectrallySelectedExcitation="NONE",
            SpatialPresaturation="NONE",
            PartialFourier="NO",
            ParallelAcquisition="NO",
        )
    ]
    shared.MRImagingModifierSequence = [
        _sequence_item(
            MagnetizationTransfer="NONE",
            BloodSignalNulling="NO",
            Tagging="NONE",
            TransmitterFrequency=round(42.576 * preset.magnetic_field_strength, 4),
            PixelBandwidth=200.0,
        )
    ]
    shared.MRReceiveCoilSequence = [
        _sequence_item(
            ReceiveCoilName="HEAD",
            ReceiveCoilManufacturerName="",
            ReceiveCoilType="MULTICOIL",
            QuadratureReceiveCoil="NO",
            MultiCoilDefinitionSequence=[
                _sequence_item(MultiCoilElementName="HEAD", MultiCoilElementUsed="YES")
            ],
        )
    ]
    shared.MRTransmitCoilSequence = [
        _sequence_item(TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY")
    ]
    shared.MRAveragesSequence = [_sequence_item(NumberOfAverages=1)]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for frame_number, slice_index in enumerate(order, start=1):
        frame = Dataset()
        frame.FrameContentSequence = [
            _sequence_item(
                StackID="1",
                InStackPositionNumber=frame_number,
                DimensionIndexValues=[1, frame_number],
                FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                FrameReferenceDateTime=ds.AcquisitionDateTime,
                FrameAcquisitionDuration=1000.0,
            )
        ]
        frame.PlanePositionSequence = [
            _sequence_item(ImagePositionPatient=_format_ds(grid.position(slice_index)))
        ]
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    return ds


def build_series(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    preset: AcquisitionPreset = FLAIR_2D,
    orientation: Orientation = "axial",
    oblique_degrees: float = 0.0,
    reverse_slices: bool = False,
    flip_rows: bool = False,
    flip_columns: bool = False,
    patient_position: str = "HFS",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    patient_id: str = "ANON",
    patient_name: str = "Anonymous",
    accession: str = "",
    enhanced: bool = False,
    seed: int | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    slice_spacing: float | None = None,
    rescale: bool = False,
    body_part: str | None = "HEAD",
    interpolation_order: int = 1,
    acquired_at: datetime | None = None,
) -> list[Dataset]:
    """The MR series a scanner would have written for ``volume``.

    ``volume`` is indexed like its nibabel ``affine`` (voxel to RAS+ mm). Slices
    are resampled on the plane's grid (linear interpolation; exact on voxel
    centres for unrotated planes with the input's spacing). ``reverse_slices``
    numbers the slices against the slice normal (descending order);
    ``flip_rows`` / ``flip_columns`` reverse the rows / columns of every image
    and the matching IOP direction. With ``seed`` every UID is deterministic.
    ``enhanced`` writes one Enhanced MR Image Storage instance instead of one
    MR Image Storage instance per slice.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected a 3D volume and a 4x4 affine, got {volume.shape} and {affine.shape}")
    row, col, normal = slice_axes(
        orientation,
        oblique_degrees=oblique_degrees,
        flip_rows=flip_rows,
        flip_columns=flip_columns,
        patient_position=patient_position,
    )
    grid = _Grid(volume, affine, row, col, normal, pixel_spacing, slice_spacing, interpolation_order)
    stored, slope, intercept = _to_stored(grid.block, rescale)
    study_uid = study_uid or _uid(seed, "study")
    series_uid = series_uid or _uid(seed, study_uid, "series", series_number)
    base = _common_header(
        preset=preset,
        patient_id=patient_id,
        patient_name=patient_name,
        accession=accession,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=_uid(seed, series_uid, "frame-of-reference"),
        series_number=series_number,
        patient_position=patient_position,
        when=acquired_at or datetime.now(UTC),
        body_part=body_part,
    )
    order = list(range(grid.slices))
    if reverse_slices:
        order.reverse()
    if enhanced:
        return [_enhanced_instance(base, preset, grid, order, stored, slope, intercept, seed)]
    return _classic_instances(base, preset, grid, order, stored, slope, intercept, seed)


def write_series(out_dir: Path | str, volume: np.ndarray, affine: np.ndarray, **options: Any) -> list[Path]:
    """Write :func:`build_series` (same options) to ``out_dir`` as ``IM<InstanceNumber>.dcm`` files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in build_series(volume, affine, **options):
        path = out / f"IM{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
