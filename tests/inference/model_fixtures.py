"""Builders shared by the model tests: a small report corpus, its tokenizer, tiny models and volumes."""

from __future__ import annotations

import functools
import itertools

import torch
from transformers import PreTrainedTokenizerFast

from inference.configuration_brain3d import Brain3DConfig
from inference.modeling_brain3d import Brain3D
from inference.tokenization import train_report_tokenizer


def report_corpus() -> list[str]:
    """TextBraTS-like sentences: enough variety for a tokenizer, small enough to build in milliseconds."""
    sentences = [
        f"A {size} lesion is seen in the {side} {lobe} lobe with {edema} edema."
        for size, side, lobe, edema in itertools.product(
            ["small", "large"],
            ["left", "right"],
            ["frontal", "parietal", "temporal", "occipital"],
            ["mild", "marked"],
        )
    ]
    sentences += ["No focal abnormality is seen.", "There is necrosis and compression of the ventricle."]
    return sentences


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_report_tokenizer([*report_corpus(), Brain3DConfig.instruction], vocab_size=400)


def tiny_config(**overrides: object) -> Brain3DConfig:
    return Brain3DConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer()), **overrides)


def tiny_model(seed: int = 0, **overrides: object) -> Brain3D:
    torch.manual_seed(seed)
    return Brain3D(tiny_config(**overrides), tiny_tokenizer()).eval()


def random_volumes(config: Brain3DConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 1, *config.input_grid), generator=generator)


def perturb_trainable(model: Brain3D, seed: int = 1) -> None:
    """Move every weight a training run would move (LoRA B starts at zero), as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad or ".lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
