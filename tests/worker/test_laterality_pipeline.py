"""Laterality through the whole reading path: DICOM in any geometry -> volume -> Brain3D -> SR codes.

A left-sided and a right-sided synthetic lesion, each written as DICOM in axial, sagittal and
coronal planes, ascending and descending, with flipped rows or columns, obliques of 5 and 15
degrees, head-first and feet-first, supine and prone. Every variant goes through the worker's
own stages (``series_to_nifti`` with its geometry gate, ``prepare``, the committed demo model,
the report parser, the SR builder) and the side coded in the SR must be the true side.

Negative control: the same DICOM with its pixels mirrored left-right and its headers unchanged
must make the model report the other side: the assertions can fail, and the model reads
laterality from the image, not from anything else.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from harness import MODEL, lateral_case

from dicom_node.acquisition import FLAIR_2D
from dicom_node.config import ModelSettings
from dicom_node.conversion import series_to_nifti
from dicom_node.series_writer import write_series
from dicom_node.sr import AlgorithmIdentity, build_reports, read_coded_findings
from inference.configuration_brain3d import Brain3DConfig
from inference.preprocessing import prepare
from inference.report_schema import Side, parse
from worker.inference import LoadedModel, generate_report, identify_model, load_model

VARIANTS = {
    "axial-asc": {"orientation": "axial"},
    "axial-desc": {"orientation": "axial", "reverse_slices": True},
    "sagittal-asc": {"orientation": "sagittal"},
    "sagittal-desc": {"orientation": "sagittal", "reverse_slices": True},
    "coronal-asc": {"orientation": "coronal"},
    "coronal-desc": {"orientation": "coronal", "reverse_slices": True},
    "axial-flip-rows": {"orientation": "axial", "flip_rows": True},
    "axial-flip-columns": {"orientation": "axial", "flip_columns": True},
    "coronal-flip-columns": {"orientation": "coronal", "flip_columns": True},
    "axial-oblique-5": {"orientation": "axial", "oblique_degrees": 5.0},
    "axial-oblique-15": {"orientation": "axial", "oblique_degrees": 15.0},
    "sagittal-oblique-15": {"orientation": "sagittal", "oblique_degrees": 15.0},
    "feet-first-supine": {"orientation": "axial", "patient_position": "FFS"},
    "head-first-prone": {"orientation": "axial", "patient_position": "HFP"},
    "feet-first-prone": {"orientation": "coronal", "patient_position": "FFP"},
}
SIDES = (Side.LEFT, Side.RIGHT)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no checkpoint at {MODEL}: the committed demo checkpoint is missing")
    settings = ModelSettings(path=MODEL, device="cpu")
    return load_model(settings, identify_model(settings))


def _read(model: LoadedModel, files: list[Path], work: Path) -> tuple[Side | None, Side | None]:
    """(side in the generated text, side coded in the TID 1500 SR) for one DICOM series."""
    image = series_to_nifti(files, work)
    volume = prepare(image, Brain3DConfig.from_pretrained(MODEL)).numpy()
    text, _ = generate_report(model, volume)
    findings = parse(text)
    identity = model.identity
    pair = build_reports(
        [pydicom.dcmread(path, stop_before_pixels=True) for path in files],
        text,
        findings,
        AlgorithmIdentity(identity.name, identity.version, identity.checkpoint_hash),
        input_hash="0" * 64,
        content_datetime=datetime(2026, 1, 1, tzinfo=UTC),
        synthetic_demo=identity.synthetic_demo,
    )
    return findings.side, read_coded_findings(pair.measurement).side


@pytest.mark.parametrize("side", SIDES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_the_reported_side_is_the_true_side_in_every_geometry(model, variant, side, tmp_path):
    case = lateral_case(side)
    files = write_series(
        tmp_path / "dicom", case.volume, case.affine, preset=FLAIR_2D, seed=3, **VARIANTS[variant]
    )
    text_side, coded_side = _read(model, files, tmp_path / "work")
    assert text_side is coded_side is side


@pytest.mark.parametrize("side", SIDES, ids=str)
@pytest.mark.parametrize("variant", ["axial-asc", "sagittal-desc", "coronal-flip-columns"])
def test_mirrored_pixels_under_an_unchanged_header_flip_the_reported_side(model, variant, side, tmp_path):
    case = lateral_case(side)
    files = write_series(
        tmp_path / "dicom", case.volume, case.affine, preset=FLAIR_2D, seed=3, **VARIANTS[variant]
    )
    for path in files:
        dataset = pydicom.dcmread(path)
        # Mirror the patient left-right inside the unchanged geometry: flip the image axis that
        # runs most along the patient's x (LPS) direction, or reverse the stack for sagittal slices.
        row, column = (
            np.array(dataset.ImageOrientationPatient[:3]),
            np.array(dataset.ImageOrientationPatient[3:]),
        )
        if abs(row[0]) >= 0.5:
            dataset.PixelData = np.ascontiguousarray(dataset.pixel_array[:, ::-1]).tobytes()
        elif abs(column[0]) >= 0.5:
            dataset.PixelData = np.ascontiguousarray(dataset.pixel_array[::-1, :]).tobytes()
        dataset.save_as(path, enforce_file_format=True)
    if variant.startswith("sagittal"):
        # Sagittal slices stack along x: swap the pixel data of slice k and slice n-1-k.
        datasets = [pydicom.dcmread(path) for path in files]
        pixels = [dataset.PixelData for dataset in datasets]
        for dataset, data, path in zip(datasets, reversed(pixels), files, strict=True):
            dataset.PixelData = data
            dataset.save_as(path, enforce_file_format=True)
    text_side, coded_side = _read(model, files, tmp_path / "work")
    assert text_side is coded_side is (Side.RIGHT if side is Side.LEFT else Side.LEFT)
