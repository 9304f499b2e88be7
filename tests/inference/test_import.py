"""brain3d data import on a miniature BraTS / TextBraTS / healthy tree written here."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_fixtures import as_lps_stored, phantom_head
from typer.testing import CliRunner

from inference.dataset import entry_findings, load_volume, read_manifest
from inference.report_schema import Side, parse
from worker.cli import app

GRID = (16, 32, 32)


def _case(
    folder: Path, flair_name: str, seg_name: str, side_mm: float, enhancing: int, lps: bool = False
) -> np.ndarray:
    """Write a FLAIR phantom with a lesion at ``side_mm`` (RAS x) and its BraTS-style labels."""
    volume, affine = phantom_head(blob_offset_mm=(side_mm, 10.0, 15.0))
    axes = [(np.arange(n) - (n - 1) / 2) * 3.0 for n in volume.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    distance = np.sqrt((x - side_mm) ** 2 + (y - 10) ** 2 + (z - 15) ** 2)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[distance < 21] = 2
    labels[distance < 15] = enhancing
    labels[distance < 8] = 1
    folder.mkdir(parents=True)
    if lps:
        nib.save(as_lps_stored(volume, affine), folder / flair_name)
        nib.save(as_lps_stored(labels, affine), folder / seg_name)
    else:
        nib.save(nib.Nifti1Image(volume, affine), folder / flair_name)
        nib.save(nib.Nifti1Image(labels, affine), folder / seg_name)
    return volume


def _tree(root: Path) -> dict[str, np.ndarray]:
    """BraTS 2020 under ``brats2020`` (with TextBraTS reports), 2021 and 2023 under ``brats``
    (BraTS2021_00007 is BraTS-GLI-00007 before 2023's renaming), and healthy controls."""
    brats2020, brats = root / "brats2020", root / "brats"
    volumes = {
        "2020-001": _case(
            brats2020 / "BraTS20_Training_001",
            "BraTS20_Training_001_flair.nii.gz",
            "BraTS20_Training_001_seg.nii.gz",
            -30,
            4,
        ),
        "2020-002": _case(
            brats2020 / "BraTS20_Training_002",
            "BraTS20_Training_002_flair.nii.gz",
            "BraTS20_Training_002_seg.nii.gz",
            30,
            4,
            lps=True,
        ),
    }
    _case(brats / "BraTS2021_00007", "BraTS2021_00007_flair.nii.gz", "BraTS2021_00007_seg.nii.gz", -30, 4)
    for timepoint in ("000", "001"):
        name = f"BraTS-GLI-00007-{timepoint}"
        _case(brats / name, f"{name}-t2f.nii.gz", f"{name}-seg.nii.gz", 30, 3)
    reports = root / "textbrats"
    reports.mkdir()
    (reports / "BraTS20_Training_001_flair_text.txt").write_text(
        "A lesion in the left frontal lobe with surrounding edema. No necrosis. No ventricular compression.\n"
    )
    healthy = root / "healthy"
    healthy.mkdir()
    volume, affine = phantom_head(blob_offset_mm=(-30.0, 10.0, 15.0))  # same image as BraTS20_Training_001
    nib.save(nib.Nifti1Image(volume, affine), healthy / "sub-01_FLAIR.nii.gz")
    control, control_affine = phantom_head(blob_offset_mm=None, seed=3)
    nib.save(nib.Nifti1Image(control, control_affine), healthy / "sub-02_FLAIR.nii.gz")
    return volumes


def _import(*arguments: str) -> CliRunner:
    return CliRunner().invoke(app, ["data", "import", *arguments])


def test_import_reads_all_layouts_reports_and_labels(tmp_path: Path) -> None:
    _tree(tmp_path)
    brats2020, later = tmp_path / "out2020" / "manifest.jsonl", tmp_path / "out" / "manifest.jsonl"
    result = _import(
        "--brats", str(tmp_path / "brats2020"), "--reports", str(tmp_path / "textbrats"),
        "--healthy", str(tmp_path / "healthy"), "--out", str(brats2020),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(later))
    assert result.exit_code == 0, result.output
    entries = {e["id"]: e for manifest in (brats2020, later) for e in read_manifest(manifest)}
    assert set(entries) == {
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "BraTS2021_00007",
        "BraTS-GLI-00007-000",
        "BraTS-GLI-00007-001",
        "healthy-sub-01_FLAIR",
        "healthy-sub-02_FLAIR",
    }
    textbrats = entries["BraTS20_Training_001"]
    assert textbrats["report_source"] == "textbrats"
    assert textbrats["report"].startswith("A lesion in the left frontal lobe")
    assert entry_findings(textbrats).side is Side.LEFT and not entry_findings(textbrats).necrosis

    # Rendered from labels: the side from RAS positions, whether the file is RAS- or LPS-stored.
    assert entry_findings(entries["BraTS20_Training_002"]).side is Side.RIGHT
    assert entry_findings(entries["BraTS2021_00007"]).side is Side.LEFT
    gli = entry_findings(entries["BraTS-GLI-00007-000"])
    assert gli.side is Side.RIGHT and gli.enhancement and gli.necrosis and gli.edema
    for entry in entries.values():
        assert parse(entry["report"]) == entry_findings(entry) or entry["report_source"] == "textbrats"
    assert not entry_findings(entries["healthy-sub-02_FLAIR"]).abnormal

    # Split by subject: both time points, and the 2021 name of the same patient, together.
    assert (
        len(
            {
                entries[case]["subject"]
                for case in ("BraTS2021_00007", "BraTS-GLI-00007-000", "BraTS-GLI-00007-001")
            }
        )
        == 1
    )
    assert (
        len(
            {
                entries[case]["split"]
                for case in ("BraTS2021_00007", "BraTS-GLI-00007-000", "BraTS-GLI-00007-001")
            }
        )
        == 1
    )
    assert {e["split"] for e in entries.values()} <= {"train", "val", "test"}
    assert json.loads(later.read_text().splitlines()[0])["path"].endswith(".nii.gz")


def test_brats_2020_mixed_with_later_editions_is_refused(tmp_path: Path) -> None:
    """2021 holds 2020's patients under names no table maps: one import could leak across splits."""
    _tree(tmp_path)
    (tmp_path / "brats2020").rename(tmp_path / "brats" / "2020")
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(tmp_path / "manifest.jsonl"))
    assert result.exit_code == 2
    assert "mixes BraTS 2020 cases with BraTS 2021/2023" in result.output
    assert not (tmp_path / "manifest.jsonl").exists()


