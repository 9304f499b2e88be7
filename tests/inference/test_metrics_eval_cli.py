"""brain3d eval end to end on a tiny (untrained) checkpoint: files written, table printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from inference import training
from inference.configuration_brain3d import Brain3DConfig
from inference.metrics import evaluate_reports
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
            "--out", str(tmp_path / "eval"), "--split", "all", "--threads", "1", "--device", "auto",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "paper pathology F1" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cases"] == 4
    assert set(metrics["paper"]) == {"laterality", "anatomy", "pathology"}
    # metrics.json reads back as the scores of the reports written beside it
    pairs = [json.loads(line) for line in (tmp_path / "eval" / "reports.jsonl").read_text().splitlines()]
    rescored = json.loads(
        json.dumps(evaluate_reports([p["reference"] for p in pairs], [p["generated"] for p in pairs]))
    )
    assert {key: metrics[key] for key in rescored} == rescored
    assert (tmp_path / "eval" / "confusion_side.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "samples.md").read_text().count("\n") == 4 + 2


@pytest.mark.parametrize("device", ["gpu0", f"cuda:{torch.cuda.device_count()}"])
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--checkpoint", "none", "--manifest", "none.jsonl"],
        ["train", "--preset", "tiny", "--synthetic", "--cases", "8"],
    ],
)
def test_eval_and_train_refuse_an_unknown_device_before_reading_anything(
    command: list[str], device: str, tmp_path: Path
) -> None:
    """A malformed device, or a GPU this machine does not have."""
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "out"), "--device", device])
    assert result.exit_code == 2
    assert "--device" in result.output and not (tmp_path / "out").exists()
