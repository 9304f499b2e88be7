"""`brain3d demo`, the README's first command, run as a user runs it: one process, no services,
in an empty working directory (its SQLite database, spool and queue land under ./var)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from worker.demo import CODED_COLUMN, DIFFERS, FINDING_COLUMN

TABLE_HEADER = "coded in the SR"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    workdir = tmp_path_factory.mktemp("demo")
    env = {key: value for key, value in os.environ.items() if not key.startswith("BRAIN3D_")}
    brain3d = Path(sys.executable).parent / "brain3d"
    run = subprocess.run(
        [str(brain3d), "demo"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, workdir


def _findings_table(output: str) -> dict[str, tuple[str, str, bool]]:
    """finding -> (coded in the SR, synthetic truth, marked as differing), read off the printed table."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if TABLE_HEADER in line) + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        marked = line.endswith(DIFFERS)
        cells = line.removesuffix(DIFFERS).rstrip()
        coded_at = 2 + FINDING_COLUMN
        truth_at = coded_at + CODED_COLUMN
        rows[cells[2:coded_at].strip()] = (cells[coded_at:truth_at].strip(), cells[truth_at:].strip(), marked)
    return rows


def test_the_demo_delivers_both_srs_in_the_source_study(demo: tuple[str, Path]) -> None:
    output, workdir = demo
    assert "job 1: succeeded" in output
    assert "AI-generated, not reviewed; synthetic demo model, not for clinical use" in output
    listed = [Path(line.strip()) for line in output.splitlines() if line.strip().endswith(".dcm")]
    received = [workdir / path if not path.is_absolute() else path for path in listed]
    assert len(received) == 2 and all(path.is_relative_to(workdir / "var" / "demo") for path in received)
    reports = [pydicom.dcmread(path) for path in received]
    assert {report.SOPClassUID for report in reports} == {ComprehensiveSRStorage, Comprehensive3DSRStorage}
    source = next((workdir / "var" / "demo" / "study" / "flair").glob("*.dcm"))
    study_uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    assert {report.StudyInstanceUID for report in reports} == {study_uid}
    assert {report.VerificationFlag for report in reports} == {"UNVERIFIED"}
    # The demo's series states no offset from UTC: nor do its SRs, whose times are local as its are.
    assert not any("TimezoneOffsetFromUTC" in report for report in reports)


def test_the_demo_marks_every_finding_where_the_sr_and_the_truth_differ(demo: tuple[str, Path]) -> None:
    output, _ = demo
    table = _findings_table(output)
    assert {"abnormality", "side", "lobes"} <= set(table)
    for finding, (coded, truth, marked) in table.items():
        assert marked == (coded != truth), finding
    differing = [finding for finding, (_, _, marked) in table.items() if marked]
    if differing:
        assert f"differs from the synthetic truth in: {', '.join(differing)}" in output
    else:
        assert "coded findings match the synthetic truth" in output


def test_the_demo_reports_the_true_side(demo: tuple[str, Path]) -> None:
    coded, truth, _ = _findings_table(demo[0])["side"]
    assert truth in {"left", "right", "bilateral"} and coded == truth


def test_the_demo_reports_the_true_lobe(demo: tuple[str, Path]) -> None:
    coded, truth, _ = _findings_table(demo[0])["lobes"]
    assert coded == truth


def test_the_demo_runs_on_the_configuration_it_is_given(tmp_path: Path) -> None:
    """The node and the worker the demo starts read the --config file too: before, they ran on the
    defaults while the demo waited on the file's database."""
    site = tmp_path / "site"
    config = tmp_path / "site.toml"
    config.write_text(
        f'[storage]\nspool_dir = "{site}/spool"\nwork_dir = "{site}/work"\nreports_dir = "{site}/reports"\n'
        f'[database]\nurl = "sqlite:///{site}/brain3d.db"\naudit_key_file = "{site}/audit.key"\n'
        f'[queue]\nbroker_url = "sqla+sqlite:///{site}/broker.db"\n'
        f'result_backend = "db+sqlite:///{site}/results.db"\n'
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("BRAIN3D_")}
    brain3d = Path(sys.executable).parent / "brain3d"
    run = subprocess.run(
        [str(brain3d), "demo", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "job 1: succeeded" in run.stdout
    assert len(list((site / "demo" / "received").rglob("*.dcm"))) == 2
    assert list((site / "spool").rglob("*.dcm")), "the node spooled into the configured folder"
    assert not (tmp_path / "var").exists(), "nothing ran on the defaults"
