"""``brain3d synth``, ``brain3d data import``, ``brain3d train`` and ``brain3d eval``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import torch

    from inference.synthetic import SeriesWriter


def _synth_command(series_writer: SeriesWriter | None) -> Callable[..., None]:
    """``brain3d synth``, writing DICOM cases with ``series_writer``."""

    def synth(
        out: Annotated[Path, typer.Option(help="Folder for cases/ and manifest.jsonl")],
        cases: Annotated[int, typer.Option(min=1)] = 100,
        seed: Annotated[int, typer.Option()] = 0,
        format: Annotated[str, typer.Option("--format", help="nifti or dicom")] = "nifti",
        lesional_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    ) -> None:
        """Synthesise brain FLAIR cases (MNI152 anatomy, gliomas, controls) and a manifest."""
        from inference.synthetic import write_dataset

        if format not in ("nifti", "dicom"):
            raise typer.BadParameter(f"{format!r}: nifti or dicom", param_hint="--format")
        start = time.perf_counter()
        manifest = write_dataset(out, cases, seed, format, lesional_fraction, series_writer)
        typer.echo(f"wrote {cases} cases and {manifest} in {time.perf_counter() - start:.1f} s")

    return synth


DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU where there is one)"


def _device(requested: str) -> torch.device:
    """``--device`` resolved (``auto``: a GPU where there is one), or a usage error naming it:
    malformed, or a GPU this machine does not have."""
    import torch

    from inference.modeling_brain3d import resolve_device

    try:
        device = resolve_device(requested)
    except RuntimeError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise typer.BadParameter(f"{requested}: this machine has no such CUDA GPU", param_hint="--device")
    return device


def _step_budgets(text: str | None, stages: Sequence[str]) -> dict[str, int]:
    """``--steps`` as {stage: steps}: comma-separated ``stage=N``, once per stage this run trains,
    N a positive integer."""
    budgets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, value = item.partition("=")
        if (
            name not in stages
            or name in budgets
            or not value.isascii()
            or not value.isdecimal()
            or int(value) < 1
        ):
            raise typer.BadParameter(
                f"{item!r}: expected stage=N, once per stage of {', '.join(stages)}, N a positive integer",
                param_hint="--steps",
            )
        budgets[name] = int(value)
    return budgets


def train(
    out: Annotated[Path, typer.Option(help="Run folder: one sub-folder per stage, final/ at the end")],
    stage: Annotated[
        str, typer.Option(help="pretrain-text, pretrain-2d, contrastive, projector, lora or all")
    ] = "all",
    preset: Annotated[str, typer.Option(help="tiny, demo or medgemma-4b")] = "demo",
    manifest: Annotated[Path | None, typer.Option(help="manifest.jsonl (train/val splits)")] = None,
    synthetic: Annotated[bool, typer.Option(help="synthesise the training data instead")] = False,
    cases: Annotated[int, typer.Option(help="synthetic cases (train + 10% validation)")] = 1200,
    edema_probability: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="share of synthetic lesions drawn with edema; default: as in the test sets "
            "(inference.synthetic.EDEMA_PROBABILITY). Lower shows the model more lesions without edema",
        ),
    ] = None,
    lesion_loss_weight: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="weight of the lesion-grounding loss (the encoder's tokens predict the lesion mask; "
            "needs masks: synthetic data, or a manifest whose patients have segmentations); 0: off",
        ),
    ] = 0.0,
    findings_loss_weight: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="weight of the findings loss (each finding, and the lesion's side and lobes, read from "
            "the compressor's grid-summary token) in the stages that train the compressor; models "
            "without that token (grid_summary_rank 0) have none; 0: off",
        ),
    ] = 1.0,
    encoder_in_lm_stages: Annotated[
        bool,
        typer.Option(
            help="presets without pretrained vision weights (tiny, demo) also train the encoder in the "
            "projector and lora stages; --no-encoder-in-lm-stages trains it in stage 1 only, as the "
            "paper's stage table does: each LM step costs about 40 % less, laterality was worse "
            "(docs/results.md)"
        ),
    ] = True,
    seed: Annotated[int, typer.Option()] = 0,
    init: Annotated[Path | None, typer.Option(help="start from this checkpoint")] = None,
    vision: Annotated[
        Path | None,
        typer.Option(help="start from this local SigLIP / MedSigLIP folder (presets on pretrained weights)"),
    ] = None,
    language_model: Annotated[
        Path | None,
        typer.Option(help="... and this local Gemma 3 / MedGemma folder (with its tokenizer)"),
    ] = None,
    minutes_scale: Annotated[float, typer.Option(help="multiply every stage's time budget")] = 1.0,
    steps: Annotated[
        str | None,
        typer.Option(
            help="step budgets replacing the time budgets, e.g. 'contrastive=464,lora=1313': "
            "the same run on any machine"
        ),
    ] = None,
    micro_batch: Annotated[int | None, typer.Option(help="override every stage's micro-batch")] = None,
    accumulation: Annotated[int | None, typer.Option(help="override gradient accumulation")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch; processes synthesising data")] = 2,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
) -> None:
    """Train Brain3D stage by stage (seeded, resumable; see inference/training.py)."""
    import dataclasses

    import torch

    from inference import training
    from inference.configuration_brain3d import Brain3DConfig
    from inference.synthetic import EDEMA_PROBABILITY

    target = _device(device)  # before data preparation, which can take long
    torch.set_num_threads(threads)
    if edema_probability is None:
        edema_probability = EDEMA_PROBABILITY
    if (manifest is None) == (not synthetic):
        raise typer.BadParameter("give exactly one of --manifest or --synthetic")
    if (vision is None) != (language_model is None):
        raise typer.BadParameter("give both --vision and --language-model, or neither")
    if vision is not None and init is not None:
        raise typer.BadParameter("start from --init or from --vision and --language-model, not both")
    # What starts the run decides the rest: its grid, its stages, its schedule.
    start_config = Brain3DConfig.from_pretrained(init) if init else Brain3DConfig.from_preset(preset)
    on_pretrained = vision is not None or start_config.pretrained_language_model
    if on_pretrained and vision is None and init is None:
        raise typer.BadParameter(
            f"the {preset} preset starts from pretrained weights: give --vision and --language-model "
            "(local Hugging Face folders, e.g. MedSigLIP and MedGemma), or --init",
            param_hint="--preset",
        )
    stages = list(training.STAGES) if stage == "all" else [stage]
    if on_pretrained and stage == "all":
        stages = ["contrastive", "projector", "lora"]  # pretrained 2D and text weights: no pretraining
    step_budgets = _step_budgets(steps, stages)
    grid = start_config.input_grid
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "data.pt"
    source = (
        {
            "synthetic_cases": cases,
            "synthetic_seed": seed + 1_000_003,
            "synthetic_edema_probability": edema_probability,
        }
        if synthetic
        else {"manifest": str(manifest.resolve())}  # type: ignore[union-attr]
    ) | {"grid": list(grid)}
    start = time.perf_counter()
    if cache.exists():
        data = training.TrainingData.load(cache)
        if data.source != source:
            typer.echo(
                f"error: {cache} holds data prepared from {data.source or 'an unrecorded source'}, "
                f"not {source}: remove it or train into another --out",
                err=True,
            )
            raise typer.Exit(2)
    else:
        if synthetic:
            data = training.synthetic_data(
                cases, source["synthetic_seed"], grid, workers=threads, edema_probability=edema_probability
            )
        else:
            data = training.manifest_data(manifest, grid)  # type: ignore[arg-type]
        data.source = source
        data.save(cache)
    typer.echo(
        f"data: {len(data.indices('train'))} train, {len(data.indices('val'))} val, "
        f"ready in {time.perf_counter() - start:.0f} s"
    )
    schedule = {}
    for name, settings in training.schedule_for(on_pretrained).items():
        changes: dict = {"minutes": settings.minutes * minutes_scale, "max_steps": step_budgets.get(name)}
        if micro_batch:
            changes["micro_batch"] = micro_batch
        if accumulation:
            changes["accumulation"] = accumulation
        schedule[name] = dataclasses.replace(settings, **changes)
    training.train_pipeline(
        preset,
        stages,
        data,
        out,
        seed=seed,
        init=init,
        pretrained=(vision, language_model) if vision is not None and language_model is not None else None,
        schedule=schedule,
        vision_in_lm=encoder_in_lm_stages,
        device=target,
        lesion_loss_weight=lesion_loss_weight,
        findings_loss_weight=findings_loss_weight,
    )
    typer.echo(f"final checkpoint: {out / 'final'}")


def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="A saved Brain3D checkpoint folder")],
    manifest: Annotated[Path, typer.Option(help="manifest.jsonl with reference reports")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, confusion PNG, samples")],
    split: Annotated[str, typer.Option(help="manifest split to evaluate, or all")] = "test",
    ablation: Annotated[bool, typer.Option(help="also train and evaluate the stage combinations")] = False,
    minutes_scale: Annotated[float, typer.Option(help="time budget scale of the ablation runs")] = 0.5,
    threads: Annotated[int, typer.Option()] = 2,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
) -> None:
    """Score a checkpoint: the paper's keyword F1 (bootstrap CI), per-finding metrics, BLEU/ROUGE."""
    import torch

    from inference import evaluation

    torch.set_num_threads(threads)
    target = _device(device)
    metrics = evaluation.evaluate_checkpoint(checkpoint, manifest, out, split, target)
    typer.echo(evaluation.format_table(metrics, f"{checkpoint} on {manifest} ({split})"))
    if ablation:
        results = evaluation.run_ablation(
            manifest, out / "ablation", minutes_scale=minutes_scale, device=target
        )
        typer.echo(evaluation.ablation_table(results))


