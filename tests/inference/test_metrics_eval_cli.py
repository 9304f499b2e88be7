"""brain3d eval end to end on a tiny (untrained) checkpoint: files written, table printed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from inference import training
from inference.configuration_brain3d import Brain3DConfig
from inference.synthetic import write_dataset
from worker.cli import app


def test_eval_writes_metrics_confusion_matrix_and_samples(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    manifest = write_dataset(tmp_path / "data", cases=4, seed=12)
    data = training.synthetic_data(4, seed=12, grid=Brain3DConfig.from_preset("tiny").input_grid)
    training.build_model("tiny", data, seed=0).save_pretrained(tmp_path / "checkpoint")
    result = CliRunner().invoke(
        app,
        [
            "eval", "--checkpoint", str(tmp_path / "checkpoint"), "--manifest", str(manifest),
            "--out", str(tmp_path / "eval"), "--split", "all", "--threads", "1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "paper pathology F1" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cases"] == 4
    assert set(metrics["paper"]) == {"laterality", "anatomy", "pathology"}
    assert 0.0 <= metrics["findings"]["hallucination_rate"] <= 1.0
    assert (tmp_path / "eval" / "confusion_side.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "samples.md").read_text().count("\n") == 4 + 2
