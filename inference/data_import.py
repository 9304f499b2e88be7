"""Import real data into a manifest: BraTS 2020 / 2021 / 2023 folders, TextBraTS reports and a
folder of healthy FLAIR NIfTI files.

Layouts recognised (any depth below ``--brats``):

- 2020: ``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz`` and ``..._seg.nii.gz``;
- 2021: ``BraTS2021_00000/BraTS2021_00000_flair.nii.gz`` and ``..._seg.nii.gz``;
- 2023: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz`` and ``...-seg.nii.gz``
  (the last number is the time point: the subject is ``BraTS-GLI-00000``).

A TextBraTS report ``<case>_flair_text.txt`` found under ``--reports`` is used verbatim; else a
report is rendered through the schema from the segmentation: side from the lesion's position
relative to the head's own midline (bilateral when the smaller side holds at least a quarter
of it), lobe from the lesion centroid mapped to MNI-like coordinates by the head's bounding box,
edema from label 2, necrosis from label 1, enhancement from label 4 (2020/2021) or 3 (2023),
size from the tumour core's equivalent radius, ventricular compression when the lesion reaches
the periventricular box of :mod:`inference.synthetic`; midline shift is not derived (False).
Findings of TextBraTS reports are read with :func:`inference.report_schema.parse`.

Healthy controls: in a BIDS tree, the files with the ``FLAIR`` suffix, one subject per ``sub-``
entity (its sessions share a split); elsewhere every NIfTI, one subject per top folder.

Two limits of the data, not of the code. BraTS 2020/2021 label 1 is necrotic *and non-enhancing*
tumour core, so reports rendered from labels call necrosis more often than a radiologist would
(TextBraTS reports, where they exist, are used instead). BraTS images are skull-stripped and
registered, a folder of clinical controls usually is not: one loader treats both alike, but the
images differ in what they show, a shortcut a model can learn. Skull-strip such controls first
(e.g. SynthStrip or HD-BET) and check the imported manifest with the shortcut probe.
A case with neither a report nor labels is left out, and named in a warning.

Splits are by subject, stratified by side, seeded (70/10/20). A BraTS 2021 case and its BraTS
2023 renaming are one subject; BraTS 2020 cannot be mixed with the later editions in one import
(they share patients under names no published table maps).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from inference.dataset import assign_splits, stratum, write_manifest
from inference.preprocessing import foreground_mask, require_orientation
from inference.report_schema import (
    NORMAL,
    NORMAL_SENTENCES,
    Findings,
    Side,
    Size,
    findings_to_dict,
    parse,
)
from inference.report_schema import render as render_report
from inference.synthetic import LOBE_CODES, SIZE_RADIUS_MM, lobe_map, ventricle_box

logger = logging.getLogger(__name__)

_FLAIR = re.compile(r"^(?P<case>.+?)(?:_flair|-t2f)\.nii(?:\.gz)?$")
#: MNI brain extent (mm) the head's bounding box is mapped onto, per RAS axis: that of the MNI152
#: brain mask (``inference.synthetic.load_anatomy``), cerebellum included (tested).
MNI_BRAIN_BOX = np.array([[-72.0, 72.0], [-105.0, 72.0], [-72.0, 81.0]])
#: The BIDS subject entity, and a BIDS file's suffix (its contrast, e.g. ``FLAIR``, ``T1w``).
_BIDS_SUBJECT = re.compile(r"(?:^|[/_])(sub-[A-Za-z0-9]+)")
_BIDS_SUFFIX = re.compile(r"_(?P<suffix>[A-Za-z0-9]+)\.nii(?:\.gz)?$")


def _subject_of(case: str) -> str:
    """The patient behind a case name, the same across editions: BraTS 2023 renamed BraTS 2021's
    ``BraTS2021_00007`` to ``BraTS-GLI-00007-000`` (the last number a time point)."""
    if match := re.match(r"^BraTS2021_(\d+)$", case):
        return f"BraTS-GLI-{match.group(1)}"
    match = re.match(r"^(BraTS-[A-Z]+-\d+)-\d+$", case)
    return match.group(1) if match else case


def _refuse_mixed_2020(cases: list[str]) -> None:
    """BraTS 2021 holds BraTS 2020's patients under new names and no published table maps them:
    mixed in one import, one patient could land in training and test."""
    is_2020 = [case.startswith("BraTS20_") for case in cases]
    if any(is_2020) and not all(is_2020):
        raise ValueError(
            "the --brats folder mixes BraTS 2020 cases with BraTS 2021/2023 ones, which include the "
            "same patients under names that cannot be matched: import one edition (TextBraTS "
            "reports are BraTS 2020's)"
        )


def _volume(path: Path) -> nib.spatialimages.SpatialImage:
    """``path`` as one oriented 3D image, from its header; anything else is refused naming the
    file, at import rather than in training."""
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel's, gzip's and the OS's errors alike
        raise ValueError(f"{path}: cannot be read as NIfTI: {error}") from None
    return _oriented_3d(image, str(path))


def _oriented_3d(image: nib.spatialimages.SpatialImage, name: str) -> nib.spatialimages.SpatialImage:
    """One 3D volume (a trailing axis of one squeezed away, as ``prepare`` does) whose header
    says where left is: a segmentation without one would give its lesion a guessed side."""
    if len(image.shape) == 4 and image.shape[3] == 1:
        image = nib.squeeze_image(image)
    if len(image.shape) != 3:
        raise ValueError(f"{name}: shape {image.shape} is not one 3D volume")
    try:
        require_orientation(image)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return image


def _seg_path(flair: Path, case: str) -> Path | None:
    for name in (f"{case}_seg.nii.gz", f"{case}_seg.nii", f"{case}-seg.nii.gz", f"{case}-seg.nii"):
        if (flair.parent / name).exists():
            return flair.parent / name
    return None


def _refuse_duplicates(flairs: list[tuple[Path, str]]) -> None:
    """One case found twice (``.nii`` beside ``.nii.gz`` after a partial gunzip) would be counted,
    and perhaps split, twice."""
    seen: dict[str, Path] = {}
    for path, case in flairs:
        if case in seen:
            raise ValueError(f"case {case} is found twice: {seen[case]} and {path}; keep one")
        seen[case] = path


def findings_from_segmentation(
    flair: nib.spatialimages.SpatialImage, seg: nib.spatialimages.SpatialImage, enhancing_label: int
) -> Findings:
    """Findings of a BraTS-style label map (see the module docstring for the rules)."""
    flair = nib.as_closest_canonical(_oriented_3d(flair, "the FLAIR"))
    seg = nib.as_closest_canonical(_oriented_3d(seg, "the segmentation"))
    labels = np.asarray(seg.dataobj).astype(np.int16)
    lesion = labels > 0
    if not lesion.any():
        return NORMAL
    head = foreground_mask(np.asarray(flair.dataobj, dtype=np.float32))

    def world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return (affine[:3, :3] @ np.argwhere(mask).T + affine[:3, 3:4]).T

    head_points = world(head, flair.affine)
    low, high = head_points.min(0), head_points.max(0)
    lesion_points = world(lesion, seg.affine)
    midline = (low[0] + high[0]) / 2
    left = float(np.mean(lesion_points[:, 0] < midline))
    minority = min(left, 1 - left)
    side = Side.BILATERAL if minority >= 0.25 else Side.LEFT if left > 0.5 else Side.RIGHT
    # Head box -> MNI brain box, axis by axis.
    mni = (
        MNI_BRAIN_BOX[:, 0]
        + (lesion_points - low) / np.maximum(high - low, 1e-6) * np.diff(MNI_BRAIN_BOX, axis=1)[:, 0]
    )
    centroid = mni.mean(0)
    code = int(lobe_map(centroid.reshape(3, 1, 1, 1))[0, 0, 0])
    lobe = {v: k for k, v in LOBE_CODES.items()}[code]
    voxel_volume = float(abs(np.linalg.det(seg.affine[:3, :3])))
    core = np.isin(labels, [1, 3, 4]).sum() * voxel_volume
    radius = (3 * core / (4 * np.pi)) ** (1 / 3)
    size = (
        Size.SMALL
        if radius < SIZE_RADIUS_MM[Size.MEDIUM][0]
        else Size.MEDIUM
        if radius < SIZE_RADIUS_MM[Size.LARGE][0]
        else Size.LARGE
    )
    periventricular = ventricle_box(*mni.T)
    return Findings(
        abnormal=True,
        side=side,
        lobes=frozenset({lobe}),
        edema=bool((labels == 2).any()),
        necrosis=bool((labels == 1).any()),
        enhancement=bool((labels == enhancing_label).any()),
        ventricular_compression=bool(periventricular.any()),
        midline_shift=False,
        size=size,
    )


def _find_reports(reports_dir: Path | None) -> dict[str, Path]:
    if reports_dir is None:
        return {}
    return {p.name[: -len("_flair_text.txt")]: p for p in reports_dir.rglob("*_flair_text.txt")}


def _healthy_flairs(healthy_dir: Path | None) -> list[tuple[Path, str, str]]:
    """(path, case id, subject) of each FLAIR under ``healthy_dir``: in a BIDS tree only files with
    the ``FLAIR`` suffix (not its T1w or T2w), the subject its ``sub-`` entity (so that sessions of one
    person share a split); elsewhere every NIfTI, the subject its top folder (or its own name)."""
    found = []
    for path in sorted(healthy_dir.rglob("*.nii*") if healthy_dir else []):
        relative = path.relative_to(healthy_dir).as_posix()
        bids_subject = _BIDS_SUBJECT.search(relative)
        suffix = _BIDS_SUFFIX.search(path.name)
        if bids_subject and not (suffix and suffix.group("suffix").upper() == "FLAIR"):
            continue
        stem = re.sub(r"\.nii(\.gz)?$", "", relative)
        subject = bids_subject.group(1) if bids_subject else stem.split("/")[0]
        found.append((path, "healthy-" + stem.replace("/", "_"), "healthy-" + subject))
    return found


def import_brats(
    brats_dir: Path | None,
    out: Path,
    reports_dir: Path | None = None,
    healthy_dir: Path | None = None,
    seed: int = 42,
) -> list[dict]:
    """Write a manifest of BraTS cases (with reports) and healthy controls; returns its entries."""
    reports = _find_reports(reports_dir)
    base = out.parent.resolve()
    entries: list[dict] = []
    flairs = sorted(
        (path, match.group("case"))
        for path in (brats_dir.rglob("*.nii*") if brats_dir else [])
        if (match := _FLAIR.match(path.name))
    )
    _refuse_mixed_2020([case for _, case in flairs])
    _refuse_duplicates(flairs)
    if reports_dir is not None and not reports:
        logger.warning("no <case>_flair_text.txt under %s: every report is rendered from labels", reports_dir)
    unlabelled = []
    for flair_path, case in flairs:
        seg_path = _seg_path(flair_path, case)
        enhancing = 3 if flair_path.name.endswith(("-t2f.nii.gz", "-t2f.nii")) else 4
        if case in reports:
            report = reports[case].read_text().strip()
            findings, report_source = parse(report), "textbrats"
        elif seg_path is not None:
            try:
                findings = findings_from_segmentation(_volume(flair_path), _volume(seg_path), enhancing)
            except (ValueError, OSError, EOFError) as error:  # a file truncated in its data, too
                raise ValueError(f"case {case}: {error}") from None
            report, report_source = render_report(findings), "rendered-from-seg"
        else:  # neither a report nor labels: nothing to learn or score against
            unlabelled.append(case)
            continue
        entry = {
            "id": case,
            "subject": _subject_of(case),
            "source": "brats",
            "path": os.path.relpath(flair_path.resolve(), base),
            "format": "nifti",
            "report": report,
            "report_source": report_source,
            "findings": findings_to_dict(findings),
        }
        if seg_path is not None:
            entry["seg"] = os.path.relpath(seg_path.resolve(), base)
        entries.append(entry)
    if unlabelled:
        logger.warning(
            "%d BraTS case(s) left out, with neither a report under --reports nor a segmentation "
            "named <case>_seg / <case>-seg beside the FLAIR: %s",
            len(unlabelled),
            ", ".join(unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else ""),
        )
    for path, case, subject in _healthy_flairs(healthy_dir):
        _volume(path)
        entries.append(
            {
                "id": case,
                "subject": subject,
                "source": "healthy",
                "path": os.path.relpath(path.resolve(), base),
                "format": "nifti",
                "report": NORMAL_SENTENCES[0],
                "report_source": "healthy-folder",
                "findings": findings_to_dict(NORMAL),
            }
        )
    splits = assign_splits(
        [e["subject"] for e in entries], [stratum(parse(e["report"])) for e in entries], seed
    )
    for entry in entries:
        entry["split"] = splits[entry["subject"]]
    write_manifest(out, entries)
    return entries