data_app = typer.Typer(
    help="Real data: BraTS / TextBraTS / healthy folders into a manifest.", no_args_is_help=True
)


@data_app.command("import")
def import_data(
    out: Annotated[Path, typer.Option(help="manifest.jsonl to write")],
    brats: Annotated[
        Path | None, typer.Option(help="BraTS 2020/2021/2023 folder", exists=True, file_okay=False)
    ] = None,
    reports: Annotated[
        Path | None,
        typer.Option(help="TextBraTS reports (<case>_flair_text.txt)", exists=True, file_okay=False),
    ] = None,
    healthy: Annotated[
        Path | None, typer.Option(help="folder of healthy FLAIR NIfTI files", exists=True, file_okay=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="split seed")] = 42,
) -> None:
    """Build a manifest (reports from TextBraTS or rendered from labels; splits by subject)."""
    from collections import Counter

    from inference.data_import import import_brats

    if brats is None and healthy is None:
        raise typer.BadParameter("give --brats and/or --healthy")
    try:
        entries = import_brats(brats, out, reports, healthy, seed)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    counts = Counter((e["source"], e["split"]) for e in entries)
    typer.echo(f"wrote {len(entries)} entries to {out}: {dict(sorted(counts.items()))}")


def register(app: typer.Typer, series_writer: SeriesWriter | None = None) -> None:
    """Add this package's commands to the ``brain3d`` application; ``series_writer`` writes
    ``synth --format dicom`` cases (this package imports nothing of the node's)."""
    app.command("synth")(_synth_command(series_writer))
    app.command("train")(train)
    app.command("eval")(evaluate)
    app.add_typer(data_app, name="data")
