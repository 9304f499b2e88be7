"""The presets: demo runs, medgemma-4b has the released shapes and size."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_volumes, tiny_tokenizer

from inference.configuration_brain3d import Brain3DConfig
from inference.modeling_brain3d import Brain3D


def test_demo_encodes_to_64_grid_tokens_and_a_summary_token_and_generates() -> None:
    torch.manual_seed(0)
    model = Brain3D(
        Brain3DConfig.from_preset("demo", vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    ).eval()
    volumes = random_volumes(model.config).clamp(0, 1)
    assert model.encode_tokens(volumes).shape == (2, 8 * 8 * 8, 96)
    assert model.encode(volumes).shape == (2, 64 + 1, 128)
    output = model.generate(volumes, max_new_tokens=5, min_new_tokens=5)
    assert len(output.reports) == 2 and output.timings["new_tokens"] == 5


def test_wrong_volume_grid_is_refused() -> None:
    model = Brain3D(Brain3DConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer())), tiny_tokenizer())
    with pytest.raises(ValueError, match="volumes must be"):
        model.encode(torch.zeros(1, 1, 8, 24, 23))


def test_medgemma_4b_text_config_has_every_released_field() -> None:
    text = Brain3DConfig.from_preset("medgemma-4b").text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2560, 10240, 34)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (8, 4, 256)
    assert (text.vocab_size, text.sliding_window, text.query_pre_attn_scalar) == (262_208, 1024, 256)
    # Five sliding-window layers, then one global layer: globals at 6, 12, ..., 30 (1-based).
    globals_ = [i + 1 for i, kind in enumerate(text.layer_types) if kind == "full_attention"]
    assert globals_ == [6, 12, 18, 24, 30]
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert text.rms_norm_eps == 1e-6 and text.hidden_activation == "gelu_pytorch_tanh"


def _medsiglip_448_vision_parameters() -> int:
    """MedSigLIP-448's vision tower, from its published shapes (no pooling head, as MedGemma uses it)."""
    width, mlp, layers, patch, positions = 1152, 4304, 27, 14, (448 // 14) ** 2
    embeddings = 3 * patch * patch * width + width + positions * width
    block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    return embeddings + layers * block + 2 * width


def _gemma3_4b_text_parameters() -> int:
    """Gemma 3 4B's language model from its released shapes (output head tied to the embedding)."""
    vocab, width, mlp, layers, heads, kv_heads, head_dim = 262_208, 2560, 10_240, 34, 8, 4, 256
    attention = width * heads * head_dim * 2 + width * kv_heads * head_dim * 2 + 2 * head_dim
    block = attention + 3 * width * mlp + 4 * width
    return vocab * width + layers * block + width


#: MedGemma 4B = vision tower + language model + its multimodal projector (1152 x 2560 and an RMS norm).
MEDGEMMA_4B_PARAMETERS = (
    _medsiglip_448_vision_parameters() + _gemma3_4b_text_parameters() + 1152 * 2560 + 1152
)


def test_reference_parameter_counts() -> None:
    assert _medsiglip_448_vision_parameters() == 413_327_088
    assert _gemma3_4b_text_parameters() == 3_880_263_168
    assert MEDGEMMA_4B_PARAMETERS == 4_296_540_528


def test_medgemma_4b_on_the_meta_device_matches_the_real_models_size() -> None:
    with torch.device("meta"):
        model = Brain3D(Brain3DConfig.from_preset("medgemma-4b"), tiny_tokenizer())
    groups = model.parameter_groups()
    total = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for _, p in groups["lora"])
    assert abs(total - MEDGEMMA_4B_PARAMETERS) / MEDGEMMA_4B_PARAMETERS < 0.01
    assert abs(total - lora - MEDGEMMA_4B_PARAMETERS) / MEDGEMMA_4B_PARAMETERS < 0.01
    assert sum(p.numel() for _, p in groups["language_model"]) == _gemma3_4b_text_parameters()
    # rank 16 on q/k/v/o of 34 layers: 16 x (in + out) per projection
    assert lora == 34 * 16 * ((2560 + 2048) * 2 + (2560 + 1024) * 2)


@pytest.mark.parametrize("preset", ["demo", "medgemma-4b"])
def test_every_layer_lets_the_whole_report_see_every_visual_token(preset: str) -> None:
    """Gemma 3's local layers attend within a sliding window; it must span the prefix and the
    longest report, or the report's words could not look at the first (inferior) visual tokens."""
    config = Brain3DConfig.from_preset(preset)
    instruction_allowance = 64  # BOS, chat turn markers and the instruction, in any tokenizer here
    sequence = (
        config.num_soft_prompts + config.num_visual_tokens + instruction_allowance + config.max_new_tokens
    )
    assert config.text_config.sliding_window >= sequence


def test_the_instruction_allowance_covers_the_demo_tokenizer() -> None:
    from dicom_node.config import ModelSettings
    from inference.modeling_brain3d import SequenceLayout

    model = Brain3D.from_pretrained(ModelSettings().path)  # the node's default: the committed demo
    layout = SequenceLayout(model.tokenizer, model.config.instruction)
    assert len(layout.head_ids) + len(layout.tail_ids) <= 64
