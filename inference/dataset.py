"""Manifests (one JSON object per case) and the one loader every case goes through.

A manifest line: ``id``, ``path`` (a NIfTI file or a DICOM series folder, relative to the
manifest's folder), ``format`` (``nifti`` or ``dicom``), ``report``, ``findings``
(:func:`inference.report_schema.findings_to_dict`), ``split`` (train / val / test),
``subject``, ``source`` and optionally ``seg``. Patients and controls, synthetic and real,
are loaded by :func:`load_volume` alone (:func:`load_volume_and_lesion_mask` adds the mask to
the same tensor): there is no second path a model could learn from.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from inference.preprocessing import HasInputGrid, prepare, prepare_with_mask, require_orientation
from inference.report_schema import Findings, findings_from_dict

#: What every manifest entry must hold (``brain3d synth`` and ``brain3d data import`` write them).
REQUIRED_KEYS = ("id", "path", "report", "findings", "split")


def read_manifest(path: str | Path) -> list[dict]:
    """The entries of a ``manifest.jsonl``; a line that is not a JSON object with the required
    keys is refused with its file and line number."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        missing = [key for key in REQUIRED_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
        entry["_base"] = str(path.parent.resolve())
        entries.append(entry)
    return entries


def write_manifest(path: str | Path, entries: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: v for k, v in entry.items() if not k.startswith("_")}) for entry in entries]
    path.write_text("\n".join(lines) + "\n")


def entry_findings(entry: dict) -> Findings:
    return findings_from_dict(entry["findings"])


def _resolve(entry: dict, key: str = "path") -> Path:
    path = Path(entry[key])
    return path if path.is_absolute() else Path(entry.get("_base", ".")) / path


def load_image(entry: dict) -> nib.spatialimages.SpatialImage:
    """The entry's volume as a nibabel image (DICOM series converted with dicom2nifti)."""
    path = _resolve(entry)
    if entry.get("format", "nifti") == "dicom":
        import dicom2nifti

        with tempfile.TemporaryDirectory() as scratch:
            result = dicom2nifti.dicom_series_to_nifti(str(path), str(Path(scratch) / "flair.nii.gz"))
            image = result["NII"]
            return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    return nib.load(path)


def load_volume(entry: dict, grid: Sequence[int] | HasInputGrid) -> torch.Tensor:
    """The model input ``(1, D, H, W)`` of a manifest entry, whatever its source."""
    return prepare(load_image(entry), grid)


def load_volume_and_lesion_mask(
    entry: dict, grid: Sequence[int] | HasInputGrid
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`load_volume`'s tensor and the entry's lesion mask on the same cells (see
    :func:`inference.preprocessing.prepare_with_mask`): any label above 0 of its ``seg``, resampled
    onto the volume's voxels where the two grids differ; empty for a control; ``None`` for a
    patient without a segmentation."""
    image = load_image(entry)
    if "seg" in entry:
        segmentation = nib.squeeze_image(nib.load(_resolve(entry, "seg")))
        require_orientation(segmentation)  # a guessed frame could put the lesion on the other side
        if segmentation.shape != image.shape[:3] or not np.allclose(
            segmentation.affine, image.affine, atol=1e-3
        ):
            from nibabel.processing import resample_from_to

            segmentation = resample_from_to(segmentation, (image.shape[:3], image.affine), order=0)
        return prepare_with_mask(image, np.asarray(segmentation.dataobj) > 0, grid)
    volume = prepare(image, grid)
    if entry_findings(entry).abnormal:
        return volume, None
    return volume, torch.zeros_like(volume, dtype=torch.bool)


def assign_splits(
    subjects: Sequence[str],
    strata: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> dict[str, str]:
    """Subject -> split, seeded, stratified (each stratum is split in the given fractions).

    Every case of one subject lands in one split, so no subject is in two."""
    stratum_of: dict[str, str] = {}
    for subject, stratum in zip(subjects, strata, strict=True):
        stratum_of.setdefault(subject, stratum)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for subject, stratum in sorted(stratum_of.items()):
        by_stratum[stratum].append(subject)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        members = list(rng.permutation(by_stratum[stratum]))
        cut_train = round(len(members) * fractions[0])
        cut_val = cut_train + round(len(members) * fractions[1])
        for index, subject in enumerate(members):
            assignment[str(subject)] = "train" if index < cut_train else "val" if index < cut_val else "test"
    return assignment


def stratum(findings: Findings) -> str:
    """Split stratum: the side for lesional cases, ``normal`` for controls."""
    if not findings.abnormal:
        return "normal"
    return findings.side.value if findings.side else "unknown-side"
