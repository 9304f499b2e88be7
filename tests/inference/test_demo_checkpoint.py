"""The committed demo checkpoint loads and still reads fresh synthetic cases well.

CI does not retrain it; this runs a quick evaluation on 20 fresh synthetic cases from a seed
never used in training and checks absolute thresholds (the full 200-case figures are in
docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.evaluation import synthetic_evaluation
from inference.modeling_brain3d import Brain3D

DEMO = Path(__file__).resolve().parents[2] / "inference" / "checkpoints" / "demo"


@pytest.fixture(scope="module")
def metrics() -> dict:
    torch.set_num_threads(1)
    model = Brain3D.from_pretrained(DEMO)
    return synthetic_evaluation(model, cases=20, seed=31337)


def test_checkpoint_files_and_model_card() -> None:
    assert (DEMO / "model.safetensors").stat().st_size < 20 * 1024 * 1024
    card = (DEMO / "README.md").read_text()
    assert "not for clinical use" in card and "brain3d train" in card


def test_quick_evaluation_meets_absolute_thresholds(metrics: dict) -> None:
    findings = metrics["findings"]
    # Floors below the 200-case figures of docs/results.md (v23: pathology F1 0.89-0.91, specificity
    # 0.98-1.0, sensitivity 0.89-0.92) with room for 20-case noise; they catch a broken load or
    # preprocessing.
    assert metrics["paper"]["pathology"]["mean"] >= 0.6
    assert findings["abnormal_specificity"] >= 0.8
    assert findings["abnormal_sensitivity"] >= 0.5
    assert findings["hallucination_rate"] <= 0.5
