"""Configuration of Brain3D: the inflated SigLIP encoder, the token compressor, the projector,
the soft prompts, the Gemma 3 decoder, LoRA and the generation defaults, in one object.

Three presets (:meth:`Brain3DConfig.from_preset`):

- ``tiny``: random weights, builds in well under a second; for tests.
- ``demo``: small enough to train on two CPU cores in minutes; the committed demo checkpoint.
- ``medgemma-4b``: the real shapes, MedSigLIP-448 (vision) and Gemma 3 4B (text), every field of the
  text model written out rather than left to ``Gemma3TextConfig``'s defaults, which are not the 4B's.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers import AutoConfig, Gemma3TextConfig, PretrainedConfig, SiglipVisionConfig

#: LoRA targets: the language model's attention projections, and only those.
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: Added to the targets when ``lora_include_mlp`` is set.
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
#: The encoders ``vision_encoder`` names: Brain3D's, and the 2D slice baseline's.
INFLATED_3D, SLICES_2D = "inflated-3d", "2d-slices"
VISION_ENCODERS = (INFLATED_3D, SLICES_2D)


class Brain3DConfig(PretrainedConfig):
    """Everything needed to rebuild a Brain3D model; saved as ``config.json`` beside its weights.

    Shapes are ``[depth, height, width]`` in the input convention of :mod:`inference.convention`.
    """

    model_type = "brain3d"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vision_config": SiglipVisionConfig,
        "text_config": Gemma3TextConfig,
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    #: Grid every volume is resampled to before the model sees it, (D, H, W) in voxels.
    input_grid: list[int] | None = None
    #: SigLIP's image-processor normalisation, applied inside the model: volumes arrive in [0, 1]
    #: (``inference.prepare``) and the encoder sees (v - mean) / std in [-1, 1], as in 2D pretraining.
    pixel_mean: float = 0.5
    pixel_std: float = 0.5
    #: Slices per tubelet; also the depth stride, so slabs do not overlap.
    tubelet_depth: int = 4
    #: ``"inflated-3d"``: Brain3D's encoder (tubelets, attention across the whole volume).
    #: ``"2d-slices"``: the ablation's 2D slice baseline: the 2D tower reads the middle slice of
    #: every ``tubelet_depth`` slab on its own, with no attention across slices, into the same
    #: token grid; compressor, projector and decoder are unchanged.
    vision_encoder: str = INFLATED_3D
    #: True when the encoder blocks carry pretrained 2D weights (then they stay frozen).
    pretrained_vision: bool = False
    #: True when the decoder carries pretrained weights (then only its LoRA adapter trains). The small
    #: presets' decoders start random: a frozen random decoder cannot learn to write, so their stage
    #: ``lora`` trains the whole decoder as well.
    pretrained_language_model: bool = False
    #: Token grid after compression, (D, H, W); its product is the number of visual tokens.
    compressor_grid: list[int] | None = None
    #: Rank of the compressor's grid-summary token (a linear readout of the whole pooled grid, see
    #: ``SpatialCompressor``); 0: no such token.
    grid_summary_rank: int = 0
    #: Channels of the convolutional stem beside the tubelet embedding (``LesionStem``); 0: none.
    stem_channels: int = 0
    #: Hidden width of the projector MLP; ``None`` means the language model's width.
    projector_hidden_size: int | None = None
    num_soft_prompts: int = 16
    instruction: str = "Describe the brain FLAIR MRI volume."
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_include_mlp: bool = False
    #: Set in a merged export: the adapter is folded into the language model's weights.
    lora_merged: bool = False
    contrastive_temperature: float = 0.07
    max_new_tokens: int = 200
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 3
    #: True for a checkpoint trained on synthetic data only (``brain3d train --synthetic``, the demo):
    #: the node's SRs then say "synthetic demo model, not for clinical use" and stay on loopback
    #: unless ``delivery.allow_demo_model``. It travels with the checkpoint, wherever it is copied.
    synthetic_demo: bool = False
    #: Where weights not saved with the checkpoint come from: ``{"vision": {"path", "sha256"},
    #: "language_model": {"path", "sha256"}}``; ``None`` when the checkpoint holds every weight.
    base_weights: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.input_grid is None:
            self.input_grid = [32, 64, 64]
        if self.compressor_grid is None:
            self.compressor_grid = [4, 4, 4]
        self.input_grid = [int(v) for v in self.input_grid]
        self.compressor_grid = [int(v) for v in self.compressor_grid]
        if self.vision_encoder not in VISION_ENCODERS:
            raise ValueError(
                f"vision_encoder {self.vision_encoder!r}: expected one of {list(VISION_ENCODERS)}"
            )
        depth, height, width = self.input_grid
        patch = self.vision_config.patch_size
        if depth % self.tubelet_depth or height % patch or width % patch:
            raise ValueError(
                f"input grid {self.input_grid} must divide into tubelets of "
                f"{self.tubelet_depth}x{patch}x{patch} voxels"
            )
        if any(c > t for c, t in zip(self.compressor_grid, self.token_grid, strict=True)):
            raise ValueError(f"compressor grid {self.compressor_grid} exceeds token grid {self.token_grid}")
        if self.grid_summary_rank < 0:
            raise ValueError(f"grid_summary_rank must be 0 (none) or more, got {self.grid_summary_rank}")
        if self.stem_channels < 0 or (self.stem_channels and patch % 2):
            raise ValueError(
                f"stem_channels must be 0 (none) or more, with an even patch size; got "
                f"{self.stem_channels} with patch size {patch}"
            )
        # The vision tower's own attention settings are set here once so that every path
        # (presets, from_2d, from_pretrained) runs the same kernels.
        self.vision_config._attn_implementation = self.vision_config._attn_implementation or "sdpa"
        self.text_config._attn_implementation = self.text_config._attn_implementation or "sdpa"

    @property
    def token_grid(self) -> list[int]:
        """Tokens along (D, H, W) after the tubelet embedding."""
        depth, height, width = self.input_grid
        patch = self.vision_config.patch_size
        return [depth // self.tubelet_depth, height // patch, width // patch]

    @property
    def num_visual_tokens(self) -> int:
        """The compressed grid's tokens, and the grid-summary token where there is one."""
        depth, height, width = self.compressor_grid
        return depth * height * width + (1 if self.grid_summary_rank else 0)

    @property
    def lora_target_modules(self) -> list[str]:
        return ATTENTION_PROJECTIONS + (MLP_PROJECTIONS if self.lora_include_mlp else [])

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Brain3DConfig:
        """A named configuration; ``overrides`` replace top-level fields (e.g. ``vocab_size`` of the text)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = copy.deepcopy(PRESETS[name])
        if "vocab_size" in overrides:
            fields["text_config"]["vocab_size"] = overrides.pop("vocab_size")
        fields.update(overrides)
        return cls(**fields)


def _sliding_pattern(num_layers: int, local_per_global: int) -> list[str]:
    """Gemma 3's layer pattern: ``local_per_global`` sliding-window layers, then one global layer."""
    period = local_per_global + 1
    return [
        "full_attention" if (index + 1) % period == 0 else "sliding_attention" for index in range(num_layers)
    ]


