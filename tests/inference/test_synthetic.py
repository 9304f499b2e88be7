"""Synthetic FLAIR: determinism, controls from the same generator, laterality, brain3d synth."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from typer.testing import CliRunner

from inference.dataset import entry_findings, load_volume, load_volume_and_lesion_mask, read_manifest
from inference.preprocessing import foreground_mask, prepare
from inference.report_schema import NORMAL, Side, parse
from inference.synthetic import EDEMA, generate_cases, lesional_flags, synthesize_case
from worker.cli import app

GRID = (16, 32, 32)


def test_a_case_depends_only_on_its_seed() -> None:
    first = synthesize_case("a", True, (5, 3))
    again = synthesize_case("b", True, (5, 3))
    np.testing.assert_array_equal(first.volume, again.volume)
    assert first.findings == again.findings and first.report == again.report
    other = synthesize_case("c", True, (5, 4))
    assert other.volume.shape != first.volume.shape or not np.array_equal(other.volume, first.volume)


def test_edema_probability_changes_only_whether_the_lesion_has_edema() -> None:
    """Training sets may draw more lesions without edema than the test sets; the lesion is
    otherwise the same one, so such a set shifts one finding, not the whole distribution."""
    with_edema = synthesize_case("a", True, (5, 3), edema_probability=1.0)
    without = synthesize_case("a", True, (5, 3), edema_probability=0.0)
    assert with_edema.findings.edema and not without.findings.edema
    for finding in ("side", "lobes", "size", "necrosis", "enhancement"):
        assert getattr(with_edema.findings, finding) == getattr(without.findings, finding)
    assert (with_edema.lesion_mask == EDEMA).any() and not (without.lesion_mask == EDEMA).any()
    assert ((without.lesion_mask > 0) <= (with_edema.lesion_mask > 0)).mean() > 0.99


def test_seventy_percent_lesional_and_controls_without_lesion() -> None:
    assert lesional_flags(200, seed=1).sum() == 140
    cases = list(generate_cases(12, seed=11))
    for case in cases:
        assert parse(case.report) == case.findings
        if case.findings.abnormal:
            assert (case.lesion_mask > 0).sum() > 20
            assert case.findings.side is not None and len(case.findings.lobes) == 1
        else:
            assert case.findings == NORMAL and not case.lesion_mask.any()
            assert case.probe_region.any()  # the matched region for the shortcut probe
        assert case.volume.shape == case.lesion_mask.shape
        _assert_scalp_then_skull(case.volume)


def _assert_scalp_then_skull(volume: np.ndarray) -> None:
    """Along the left-right line through the head's centre: bright scalp first, then dark bone."""
    head = foreground_mask(volume)
    _, cy, cz = np.argwhere(head).mean(0).round().astype(int)
    line, inside = volume[:, cy, cz], np.nonzero(head[:, cy, cz])[0]
    median = np.median(volume[head])
    first = inside[0]
    assert line[first : first + 2].max() > 0.8 * median
    assert line[first + 1 : first + 8].min() < 0.4 * median


def test_lesion_side_matches_findings_in_ras_and_in_the_model_tensor() -> None:
    checked = {Side.LEFT: 0, Side.RIGHT: 0}
    for case in generate_cases(30, seed=21):
        side = case.findings.side
        if side not in checked:
            continue
        head = np.argwhere(foreground_mask(case.volume))
        lesion = np.argwhere(case.lesion_mask > 0)
        to_world = case.affine[:3, :3]
        head_x = (to_world @ head.mean(0))[0]
        lesion_x = (to_world @ lesion.mean(0))[0]
        assert (lesion_x < head_x) == (side is Side.LEFT)  # RAS: left is negative x
        # Where the lesion lands in the model's tensor: raise its hyperintense part (already above
        # the median, so the normalisation stays put) to the volume's maximum; see which W changes.
        plain = prepare(nib.Nifti1Image(case.volume, case.affine), GRID)[0]
        marked_volume = np.where(np.isin(case.lesion_mask, (2, 3)), case.volume.max(), case.volume)
        marked = prepare(nib.Nifti1Image(marked_volume, case.affine), GRID)[0]
        profile = (marked - plain).clamp_min(0).sum((0, 1))
        width_centre = float((profile * torch.arange(GRID[2])).sum() / profile.sum())
        assert (width_centre < GRID[2] / 2) == (side is Side.LEFT), width_centre
        checked[side] += 1
    assert min(checked.values()) >= 3


def test_synth_command_writes_nifti_and_dicom_that_load_alike(tmp_path: Path) -> None:
    runner = CliRunner()
    for file_format in ("nifti", "dicom"):
        result = runner.invoke(
            app,
            [
                "synth",
                "--out",
                str(tmp_path / file_format),
                "--cases",
                "3",
                "--seed",
                "4",
                "--format",
                file_format,
            ],
        )
        assert result.exit_code == 0, result.output
    nifti = read_manifest(tmp_path / "nifti" / "manifest.jsonl")
    dicom = read_manifest(tmp_path / "dicom" / "manifest.jsonl")
    assert [e["id"] for e in nifti] == [e["id"] for e in dicom]
    for a, b in zip(nifti, dicom, strict=True):
        assert entry_findings(a) == entry_findings(b) and a["split"] in ("train", "val", "test")
        assert (tmp_path / "nifti" / a["seg"]).exists()
        from_nifti, from_dicom = load_volume(a, GRID), load_volume(b, GRID)
        # Written in a random plane, obliquity and slice order, read back to the same patient.
        correlation = torch.corrcoef(torch.stack([from_nifti.flatten(), from_dicom.flatten()]))[0, 1]
        mirrored = torch.corrcoef(torch.stack([from_nifti.flatten(), from_dicom.flip(-1).flatten()]))[0, 1]
        assert correlation > 0.75 and correlation > mirrored, b.get("orientation")
        # The segmentation follows its volume, whichever plane and order the series was written in.
        (volume, nifti_mask), (_, dicom_mask) = (load_volume_and_lesion_mask(e, GRID) for e in (a, b))
        assert torch.equal(volume, from_nifti)
        if not entry_findings(a).abnormal:
            assert not nifti_mask.any() and not dicom_mask.any()
            continue
        overlap = (nifti_mask & dicom_mask).sum() / (nifti_mask | dicom_mask).sum()
        mirrored_overlap = (nifti_mask & dicom_mask.flip(-1)).sum() / (nifti_mask | dicom_mask.flip(-1)).sum()
        assert overlap > 0.5 and overlap > mirrored_overlap, b.get("orientation")
