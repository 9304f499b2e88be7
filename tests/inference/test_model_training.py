"""Projector scale (test 6), LoRA placement, and what each training stage trains."""

from __future__ import annotations

import re

import pytest
import torch
from model_fixtures import random_volumes, report_corpus, tiny_model, tiny_tokenizer
from torch import nn

from inference.configuration_brain3d import Brain3DConfig
from inference.modeling_brain3d import Brain3D, scaled_token_embedding_norms


def _lm_initialised_mlp(vision_width: int, text_width: int, std: float) -> nn.Sequential:
    """The projector without scale matching, initialised as the decoder initialises its layers."""
    mlp = nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
    for layer in (mlp[0], mlp[2]):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return mlp


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_6_projector_output_norm_matches_the_decoders_token_embeddings(preset: str) -> None:
    torch.manual_seed(0)
    model = Brain3D(
        Brain3DConfig.from_preset(preset, vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    ).eval()
    embedding_norm = scaled_token_embedding_norms(model.causal_lm).median()
    volumes = random_volumes(model.config).clamp(0, 1)
    with torch.no_grad():
        compressed = model.compressor(model.encode_tokens(volumes))
        matched = model.projector(compressed).norm(dim=-1).median()
        unmatched_mlp = _lm_initialised_mlp(
            model.config.vision_config.hidden_size,
            model.config.text_config.hidden_size,
            model.config.text_config.initializer_range,
        )
        unmatched = unmatched_mlp(compressed).norm(dim=-1).median()
    assert 0.5 <= matched / embedding_norm <= 2.0
    # Measured 29x (tiny) and 11x (demo) too small: such visual tokens would whisper under the text.
    assert embedding_norm / unmatched > 5, f"unmatched projector only {embedding_norm / unmatched:.1f}x off"


def test_soft_prompts_start_at_the_scale_of_token_embeddings() -> None:
    model = tiny_model()
    ratio = model.soft_prompts.norm(dim=-1).median() / scaled_token_embedding_norms(model.causal_lm).median()
    assert 0.5 <= ratio <= 2.0


@pytest.mark.parametrize("include_mlp", [False, True])
def test_lora_adapts_the_decoder_attention_projections_and_nothing_else(include_mlp: bool) -> None:
    model = tiny_model(lora_include_mlp=include_mlp)
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    layers = range(model.config.text_config.num_hidden_layers)
    expected = {
        f"language_model.base_model.model.model.layers.{i}.self_attn.{p}"
        for i in layers
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    if include_mlp:
        expected |= {
            f"language_model.base_model.model.model.layers.{i}.mlp.{p}"
            for i in layers
            for p in ("gate_proj", "up_proj", "down_proj")
        }
    assert adapted == expected
    assert not any(re.search(r"vision|compressor|projector", name) for name in adapted)


EXPECTED_GROUPS = {
    ("contrastive", False): {
        "tubelet_embedding",
        "depth_position",
        "compressor",
        "projector",
        "plane_position",
        "encoder_blocks",
    },
    ("contrastive", True): {"tubelet_embedding", "depth_position", "compressor", "projector"},
    ("projector", False): {"projector", "soft_prompts"},
    ("lora", True): {"projector", "soft_prompts", "lora"},
    ("lora", False): {"projector", "soft_prompts", "lora", "language_model"},
}


@pytest.mark.parametrize(("stage", "pretrained"), list(EXPECTED_GROUPS))
def test_one_training_step_reaches_exactly_the_parts_a_stage_unfreezes(stage: str, pretrained: bool) -> None:
    """``pretrained`` stands for 2D weights (encoder blocks, decoder) that a stage must leave alone."""
    model = tiny_model(pretrained_vision=pretrained, pretrained_language_model=pretrained).train()
    counts = model.set_trainable(stage)
    expected = EXPECTED_GROUPS[(stage, pretrained)]
    assert {
        group for group, count in counts.items() if count and group not in ("trainable", "total")
    } == expected
    volumes, reports = random_volumes(model.config).clamp(0, 1), report_corpus()[:2]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = model.contrastive_loss if stage == "contrastive" else model.language_modeling_loss
    loss = loss_fn(volumes, reports)
    loss.backward()
    for group, members in model.parameter_groups().items():
        grads = [p.grad for _, p in members]
        if group in expected:
            assert all(g is not None for g in grads), f"{group} got no gradient in stage {stage}"
            assert sum(float(g.abs().sum()) for g in grads) > 0, f"{group} gradient is zero in stage {stage}"
        else:
            assert all(g is None for g in grads), f"{group} got a gradient in stage {stage}"
    optimizer.step()
    for group, members in model.parameter_groups().items():
        moved = any(not torch.equal(before[name], p) for name, p in members)
        assert moved == (group in expected), f"{group} moved={moved} in stage {stage}"


def test_contrastive_loss_refuses_a_batch_of_one() -> None:
    model = tiny_model()
    model.set_trainable("contrastive")
    with pytest.raises(ValueError, match="at least 2"):
        model.contrastive_loss(random_volumes(model.config, batch=1), report_corpus()[:1])


def test_language_modeling_loss_counts_report_tokens_only() -> None:
    """Padding a short report's batch-mate must not change the short report's own loss share."""
    model = tiny_model()
    volumes = random_volumes(model.config, batch=1).clamp(0, 1)
    short = "No focal abnormality is seen."
    alone = model.language_modeling_loss(volumes, [short])
    # Same study twice, once with a long report: the mean over tokens is a weighted mean of both.
    long = report_corpus()[0] + " " + report_corpus()[5]
    both = model.language_modeling_loss(volumes.expand(2, -1, -1, -1, -1), [short, long])
    long_alone = model.language_modeling_loss(volumes, [long])
    tokens = [len(tiny_tokenizer()(text, add_special_tokens=False).input_ids) + 1 for text in (short, long)]
    expected = (alone * tokens[0] + long_alone * tokens[1]) / sum(tokens)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)


def test_training_the_lora_stage_teaches_the_reports_to_generation() -> None:
    """Teacher-forced training and generation must use one layout: after overfitting two studies,
    greedy generation writes their two reports back, each for its own volume."""
    model = tiny_model(seed=3)
    model.train()
    model.set_trainable("lora")
    volumes = torch.full((2, 1, *model.config.input_grid), 0.3)
    volumes[1, ..., : model.config.input_grid[2] // 2] = 1.0  # bright on the patient's left
    reports = [
        "No focal abnormality is seen.",
        "A large lesion is seen in the left frontal lobe with mild edema.",
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss = model.language_modeling_loss(volumes, reports)
        first = first if first is not None else float(loss)
        loss.backward()
        optimizer.step()
    assert float(loss) < first / 10
    model.eval()
    output = model.generate(volumes, max_new_tokens=30, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert output.reports == reports
