"""The ablation end to end on the tiny preset: every stage combination and the 2D slice baseline
train from one shared start on the same split, and each is evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference import evaluation, training
from inference.configuration_brain3d import Brain3DConfig
from inference.synthetic import write_dataset


def test_ablation_trains_and_evaluates_each_combination_and_the_slice_baseline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    manifest = write_dataset(tmp_path / "data", cases=40, seed=21)
    results = evaluation.run_ablation(manifest, tmp_path / "ablation", preset="tiny", minutes_scale=0.002)

    assert list(results) == list(evaluation.ABLATION)
    test_cases = sum(json.loads(line)["split"] == "test" for line in manifest.read_text().splitlines())
    assert all(metrics["cases"] == test_cases > 0 for metrics in results.values())
    encoders = {
        name: Brain3DConfig.from_pretrained(Path(metrics["checkpoint"])).vision_encoder
        for name, metrics in results.items()
    }
    assert encoders.pop(evaluation.SLICE_BASELINE) == "2d-slices"
    assert set(encoders.values()) == {"inflated-3d"}
    # The baseline ran every stage; "2b only" ran LoRA alone, from the same start.
    baseline_stages = json.loads((tmp_path / "ablation" / "2d-slices" / "training.json").read_text())[
        "stages"
    ]
    assert [stage["stage"] for stage in baseline_stages] == list(evaluation.ABLATION["1+2a+2b"].stages)
    table = evaluation.ablation_table(results)
    assert table.count("\n") == 2 + len(results) - 1 and evaluation.SLICE_BASELINE in table


def test_training_refuses_a_split_without_two_validation_cases(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path / "data", cases=6, seed=21)
    data = training.manifest_data(manifest, Brain3DConfig.from_preset("tiny").input_grid)
    assert len(data.indices("val")) < 2
    with pytest.raises(ValueError, match="'val' split holds"):
        training.train_pipeline("tiny", ["pretrain-text"], data, tmp_path / "run")