def _small_text_config(hidden: int, layers: int, heads: int, kv_heads: int, window: int) -> dict[str, Any]:
    """A small Gemma 3 text model with the 4B's structure (local/global layers, GQA, two RoPE bases)."""
    return {
        "vocab_size": 512,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "query_pre_attn_scalar": hidden // heads,
        "sliding_window": window,
        "layer_types": _sliding_pattern(layers, local_per_global=layers - 1),
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
    }


#: The released Gemma 3 4B text model (and MedGemma 4B's language model), every field explicit.
GEMMA3_4B_TEXT: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10_240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "layer_types": _sliding_pattern(34, local_per_global=5),
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}

#: MedSigLIP-448's vision tower (a SigLIP So400m vision transformer at 448 px); the pooling head
#: is not used by Brain3D and therefore not built.
MEDSIGLIP_448_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
            "vision_use_head": False,
        },
        "text_config": _small_text_config(hidden=32, layers=2, heads=2, kv_heads=1, window=16),
        "input_grid": [8, 24, 24],
        "tubelet_depth": 2,
        # Token grid 4x6x6 pooled by 2x2x2 windows, the same ratio as demo's 8x8x8 -> 4x4x4.
        "compressor_grid": [2, 3, 3],
        "num_soft_prompts": 4,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_new_tokens": 16,
    },
    "demo": {
        "vision_config": {
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "vision_use_head": False,
        },
        # The window covers the whole prefix and report (about 90 + up to 200 tokens), as the 4B's 1024-token
        # window covers its own: with 64, three of four layers could not see the first visual tokens
        # from the report, and the one global layer was left to find the lesion alone.
        "text_config": {
            **_small_text_config(hidden=128, layers=4, heads=4, kv_heads=2, window=512),
            "vocab_size": 1024,
        },
        "input_grid": [32, 64, 64],
        "tubelet_depth": 4,
        "compressor_grid": [4, 4, 4],
        "grid_summary_rank": 32,
        "stem_channels": 16,
        "num_soft_prompts": 16,
        "lora_rank": 8,
        "lora_alpha": 16,
        "max_new_tokens": 120,
    },
    "medgemma-4b": {
        "vision_config": MEDSIGLIP_448_VISION,
        "text_config": GEMMA3_4B_TEXT,
        # 224 px in plane (16x16 patches of 14 px, ~1 mm over a 22-24 cm field of view) and 64 slices
        # in 16 slabs of 4: 4,096 tokens through the encoder, compressed to 4x4x4 = 64 visual tokens.
        "input_grid": [64, 224, 224],
        "tubelet_depth": 4,
        "pretrained_vision": True,
        "pretrained_language_model": True,
        "compressor_grid": [4, 4, 4],
        "num_soft_prompts": 16,
        "lora_rank": 16,
        "lora_alpha": 32,
        "max_new_tokens": 200,
    },
}


# So that AutoConfig (and AutoTokenizer, which reads config.json) recognise a Brain3D checkpoint.
AutoConfig.register(Brain3DConfig.model_type, Brain3DConfig)
