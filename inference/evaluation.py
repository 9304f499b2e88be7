"""Evaluate a checkpoint: generate reports, score them, write metrics.json, a confusion matrix
PNG and reports side by side, and print one table.

Every volume goes through :func:`inference.dataset.load_volume` (the preprocessing every
other path uses); references are the manifest's reports; the stricter metrics read both
texts through :func:`inference.report_schema.parse`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from inference.configuration_brain3d import INFLATED_3D, SLICES_2D, Brain3DConfig
from inference.metrics import evaluate_reports, side_confusion
from inference.report_schema import parse

if TYPE_CHECKING:
    from inference.modeling_brain3d import Brain3D


def generate_reports(model: Brain3D, volumes: torch.Tensor, batch_size: int = 16) -> tuple[list[str], float]:
    """Reports for ``(N, 1, D, H, W)`` volumes, and the mean seconds per study."""
    reports: list[str] = []
    start = time.perf_counter()
    for first in range(0, volumes.shape[0], batch_size):
        reports += model.generate(volumes[first : first + batch_size]).reports
    return reports, (time.perf_counter() - start) / max(volumes.shape[0], 1)


def score(
    references: Sequence[str], generated: Sequence[str], seconds_per_study: float | None = None
) -> dict:
    metrics = evaluate_reports(list(references), list(generated))
    if seconds_per_study is not None:
        metrics["seconds_per_study"] = seconds_per_study
    return metrics


def synthetic_evaluation(model: Brain3D, cases: int, seed: int, lesional_fraction: float = 0.7) -> dict:
    """Metrics on ``cases`` fresh synthetic cases of ``seed`` (prepared like any file)."""
    from inference.training import synthetic_data

    data = synthetic_data(cases, seed, model.config.input_grid, lesional_fraction=lesional_fraction)
    generated, seconds = generate_reports(model, data.volumes)
    metrics = score(data.reports, generated, seconds)
    metrics["samples"] = list(zip(data.reports, generated, strict=True))
    return metrics


def format_table(metrics: dict, title: str = "") -> str:
    """The headline figures as a Markdown table."""
    paper, findings, text = metrics["paper"], metrics["findings"], metrics["text"]

    def interval(name: str) -> str:
        value = paper[name]
        return f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"

    rows = [
        ("cases", str(metrics["cases"])),
        ("paper pathology F1 [95% CI]", interval("pathology")),
        ("paper laterality F1 [95% CI]", interval("laterality")),
        ("paper anatomy F1 [95% CI]", interval("anatomy")),
        ("laterality error (lesional)", f"{findings['laterality_error']:.3f}"),
        *(
            [("lesional references with no side (left out above)", str(unsided))]
            if (unsided := findings.get("lesional_cases_without_side", 0))
            else []
        ),
        ("abnormal sensitivity", f"{findings['abnormal_sensitivity']:.3f}"),
        ("abnormal specificity", f"{findings['abnormal_specificity']:.3f}"),
        ("hallucination rate", f"{findings['hallucination_rate']:.3f}"),
        ("exact findings match", f"{findings['exact_match']:.3f}"),
        *(
            (f"{name} F1", f"{findings['per_finding'][name]['f1']:.3f}")
            for name in ("edema", "necrosis", "enhancement", "ventricular_compression", "midline_shift")
        ),
        ("BLEU-4", f"{text['bleu4']:.3f}"),
        ("ROUGE-L", f"{text['rougeL']:.3f}"),
    ]
    header = f"### {title}\n\n" if title else ""
    return header + "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _confusion_png(references: Sequence[str], generated: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = side_confusion([parse(t) for t in references], [parse(t) for t in generated])
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=30)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("generated")
    axis.set_ylabel("reference")
    axis.set_title("reported side (parsed)")
    for row in range(len(labels)):
        for column in range(len(labels)):
            axis.text(column, row, str(matrix[row, column]), ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs(
    out_dir: Path, ids: Sequence[str], references: Sequence[str], generated: Sequence[str], metrics: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    _confusion_png(references, generated, out_dir / "confusion_side.png")
    lines = ["| case | reference | generated |", "|---|---|---|"]
    lines += [f"| {i} | {r} | {g} |" for i, r, g in list(zip(ids, references, generated, strict=True))[:40]]
    (out_dir / "samples.md").write_text("\n".join(lines) + "\n")
    with (out_dir / "reports.jsonl").open("w") as handle:
        for i, r, g in zip(ids, references, generated, strict=True):
            handle.write(json.dumps({"id": i, "reference": r, "generated": g}) + "\n")


def evaluate_checkpoint(
    checkpoint: Path,
    manifest: Path,
    out_dir: Path,
    split: str = "test",
    device: str | torch.device = "cpu",
) -> dict:
    """Evaluate ``checkpoint`` on the ``split`` entries of ``manifest`` (``all``: every entry),
    on ``device`` (``auto``: a GPU where there is one) in the dtype the worker reads with."""
    from inference.dataset import load_volume, read_manifest
    from inference.modeling_brain3d import Brain3D, inference_dtype, resolve_device

    target = resolve_device(device)
    model = Brain3D.from_pretrained(checkpoint, device=target, dtype=inference_dtype(target))
    entries = read_manifest(manifest)
    if split != "all":
        entries = [e for e in entries if e.get("split") == split]
    if not entries:
        raise ValueError(f"no {split!r} entries in {manifest}")
    volumes = torch.stack([load_volume(e, model.config) for e in entries])
    generated, seconds = generate_reports(model, volumes)
    references = [e["report"] for e in entries]
    metrics = score(references, generated, seconds)
    metrics.update(checkpoint=str(checkpoint), manifest=str(manifest), split=split)
    write_outputs(out_dir, [e["id"] for e in entries], references, generated, metrics)
    return metrics


@dataclass(frozen=True)
class AblationRun:
    """One row of the ablation: the stages it trains, its folder, and the vision encoder it reads with."""

    stages: tuple[str, ...]
    folder: str
    vision_encoder: str = INFLATED_3D


#: The 2D slice baseline's row: every stage, the 2D tower reading axial slices (``SliceEncoder``).
SLICE_BASELINE = "2D slices, 1+2a+2b"
#: The paper's stage combinations on the same split, then the 2D slice baseline.
ABLATION: dict[str, AblationRun] = {
    "2b only": AblationRun(("lora",), "2b_only"),
    "2a+2b": AblationRun(("projector", "lora"), "2a-2b"),
    "1+2a+2b": AblationRun(("contrastive", "projector", "lora"), "1-2a-2b"),
    "1+2a (no LoRA)": AblationRun(("contrastive", "projector"), "1-2a_no_LoRA"),
    SLICE_BASELINE: AblationRun(("contrastive", "projector", "lora"), "2d-slices", vision_encoder=SLICES_2D),
}


def run_ablation(
    manifest: Path,
    out_dir: Path,
    preset: str = "demo",
    minutes_scale: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train each row of :data:`ABLATION` from one shared text/2D-pretrained start and evaluate each
    on the manifest's test split; returns {row name: metrics}."""
    from inference import training

    data = training.manifest_data(manifest, Brain3DConfig.from_preset(preset).input_grid)
    schedule = {
        name: replace(s, minutes=s.minutes * minutes_scale) for name, s in training.DEMO_SCHEDULE.items()
    }
    base = out_dir / "base"
    training.train_pipeline(
        preset, ["pretrain-text", "pretrain-2d"], data, base, seed=seed, schedule=schedule, device=device
    )
    results = {}
    for name, row in ABLATION.items():
        run = out_dir / row.folder
        start = (
            training.slice_baseline_start(base, run / "start")
            if row.vision_encoder == SLICES_2D
            else base / "final"
        )
        training.train_pipeline(
            preset,
            row.stages,
            data,
            run,
            seed=seed,
            init=start,
            schedule=schedule,
            pretrained_2d_run=base,
            device=device,
        )
        results[name] = evaluate_checkpoint(run / "final", manifest, run / "eval", device=device)
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def ablation_table(results: dict[str, dict]) -> str:
    header = "| stages | pathology F1 | laterality F1 | laterality error | specificity | hallucination |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name, m in results.items():
        f = m["findings"]
        lines.append(
            f"| {name} | {m['paper']['pathology']['mean']:.3f} | {m['paper']['laterality']['mean']:.3f} | "
            f"{f['laterality_error']:.3f} | {f['abnormal_specificity']:.3f} | {f['hallucination_rate']:.3f} |"
        )
    return "\n".join(lines)