def _without_orientation(path: Path) -> None:
    image = nib.load(path)
    bare = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    bare.set_sform(None, code=0)
    bare.set_qform(None, code=0)
    nib.save(bare, path)


def _case_2021(root: Path, side_mm: float = -30) -> Path:
    folder = root / "brats" / "BraTS2021_00001"
    _case(folder, "BraTS2021_00001_flair.nii.gz", "BraTS2021_00001_seg.nii.gz", side_mm, 4)
    return folder


@pytest.mark.parametrize("side_mm", [-30.0, 30.0], ids=["left", "right"])
def test_a_segmentation_that_states_no_orientation_is_refused_not_given_a_side(
    tmp_path: Path, side_mm: float
) -> None:
    """nibabel would guess its left-right sense: the side written into the manifest could be the
    wrong one (it was, for a left lesion stored as RAS)."""
    folder = _case_2021(tmp_path, side_mm)
    _without_orientation(folder / "BraTS2021_00001_seg.nii.gz")
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(tmp_path / "manifest.jsonl"))
    assert result.exit_code == 2, result.output
    assert "BraTS2021_00001_seg.nii.gz" in result.output and "states no orientation" in result.output
    assert not (tmp_path / "manifest.jsonl").exists()


def test_inputs_that_are_not_one_volume_are_refused_at_import_naming_the_file(tmp_path: Path) -> None:
    folder = _case_2021(tmp_path)
    flair = folder / "BraTS2021_00001_flair.nii.gz"
    loaded = nib.load(flair)
    image = nib.Nifti1Image(np.asarray(loaded.dataobj), loaded.affine)  # in memory: the file changes
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., None], image.affine), flair)
    out = tmp_path / "manifest.jsonl"
    assert _import("--brats", str(tmp_path / "brats"), "--out", str(out)).exit_code == 0, "one volume of 4D"
    nib.save(nib.Nifti1Image(np.stack([np.asarray(image.dataobj)] * 2, axis=-1), image.affine), flair)
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(out))
    assert result.exit_code == 2 and "is not one 3D volume" in result.output and flair.name in result.output
    flair.write_bytes(flair.read_bytes()[:200])  # truncated
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(out))
    assert result.exit_code == 2 and "BraTS2021_00001" in result.output
    controls = tmp_path / "healthy"
    controls.mkdir()
    nib.save(image, controls / "control.nii.gz")
    _without_orientation(controls / "control.nii.gz")
    result = _import("--healthy", str(controls), "--out", str(out))
    assert (
        result.exit_code == 2
        and "control.nii.gz" in result.output
        and "states no orientation" in result.output
    )


def test_a_case_found_twice_or_a_folder_that_is_not_there_is_refused(tmp_path: Path) -> None:
    folder = _case_2021(tmp_path)
    (folder / "BraTS2021_00001_flair.nii").write_bytes(
        nib.load(folder / "BraTS2021_00001_flair.nii.gz").to_bytes()
    )  # a partial gunzip
    out = tmp_path / "manifest.jsonl"
    result = _import("--brats", str(tmp_path / "brats"), "--out", str(out))
    assert result.exit_code == 2 and "case BraTS2021_00001 is found twice" in result.output
    for option in ("--brats", "--healthy", "--reports"):
        arguments = ["--brats", str(tmp_path / "brats")] if option != "--brats" else []
        result = _import(*arguments, option, str(tmp_path / "mistyped"), "--out", str(out))
        assert result.exit_code == 2 and "does not exist" in result.output, option
    assert not out.exists()


