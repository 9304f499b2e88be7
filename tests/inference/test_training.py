"""Training loop on the tiny preset: stage 1's batch rule and gradient, logs, best checkpoint, resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import tiny_model

from inference import training
from inference.configuration_brain3d import Brain3DConfig
from inference.convention import LEFT_RIGHT_AXIS
from inference.modeling_brain3d import Brain3D
from inference.report_schema import NORMAL, Findings, Lobe, Side, mirrored

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_data() -> training.TrainingData:
    return training.synthetic_data(
        12, seed=77, grid=Brain3DConfig.from_preset("tiny").input_grid, val_fraction=0.34
    )


def _quick(**changes) -> training.StageSettings:
    settings = training.StageSettings(minutes=0.2, max_epochs=2, micro_batch=4, validate_every=2)
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


def test_stage_one_refuses_micro_batch_of_one(tmp_path: Path, tiny_data) -> None:
    model = training.build_model("tiny", tiny_data, seed=0)
    with pytest.raises(ValueError, match="micro-batch of at least 2"):
        training.train_model_stage(model, "contrastive", tiny_data, _quick(micro_batch=1), tmp_path, 0, True)


def test_stage_one_has_a_gradient_at_micro_batch_two(tiny_data) -> None:
    model = training.build_model("tiny", tiny_data, seed=0)
    model.set_trainable("contrastive")
    batch = tiny_data.indices("train")[:2]
    reports = [tiny_data.report_for(i, random.Random(0)) for i in batch]
    model.contrastive_loss(tiny_data.volumes[batch], reports).backward()
    gradient = sum(float(p.grad.abs().sum()) for p in model.projector.parameters() if p.grad is not None)
    assert gradient > 0


def test_equal_findings_are_not_each_others_negatives_in_stage_one(tiny_data) -> None:
    """Two studies with equal findings (two controls, a control and its mirror) have reports no
    image can tell apart: as each other's negatives they would cap stage 1 at chance between them."""
    model = training.build_model("tiny", tiny_data, seed=0)
    volumes = tiny_data.volumes[:3]
    embeddings = torch.randn(
        3, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    embeddings[1] = embeddings[0]  # the two reports say the same

    def loss(same: list[list[bool]] | None) -> float:
        mask = None if same is None else torch.tensor(same)
        return float(model.contrastive_loss(volumes, ["a", "a", "b"], lambda _: embeddings, mask))

    diagonal = [[i == j for j in range(3)] for i in range(3)]
    assert loss(diagonal) == pytest.approx(loss(None)), "only the off-diagonal pairs are masked"
    equal_pair = [[True, True, False], [True, True, False], [False, False, True]]
    assert loss(equal_pair) < loss(None) - 0.1


def test_pretrain_2d_picks_slices_by_one_rule_for_patients_and_controls(tiny_data) -> None:
    """The slice chosen for a volume does not depend on whether its findings are normal."""
    lesional = next(i for i, f in enumerate(tiny_data.findings) if f.abnormal)
    relabelled = training.TrainingData(
        tiny_data.volumes[[lesional, lesional]],
        [tiny_data.findings[lesional], NORMAL],
        ["", ""],
        ["train"] * 2,
    )
    slices = training._axial_slices(relabelled, [0, 1])
    assert torch.equal(slices[0], slices[1])


def test_pipeline_writes_logs_best_checkpoint_and_resumes(
    tmp_path: Path, tiny_data, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = {stage: _quick() for stage in training.STAGES}
    model = training.train_pipeline(
        "tiny", list(training.STAGES), tiny_data, tmp_path, seed=3, schedule=schedule
    )
    # pretrain-2d trained a text tower beside the 2D encoder, and stage 1 embedded reports with it.
    assert "stage contrastive: reports embedded by the 2D text tower" in capsys.readouterr().out
    tower = training.load_text_tower(tmp_path, model)
    assert tower is not None and not any(p.requires_grad for p in tower.parameters())
    assert tower(["No focal abnormality is seen.", "A lesion."]).shape == (
        2,
        model.config.text_config.hidden_size,
    )
    for stage in training.STAGES:
        log = json.loads((tmp_path / stage / "log.json").read_text())
        assert log["steps"] > 0 and any("val_loss" in entry for entry in log["log"])
        assert (tmp_path / stage / "loss.png").stat().st_size > 1000
    contrastive = json.loads((tmp_path / "contrastive" / "log.json").read_text())
    assert any("retrieval_accuracy" in entry for entry in contrastive["log"])
    assert contrastive["trainable"]["encoder_blocks"] > 0  # no pretrained 2D weights in tiny
    reloaded = Brain3D.from_pretrained(tmp_path / "final")
    assert reloaded.config.synthetic_demo, "trained on synthetic data only, and it says so"
    volumes = tiny_data.volumes[:2]
    assert reloaded.generate(volumes).reports == model.eval().generate(volumes).reports
    # Finished stages are skipped on a rerun (resume), and the run summary exists.
    again = training.train_model_stage(reloaded, "lora", tiny_data, _quick(), tmp_path, 3, True)
    assert again.steps == json.loads((tmp_path / "lora" / "done.json").read_text())["steps"]
    assert json.loads((tmp_path / "training.json").read_text())["stages"][0]["stage"] == "pretrain-text"


class _ToyStage:
    """A linear regression on 32 samples, trained by ``training.run_loop`` as a stage named "toy"."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = torch.nn.Linear(3, 1)
        self.inputs, self.targets = torch.randn(32, 3), torch.randn(32, 1)

    def loss(self, batch: list[int]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.module(self.inputs[batch]), self.targets[batch])

    def run(
        self,
        batch_loss: Callable[[list[int], random.Random], torch.Tensor],
        settings: training.StageSettings,
        out_dir: Path,
        options: dict | None = None,
    ) -> training.StageResult:
        return training.run_loop(
            "toy",
            list(self.module.parameters()),
            batch_loss,
            lambda: {"val_loss": float(self.loss(list(range(32))))},
            lambda directory: directory.mkdir(parents=True, exist_ok=True),
            list(range(32)),
            settings,
            out_dir,
            seed=0,
            modules=[self.module],
            options=options,
        )


def test_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """An exception mid-stage (a crash, Ctrl-C) leaves last.pt; the rerun continues from it and
    sees the batches (and batch randomness) an uninterrupted run would have seen."""
    toy = _ToyStage()
    seen: list[tuple[list[int], float]] = []

    def loss(batch: list[int], rng: random.Random, crash_at: int | None) -> torch.Tensor:
        seen.append((batch, rng.random()))
        if crash_at is not None and len(seen) > crash_at:
            raise KeyboardInterrupt
        return toy.loss(batch)

    def run(out_dir: Path, crash_at: int | None) -> training.StageResult:
        settings = training.StageSettings(minutes=1.0, max_epochs=3, micro_batch=4, validate_every=4)
        return toy.run(lambda batch, rng: loss(batch, rng, crash_at), settings, out_dir)

    run(tmp_path / "uninterrupted", crash_at=None)
    uninterrupted = list(seen)
    seen.clear()
    toy = _ToyStage()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", crash_at=10)
    assert (tmp_path / "resumed" / "toy" / "last.pt").exists()
    saved_step = torch.load(tmp_path / "resumed" / "toy" / "last.pt", weights_only=False)["state"]["step"]
    assert saved_step == 8  # the end of the first epoch: the next one is reshuffled
    before_crash = seen[:saved_step]
    seen.clear()
    result = run(tmp_path / "resumed", crash_at=None)
    assert result.steps == 24  # 3 epochs of 8 steps in all
    assert len(seen) == 24 - saved_step  # only the remaining steps ran
    assert before_crash + seen == uninterrupted
    assert not (tmp_path / "resumed" / "toy" / "last.pt").exists()


def test_a_stage_ended_by_its_time_budget_has_annealed_its_learning_rate(tmp_path: Path) -> None:
    """The cosine decay follows the time budget when it ends the stage before the epochs do:
    the last steps run near the floor (0.1x), not at the peak a step-count schedule would still be at."""
    toy = _ToyStage()

    def slow_loss(batch: list[int], rng: random.Random) -> torch.Tensor:
        time.sleep(0.02)
        return toy.loss(batch)

    settings = training.StageSettings(minutes=0.05, max_epochs=10_000, micro_batch=4, validate_every=1_000)
    result = toy.run(slow_loss, settings, tmp_path)
    rates = [entry["lr"] for entry in result.log if "lr" in entry]
    assert result.steps < 8 * 10_000 // 10  # the budget, not the epochs, ended it
    assert max(rates) > 0.8e-3
    assert rates[-1] < 0.2e-3


def test_a_step_budget_replaces_the_time_budget_and_anneals_over_its_steps(tmp_path: Path) -> None:
    """With ``max_steps`` a stage runs exactly that many steps however slow the machine (here: a
    budget of a fraction of a second, and one epoch of 8 steps, that would otherwise stop it early),
    decaying to the floor; resuming it under another budget, or other options, is refused."""
    toy = _ToyStage()

    def slow_loss(batch: list[int], rng: random.Random) -> torch.Tensor:
        time.sleep(0.005)
        return toy.loss(batch)

    settings = training.StageSettings(
        minutes=1e-4, max_steps=60, max_epochs=1, micro_batch=4, validate_every=20
    )
    result = toy.run(slow_loss, settings, tmp_path / "whole")
    assert result.steps == 60
    rates = [entry["lr"] for entry in result.log if "lr" in entry]
    assert max(rates) > 0.8e-3 and rates[-1] < 0.11e-3

    calls = itertools.count()

    def crash_at_25(batch: list[int], rng: random.Random) -> torch.Tensor:
        if next(calls) == 25:
            raise KeyboardInterrupt
        return toy.loss(batch)

    with pytest.raises(KeyboardInterrupt):
        toy.run(crash_at_25, settings, tmp_path / "resumed")
    for other in (dataclasses.replace(settings, max_steps=90), dataclasses.replace(settings, max_steps=None)):
        with pytest.raises(ValueError, match="resume it with the same --steps"):
            toy.run(crash_at_25, other, tmp_path / "resumed")
    with pytest.raises(ValueError, match="resume it with the same options"):
        toy.run(crash_at_25, settings, tmp_path / "resumed", options={"lesion_loss_weight": 1.0})
    for change in ({"micro_batch": 2}, {"accumulation": 2}):
        other = dataclasses.replace(settings, **change)
        with pytest.raises(ValueError, match="resume it with the same --micro-batch and --accumulation"):
            toy.run(crash_at_25, other, tmp_path / "resumed")
    assert toy.run(slow_loss, settings, tmp_path / "resumed").steps == 60


def test_train_reads_step_budgets_and_refuses_a_malformed_one() -> None:
    from typer import BadParameter

    from inference.cli import _step_budgets

    assert _step_budgets("contrastive=464, lora=1313", training.STAGES) == {"contrastive": 464, "lora": 1313}
    assert _step_budgets(None, training.STAGES) == {}
    for malformed in ("lora=0", "lora", "lora=ten", "lora=²", "decoder=10", "lora=5,lora=6"):
        with pytest.raises(BadParameter, match="stage=N"):
            _step_budgets(malformed, training.STAGES)
    with pytest.raises(BadParameter, match="once per stage of lora"):
        _step_budgets("contrastive=10", ["lora"])  # a budget for a stage this run does not train


def test_synthetic_data_do_not_depend_on_the_number_of_processes(tiny_data) -> None:
    grid = Brain3DConfig.from_preset("tiny").input_grid
    parallel = training.synthetic_data(12, seed=77, grid=grid, val_fraction=0.34, workers=2)
    assert torch.equal(parallel.volumes, tiny_data.volumes)
    assert torch.equal(parallel.lesion_masks, tiny_data.lesion_masks)
    assert (parallel.findings, parallel.reports, parallel.splits) == (
        tiny_data.findings,
        tiny_data.reports,
        tiny_data.splits,
    )


def test_mirror_augmentation_pairs_each_study_with_its_twin(tiny_data) -> None:
    """The first half of a batch and its mirrored twins: volume flipped, side swapped, rest kept."""
    from inference.report_schema import Side, parse

    sided = [
        i for i in range(len(tiny_data.findings)) if tiny_data.findings[i].side in (Side.LEFT, Side.RIGHT)
    ][:4]
    assert len(sided) >= 2
    volumes, reports, _ = tiny_data.batch(sided, random.Random(0), torch.device("cpu"), mirror=True)
    originals = sided[: len(sided) // 2]
    assert len(reports) == volumes.shape[0] == 2 * len(originals)
    for position, index in enumerate(originals):
        twin = position + len(originals)
        assert torch.equal(volumes[position], tiny_data.volumes[index])
        assert torch.equal(volumes[twin], tiny_data.volumes[index].flip(-1))
        findings, twin_findings = parse(reports[position]), parse(reports[twin])
        assert findings.side is tiny_data.findings[index].side
        assert twin_findings.side is not findings.side and twin_findings.side in (Side.LEFT, Side.RIGHT)
        assert twin_findings.lobes == findings.lobes == tiny_data.findings[index].lobes
    plain, _, _ = tiny_data.batch(sided, random.Random(0), torch.device("cpu"), mirror=False)
    assert torch.equal(plain, tiny_data.volumes[sided])
    # The lesion masks come in the same order and are mirrored with their volumes.
    masks = tiny_data.lesion_masks_of(sided, torch.device("cpu"), mirror=True)
    assert torch.equal(masks[: len(originals)], tiny_data.lesion_masks[originals])
    assert torch.equal(masks[len(originals) :], tiny_data.lesion_masks[originals].flip(-1))
    assert torch.equal(tiny_data.lesion_masks_of(sided, torch.device("cpu")), tiny_data.lesion_masks[sided])


def test_synthetic_data_keep_each_lesion_mask_on_its_lesion(tmp_path: Path, tiny_data) -> None:
    """A lesion's mask covers bright cells on its reported side; a control's is empty; the masks
    survive the data cache."""
    from inference.report_schema import Side

    assert tiny_data.lesion_masks is not None
    assert (
        tiny_data.lesion_masks.shape == tiny_data.volumes.shape and tiny_data.lesion_masks.dtype == torch.bool
    )
    width = tiny_data.volumes.shape[-1]
    for volume, mask, findings in zip(
        tiny_data.volumes, tiny_data.lesion_masks, tiny_data.findings, strict=True
    ):
        if not findings.abnormal:
            assert not mask.any()
            continue
        assert mask.any() and volume[mask].mean() > volume[volume > 0].median()
        side = mask[0].nonzero()[:, 2].float().mean().item()
        if findings.side is Side.LEFT:  # W runs from the patient's left to the right
            assert side < width / 2
        elif findings.side is Side.RIGHT:
            assert side > width / 2
    tiny_data.save(tmp_path / "data.pt")
    assert torch.equal(training.TrainingData.load(tmp_path / "data.pt").lesion_masks, tiny_data.lesion_masks)


def test_manifest_data_keep_lesion_masks_only_when_every_patient_has_one(tmp_path: Path) -> None:
    """Patients' masks come from their ``seg``, a control needs none; one patient without a
    segmentation leaves the data without masks; a segmentation stating no orientation is refused."""
    import nibabel as nib

    from inference.dataset import read_manifest, write_manifest
    from inference.synthetic import write_dataset

    manifest = write_dataset(tmp_path, cases=5, seed=21)
    grid = Brain3DConfig.from_preset("tiny").input_grid
    entries = read_manifest(manifest)
    training_entries = [e for e in entries if e["split"] in ("train", "val")]
    control = next(e for e in training_entries if not e["findings"]["abnormal"])
    del control["seg"]
    write_manifest(manifest, entries)
    data = training.manifest_data(manifest, grid)
    assert data.lesion_masks is not None and data.lesion_masks.shape == data.volumes.shape
    for mask, findings in zip(data.lesion_masks, data.findings, strict=True):
        assert bool(mask.any()) == findings.abnormal
    patient = next(e for e in training_entries if e["findings"]["abnormal"])
    segmentation = nib.load(tmp_path / patient["seg"])
    unoriented = nib.Nifti1Image(np.asarray(segmentation.dataobj), None)
    unoriented.set_qform(None, code=0)
    unoriented.set_sform(None, code=0)
    nib.save(unoriented, tmp_path / "unoriented.nii.gz")
    patient["seg"] = "unoriented.nii.gz"
    write_manifest(manifest, entries)
    with pytest.raises(ValueError, match="states no orientation"):
        training.manifest_data(manifest, grid)
    del patient["seg"]
    write_manifest(manifest, entries)
    assert training.manifest_data(manifest, grid).lesion_masks is None


def test_lesion_grounding_teaches_the_encoder_where_the_lesion_is(tmp_path: Path, tiny_data) -> None:
    """The grounding loss reaches the encoder and falls as it learns; the head stays out of the saved
    model; data without masks are refused with a clear message."""
    model = training.build_model("tiny", tiny_data, seed=0)
    model.set_trainable("contrastive")
    grounding = training.LesionGrounding(model, weight=1.0)
    lesional = [i for i, f in enumerate(tiny_data.findings) if f.abnormal][:4]
    volumes, masks = tiny_data.volumes[lesional], tiny_data.lesion_masks[lesional]
    optimizer = torch.optim.Adam([*model.vision.parameters(), *grounding.parameters()], lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        model.encode_tokens(volumes)
        grounding(masks).backward()
        optimizer.step()
    assert float(model.vision.embeddings.patch.weight.grad.abs().sum()) > 0  # it reaches the encoder
    with torch.no_grad():  # the head now scores the lesion's tokens above the rest, not just lower overall
        scores = grounding.head(model.encode_tokens(volumes)).squeeze(-1)
    in_lesion = torch.nn.functional.adaptive_avg_pool3d(masks.float(), grounding.token_grid).flatten(1) > 0
    assert float(scores[in_lesion].mean() - scores[~in_lesion].mean()) > 2.0
    grounding(masks)  # each loss takes the tokens of one forward pass: a second would be stale
    with pytest.raises(RuntimeError, match="has not run"):
        grounding(masks)
    grounding.remove()

    # In a stage: the same start and batches with and without the loss end as different encoders;
    # validation reports the grounding loss beside (not inside) the stage's own.
    trained = {}
    for weight in (0.0, 1.0):
        trained[weight] = training.build_model("tiny", tiny_data, seed=0)
        out = tmp_path / f"weight-{weight}"
        training.train_model_stage(
            trained[weight],
            "contrastive",
            tiny_data,
            _quick(max_steps=3),
            out,
            0,
            True,
            lesion_loss_weight=weight,
        )
        log = json.loads((out / "contrastive" / "log.json").read_text())
        validated = [entry for entry in log["log"] if "val_loss" in entry]
        assert all(("val_lesion_grounding" in entry) == (weight > 0) for entry in validated)
        assert log["options"] == ({"lesion_loss_weight": weight} if weight else {})
        assert ("lesion_grounding_head" in log["trainable"]) == (weight > 0)
        assert not trained[weight].vision._forward_hooks  # the head is gone with its stage
    patch = {weight: model.vision.embeddings.patch.weight for weight, model in trained.items()}
    assert not torch.allclose(patch[0.0], patch[1.0])

    unmasked = dataclasses.replace(tiny_data, lesion_masks=None)
    with pytest.raises(ValueError, match="needs a lesion mask for every case"):
        training.train_pipeline(
            "tiny", ["pretrain-text"], unmasked, tmp_path / "unmasked", lesion_loss_weight=1.0
        )
    assert not (tmp_path / "unmasked").exists()  # refused before the first stage


def test_findings_labels_are_the_findings_then_the_lobes_then_left_then_right() -> None:
    lobes = frozenset({Lobe.FRONTAL, Lobe.TEMPORAL})
    labels = training.FindingsSupervision.targets
    lobe_labels = [lobe in lobes for lobe in Lobe]
    lesion = Findings(abnormal=True, side=Side.LEFT, lobes=lobes, edema=True, midline_shift=True)
    # abnormal, edema, necrosis, enhancement, ventricular compression, midline shift
    found = [True, True, False, False, False, True]
    assert labels(lesion) == [*found, *lobe_labels, True, False]
    assert labels(dataclasses.replace(lesion, side=Side.RIGHT)) == [*found, *lobe_labels, False, True]
    assert labels(dataclasses.replace(lesion, side=Side.BILATERAL)) == [*found, *lobe_labels, True, True]
    assert labels(NORMAL) == [False] * (len(training.FindingsSupervision.FINDINGS) + len(Lobe) + 2)


def test_findings_loss_teaches_the_summary_token_the_side(tiny_data) -> None:
    """Trained on a few one-sided lesions and their mirror images, the head reads each study's side
    from the summary token alone: a token that cannot tell a volume from its mirror could not."""
    model = tiny_model(grid_summary_rank=8)
    model.set_trainable("contrastive")
    findings_loss = training.FindingsSupervision(model, weight=1.0)
    one_sided = [i for i, f in enumerate(tiny_data.findings) if f.side in (Side.LEFT, Side.RIGHT)][:3]
    assert len(one_sided) == 3
    volumes = tiny_data.volumes[one_sided]
    volumes = torch.cat([volumes, volumes.flip(LEFT_RIGHT_AXIS)])
    findings = [tiny_data.findings[i] for i in one_sided]
    findings = findings + [mirrored(f) for f in findings]
    optimizer = torch.optim.Adam(
        [*model.vision.parameters(), *model.compressor.parameters(), *findings_loss.parameters()], lr=3e-3
    )
    for _ in range(80):
        optimizer.zero_grad()
        model.encode(volumes)
        findings_loss(findings).backward()
        optimizer.step()
    with torch.no_grad():
        logits = findings_loss.head(model.compressor(model.encode_tokens(volumes))[:, -1])
    left_over_right = (logits[:, -2] - logits[:, -1]) > 0
    assert left_over_right.tolist() == [f.side is Side.LEFT for f in findings]

    # Controls teach the findings (all absent), never where a lesion is: the location rows of the
    # head do not enter their loss.
    def control_loss() -> float:
        with torch.no_grad():
            model.encode(volumes[:2])
            return float(findings_loss([NORMAL, NORMAL]))

    before = control_loss()
    first_location = len(training.FindingsSupervision.FINDINGS)
    with torch.no_grad():
        findings_loss.head.weight[first_location:] += 1.0
    assert control_loss() == pytest.approx(before)
    with torch.no_grad():
        findings_loss.head.bias[0] += 1.0  # "abnormal" said more strongly of a control costs more
    assert control_loss() > before
    model.encode(volumes)
    findings_loss(findings)  # each loss takes the summary of one forward pass: a second would be stale
    with pytest.raises(RuntimeError, match="has not run"):
        findings_loss(findings)
    findings_loss.remove()
    assert not model.compressor._forward_hooks
    with pytest.raises(ValueError, match="grid-summary token"):
        training.FindingsSupervision(tiny_model(), weight=1.0)


@pytest.mark.parametrize("grid_summary_rank", [0, 8])
def test_a_stage_adds_the_findings_loss_where_the_model_has_a_summary_token(
    tmp_path: Path, tiny_data, grid_summary_rank: int
) -> None:
    model = tiny_model(grid_summary_rank=grid_summary_rank)
    training.train_model_stage(model, "contrastive", tiny_data, _quick(max_steps=2), tmp_path, 0, True)
    log = json.loads((tmp_path / "contrastive" / "log.json").read_text())
    assert log["options"] == ({"findings_loss_weight": 1.0} if grid_summary_rank else {})
    assert ("findings_head" in log["trainable"]) == bool(grid_summary_rank)
    assert not model.compressor._forward_hooks  # the head is gone with its stage


def test_train_refuses_a_cached_data_file_from_another_source(tmp_path: Path, tiny_data) -> None:
    """A run folder's data.pt is reused only for the same cases and seed (or manifest) and grid."""
    from typer.testing import CliRunner

    from worker.cli import app

    cached = training.TrainingData(tiny_data.volumes, tiny_data.findings, tiny_data.reports, tiny_data.splits)
    cached.source = {"synthetic_cases": 12, "synthetic_seed": 77, "grid": [8, 24, 24]}
    cached.save(tmp_path / "data.pt")
    arguments = [
        "train",
        "--out",
        str(tmp_path),
        "--preset",
        "tiny",
        "--synthetic",
        "--stage",
        "pretrain-text",
    ]
    result = CliRunner().invoke(app, [*arguments, "--cases", "12", "--seed", "5", "--threads", "1"])
    assert result.exit_code == 2
    assert "data.pt holds data prepared from" in result.output and "synthetic_seed': 1000008" in result.output
    # The same cases and seed, drawn with another share of lesions without edema, are other data.
    cached.source = {
        "synthetic_cases": 12,
        "synthetic_seed": 1_000_008,
        "synthetic_edema_probability": 0.85,
        "grid": [8, 24, 24],
    }
    cached.save(tmp_path / "data.pt")
    options = ["--cases", "12", "--seed", "5", "--threads", "1", "--edema-probability", "0.5"]
    result = CliRunner().invoke(app, [*arguments, *options])
    assert result.exit_code == 2 and "synthetic_edema_probability': 0.5" in result.output


@pytest.mark.parametrize("encoder_in_lm_stages", [True, False])
def test_the_encoder_trains_in_the_lm_stages_unless_told_not_to(
    tmp_path: Path, encoder_in_lm_stages: bool
) -> None:
    """Through the command line: ``--no-encoder-in-lm-stages`` leaves the encoder as stage 1 left it."""
    from typer.testing import CliRunner

    from worker.cli import app

    flag = "--encoder-in-lm-stages" if encoder_in_lm_stages else "--no-encoder-in-lm-stages"
    arguments = ["train", "--out", str(tmp_path), "--preset", "tiny", "--synthetic", "--cases", "20"]
    result = CliRunner().invoke(
        app, [*arguments, "--stage", "projector", "--steps", "projector=3", "--threads", "1", flag]
    )
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "projector" / "log.json").read_text())
    assert ("vision_in_lm_stage" in log["trainable"]) == encoder_in_lm_stages
    start = training.build_model("tiny", training.TrainingData.load(tmp_path / "data.pt"), seed=0)
    trained = Brain3D.from_pretrained(tmp_path / "final")
    unchanged = torch.equal(trained.vision.embeddings.patch.weight, start.vision.embeddings.patch.weight)
    assert unchanged != encoder_in_lm_stages


def test_a_preset_on_pretrained_weights_refuses_to_start_without_them(tmp_path: Path) -> None:
    """A 4B model of random weights, frozen but for LoRA, would train and teach nothing."""
    from typer.testing import CliRunner

    from worker.cli import app

    out = tmp_path / "run"
    arguments = ["train", "--out", str(out), "--preset", "medgemma-4b", "--synthetic", "--cases", "8"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and "--vision and --language-model" in result.output
    result = CliRunner().invoke(app, [*arguments, "--vision", str(tmp_path)])
    assert result.exit_code == 2 and "give both" in result.output
    assert not out.exists(), "refused before any data was prepared"
    with pytest.raises(ValueError, match="starts from pretrained weights"):
        training.train_pipeline(
            "medgemma-4b", ["lora"], training.synthetic_data(24, 3, (8, 24, 24)), tmp_path
        )
