"""Metrics: hand-worked examples of the paper's keyword F1 and of the stricter finding metrics."""

from __future__ import annotations

import math

import pytest

from inference.metrics import (
    PAPER_KEYWORDS,
    bootstrap_ci,
    evaluate_reports,
    finding_metrics,
    keyword_set,
    paper_metrics,
    set_f1,
    side_confusion,
)
from inference.report_schema import NORMAL, Findings, Lobe, Side


def test_keywords_are_whole_words_after_punctuation_blanking() -> None:
    text = "Lesion (left) in the FRONTAL lobe; lesions, edema! no-necrosis, tumors."
    assert keyword_set(text, PAPER_KEYWORDS["pathology"]) == {"lesion", "edema"}
    assert keyword_set(text, PAPER_KEYWORDS["laterality"]) == {"left"}
    assert keyword_set(text, PAPER_KEYWORDS["anatomy"]) == {"frontal"}


def test_set_f1_hand_worked() -> None:
    # reference {lesion, edema, necrosis}, generated {lesion, edema, mass}: P = R = 2/3.
    assert set_f1(frozenset({"lesion", "edema", "necrosis"}), frozenset({"lesion", "edema", "mass"})) == (
        pytest.approx(2 / 3)
    )
    # reference {left}, generated {left, right}: P = 1/2, R = 1, F1 = 2/3.
    assert set_f1(frozenset({"left"}), frozenset({"left", "right"})) == pytest.approx(2 / 3)
    assert set_f1(frozenset({"left"}), frozenset({"right"})) == 0.0
    assert set_f1(frozenset(), frozenset()) == 1.0
    assert set_f1(frozenset(), frozenset({"lesion"})) == 0.0


def test_paper_metrics_mean_and_interval() -> None:
    references = ["Left frontal lesion with edema.", "No focal abnormality."]
    generated = ["Right frontal lesion with edema.", "No focal abnormality."]
    metrics = paper_metrics(references, generated)
    # laterality: 0 (left vs right) and 1 (both empty) -> 0.5
    assert metrics["laterality"].mean == pytest.approx(0.5)
    assert metrics["anatomy"].mean == 1.0
    assert metrics["pathology"].mean == 1.0
    assert metrics["laterality"].ci_low == 0.0 and metrics["laterality"].ci_high == 1.0


def test_bootstrap_interval_contains_the_mean_and_narrows_with_data() -> None:
    small = bootstrap_ci([0, 1] * 5)
    large = bootstrap_ci([0, 1] * 500)
    assert small[0] < 0.5 < small[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5


def test_finding_metrics_hand_worked() -> None:
    left_frontal = Findings(True, Side.LEFT, frozenset({Lobe.FRONTAL}), edema=True)
    references = [left_frontal, left_frontal, NORMAL, NORMAL]
    generated = [
        left_frontal,  # correct: 3 asserted items
        Findings(True, Side.RIGHT, frozenset({Lobe.FRONTAL}), edema=True, necrosis=True),  # 2 hallucinated
        Findings(True, Side.LEFT, frozenset({Lobe.TEMPORAL})),  # false positive: 3 hallucinated
        NORMAL,
    ]
    metrics = finding_metrics(references, generated)
    assert metrics["laterality_error"] == 0.5
    assert metrics["abnormal_sensitivity"] == 1.0
    assert metrics["abnormal_specificity"] == 0.5
    # asserted: 4 + 5 + 3 = 12 items; absent from reference: side:right, necrosis, + 3 = 5
    assert metrics["asserted_findings"] == 12
    assert metrics["hallucination_rate"] == pytest.approx(5 / 12)
    edema = metrics["per_finding"]["edema"]
    assert (edema["tp"], edema["fp"], edema["fn"], edema["tn"]) == (2, 0, 0, 2)
    assert math.isnan(metrics["per_finding"]["side:bilateral"]["sensitivity"])
    labels, matrix = side_confusion(references, generated)
    assert matrix[labels.index("left"), labels.index("right")] == 1
    assert matrix[labels.index("normal"), labels.index("left")] == 1
    assert (metrics["lesional_cases_with_side"], metrics["lesional_cases_without_side"]) == (2, 0)
    unsided = finding_metrics([*references, Findings(True)], [*generated, left_frontal])
    assert (unsided["lesional_cases_with_side"], unsided["lesional_cases_without_side"]) == (2, 1)
    assert unsided["laterality_error"] == 0.5, "a reference with no side cannot be judged: counted apart"


def test_evaluate_reports_reads_assertions_not_keywords() -> None:
    # The paper's pathology F1 is perfect although the generation negates every finding.
    reference = "A lesion in the left frontal lobe. Surrounding edema is present. Central necrosis is noted."
    generated = "A lesion in the left frontal lobe. No edema. No necrosis."
    metrics = evaluate_reports([reference], [generated])
    assert metrics["paper"]["pathology"]["mean"] == 1.0
    assert metrics["findings"]["per_finding"]["edema"]["sensitivity"] == 0.0
    assert 0 < metrics["text"]["bleu4"] < 1 and 0 < metrics["text"]["rougeL"] < 1


def test_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="references"):
        paper_metrics(["a"], [])
