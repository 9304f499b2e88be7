"""Shortcut probe: outside the lesion and its edema, patients and controls look alike.

Intensity histograms of the model-normalised head (the normalisation ``prepare`` applies,
computed over the whole head, lesion included),
with the lesion and edema masked out (for controls: the matched region a lesion drawn with
the same parameters would occupy), must not separate the two groups: cross-validated AUC of
a logistic regression at most 0.6. A positive control shows the probe has power: with the
p1/p99 scale ``prepare`` deliberately avoids, the lesion's top percentiles dim every
patient's head and the same probe does separate the groups."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from inference.preprocessing import MEDIAN_LEVEL, PERCENTILES, foreground_mask
from inference.synthetic import generate_cases

CASES = 120
BINS = np.linspace(0, 1, 33)


def _histogram(
    volume: np.ndarray, keep: np.ndarray, head: np.ndarray, percentiles=PERCENTILES, level=MEDIAN_LEVEL
) -> np.ndarray:
    low, high = np.percentile(volume[head], percentiles)
    values = np.clip(level * (volume[keep] - low) / (high - low), 0, 1)
    counts, _ = np.histogram(values, bins=BINS)
    return counts / counts.sum()


def _auc(features: np.ndarray, labels: np.ndarray) -> float:
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = cross_val_predict(classifier, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def test_image_statistics_outside_the_lesion_do_not_reveal_the_group() -> None:
    masked, p99_scaled, labels = [], [], []
    for case in generate_cases(CASES, seed=9090, lesional_fraction=0.5):
        head = foreground_mask(case.volume)
        outside = head & ~case.probe_region
        masked.append(_histogram(case.volume, outside, head))
        p99_scaled.append(_histogram(case.volume, outside, head, percentiles=(1.0, 99.0), level=1.0))
        labels.append(case.findings.abnormal)
    y = np.array(labels)
    assert 0.4 < y.mean() < 0.6
    auc_outside = _auc(np.array(masked), y)
    auc_p99 = _auc(np.array(p99_scaled), y)
    print(f"shortcut probe AUC outside the lesion {auc_outside:.3f} (p1/p99 scale instead: {auc_p99:.3f})")
    assert auc_outside <= 0.6
    assert auc_p99 >= 0.7
