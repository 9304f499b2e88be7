"""Seconds per language-stage training step of the demo model, beside the previous tubelet embedding.

The step of stage 2b (``lora``) as the demo recipe runs it: micro-batch 16, the encoder trained
with the decoder (``vision_in_lm``), the report loss, backward, gradient clipping and AdamW. About
two thirds of the demo's training time is such steps (``docs/results.md``). Two variants of the
same model, alternated round by round in one process so that they share the machine's state:

- *matrix product* (as shipped): ``TubeletEmbedding.tubelet_tokens``, the volume cut into
  tubelets and multiplied by the flattened kernel;
- *strided convolution* (the peer, as before): the same kernel applied by ``Conv3d``.

Weights come from the committed checkpoint; volumes are random and reports rendered from seeded
findings (70 % lesional), since time does not depend on values.

    python benchmarks/training_step.py                  # 2 threads, 5 rounds of 5 steps
    python benchmarks/training_step.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from inference import training  # noqa: E402
from inference.modeling_brain3d import Brain3D  # noqa: E402
from inference.report_schema import NORMAL, Findings, Lobe, Side, Size, render  # noqa: E402

CHECKPOINT = ROOT / "inference" / "checkpoints" / "demo"


def _reports(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    reports = []
    for _ in range(count):
        findings = NORMAL
        if rng.random() < 0.7:
            findings = Findings(
                abnormal=True,
                side=rng.choice(list(Side)),
                lobes=frozenset({rng.choice(list(Lobe))}),
                edema=rng.random() < 0.85,
                necrosis=rng.random() < 0.5,
                enhancement=rng.random() < 0.5,
                ventricular_compression=rng.random() < 0.4,
                midline_shift=rng.random() < 0.2,
                size=rng.choice(list(Size)),
            )
        reports.append(render(findings, rng))
    return reports


def _strided_convolution(model: Brain3D) -> None:
    """The peer: the tubelet kernel applied by its ``Conv3d``, as the embedding did before."""
    embeddings = model.vision.embeddings
    embeddings.tubelet_tokens = lambda volumes: embeddings.patch(volumes).flatten(2).transpose(1, 2)


def _language_step(model: Brain3D, volumes: torch.Tensor, reports: list[str]) -> Callable[[], None]:
    """One optimiser step of stage 2b as the demo recipe trains it, encoder included."""
    training.set_stage_trainable(model, "lora", vision_in_lm=True)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.language_modeling_loss(volumes, reports).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds * args.steps < 2:
        parser.error("--rounds times --steps must give each variant at least 2 timed steps")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants = {"matrix product (shipped)": Brain3D.from_pretrained(args.checkpoint)}
    variants["strided convolution (before)"] = Brain3D.from_pretrained(args.checkpoint)
    _strided_convolution(variants["strided convolution (before)"])
    config = variants["matrix product (shipped)"].config
    volumes = torch.rand(args.micro_batch, 1, *config.input_grid, generator=torch.Generator().manual_seed(0))
    reports = _reports(args.micro_batch, seed=0)
    steps = {name: _language_step(model, volumes, reports) for name, model in variants.items()}
    for step in steps.values():
        step()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)

    shipped = statistics.median(seconds["matrix product (shipped)"])
    print(
        f"`python benchmarks/training_step.py {' '.join(sys.argv[1:])}` on {platform.machine()}, "
        f"{args.threads} thread(s), micro-batch {args.micro_batch}, {args.rounds} rounds of {args.steps} "
        "steps per variant, alternated\n"
    )
    print("| tubelet embedding | median s / step | IQR s | relative |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        quartiles = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {quartiles[2] - quartiles[0]:.3f} | {median / shipped:.2f} |")


if __name__ == "__main__":
    main()
