"""Training stages of Brain3D, one loop for all of them.

Stages (``--stage``):

- ``pretrain-text``: the small decoder learns the report language (next token on the corpus);
- ``pretrain-2d``: a 2D SigLIP (vision and text towers) learns axial slices against their
  reports (sigmoid loss); the vision tower is inflated into the 3D encoder;
- ``contrastive`` (stage 1): tubelets, positions, compressor, projector (and the encoder blocks
  when not pretrained), InfoNCE between volumes and reports embedded by that text tower;
- ``projector`` (stage 2a): projector and soft prompts, next token on report tokens only;
- ``lora`` (stage 2b): those plus LoRA (and the whole decoder when not pretrained).

Every stage: seeded, progress bar, validation, best checkpoint (``<out>/<stage>/best``),
resume from ``<out>/<stage>/last.pt`` (weights, optimiser and the data position, so a resumed
stage sees the batches an uninterrupted one would), JSON log and loss-curve PNG, gradient
accumulation, bf16 autocast on a GPU. Studies with equal findings (two controls, a control and
its mirrored twin) are positives of each other in ``pretrain-2d`` and never negatives in stage 1.
Reports are re-rendered from their findings with fresh wording at every step for synthetic data,
so the decoder learns findings rather than one phrasing.

Presets without pretrained vision weights (``tiny``, ``demo``) also train the encoder in the
language-modelling stages (``vision_in_lm``): there is no pretrained feature to keep, and
frozen after stage 1 it lateralised worse (``docs/results.md``).
Where the data hold lesion masks (synthetic cases, BraTS segmentations), ``lesion_loss_weight``
adds :class:`LesionGrounding` to every stage that trains the encoder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.convention import LEFT_RIGHT_AXIS
from inference.metrics import BINARY_FINDINGS, finding_metrics
from inference.report_schema import NORMAL_SENTENCES, Findings, Lobe, Side, mirrored, parse, render
from inference.synthetic import EDEMA_PROBABILITY, case_plans, synthesize_case

if TYPE_CHECKING:  # the model module imports torch and transformers: loaded where it is used
    from inference.modeling_brain3d import Brain3D

logger = logging.getLogger(__name__)

STAGES = ("pretrain-text", "pretrain-2d", "contrastive", "projector", "lora")
LM_STAGES = ("projector", "lora")
TEXT_TOWER_DIR = "text"  # inside pretrain-2d/best: the 2D text tower stage 1 embeds reports with
VISION_GROUPS = {"tubelet_embedding", "depth_position", "plane_position", "encoder_blocks", "compressor"}


@dataclass
class StageSettings:
    """How long and how hard one stage trains."""

    minutes: float = 2.0
    #: When set, the stage runs exactly this many optimiser steps, whatever ``minutes`` and
    #: ``max_epochs`` say, so the run is the same on any machine; else ``minutes`` bounds it.
    max_steps: int | None = None
    max_epochs: int = 50
    micro_batch: int = 8
    accumulation: int = 1
    learning_rate: float = 1e-3
    validate_every: int = 50


#: Budgets for the demo preset on two CPU cores (about 18 minutes of training in all).
DEMO_SCHEDULE: dict[str, StageSettings] = {
    "pretrain-text": StageSettings(minutes=1.5, micro_batch=32, learning_rate=2e-3, validate_every=100),
    "pretrain-2d": StageSettings(minutes=1.5, micro_batch=32, learning_rate=1e-3, validate_every=100),
    "contrastive": StageSettings(minutes=2.5, micro_batch=16, learning_rate=5e-4, validate_every=50),
    "projector": StageSettings(minutes=1.5, micro_batch=16, learning_rate=1e-3, validate_every=50),
    "lora": StageSettings(minutes=11.0, micro_batch=16, learning_rate=1e-3, validate_every=100),
}

#: The paper's stage 2 settings for a pretrained 4B model on one GPU (projector lr 2e-4, LoRA lr 5e-5,
#: accumulation 8, 10 and 15 epochs; epochs bound them). Stage 1 keeps its negatives in one
#: micro-batch of 8: by estimate (never run here) about 3.6 GB of the frozen encoder's saved
#: activations per study in bf16, so about 30 GB beside the weights.
PRETRAINED_SCHEDULE: dict[str, StageSettings] = {
    "contrastive": StageSettings(
        minutes=240, max_epochs=10, micro_batch=8, learning_rate=2e-4, validate_every=200
    ),
    "projector": StageSettings(
        minutes=600, max_epochs=10, micro_batch=4, accumulation=8, learning_rate=2e-4, validate_every=200
    ),
    "lora": StageSettings(
        minutes=900, max_epochs=15, micro_batch=4, accumulation=8, learning_rate=5e-5, validate_every=200
    ),
}


def schedule_for(pretrained: bool) -> dict[str, StageSettings]:
    """The stage budgets of a model on pretrained weights (the paper's), or of a small one trained
    here from scratch (the demo's)."""
    return PRETRAINED_SCHEDULE if pretrained else DEMO_SCHEDULE


@dataclass
class TrainingData:
    """Prepared volumes ``(N, 1, D, H, W)`` with findings, reference reports and splits."""

    volumes: torch.Tensor
    findings: list[Findings]
    reports: list[str]
    splits: list[str]
    rerender: bool = True  # synthetic reports come from findings: fresh wording each time
    #: What the data were prepared from (synthetic cases and seed, or a manifest) and on which grid:
    #: a cached copy is only reused for the same source.
    source: dict[str, Any] = field(default_factory=dict)
    #: Where each volume's lesion is, ``(N, 1, D, H, W)`` booleans on the input grid (empty for a
    #: control), for the lesion-grounding loss; ``None`` unless every patient has a segmentation.
    lesion_masks: torch.Tensor | None = None

    def batch(
        self, batch: list[int], rng: random.Random, device: torch.device, mirror: bool = False
    ) -> tuple[torch.Tensor, list[str], list[Findings]]:
        """Volumes, reports and findings of ``batch``. With ``mirror`` (synthetic data only) the first half
        of ``batch`` comes with its left-right mirrored twins instead of the second half: volume
        flipped, the report re-rendered with the side swapped. A study and its twin differ only
        in side, so the contrastive loss has to tell them apart and the decoder sees the side as
        the one thing that changes."""
        volumes = self._batch_rows(self.volumes, batch, mirror).to(device)
        if not (mirror and self.rerender):
            return volumes, [self.report_for(i, rng) for i in batch], [self.findings[i] for i in batch]
        _, findings = self.twins(batch)
        return volumes, [render(f, rng) for f in findings], findings

    def lesion_masks_of(self, batch: list[int], device: torch.device, mirror: bool = False) -> torch.Tensor:
        """The lesion masks of exactly the volumes :meth:`batch` gives for the same arguments."""
        if self.lesion_masks is None:
            raise ValueError("these training data hold no lesion masks")
        return self._batch_rows(self.lesion_masks, batch, mirror).to(device)

    def _batch_rows(self, tensor: torch.Tensor, batch: list[int], mirror: bool) -> torch.Tensor:
        """Rows of ``tensor`` for ``batch``; with ``mirror``, its first half and their mirror images."""
        if not (mirror and self.rerender):
            return tensor[batch]
        rows = tensor[_first_half(batch)]
        return torch.cat([rows, rows.flip(LEFT_RIGHT_AXIS)])

    def twins(self, batch: list[int]) -> tuple[list[int], list[Findings]]:
        """The first half of ``batch``, and the findings of it followed by those of its mirrors."""
        originals = _first_half(batch)
        findings = [self.findings[i] for i in originals]
        return originals, findings + [mirrored(f) for f in findings]

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def report_for(self, index: int, rng: random.Random) -> str:
        if self.rerender:
            return render(self.findings[index], rng)
        return self.reports[index]

    def save(self, path: Path) -> None:
        from inference.report_schema import findings_to_dict

        torch.save(
            {
                "volumes": self.volumes.half(),
                "findings": [findings_to_dict(f) for f in self.findings],
                "reports": self.reports,
                "splits": self.splits,
                "rerender": self.rerender,
                "source": self.source,
                "lesion_masks": self.lesion_masks,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> TrainingData:
        from inference.report_schema import findings_from_dict

        stored = torch.load(path, weights_only=True)
        return cls(
            stored["volumes"].float(),
            [findings_from_dict(f) for f in stored["findings"]],
            stored["reports"],
            stored["splits"],
            stored["rerender"],
            stored.get("source", {}),
            stored.get("lesion_masks"),
        )


def _first_half(batch: list[int]) -> list[int]:
    """The studies of a mirrored batch that come with their twins (at least one)."""
    return batch[: max(len(batch) // 2, 1)]


def synthetic_data(
    cases: int,
    seed: int,
    grid: Sequence[int],
    val_fraction: float = 0.1,
    workers: int = 1,
    lesional_fraction: float = 0.7,
    edema_probability: float = EDEMA_PROBABILITY,
) -> TrainingData:
    """Synthesise and prepare ``cases`` cases and their lesion masks in memory (through
    :func:`~inference.preprocessing.prepare_with_mask`, whose volume is :func:`prepare`'s, like any
    file's), in ``workers`` processes; the data do not depend on how many."""
    plans = [(*plan, tuple(grid)) for plan in case_plans(cases, seed, lesional_fraction, edema_probability)]
    with contextlib.ExitStack() as stack:
        if workers > 1:  # spawned, not forked: torch's thread pools do not survive a fork
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            )
            prepared = pool.map(_synthetic_case, plans, chunksize=4)
        else:
            prepared = map(_synthetic_case, plans)
        volumes, masks, findings, reports = zip(
            *tqdm(prepared, total=cases, desc="synthesise", leave=False), strict=True
        )
    cut = round(cases * (1 - val_fraction))
    splits = ["train" if index < cut else "val" for index in range(cases)]
    return TrainingData(
        torch.stack(volumes), list(findings), list(reports), splits, lesion_masks=torch.stack(masks)
    )


def _synthetic_case(
    plan: tuple[str, bool, tuple[int, int], float, tuple[int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, Findings, str]:
    """One synthetic case prepared for the model, with its lesion mask on the same grid: the unit
    of work of :func:`synthetic_data`."""
    import nibabel as nib

    from inference.preprocessing import prepare_with_mask

    *arguments, grid = plan
    case = synthesize_case(*arguments)
    image = nib.Nifti1Image(case.volume, case.affine)
    volume, mask = prepare_with_mask(image, case.lesion_mask > 0, grid)
    return volume, mask, case.findings, case.report


def manifest_data(manifest: Path, grid: Sequence[int]) -> TrainingData:
    """Train and validation entries of a manifest, loaded through
    :func:`inference.dataset.load_volume_and_lesion_mask`; lesion masks are kept when every
    patient has a segmentation."""
    from inference.dataset import entry_findings, load_volume_and_lesion_mask, read_manifest

    entries = [e for e in read_manifest(manifest) if e.get("split") in ("train", "val")]
    if not entries:
        raise ValueError(f"{manifest} holds no train or val entries")
    volumes, masks = zip(
        *(load_volume_and_lesion_mask(e, grid) for e in tqdm(entries, desc="prepare", leave=False)),
        strict=True,
    )
    unmasked = [e["id"] for e, m in zip(entries, masks, strict=True) if m is None]
    if unmasked:
        logger.warning(
            "%d patient(s) have no segmentation (`seg`), so no lesion-grounding loss: %s",
            len(unmasked),
            ", ".join(unmasked[:10]) + (" ..." if len(unmasked) > 10 else ""),
        )
    return TrainingData(
        torch.stack(volumes),
        [entry_findings(e) for e in entries],
        [e["report"] for e in entries],
        [e["split"] for e in entries],
        rerender=all(e.get("source") == "synthetic" for e in entries),
        lesion_masks=None if unmasked else torch.stack(masks),
    )


def report_corpus(data: TrainingData, variants: int = 4, seed: int = 0) -> list[str]:
    """Texts for the tokenizer and text pretraining: every training report in several wordings."""
    rng = random.Random(seed)
    corpus = [*NORMAL_SENTENCES]
    for index in data.indices("train"):
        corpus.append(data.reports[index])
        if data.rerender:
            corpus.extend(render(data.findings[index], rng) for _ in range(variants))
    return corpus


# ----------------------------------------------------------------------------------- the loop


@dataclass
class StageResult:
    stage: str
    steps: int
    seconds: float
    best_validation: float
    log: list[dict] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _plot_losses(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
    if train:
        axis.plot(*zip(*train, strict=True), label="train", alpha=0.6)
    if val:
        axis.plot(*zip(*val, strict=True), "o-", label="validation")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run_loop(
    stage: str,
    parameters: list[torch.nn.Parameter],
    batch_loss: Callable[[list[int], random.Random], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    save_best: Callable[[Path], None],
    train_indices: list[int],
    settings: StageSettings,
    out_dir: Path,
    seed: int,
    modules: Sequence[torch.nn.Module],
    trainable: dict[str, int] | None = None,
    options: dict[str, Any] | None = None,
) -> StageResult:
    """Generic loop: time- or step-bounded, validated, best-kept, resumable. ``options`` are the
    stage's settings beyond its budget (e.g. the lesion-grounding weight) that a resumed stage must
    share; they are logged with the stage."""
    stage_dir = out_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    if (stage_dir / "done.json").exists():
        logger.info("stage %s already finished in %s", stage, stage_dir)
        return StageResult(**json.loads((stage_dir / "done.json").read_text()))
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.01)
    steps_per_epoch = max(len(train_indices) // (settings.micro_batch * settings.accumulation), 1)
    if settings.max_steps is not None:
        total_steps, budget = settings.max_steps, math.inf
    else:
        total_steps, budget = steps_per_epoch * settings.max_epochs, max(settings.minutes * 60, 1e-6)
    warmup = min(50, total_steps // 10 + 1)

    def learning_rate_factor(step: int) -> float:
        """Linear warmup, then cosine decay to 0.1 over whichever bound ends the stage first:
        the steps or the time budget (a budget-bound stage still anneals before it stops)."""
        if step < warmup:
            return (step + 1) / warmup
        elapsed = time.perf_counter() - started
        progress = min(max(step / max(total_steps, 1), elapsed / budget), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    options = options or {}
    state = {
        "step": 0,
        "elapsed": 0.0,
        "best": math.inf,
        "log": [],
        "max_steps": settings.max_steps,
        "batch": [settings.micro_batch, settings.accumulation],
        "options": options,
    }
    last = stage_dir / "last.pt"
    _seed_everything(seed)
    saved = torch.load(last, weights_only=False) if last.exists() else None
    if saved is not None:
        state = saved["state"]
        if state.get("max_steps") != settings.max_steps:  # its learning-rate schedule would jump
            raise ValueError(
                f"stage {stage} was started with a step budget of {state.get('max_steps')}, not "
                f"{settings.max_steps}: resume it with the same --steps, or remove {last} to restart it"
            )
        batch = [settings.micro_batch, settings.accumulation]
        if state.setdefault("batch", batch) != batch:  # so would its steps per epoch
            raise ValueError(
                f"stage {stage} was started with micro-batch and accumulation {state['batch']}, not "
                f"{batch}: resume it with the same --micro-batch and --accumulation, or remove {last} "
                "to restart it"
            )
        if state.get("options", {}) != options:
            raise ValueError(
                f"stage {stage} was started with {state.get('options', {})}, not {options}: resume it "
                f"with the same options, or remove {last} to restart it"
            )
    started = time.perf_counter() - state["elapsed"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    if saved is not None:
        for module, module_state in zip(modules, saved["modules"], strict=True):
            module.load_state_dict(module_state)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        random.setstate(saved["python_rng"])
        np.random.set_state(saved["numpy_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])  # LoRA dropout draws on the GPU
        logger.info("resuming stage %s at step %d", stage, state["step"])
    # Where the data stand (this epoch's order, the next batch, the batch randomness): saved with
    # the weights, so a resumed stage sees exactly the batches an uninterrupted one would have.
    rng = random.Random(seed)
    position = {"order": np.random.default_rng(seed).permutation(train_indices).tolist(), "cursor": 0}
    if saved is not None:
        rng.setstate(saved["batch_rng"])
        position = saved["position"]
    progress = tqdm(total=total_steps, initial=state["step"], desc=stage, leave=False)

    def checkpoint() -> None:
        state["elapsed"] = time.perf_counter() - started
        torch.save(
            {
                "modules": [m.state_dict() for m in modules],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": state,
                "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "batch_rng": rng.getstate(),
                "position": position,
            },
            last,
        )

    def evaluate() -> None:
        for module in modules:
            module.eval()
        with torch.no_grad():
            metrics = validate()
        for module in modules:
            module.train()
        state["log"].append({"step": state["step"], **metrics})
        if metrics["val_loss"] < state["best"]:
            state["best"] = metrics["val_loss"]
            save_best(stage_dir / "best")
        progress.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
        checkpoint()

    for module in modules:
        module.train()
    while state["step"] < total_steps and time.perf_counter() - started < budget:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(settings.accumulation):
            if position["cursor"] + settings.micro_batch > len(position["order"]):
                reshuffled = np.random.default_rng(seed + state["step"]).permutation(train_indices)
                position.update(order=reshuffled.tolist(), cursor=0)  # in place: checkpoint() saves it
            batch = position["order"][position["cursor"] : position["cursor"] + settings.micro_batch]
            position["cursor"] += settings.micro_batch
            loss = batch_loss(batch, rng) / settings.accumulation
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        progress.update(1)
        if state["step"] % 10 == 0:
            state["log"].append({"step": state["step"], "loss": total, "lr": scheduler.get_last_lr()[0]})
        if state["step"] % settings.validate_every == 0:
            evaluate()
    evaluate()
    progress.close()
    seconds = time.perf_counter() - started
    result = StageResult(stage, state["step"], seconds, state["best"], state["log"], trainable or {}, options)
    (stage_dir / "log.json").write_text(json.dumps(asdict(result), indent=1))
    _plot_losses(
        state["log"], stage_dir / "loss.png", f"{stage}: {state['step']} steps, {seconds / 60:.1f} min"
    )
    (stage_dir / "done.json").write_text(json.dumps(asdict(result)))
    last.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------- stages


def _volumes(data: TrainingData, batch: list[int], device: torch.device) -> torch.Tensor:
    return data.volumes[batch].to(device)


def _validation_batches(data: TrainingData, size: int) -> list[list[int]]:
    indices = data.indices("val")
    return [
        indices[i : i + size] for i in range(0, len(indices) - 1, size) if len(indices[i : i + size]) >= 2
    ]


def train_text(
    model: Brain3D, data: TrainingData, settings: StageSettings, out_dir: Path, seed: int
) -> StageResult:
    """``pretrain-text``: the decoder (base weights, adapter off) learns the report language."""
    decoder = model.causal_lm
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for n, p in decoder.named_parameters() if ".lora_" not in n]
    for parameter in parameters:
        parameter.requires_grad_(True)
    tokenizer, end = model.tokenizer, model.layout.report_end_id
    device = model.device

    def loss_of(texts: list[str]) -> torch.Tensor:
        from inference.modeling_brain3d import _pad_right

        sequences = [
            [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids, end] for t in texts
        ]
        ids, mask = _pad_right(sequences, tokenizer.pad_token_id, device)
        with _autocast(device), model._frozen_language_model():
            logits = decoder(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)

    val_rng = random.Random(seed + 1)
    val_texts = [data.report_for(i, val_rng) for i in data.indices("val")]

    def validate() -> dict[str, float]:
        losses = [float(loss_of(val_texts[i : i + 32])) for i in range(0, len(val_texts), 32)]
        return {"val_loss": float(np.mean(losses))}

    return run_loop(
        "pretrain-text",
        parameters,
        lambda batch, rng: loss_of([data.report_for(i, rng) for i in batch]),
        validate,
        model.save_pretrained,
        data.indices("train"),
        settings,
        out_dir,
        seed,
        [model],
        {"language_model": sum(p.numel() for p in parameters)},
    )


def same_findings(findings: Sequence[Findings]) -> torch.Tensor:
    """``(B, B)`` bool: which studies of a batch have equal findings (two controls; a control and
    its mirror image), whose reports no image can tell apart."""
    return torch.tensor([[a == b for b in findings] for a in findings])


def _axial_slices(data: TrainingData, batch: list[int]) -> torch.Tensor:
    """One axial slice per volume, ``(B, 1, H, W)``: the slice with the most hyperintense voxels
    inside the central in-plane region (away from the bright scalp), where a lesion shows best.

    The same rule for every case: choosing controls' slices differently (at random, say) would
    let the slice's level tell a control from a patient."""
    volumes = data.volumes[batch, 0]
    _, _, height, width = volumes.shape
    centre = volumes[:, :, height // 6 : -height // 6, width // 6 : -width // 6]
    choice = (centre > 0.62).flatten(2).sum(2).argmax(1)
    return volumes[torch.arange(len(batch)), choice].unsqueeze(1)


class ReportTextTower(torch.nn.Module):
    """SigLIP's text tower over the report tokenizer: the report embeddings of stage 1 where the
    2D checkpoint has a text tower (MedSigLIP has one; ``pretrain-2d`` trains one for ``tiny`` and
    ``demo``). Mean-pooled hidden states of a frozen decoder, the paper's alternative, barely see a
    one-word change: a report and its left-right twin embed at cosine 0.99997 (``docs/results.md``),
    so stage 1 could not ground laterality with them. Pooled as SigLIP pools: the last position of
    a sequence padded to its full length."""

    def __init__(self, text_model, tokenizer) -> None:
        super().__init__()
        self.text_model = text_model
        self.tokenizer = tokenizer

    @classmethod
    def build(cls, tokenizer, width: int, max_length: int = 128) -> ReportTextTower:
        from transformers import SiglipTextConfig, SiglipTextModel

        config = SiglipTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            projection_size=width,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return cls(SiglipTextModel(config), tokenizer)

    @classmethod
    def from_pretrained(cls, directory: Path, tokenizer) -> ReportTextTower:
        from transformers import SiglipTextModel

        return cls(SiglipTextModel.from_pretrained(directory), tokenizer)

    def save_pretrained(self, directory: Path) -> None:
        self.text_model.save_pretrained(directory)

    def forward(self, report_texts: list[str]) -> torch.Tensor:
        """``(B, width)`` embeddings of the reports."""
        length = self.text_model.config.max_position_embeddings
        pad = self.tokenizer.pad_token_id
        # Padded by hand: padding arguments would stick to the shared tokenizer and be saved with it.
        rows = [self.tokenizer(text, add_special_tokens=False).input_ids[:length] for text in report_texts]
        ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows], device=self.text_model.device)
        return self.text_model(input_ids=ids).pooler_output


def train_2d(
    model: Brain3D, data: TrainingData, settings: StageSettings, out_dir: Path, seed: int
) -> tuple[StageResult, ReportTextTower]:
    """``pretrain-2d``: a 2D SigLIP (vision and text towers) learns axial slices against their
    reports with SigLIP's sigmoid loss, half of each batch beside its left-right mirrored twins
    (slice flipped, side swapped in the report), so both towers must tell left from right; the
    vision tower is then inflated into the 3D encoder and the text tower returned for stage 1."""
    from transformers import SiglipVisionModel

    from inference.modeling_brain3d import build_vision_encoder

    _seed_everything(seed)
    config = model.config
    siglip = SiglipVisionModel(config.vision_config).to(model.device)
    text_width = config.text_config.hidden_size
    text_tower = ReportTextTower.build(model.tokenizer, text_width).to(model.device)
    head = torch.nn.Linear(config.vision_config.hidden_size, text_width).to(model.device)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=model.device))
    bias = torch.nn.Parameter(torch.tensor(-10.0, device=model.device))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [*siglip.parameters(), *text_tower.parameters(), *head.parameters(), scale, bias]
    image_size = config.vision_config.image_size
    height, width = config.input_grid[1:]

    def loss_of(batch: list[int], rng: random.Random, mirror: bool = True) -> torch.Tensor:
        if mirror and data.rerender:
            batch, findings = data.twins(batch)
            images = _axial_slices(data, batch).to(model.device)
            images = torch.cat([images, images.flip(LEFT_RIGHT_AXIS)])
        else:
            findings = [data.findings[i] for i in batch]
            images = _axial_slices(data, batch).to(model.device)
        reports = [render(f, rng) for f in findings] if data.rerender else [data.reports[i] for i in batch]
        if (height, width) != (image_size, image_size):
            images = F.interpolate(
                images, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        images = ((images - config.pixel_mean) / config.pixel_std).expand(-1, 3, -1, -1)
        with _autocast(model.device):
            tokens = siglip(pixel_values=images).last_hidden_state.mean(1)
            text = text_tower(reports)
        image_embedding = F.normalize(head(tokens.float()), dim=-1)
        logits = image_embedding @ F.normalize(text.float(), dim=-1).T * scale.exp() + bias
        # Identical findings are positives too: a control matches every control's report.
        labels = same_findings(findings).to(logits.device).float() * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / len(findings)

    val_batches = _validation_batches(data, settings.micro_batch)

    def validate() -> dict[str, float]:
        val_rng = random.Random(seed + 2)
        return {"val_loss": float(np.mean([float(loss_of(b, val_rng, mirror=False)) for b in val_batches]))}

    def save_best(directory: Path) -> None:
        siglip.save_pretrained(directory)
        text_tower.save_pretrained(directory / TEXT_TOWER_DIR)

    result = run_loop(
        "pretrain-2d",
        parameters,
        loss_of,
        validate,
        save_best,
        data.indices("train"),
        settings,
        out_dir,
        seed,
        [siglip, text_tower, head],
        {
            "siglip_2d_vision": sum(p.numel() for p in siglip.parameters()),
            "siglip_2d_text": sum(p.numel() for p in text_tower.parameters()),
        },
    )
    best_dir = out_dir / "pretrain-2d" / "best"
    best = SiglipVisionModel.from_pretrained(best_dir).to(model.device)
    model.vision = build_vision_encoder(config, best).to(model.device)
    return result, load_text_tower(out_dir, model)


def load_text_tower(run_dir: Path, model: Brain3D) -> ReportTextTower | None:
    """The 2D text tower (frozen), when ``pretrain-2d`` trained one in the run ``run_dir``."""
    directory = run_dir / "pretrain-2d" / "best" / TEXT_TOWER_DIR
    if not directory.exists():
        return None
    tower = ReportTextTower.from_pretrained(directory, model.tokenizer).to(model.device).eval()
    tower.requires_grad_(False)
    return tower


def _findings_retrieval_accuracy(
    model: Brain3D,
    data: TrainingData,
    batches: list[list[int]],
    rng: random.Random,
    embed_reports: Callable[[list[str]], torch.Tensor],
) -> float:
    """Top-1 volume-to-report retrieval within each batch, counted correct when the retrieved
    report states the same findings (controls share one meaning)."""
    correct = total = 0
    for batch in batches:
        visual = F.normalize(model.encode(_volumes(data, batch, model.device)).mean(1).float(), dim=-1)
        text = F.normalize(embed_reports([data.report_for(i, rng) for i in batch]).float(), dim=-1)
        best = (visual @ text.T).argmax(1).tolist()
        correct += sum(data.findings[batch[q]] == data.findings[batch[k]] for q, k in enumerate(best))
        total += len(batch)
    return correct / max(total, 1)


class _ForwardOutputLoss(torch.nn.Module):
    """Base of the auxiliary losses below: a forward hook keeps the output of one module's last
    forward pass, which the loss takes once (a second loss on it would be stale); ``remove``
    takes the hook away when the stage ends."""

    def __init__(self, module: torch.nn.Module, weight: float, source: str, loss_name: str) -> None:
        super().__init__()
        self.weight = weight
        self._source, self._loss_name = source, loss_name
        self._output: torch.Tensor | None = None
        self._hook = module.register_forward_hook(self._keep_output)

    def _keep_output(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._output = output

    def remove(self) -> None:
        self._hook.remove()

    def _take_output(self) -> torch.Tensor:
        if self._output is None:
            raise RuntimeError(f"the {self._source} has not run since the last {self._loss_name}")
        output, self._output = self._output, None
        return output


class LesionGrounding(_ForwardOutputLoss):
    """An auxiliary loss that tells the encoder where the lesion is: a linear head on every token of
    the encoder's 3D grid predicts the share of its tubelet inside the lesion mask (binary
    cross-entropy, lesion and background tokens averaged separately so a small lesion weighs
    as much as the background). Each stage that trains the encoder starts a fresh head, and the
    model does not keep it: what stays is an encoder whose tokens say where the lesion is.

    Why: a report says in one sentence what a mask shows voxel by voxel. A lesion without edema is
    faint in FLAIR and a few hundred voxels, and its report differs from a control's by that one
    sentence, which the report losses alone did not teach the demo encoder to see. Nor did this loss,
    at weight 1, as the only objective, or beside the lesion stem at weights 1 and 3, where it cost the
    lobe (``docs/results.md``): such lesions are about as bright as cortex at any grid, and the demo
    encoder is the limit there. It is meant for a larger encoder,
    and BraTS provides the masks too (its segmentation labels)."""

    def __init__(self, model: Brain3D, weight: float) -> None:
        super().__init__(model.vision, weight, "encoder", "lesion-grounding loss")
        self.token_grid = tuple(model.config.token_grid)
        self.head = torch.nn.Linear(model.config.vision_config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.constant_(self.head.bias, -4.0)  # predicts a 1.8 % share everywhere at the start

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """The weighted loss for the tokens of the encoder's last forward pass; ``masks`` are the
        lesion masks of its volumes, ``(B, 1, D, H, W)``."""
        tokens = self._take_output()
        targets = F.adaptive_avg_pool3d(masks.float(), self.token_grid).flatten(1)  # (B, tokens)
        logits = self.head(tokens.float()).squeeze(-1)
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        lesion = targets > 0
        loss = losses[~lesion].mean()
        if lesion.any():
            loss = loss + losses[lesion].mean()
        return self.weight * loss


class FindingsSupervision(_ForwardOutputLoss):
    """An auxiliary loss that teaches the compressor's grid-summary token what the report will
    assert: a linear head on that token predicts, for every study, whether it is abnormal and each
    binary finding (:attr:`FINDINGS`), and, for a lesional study, each of its lobes and whether it
    reaches the left and the right hemisphere (both for a bilateral lesion). Binary cross-entropy:
    the findings averaged over every study, controls and mirrored twins included, and the location
    over the lesional ones, so controls teach what is absent without diluting where a lesion is.
    The model does not keep the head.

    The report loss alone never taught the demo decoder the lobe, nor did a summary token kept
    blind to the side. Taught the side beside the lobes, the token improved both; taught the
    findings as well, it improved the side and the pathology again (``docs/results.md``)."""

    #: The findings predicted for every study, in this order, before the lobes and sides.
    FINDINGS = BINARY_FINDINGS

    def __init__(self, model: Brain3D, weight: float) -> None:
        if model.compressor.grid_summary is None:
            raise ValueError(
                "the findings loss needs the compressor's grid-summary token (grid_summary_rank > 0)"
            )
        super().__init__(model.compressor, weight, "compressor", "findings loss")
        self.head = torch.nn.Linear(
            model.config.vision_config.hidden_size, len(self.FINDINGS) + len(Lobe) + 2
        )

    @classmethod
    def targets(cls, findings: Findings) -> list[bool]:
        """One study's labels: :attr:`FINDINGS`, its lobes in :class:`Lobe` order, then left, then
        right."""
        return [bool(getattr(findings, name)) for name in cls.FINDINGS] + [
            *(lobe in findings.lobes for lobe in Lobe),
            findings.side in (Side.LEFT, Side.BILATERAL),
            findings.side in (Side.RIGHT, Side.BILATERAL),
        ]

    def forward(self, findings: Sequence[Findings]) -> torch.Tensor:
        summary = self._take_output()[:, -1]
        labels = torch.tensor([self.targets(f) for f in findings], dtype=torch.float32, device=summary.device)
        logits = self.head(summary.float())
        first_location = len(self.FINDINGS)  # the lobe and side columns follow the findings
        loss = F.binary_cross_entropy_with_logits(logits[:, :first_location], labels[:, :first_location])
        lesional = torch.tensor([f.abnormal for f in findings], device=summary.device)
        if lesional.any():
            loss = loss + F.binary_cross_entropy_with_logits(
                logits[lesional, first_location:], labels[lesional, first_location:]
            )
        return self.weight * loss


def _require_lesion_masks(data: TrainingData) -> None:
    if data.lesion_masks is None:
        raise ValueError(
            "the lesion-grounding loss needs a lesion mask for every case, and these training data hold "
            "none: synthetic data cached before masks were kept (remove the run's data.pt), or a "
            "manifest with a patient that has no `seg` (the log names them)"
        )


def set_stage_trainable(model: Brain3D, stage: str, vision_in_lm: bool) -> dict[str, int]:
    """What ``stage`` trains (:meth:`Brain3D.set_trainable`) and, with ``vision_in_lm``, the encoder
    too in a language stage where it has no pretrained weights; returns the parameter counts."""
    counts = model.set_trainable(stage)
    if stage in LM_STAGES and vision_in_lm and not model.config.pretrained_vision:
        groups = model.parameter_groups()
        vision = [p for group in VISION_GROUPS for _, p in groups.get(group, [])]
        for parameter in vision:
            parameter.requires_grad_(True)
        counts["vision_in_lm_stage"] = sum(p.numel() for p in vision)
    return counts


def train_model_stage(
    model: Brain3D,
    stage: str,
    data: TrainingData,
    settings: StageSettings,
    out_dir: Path,
    seed: int,
    vision_in_lm: bool,
    text_tower: ReportTextTower | None = None,
    lesion_loss_weight: float = 0.0,
    findings_loss_weight: float = 1.0,
) -> StageResult:
    """Stage 1 (``contrastive``), 2a (``projector``) or 2b (``lora``).

    Stage 1 embeds reports with ``text_tower`` where there is one, else with the frozen decoder.
    With ``lesion_loss_weight``, a stage that trains the encoder adds :class:`LesionGrounding`; with
    ``findings_loss_weight``, a stage that trains the compressor of a model with a grid-summary token
    adds :class:`FindingsSupervision`."""
    if stage == "contrastive" and settings.micro_batch < 2:
        raise ValueError(
            "the contrastive stage needs a micro-batch of at least 2: the other studies of a batch "
            "are its negatives, and gradient accumulation does not add any"
        )
    counts = set_stage_trainable(model, stage, vision_in_lm)
    device = model.device
    modules: list[torch.nn.Module] = [model]
    grounding = None
    if lesion_loss_weight > 0:
        _require_lesion_masks(data)
        if any(p.requires_grad for p in model.vision.parameters()):
            grounding = LesionGrounding(model, lesion_loss_weight).to(device)
            modules.append(grounding)
            counts["lesion_grounding_head"] = sum(p.numel() for p in grounding.parameters())
        else:
            print(f"stage {stage}: the encoder is frozen, so no lesion-grounding loss")
    findings_loss = None
    if findings_loss_weight > 0 and any(p.requires_grad for p in model.compressor.parameters()):
        if model.compressor.grid_summary is None:
            print(f"stage {stage}: the model has no grid-summary token, so no findings loss")
        else:
            findings_loss = FindingsSupervision(model, findings_loss_weight).to(device)
            modules.append(findings_loss)
            counts["findings_head"] = sum(p.numel() for p in findings_loss.head.parameters())
    options = {}  # the loss weights in effect, which a resumed stage must match
    if lesion_loss_weight > 0:
        options["lesion_loss_weight"] = lesion_loss_weight
    if findings_loss is not None:
        options["findings_loss_weight"] = findings_loss_weight
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    counts["trainable"] = sum(p.numel() for p in parameters)
    print(f"stage {stage}: trains {counts}")
    embed_reports = model.report_embeddings if text_tower is None else text_tower
    if stage == "contrastive":
        source = "the decoder" if text_tower is None else "the 2D text tower"
        print(f"stage contrastive: reports embedded by {source}")

    def losses_of(
        batch: list[int], rng: random.Random, mirror: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's loss (with the findings loss added where there is one), and the
        lesion-grounding loss where there is one."""
        volumes, reports, findings = data.batch(batch, rng, device, mirror=mirror)
        with _autocast(device):
            if stage == "contrastive":
                loss = model.contrastive_loss(volumes, reports, embed_reports, same_findings(findings))
            else:
                loss = model.language_modeling_loss(volumes, reports)
        if findings_loss is not None:
            loss = loss + findings_loss(findings)
        if grounding is None:
            return loss, None
        return loss, grounding(data.lesion_masks_of(batch, device, mirror=mirror))

    def training_loss(batch: list[int], rng: random.Random) -> torch.Tensor:
        loss, grounding_loss = losses_of(batch, rng, mirror=True)
        return loss if grounding_loss is None else loss + grounding_loss

    val_batches = _validation_batches(data, max(settings.micro_batch, 2))

    def validate() -> dict[str, float]:
        """The stage's loss, findings loss included, decides the best checkpoint; the grounding
        loss is only reported."""
        val_rng = random.Random(seed + 3)
        losses = [losses_of(b, val_rng, mirror=False) for b in val_batches]
        metrics = {"val_loss": float(np.mean([float(loss) for loss, _ in losses]))}
        if grounding is not None:
            metrics["val_lesion_grounding"] = float(np.mean([float(g) for _, g in losses if g is not None]))
        if stage == "contrastive":
            metrics["retrieval_accuracy"] = _findings_retrieval_accuracy(
                model, data, val_batches, val_rng, embed_reports
            )
        return metrics

    try:
        result = run_loop(
            stage,
            parameters,
            training_loss,
            validate,
            model.save_pretrained,
            data.indices("train"),
            settings,
            out_dir,
            seed,
            modules,
            counts,
            options or None,
        )
    finally:
        if grounding is not None:
            grounding.remove()
        if findings_loss is not None:
            findings_loss.remove()
    if stage == "contrastive":
        final = [e for e in result.log if "retrieval_accuracy" in e]
        if final:
            print(f"stage contrastive: validation retrieval accuracy {final[-1]['retrieval_accuracy']:.3f}")
    return result


def quick_generation_check(model: Brain3D, data: TrainingData, limit: int = 64) -> dict[str, float]:
    """Validation reports generated and parsed: a sanity figure printed after the LM stages."""
    indices = data.indices("val")[:limit]
    generated = []
    for start in range(0, len(indices), 16):
        batch = indices[start : start + 16]
        generated += model.generate(_volumes(data, batch, model.device)).reports
    metrics = finding_metrics([data.findings[i] for i in indices], [parse(t) for t in generated])
    return {
        "laterality_error": metrics["laterality_error"],
        "abnormal_specificity": metrics["abnormal_specificity"],
        "hallucination_rate": metrics["hallucination_rate"],
        "exact_match": metrics["exact_match"],
    }


# ----------------------------------------------------------------------------------- pipeline


def slice_baseline_start(pretrained_run: Path, out: Path) -> Path:
    """The 2D slice baseline's starting checkpoint, written to ``out``: the decoder of a run that
    finished ``pretrain-text`` and ``pretrain-2d`` (its ``final``), with that run's 2D vision
    tower reading slices (``vision_encoder="2d-slices"``) instead of inflated into 3D."""
    from transformers import SiglipVisionModel

    from inference.configuration_brain3d import SLICES_2D
    from inference.modeling_brain3d import Brain3D, build_vision_encoder

    model = Brain3D.from_pretrained(pretrained_run / "final")
    model.config.vision_encoder = SLICES_2D
    model.vision = build_vision_encoder(
        model.config, SiglipVisionModel.from_pretrained(pretrained_run / "pretrain-2d" / "best")
    )
    return model.save_pretrained(out)


def build_model(preset: str, data: TrainingData, seed: int) -> Brain3D:
    """A fresh model of ``preset`` with a tokenizer trained on the training reports."""
    from inference.configuration_brain3d import Brain3DConfig
    from inference.modeling_brain3d import Brain3D
    from inference.tokenization import train_report_tokenizer

    _seed_everything(seed)
    # Reports legitimately repeat phrases ("is seen."): the paper's anti-repetition settings,
    # meant for a chatty general LLM, would force a templated decoder off its findings.
    config = Brain3DConfig.from_preset(
        preset,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        synthetic_demo=data.rerender,  # every case synthetic (reports rendered from their findings)
    )
    corpus = [*report_corpus(data, seed=seed), config.instruction]
    tokenizer = train_report_tokenizer(corpus, vocab_size=config.text_config.vocab_size)
    return Brain3D(config, tokenizer)


def train_pipeline(
    preset: str,
    stages: Sequence[str],
    data: TrainingData,
    out_dir: Path,
    seed: int = 0,
    init: Path | None = None,
    schedule: dict[str, StageSettings] | None = None,
    vision_in_lm: bool = True,
    device: str | torch.device = "cpu",
    pretrained_2d_run: Path | None = None,
    pretrained: tuple[Path, Path] | None = None,
    lesion_loss_weight: float = 0.0,
    findings_loss_weight: float = 1.0,
) -> Brain3D:
    """Run ``stages`` in order, each starting from the previous one's best checkpoint.

    The run starts from ``init`` (a saved checkpoint), else from ``pretrained`` (local SigLIP and
    Gemma 3 folders, through ``Brain3D.from_2d``), else from a fresh model of ``preset``; a preset
    built on pretrained weights refuses the last. Stage 1 embeds reports with the text tower of
    ``pretrain-2d`` in ``pretrained_2d_run`` (default: this run) where there is one. Writes
    ``<out>/<stage>/`` per stage and the final model to ``<out>/final``; returns it."""
    from inference.configuration_brain3d import Brain3DConfig
    from inference.modeling_brain3d import Brain3D

    validation_cases = len(data.indices("val"))
    if validation_cases < 2:
        raise ValueError(
            f"the 'val' split holds {validation_cases} case(s); every stage validates on at least 2 "
            "to keep its best checkpoint (a larger manifest, or more synthetic cases)"
        )
    if lesion_loss_weight > 0:
        _require_lesion_masks(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    if init:
        model = Brain3D.from_pretrained(init)
    elif pretrained:
        model = Brain3D.from_2d(*pretrained, config=Brain3DConfig.from_preset(preset))
    elif Brain3DConfig.from_preset(preset).pretrained_language_model:
        raise ValueError(
            f"the {preset} preset starts from pretrained weights: pass pretrained=(vision, language "
            "model) folders, or init"
        )
    else:
        model = build_model(preset, data, seed)
    model = model.to(device)
    schedule = schedule or schedule_for(model.config.pretrained_language_model)
    text_tower = load_text_tower(pretrained_2d_run or out_dir, model)
    results = []
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        settings = schedule.get(stage, StageSettings())
        if stage == "pretrain-text":
            result = train_text(model, data, settings, out_dir, seed)
        elif stage == "pretrain-2d":
            result, text_tower = train_2d(model, data, settings, out_dir, seed)
        else:
            result = train_model_stage(
                model,
                stage,
                data,
                settings,
                out_dir,
                seed,
                vision_in_lm,
                text_tower,
                lesion_loss_weight,
                findings_loss_weight,
            )
        results.append(result)
        if stage == "pretrain-2d":
            model.save_pretrained(out_dir / stage / "inflated")
        else:
            model = Brain3D.from_pretrained(out_dir / stage / "best").to(device)
        print(
            f"stage {stage}: {result.steps} steps in {result.seconds / 60:.1f} min, "
            f"best val {result.best_validation:.4f}"
        )
        if stage in LM_STAGES:
            model.eval()
            print(f"stage {stage}: validation generations {quick_generation_check(model, data)}")
    final = out_dir / "final"
    model.save_pretrained(final)
    summary = {
        "preset": preset,
        "seed": seed,
        "stages": [asdict(r) | {"log": None} for r in results],
        "training_minutes": sum(r.seconds for r in results) / 60,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1))
    return model