def test_patients_and_controls_share_one_loader(tmp_path: Path) -> None:
    """The same image filed as a BraTS patient and as a healthy control gives the same tensor."""
    _tree(tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    from inference.data_import import import_brats

    import_brats(tmp_path / "brats2020", manifest, None, tmp_path / "healthy")
    entries = {e["id"]: e for e in read_manifest(manifest)}
    patient = load_volume(entries["BraTS20_Training_001"], GRID)
    control = load_volume(entries["healthy-sub-01_FLAIR"], GRID)
    assert torch.equal(patient, control)
    lps_patient = load_volume(entries["BraTS20_Training_002"], GRID)
    assert lps_patient[0, :, :, GRID[2] // 2 :].max() > lps_patient[0, :, :, : GRID[2] // 2].max() - 1e-6


def test_a_case_with_neither_report_nor_labels_is_named_not_dropped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _tree(tmp_path)
    (tmp_path / "brats2020" / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").unlink()
    from inference.data_import import import_brats

    entries = import_brats(tmp_path / "brats2020", tmp_path / "manifest.jsonl", tmp_path / "textbrats")
    assert [entry["id"] for entry in entries] == ["BraTS20_Training_001"]
    assert "1 BraTS case(s) left out" in caplog.text and "BraTS20_Training_002" in caplog.text


def test_a_bids_tree_of_controls_gives_its_flairs_one_subject_each(tmp_path: Path) -> None:
    """Two sessions of one person land in one split; a T1w beside the FLAIR is not taken for a
    FLAIR; files of one name in several folders get ids of their own."""
    volume, affine = phantom_head(blob_offset_mm=None, seed=5)
    healthy = tmp_path / "healthy"
    for relative in (
        "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_FLAIR.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-02/anat/sub-02_FLAIR.nii.gz",
        "site-a/flair.nii.gz",
        "site-b/flair.nii.gz",
    ):
        (healthy / relative).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume, affine), healthy / relative)
    from inference.data_import import import_brats

    entries = import_brats(None, tmp_path / "manifest.jsonl", None, healthy)
    subjects = {entry["id"]: entry["subject"] for entry in entries}
    assert subjects == {
        "healthy-sub-01_ses-1_anat_sub-01_ses-1_FLAIR": "healthy-sub-01",
        "healthy-sub-01_ses-2_anat_sub-01_ses-2_FLAIR": "healthy-sub-01",
        "healthy-sub-02_anat_sub-02_FLAIR": "healthy-sub-02",
        "healthy-site-a_flair": "healthy-site-a",
        "healthy-site-b_flair": "healthy-site-b",
    }
    splits = {entry["split"] for entry in entries if entry["subject"] == "healthy-sub-01"}
    assert len(splits) == 1


def test_lobes_rendered_from_labels_match_where_the_lesion_lies() -> None:
    """A segmentation on a skull-stripped MNI brain (as BraTS gives them) names the lobe the lesion
    was planned in: the brain box the head is mapped onto is the MNI brain's, cerebellum included."""
    from inference.data_import import MNI_BRAIN_BOX, findings_from_segmentation
    from inference.synthetic import _template_world, load_anatomy, plan_lesion, template_affine

    anatomy, world = load_anatomy(), _template_world()
    brain = anatomy.brain > 0.5
    points = world[:, brain]
    np.testing.assert_array_equal(MNI_BRAIN_BOX, np.stack([points.min(1), points.max(1)], axis=1))
    flair = nib.Nifti1Image(np.where(brain, anatomy.gm * 700 + anatomy.wm * 500 + 60, 0), template_affine())
    rng = np.random.default_rng(1)
    agree = 0
    for _ in range(60):
        plan = plan_lesion(rng)
        distance = np.linalg.norm(world - plan.center[:, None, None, None], axis=0)
        labels = np.where(distance < 5, 1, np.where(distance < 8, 2, 0)).astype(np.uint8)
        findings = findings_from_segmentation(flair, nib.Nifti1Image(labels, template_affine()), 4)
        agree += findings.lobes == {plan.lobe}
    assert agree >= 54, f"{agree} of 60 lesions in their planned lobe"


def test_splits_are_seeded_and_stratified_by_side() -> None:
    from inference.dataset import assign_splits

    subjects = [f"s{i}" for i in range(100)]
    strata = ["left"] * 40 + ["right"] * 40 + ["normal"] * 20
    first = assign_splits(subjects, strata, seed=42)
    assert first == assign_splits(subjects, strata, seed=42)
    assert first != assign_splits(subjects, strata, seed=43)
    for side, count in (("left", 40), ("normal", 20)):
        members = [s for s, st in zip(subjects, strata, strict=True) if st == side]
        test_share = sum(first[s] == "test" for s in members) / count
        assert test_share == 0.2


def test_a_broken_manifest_line_is_refused_with_its_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    entry = {"id": "a", "path": "a.nii.gz", "report": "No abnormality.", "findings": {}, "split": "test"}
    manifest.write_text(json.dumps(entry) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: not JSON"):
        read_manifest(manifest)
    manifest.write_text(json.dumps(entry) + "\n" + json.dumps({"id": "b", "path": "b.nii.gz"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: missing report, findings, split"):
        read_manifest(manifest)
