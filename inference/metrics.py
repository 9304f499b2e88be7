"""Report metrics: the paper's keyword-set F1 exactly as its code defines it, and stricter
per-finding metrics read through the report schema's parser.

The keyword metric counts a keyword whether it is asserted or negated and misses plurals;
it rewards a template. The per-finding metrics (sensitivity, specificity, laterality error,
hallucination rate) compare what reports *assert*, via :func:`inference.report_schema.parse`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.report_schema import Findings, Lobe, Side, parse

#: The paper's keyword lists (its code, verbatim).
PAPER_KEYWORDS: dict[str, tuple[str, ...]] = {
    "laterality": ("left", "right", "bilateral"),
    "anatomy": ("frontal", "parietal", "temporal", "occipital", "cerebellum", "ventricle", "periventricular"),
    "pathology": ("edema", "necrosis", "enhancement", "compression", "tumor", "mass", "lesion"),
}
_PUNCTUATION = str.maketrans(dict.fromkeys(".,;!?()", " "))


def keyword_set(text: str, keywords: Sequence[str]) -> frozenset[str]:
    """Keywords present as whole words after lowercasing and blanking ``. , ; ! ? ( )``."""
    words = set(text.lower().translate(_PUNCTUATION).split())
    return frozenset(keyword for keyword in keywords if keyword in words)


def set_f1(reference: frozenset[str], generated: frozenset[str]) -> float:
    """F1 of two keyword sets; an empty reference scores 1 only against an empty generation."""
    if not reference:
        return 1.0 if not generated else 0.0
    true_positives = len(reference & generated)
    if true_positives == 0:
        return 0.0
    precision = true_positives / len(generated)
    recall = true_positives / len(reference)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(
    values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean over ``samples`` resamples with replacement."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(samples, array.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high}


def paper_metrics(references: Sequence[str], generated: Sequence[str], seed: int = 0) -> dict[str, Estimate]:
    """Laterality, anatomy and pathology keyword F1: mean over reports and bootstrap 95% CI."""
    _check_lengths(references, generated)
    out = {}
    for name, keywords in PAPER_KEYWORDS.items():
        scores = [
            set_f1(keyword_set(ref, keywords), keyword_set(gen, keywords))
            for ref, gen in zip(references, generated, strict=True)
        ]
        low, high = bootstrap_ci(scores, seed=seed)
        out[name] = Estimate(float(np.mean(scores)) if scores else float("nan"), low, high)
    return out


# --------------------------------------------------------------------------- per finding

BINARY_FINDINGS = ("abnormal", "edema", "necrosis", "enhancement", "ventricular_compression", "midline_shift")


def asserted_items(findings: Findings) -> frozenset[str]:
    """Everything a report claims, as comparable items (size is approximate and left out)."""
    if not findings.abnormal:
        return frozenset()
    items = {name for name in BINARY_FINDINGS if getattr(findings, name)}
    if findings.side is not None:
        items.add(f"side:{findings.side.value}")
    items.update(f"lobe:{lobe.value}" for lobe in findings.lobes)
    return frozenset(items)


def _rates(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float | int]:
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    fn = int(np.sum(truth & ~predicted))
    tn = int(np.sum(~truth & ~predicted))
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def finding_metrics(references: Sequence[Findings], generated: Sequence[Findings]) -> dict[str, object]:
    """Per-finding rates, laterality error, abnormal-vs-normal and hallucination rate."""
    _check_lengths(references, generated)
    names = [*BINARY_FINDINGS, *(f"side:{s.value}" for s in Side), *(f"lobe:{lobe.value}" for lobe in Lobe)]
    ref_items = [asserted_items(f) for f in references]
    gen_items = [asserted_items(f) for f in generated]
    per_finding = {
        name: _rates(
            np.array([name in items for items in ref_items], dtype=bool),
            np.array([name in items for items in gen_items], dtype=bool),
        )
        for name in names
    }
    # A lesional reference whose side the parser found none of cannot be judged: counted apart.
    lesional = [(r, g) for r, g in zip(references, generated, strict=True) if r.abnormal and r.side]
    unsided = sum(1 for r in references if r.abnormal and r.side is None)
    wrong_side = sum(1 for r, g in lesional if not g.abnormal or g.side != r.side)
    asserted = sum(len(items) for items in gen_items)
    hallucinated = sum(len(g - r) for r, g in zip(ref_items, gen_items, strict=True))
    sized = [(r, g) for r, g in zip(references, generated, strict=True) if r.abnormal and r.size]
    return {
        "per_finding": per_finding,
        "laterality_error": wrong_side / len(lesional) if lesional else float("nan"),
        "lesional_cases_with_side": len(lesional),
        "lesional_cases_without_side": unsided,
        "abnormal_sensitivity": per_finding["abnormal"]["sensitivity"],
        "abnormal_specificity": per_finding["abnormal"]["specificity"],
        "hallucination_rate": hallucinated / asserted if asserted else 0.0,
        "asserted_findings": asserted,
        "exact_match": float(np.mean([r == g for r, g in zip(references, generated, strict=True)]))
        if references
        else float("nan"),
        "size_accuracy": float(np.mean([r.size == g.size for r, g in sized])) if sized else float("nan"),
    }


def side_confusion(
    references: Sequence[Findings], generated: Sequence[Findings]
) -> tuple[list[str], np.ndarray]:
    """Confusion matrix of the reported side (rows: reference, columns: generated)."""
    labels = ["normal", "none", *(s.value for s in Side)]

    def label(f: Findings) -> str:
        if not f.abnormal:
            return "normal"
        return f.side.value if f.side else "none"

    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for r, g in zip(references, generated, strict=True):
        matrix[labels.index(label(r)), labels.index(label(g))] += 1
    return labels, matrix


# --------------------------------------------------------------------------- text overlap


def text_overlap_metrics(references: Sequence[str], generated: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-1 scale) and mean ROUGE-L F-measure (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    _check_lengths(references, generated)
    bleu = sacrebleu.corpus_bleu(list(generated), [list(references)]).score / 100
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score(ref, gen)["rougeL"].fmeasure for ref, gen in zip(references, generated, strict=True)
    ]
    return {"bleu4": float(bleu), "rougeL": float(np.mean(rouge)) if rouge else float("nan")}


def evaluate_reports(references: Sequence[str], generated: Sequence[str], seed: int = 0) -> dict[str, object]:
    """Every metric for paired reference / generated reports, JSON-ready."""
    paper = paper_metrics(references, generated, seed=seed)
    strict = finding_metrics([parse(t) for t in references], [parse(t) for t in generated])
    return {
        "cases": len(references),
        "paper": {name: estimate.as_dict() for name, estimate in paper.items()},
        "findings": strict,
        "text": text_overlap_metrics(references, generated),
    }


def _check_lengths(references: Sequence[object], generated: Sequence[object]) -> None:
    if len(references) != len(generated):
        raise ValueError(f"{len(references)} references but {len(generated)} generated reports")
