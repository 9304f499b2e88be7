"""Brain3D: an inflated 3D SigLIP encoder, a spatial token compressor, a projector, soft prompts
and a Gemma 3 decoder with LoRA, writing a brain FLAIR report from one volume.

Read top to bottom:

1. checkpoint reading: only the tensors a part needs are read from a 2D checkpoint's safetensors;
2. :class:`TubeletEmbedding` and :class:`InflatedSiglipEncoder`: SigLIP's 2D patch embedding
   inflated to 3D, SigLIP's own encoder blocks attending across the whole volume;
3. :class:`SpatialCompressor`: 3D adaptive average pooling of the token grid, so that left stays
   left (the published code pooled the flattened sequence, which blurs left and right);
4. :class:`Projector`: vision width to language-model width, output norm matched to the language
   model's own (scaled) token embeddings;
5. :class:`SequenceLayout`: the one place where the decoder's input sequence is built;
6. :class:`Brain3D`: the model, its training primitives (``set_trainable``, ``contrastive_loss``,
   ``language_modeling_loss``), ``generate``, ``save_pretrained`` / ``from_pretrained`` / ``from_2d``.

Input convention (:mod:`inference.convention`): volumes are ``(batch, 1, D, H, W)`` floats, D inferior
to superior, H posterior to anterior, W patient left to patient right, on ``config.input_grid``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DynamicCache,
    Gemma3ForCausalLM,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
    StaticCache,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from inference.configuration_brain3d import SLICES_2D, Brain3DConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
STAGES = ("contrastive", "projector", "lora")


# --------------------------------------------------------------------------------------------------
# 1. Reading 2D checkpoints: only the tensors wanted, shard by shard
# --------------------------------------------------------------------------------------------------


def read_safetensors(directory: str | Path, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Read the tensors of a Hugging Face checkpoint whose ``rename(key)`` is not ``None``.

    Tensors that are not wanted (a multimodal checkpoint's vision tower, a SigLIP text tower) are
    never read from disk, so they never reach any device; shards holding none of the wanted keys
    are not even opened.
    """
    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if rename(key) is not None:
                shards.setdefault(shard, []).append(key)
    else:
        shards = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                wanted = [key for key in handle.keys() if rename(key) is not None]  # noqa: SIM118
            if wanted:
                shards[path.name] = wanted
    if not shards:
        raise FileNotFoundError(f"no wanted safetensors weights in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in shards.items():
        with safe_open(directory / shard, framework="pt") as handle:
            for key in keys:
                tensors[rename(key)] = handle.get_tensor(key)  # type: ignore[index]
    return tensors


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 over a checkpoint's ``config.json`` and safetensors files (names and bytes, sorted)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted([directory / "config.json", *directory.glob("*.safetensors")]):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _siglip_vision_key(key: str) -> str | None:
    """SigLIP vision weights under ``SiglipVisionModel``'s names, from a vision-only, a full SigLIP
    (such as MedSigLIP: its text tower is skipped) or a multimodal Gemma 3 checkpoint, whether
    written by transformers 4 (``vision_model.`` prefix) or 5 (none)."""
    name = key
    for prefix in ("model.vision_tower.", "vision_tower.", "vision_model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name if name.startswith(("embeddings.", "encoder.", "post_layernorm.")) else None


def _language_model_key_function(model_type: str) -> Callable[[str], str | None]:
    """Map a checkpoint's keys to ``Gemma3ForCausalLM`` names; a multimodal one keeps its text part only."""
    if model_type == "gemma3_text":
        return lambda key: key if key.startswith(("model.", "lm_head.")) else None
    if model_type != "gemma3":
        raise ValueError(f"expected a Gemma 3 checkpoint (gemma3 or gemma3_text), got {model_type!r}")

    def multimodal_key(key: str) -> str | None:
        # transformers >= 4.52 writes model.language_model.*, earlier releases language_model.model.*
        for prefix in ("model.language_model.", "language_model.model."):
            if key.startswith(prefix):
                return "model." + key[len(prefix) :]
        for prefix in ("lm_head.", "language_model.lm_head."):
            if key.startswith(prefix):
                return "lm_head." + key[len(prefix) :]
        return None

    return multimodal_key


# --------------------------------------------------------------------------------------------------
# 2. The inflated encoder
# --------------------------------------------------------------------------------------------------


class LesionStem(nn.Module):
    """A convolutional stem beside the tubelet embedding: one 3x3x3 convolution at full depth and
    half the in-plane resolution, GELU, the maximum over each tubelet, and a 1x1x1 projection to the
    encoder's width, added to the tubelet's token.

    A tubelet embedding is linear in its voxels, so a small lesion anywhere in a tubelet, barely
    brighter than cortex, moves its token little; a filter slid over every voxel and maximised per
    tubelet marks it wherever it lies. On the demo grid a small network that starts with a tubelet
    embedding finds 24-31 % of the lesions without edema at 98 % specificity, one with this stem
    35-54 % (``docs/results.md``). The projection starts at zero, so the inflated encoder is
    unchanged at initialisation.
    """

    def __init__(self, config: Brain3DConfig):
        super().__init__()
        channels = config.stem_channels
        patch = config.vision_config.patch_size
        self.convolution = nn.Conv3d(1, channels, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.pool = nn.MaxPool3d((config.tubelet_depth, patch // 2, patch // 2))
        self.projection = nn.Conv3d(channels, config.vision_config.hidden_size, kernel_size=1)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, d * h * w, width)``, in the tubelet tokens' order."""
        # Channels-last: this convolution's forward and backward take a quarter less time on the CPU.
        volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
        features = self.pool(F.gelu(self.convolution(volumes)))
        return self.projection(features).flatten(2).transpose(1, 2)


class TubeletEmbedding(nn.Module):
    """SigLIP's patch embedding inflated to non-overlapping ``t x p x p`` tubelets of a grey volume.

    A grey image fed to the 2D model as R=G=B sees the sum over channels of each kernel, so the
    kernel is summed over its input channels, repeated along depth and divided by the tubelet
    depth: a volume of identical slices then embeds exactly as the 2D model embeds one slice.
    The learned 2D position embeddings are kept (interpolated to the in-plane patch grid as
    SigLIP's ``interpolate_pos_encoding`` does); a depth embedding, zero at initialisation, is added,
    and the :class:`LesionStem`'s output where the configuration has one (``stem_channels``).

    The kernel is kept as a ``Conv3d`` (its weights, and the checkpoints' names for them, are a
    convolution's) but applied as what a convolution whose stride equals its kernel is: one matrix
    product over the volume cut into tubelets. On the CPU its forward and backward take a sixth of
    the convolution's time (``docs/benchmarks.md``).
    """

    def __init__(self, config: Brain3DConfig, patch_embedding: nn.Conv2d, position_embedding: nn.Embedding):
        super().__init__()
        width = config.vision_config.hidden_size
        patch = config.vision_config.patch_size
        depth = config.tubelet_depth
        self.token_grid = tuple(config.token_grid)
        self.patch = nn.Conv3d(1, width, kernel_size=(depth, patch, patch), stride=(depth, patch, patch))
        side = math.isqrt(position_embedding.weight.shape[0])
        self.plane_position = nn.Parameter(
            position_embedding.weight.detach().reshape(side, side, width).clone()
        )
        self.depth_position = nn.Parameter(torch.zeros(self.token_grid[0], width))
        self.stem = LesionStem(config) if config.stem_channels else None
        with torch.no_grad():
            kernel_2d = patch_embedding.weight.sum(dim=1, keepdim=True)  # (width, 1, p, p)
            self.patch.weight.copy_(kernel_2d.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth)
            self.patch.bias.copy_(patch_embedding.bias)

    def plane_positions(self) -> torch.Tensor:
        """The 2D position embeddings on the in-plane patch grid, ``(h * w, width)``."""
        _, height, width = self.token_grid
        grid = self.plane_position
        if grid.shape[:2] != (height, width):
            grid = F.interpolate(
                grid.permute(2, 0, 1).unsqueeze(0), size=(height, width), mode="bicubic", align_corners=False
            )[0].permute(1, 2, 0)
        return grid.reshape(height * width, -1)

    def tubelet_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """``self.patch`` applied to ``(B, 1, D, H, W)``: ``(B, d * h * w, width)``, each token the
        kernel's product with its ``t x p x p`` tubelet, in (d, h, w) row-major order."""
        depth, height, width = self.token_grid
        t, p, q = self.patch.kernel_size
        tubelets = (
            volumes.reshape(volumes.shape[0], depth, t, height, p, width, q)
            .permute(0, 1, 3, 5, 2, 4, 6)
            .reshape(volumes.shape[0], depth * height * width, t * p * q)
        )
        return F.linear(tubelets, self.patch.weight.flatten(1), self.patch.bias)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, d * h * w, width)``, tokens in (d, h, w) row-major order."""
        volumes = volumes.to(self.patch.weight.dtype)
        tokens = self.tubelet_tokens(volumes)
        if self.stem is not None:
            tokens = tokens + self.stem(volumes)
        positions = self.depth_position[:, None, :] + self.plane_positions()[None, :, :]
        return tokens + positions.reshape(1, -1, tokens.shape[-1])


class InflatedSiglipEncoder(nn.Module):
    """SigLIP's vision transformer with a tubelet embedding: its blocks attend across the whole volume."""

    def __init__(self, config: Brain3DConfig, siglip: SiglipVisionModel):
        super().__init__()
        self.embeddings = TubeletEmbedding(
            config, siglip.embeddings.patch_embedding, siglip.embeddings.position_embedding
        )
        self.encoder = siglip.encoder
        self.post_layernorm = siglip.post_layernorm
        self.pixel_mean = config.pixel_mean
        self.pixel_std = config.pixel_std

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` in [0, 1] -> tokens ``(B, d * h * w, width)`` after SigLIP's final norm."""
        normalised = (volumes - self.pixel_mean) / self.pixel_std
        hidden = self.encoder(inputs_embeds=self.embeddings(normalised)).last_hidden_state
        return self.post_layernorm(hidden)


class SliceEncoder(nn.Module):
    """The 2D slice baseline's encoder (``vision_encoder="2d-slices"``), for the ablation.

    SigLIP's 2D vision tower reads the middle axial slice of every ``tubelet_depth`` slab as an
    image of its own, as a 2D model fed several slices would; no attention crosses slices, and no
    lesion stem reads the volume. The
    slices' tokens stack along depth into the token grid the inflated encoder produces, so
    compressor, projector and decoder are the same and the ablation compares the encoders alone.
    """

    def __init__(self, config: Brain3DConfig, siglip: SiglipVisionModel):
        super().__init__()
        self.embeddings = siglip.embeddings
        self.encoder = siglip.encoder
        self.post_layernorm = siglip.post_layernorm
        self.pixel_mean = config.pixel_mean
        self.pixel_std = config.pixel_std
        self.slab = config.tubelet_depth
        self.image_size = config.vision_config.image_size

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` in [0, 1] -> tokens ``(B, d * h * w, width)``, slice by slice."""
        slices = volumes[:, 0, self.slab // 2 :: self.slab]  # (B, d, H, W)
        batch, _, height, width = slices.shape
        images = ((slices.reshape(-1, 1, height, width) - self.pixel_mean) / self.pixel_std).expand(
            -1, 3, -1, -1
        )
        embedded = self.embeddings(
            images.to(self.embeddings.patch_embedding.weight.dtype),
            interpolate_pos_encoding=(height, width) != (self.image_size, self.image_size),
        )
        hidden = self.post_layernorm(self.encoder(inputs_embeds=embedded).last_hidden_state)
        return hidden.reshape(batch, -1, hidden.shape[-1])


def build_vision_encoder(config: Brain3DConfig, siglip: SiglipVisionModel) -> nn.Module:
    """The encoder ``config.vision_encoder`` names, around the 2D tower ``siglip``."""
    if config.vision_encoder == SLICES_2D:
        return SliceEncoder(config, siglip)
    return InflatedSiglipEncoder(config, siglip)


# --------------------------------------------------------------------------------------------------
# 3. Spatial token compression, 4. projector
# --------------------------------------------------------------------------------------------------


class SpatialCompressor(nn.Module):
    """3D adaptive average pooling of the token grid, plus the hemispheric difference and a
    learned 3D position embedding on every token, and optionally one grid-summary token after them.

    Each token summarises one block of the volume, so a left-sided lesion lands in left tokens;
    pooling windows are symmetric, so a mirrored grid pools to the mirrored tokens.

    The hemispheric difference is the mean of the pooled tokens over the patient's left half of
    the grid minus their mean over the right half (a middle column of an odd grid belongs to
    neither), as a radiologist compares hemispheres: a one-sided lesion gives it a sign, and
    mirroring the volume negates it. Added to every token, it reaches the decoder in whatever the
    decoder attends to; where the lesion is only told by which token holds it, the demo decoder
    never learned laterality (``docs/results.md``).

    The grid summary (``grid_summary_rank`` > 0) says where the lesion lies in one place: a
    low-rank linear readout of the whole pooled grid, appended as one more token, which training's
    findings loss (:class:`inference.training.FindingsSupervision`) teaches the report's findings
    and the lesion's side and lobes. The report loss alone never put the lobe into it, and the
    decoder never learnt to read the lobe from which grid token holds the lesion, although a
    linear probe finds it there. A token of its own, because added to every token it outgrew them
    twelvefold and the decoder lost the side (``docs/results.md``).
    """

    def __init__(self, config: Brain3DConfig):
        super().__init__()
        self.token_grid = tuple(config.token_grid)
        self.output_grid = tuple(config.compressor_grid)
        if self.output_grid[2] < 2:
            raise ValueError(f"compressor_grid {list(self.output_grid)} needs at least 2 columns along W")
        width = config.vision_config.hidden_size
        grid_tokens = math.prod(self.output_grid)
        self.position = nn.Parameter(torch.zeros(grid_tokens, width))
        # A difference of two half-grid means is about 1/20 of a token's norm; at gain 1 the demo
        # decoder did not pick it up in 750 steps, while a global signal of half a token's norm is
        # learnt within 400 (docs/results.md). Learnt from here on.
        self.difference_gain = nn.Parameter(torch.tensor(10.0))
        self.grid_summary: nn.Sequential | None = None
        if config.grid_summary_rank > 0:
            self.grid_summary = nn.Sequential(
                nn.Flatten(),
                nn.Linear(grid_tokens * width, config.grid_summary_rank),
                nn.Linear(config.grid_summary_rank, width),
            )

    def hemispheric_difference(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w)`` pooled grid -> ``(B, C)``: left-half mean minus right-half mean."""
        half = self.output_grid[2] // 2  # W runs from the patient's left (small w) to the right
        return pooled[..., :half].mean((2, 3, 4)) - pooled[..., -half:].mean((2, 3, 4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, d * h * w, C)`` -> ``(B, prod(compressor_grid), C)`` in (d, h, w) row-major order,
        then the grid-summary token where there is one."""
        batch, _, channels = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, channels, *self.token_grid)
        pooled = F.adaptive_avg_pool3d(grid, self.output_grid)
        difference = self.difference_gain * self.hemispheric_difference(pooled).unsqueeze(1)
        compressed = pooled.flatten(2).transpose(1, 2) + difference + self.position
        if self.grid_summary is None:
            return compressed
        summary = self.grid_summary(pooled)
        return torch.cat([compressed, summary.unsqueeze(1)], dim=1)


class Projector(nn.Module):
    """Linear, GELU, Linear to the language model's width; then RMS-normalised and scaled.

    Gemma multiplies its token embeddings by sqrt(hidden) but not vectors passed as
    ``inputs_embeds``; the learned ``output_scale`` starts at the language model's median scaled
    token-embedding norm, so visual tokens enter at the norm the decoder was trained on.
    """

    def __init__(self, vision_width: int, text_width: int, hidden_width: int | None = None):
        super().__init__()
        hidden_width = hidden_width or text_width
        self.fc1 = nn.Linear(vision_width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, text_width)
        self.output_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.fc2(F.gelu(self.fc1(tokens), approximate="tanh"))
        return F.rms_norm(hidden, (hidden.shape[-1],), eps=1e-6) * self.output_scale

    @torch.no_grad()
    def match_scale(self, target_norm: float) -> None:
        """Set the output norm to ``target_norm`` (an RMS-normalised vector of width n has norm sqrt(n))."""
        self.output_scale.fill_(target_norm / math.sqrt(self.fc2.out_features))


def scaled_token_embedding_norms(language_model: Gemma3ForCausalLM) -> torch.Tensor:
    """Norms of the vectors Gemma's embedding layer really feeds its first block (weights x sqrt(hidden))."""
    embedding = language_model.get_input_embeddings()
    scale = float(getattr(embedding, "scalar_embed_scale", 1.0))
    return embedding.weight.detach().float().norm(dim=-1) * scale


# --------------------------------------------------------------------------------------------------
# 5. The sequence layout
# --------------------------------------------------------------------------------------------------


class SequenceLayout:
    """The decoder's input, built here and nowhere else.

    With a chat template (Gemma's, and the small tokenizer's copy of it)::

        <bos><start_of_turn>user\\n [soft prompt x N] [visual x G] {instruction}<end_of_turn>\\n
        <start_of_turn>model\\n {report} <end_of_turn>

    i.e. beginning of sequence, soft prompt, visual tokens, instruction, then the report, which ends
    with ``<end_of_turn>`` (the token Gemma ends a turn with). Without a chat template:
    ``<bos> [soft] [visual] {instruction}\\n {report} <eos>``. Every study in a batch shares the prefix
    length (the instruction is fixed), so batched generation needs no padding.
    """

    _VISUAL_SLOT = "\u241fVISUAL\u241f"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, instruction: str):
        self.tokenizer = tokenizer
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": self._VISUAL_SLOT + instruction}],
                add_generation_prompt=True,
                tokenize=False,
            )
        else:
            rendered = f"{tokenizer.bos_token}{self._VISUAL_SLOT}{instruction}\n"
        head, tail = rendered.split(self._VISUAL_SLOT)
        self.head_ids: list[int] = tokenizer(head, add_special_tokens=False).input_ids
        self.tail_ids: list[int] = tokenizer(tail, add_special_tokens=False).input_ids
        if not self.head_ids or self.head_ids[0] != tokenizer.bos_token_id:
            raise ValueError("the sequence must start with the tokenizer's beginning-of-sequence token")
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        has_turns = bool(tokenizer.chat_template) and end_of_turn != tokenizer.unk_token_id
        self.report_end_id: int = end_of_turn if has_turns else tokenizer.eos_token_id
        self.stop_ids: list[int] = sorted({self.report_end_id, tokenizer.eos_token_id})

    def prefix_length(self, num_soft_prompts: int, num_visual: int) -> int:
        return len(self.head_ids) + num_soft_prompts + num_visual + len(self.tail_ids)

    def prefix_embeddings(
        self, embed_tokens: nn.Module, soft_prompts: torch.Tensor, visual: torch.Tensor
    ) -> torch.Tensor:
        """``(B, prefix_length, width)``: BOS and turn header, soft prompts, visual tokens, instruction."""
        batch, device = visual.shape[0], visual.device
        head = embed_tokens(torch.tensor([self.head_ids], device=device)).expand(batch, -1, -1)
        tail = embed_tokens(torch.tensor([self.tail_ids], device=device)).expand(batch, -1, -1)
        soft = soft_prompts.to(visual.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([head.to(visual.dtype), soft, visual, tail.to(visual.dtype)], dim=1)

    def report_targets(self, reports: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Report token ids ending with the report terminator, right-padded, and their mask."""
        sequences = [
            [*self.tokenizer(text, add_special_tokens=False).input_ids, self.report_end_id]
            for text in reports
        ]
        return _pad_right(sequences, self.tokenizer.pad_token_id, device)


def _pad_right(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# 6. The model
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    """Reports in batch order; timings in seconds for the whole batch, ``new_tokens`` per study."""

    reports: list[str]
    token_ids: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(requested: str | torch.device) -> torch.device:
    """``auto`` (a CUDA GPU where there is one, else the CPU) or a torch device (``cuda:1``)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype to read reports in: bfloat16 on a GPU that computes in it natively (Ampere and
    later: half the memory, and the dtype MedGemma ships in), float32 elsewhere (older GPUs only
    emulate bf16; CPUs gain nothing from it here, docs/results.md)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


class Brain3D(nn.Module):
    """Volume in, report out. Build with ``Brain3D(config, tokenizer)`` (random weights),
    :meth:`from_2d` (pretrained SigLIP + Gemma 3) or :meth:`from_pretrained` (a saved checkpoint).

    ``siglip`` and ``language_model`` take prebuilt 2D parts (``from_2d`` passes loaded ones);
    without them both are built from the configuration with random weights.
    """

    def __init__(
        self,
        config: Brain3DConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        siglip: SiglipVisionModel | None = None,
        language_model: Gemma3ForCausalLM | None = None,
    ):
        super().__init__()
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, the language model's vocabulary "
                f"only {config.text_config.vocab_size}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.layout = SequenceLayout(tokenizer, config.instruction)
        self.vision = build_vision_encoder(config, siglip or SiglipVisionModel(config.vision_config))
        self.compressor = SpatialCompressor(config)
        text_width = config.text_config.hidden_size
        self.projector = Projector(config.vision_config.hidden_size, text_width, config.projector_hidden_size)
        self.soft_prompts = nn.Parameter(torch.zeros(config.num_soft_prompts, text_width))
        language_model = language_model or Gemma3ForCausalLM(config.text_config)
        self._init_from_language_model(language_model)
        if config.lora_merged:
            self.language_model: Gemma3ForCausalLM | PeftModel = language_model
        else:
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                # Anchored on the decoder's layers: nothing outside the language model is adapted.
                target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.("
                + "|".join(config.lora_target_modules)
                + ")",
            )
            self.language_model = get_peft_model(language_model, lora)
        self.set_trainable("projector" if config.lora_merged else "lora")

    @torch.no_grad()
    def _init_from_language_model(self, language_model: Gemma3ForCausalLM) -> None:
        """Scale the projector and seed the soft prompts from the decoder's own token embeddings."""
        if language_model.get_input_embeddings().weight.is_meta:
            return  # a checkpoint load overwrites both
        norms = scaled_token_embedding_norms(language_model)
        self.projector.match_scale(float(norms.median()))
        # Soft prompts start as the (scaled) embeddings of random vocabulary tokens: the scale the
        # decoder expects, and a reproducible choice for a given seed.
        generator = torch.Generator().manual_seed(0)
        special = set(self.tokenizer.all_special_ids)
        # On the CPU explicitly: the model may be built under another default device (benchmarks on a GPU).
        candidates = torch.tensor([i for i in range(len(self.tokenizer)) if i not in special], device="cpu")
        chosen = candidates[
            torch.randint(len(candidates), (self.config.num_soft_prompts,), generator=generator, device="cpu")
        ]
        embedding = language_model.get_input_embeddings()
        self.soft_prompts.copy_(embedding(chosen.to(embedding.weight.device)).to(self.soft_prompts.dtype))

    # ---- parts ----------------------------------------------------------------------------------

    @property
    def causal_lm(self) -> Gemma3ForCausalLM:
        """The Gemma 3 decoder (with the LoRA layers injected, when there are any)."""
        if isinstance(self.language_model, PeftModel):
            return self.language_model.get_base_model()
        return self.language_model

    @property
    def device(self) -> torch.device:
        return self.soft_prompts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.soft_prompts.dtype

    def _frozen_language_model(self) -> contextlib.AbstractContextManager:
        """The decoder without its adapter (the base model the contrastive stage aligns to)."""
        if isinstance(self.language_model, PeftModel):
            return self.language_model.disable_adapter()
        return contextlib.nullcontext()

    # ---- forward pieces -------------------------------------------------------------------------

    def _check_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.config.input_grid)
        if volumes.ndim != 5 or volumes.shape[1] != 1 or tuple(volumes.shape[2:]) != expected:
            raise ValueError(
                f"volumes must be (batch, 1, {', '.join(map(str, expected))}), got {tuple(volumes.shape)}"
            )
        return volumes.to(self.device, self.dtype)

    def encode_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """The encoder's 3D token grid, ``(B, d * h * w, vision width)``, before compression."""
        volumes = self._check_volumes(volumes)
        trains_vision = any(p.requires_grad for p in self.vision.parameters())
        with contextlib.nullcontext() if trains_vision else torch.no_grad():
            return self.vision(volumes)

    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """Visual tokens in the decoder's input space, ``(B, num_visual_tokens, text width)``."""
        return self.projector(self.compressor(self.encode_tokens(volumes)))

    # ---- training primitives --------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by part: what ``set_trainable`` switches on and off."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, parameter in self.named_parameters():
            if name.startswith(("vision.embeddings.patch.", "vision.embeddings.stem.")):
                group = "tubelet_embedding"
            elif name == "vision.embeddings.depth_position":
                group = "depth_position"
            elif name == "vision.embeddings.plane_position":
                group = "plane_position"
            elif name.startswith("vision."):
                group = "encoder_blocks"
            elif name.startswith(("compressor.", "projector.")):
                group = name.split(".", 1)[0]
            elif name == "soft_prompts":
                group = "soft_prompts"
            elif ".lora_" in name:
                group = "lora"
            else:
                group = "language_model"
            groups.setdefault(group, []).append((name, parameter))
        return groups

    def trainable_groups(self, stage: str) -> set[str]:
        """Stage 1 ``contrastive``: tubelet embedding, depth positions, compressor, projector (and the
        whole encoder when it has no pretrained 2D weights); stage 2a ``projector``: projector and
        soft prompts; stage 2b ``lora``: those and the LoRA adapter (and the whole decoder when it has
        no pretrained weights, as in ``tiny`` and ``demo``)."""
        if stage == "contrastive":
            groups = {"tubelet_embedding", "depth_position", "compressor", "projector"}
            if not self.config.pretrained_vision:
                groups |= {"plane_position", "encoder_blocks"}
            return groups
        if stage == "projector":
            return {"projector", "soft_prompts"}
        if stage == "lora":
            if self.config.lora_merged:
                raise ValueError("a merged export has no adapter to train; load the unmerged checkpoint")
            groups = {"projector", "soft_prompts", "lora"}
            if not self.config.pretrained_language_model:
                groups.add("language_model")
            return groups
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    def set_trainable(self, stage: str) -> dict[str, int]:
        """Freeze everything but the parts ``stage`` trains; returns parameter counts.

        The returned dict has one entry per part (its trainable parameter count, 0 when frozen) and
        ``trainable`` / ``total``. Training mode (dropout) is left to the caller's ``train()``/``eval()``.
        """
        wanted = self.trainable_groups(stage)
        counts: dict[str, int] = {}
        for group, members in self.parameter_groups().items():
            counts[group] = 0
            for _, parameter in members:
                parameter.requires_grad_(group in wanted)
                counts[group] += parameter.numel() if group in wanted else 0
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        counts["total"] = sum(p.numel() for p in self.parameters())
        logger.info(
            "stage %s: %s of %s parameters trainable %s", stage, counts["trainable"], counts["total"], counts
        )
        return counts

    def report_embeddings(self, report_texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of the frozen decoder over each report's tokens, ``(B, width)``."""
        sequences = [
            [self.tokenizer.bos_token_id, *self.tokenizer(text, add_special_tokens=False).input_ids]
            for text in report_texts
        ]
        ids, mask = _pad_right(sequences, self.tokenizer.pad_token_id, self.device)
        with torch.no_grad(), self._frozen_language_model():
            hidden = self.causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.clone()
        mask[:, 0] = 0  # the BOS state carries no report content (and Gemma's BOS state is huge)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def contrastive_loss(
        self,
        volumes: torch.Tensor,
        report_texts: list[str],
        embed_reports: Callable[[list[str]], torch.Tensor] | None = None,
        same_findings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE between mean-pooled visual tokens and report embeddings: from
        ``embed_reports`` (a 2D checkpoint's text tower) where given, else the frozen decoder's
        (:meth:`report_embeddings`, the paper's choice).

        The other studies of the batch are the negatives, so a batch of one has no signal (the
        published code's default batch size of 1 made its stage 1 a no-op): that raises ValueError.
        ``same_findings`` (``(B, B)`` bool) marks pairs whose findings are equal, such as two
        controls or a control and its mirror image: they are left out of each other's negatives,
        since no image could tell their reports apart.
        """
        if volumes.shape[0] < 2 or len(report_texts) != volumes.shape[0]:
            raise ValueError(
                f"contrastive loss needs a batch of at least 2 matched volumes and reports, got "
                f"{volumes.shape[0]} volumes and {len(report_texts)} reports"
            )
        visual = F.normalize(self.encode(volumes).mean(dim=1).float(), dim=-1)
        embed = self.report_embeddings if embed_reports is None else embed_reports
        with torch.no_grad():
            text = F.normalize(embed(report_texts).float(), dim=-1)
        logits = visual @ text.T / self.config.contrastive_temperature
        targets = torch.arange(len(report_texts), device=logits.device)
        if same_findings is not None:
            not_negative = same_findings.to(logits.device) & ~torch.eye(
                len(report_texts), dtype=torch.bool, device=logits.device
            )
            logits = logits.masked_fill(not_negative, float("-inf"))
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def language_modeling_loss(self, volumes: torch.Tensor, report_texts: list[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over the report tokens (and their terminator) only."""
        if len(report_texts) != volumes.shape[0]:
            raise ValueError(f"{volumes.shape[0]} volumes but {len(report_texts)} reports")
        embed_tokens = self.causal_lm.get_input_embeddings()
        prefix = self.layout.prefix_embeddings(embed_tokens, self.soft_prompts, self.encode(volumes))
        report_ids, report_mask = self.layout.report_targets(report_texts, self.device)
        inputs = torch.cat([prefix, embed_tokens(report_ids).to(prefix.dtype)], dim=1)
        attention = torch.cat(
            [torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device), report_mask], 1
        )
        # The logit at position i predicts token i + 1: the last prefix position predicts report token 0.
        logits = self.causal_lm(
            inputs_embeds=inputs, attention_mask=attention, logits_to_keep=report_ids.shape[1] + 1
        ).logits[:, :-1]
        labels = report_ids.masked_fill(report_mask == 0, -100)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)

    # ---- generation -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        volumes: torch.Tensor,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        *,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        static_cache: bool = False,
        decode_step: Callable[..., torch.Tensor] | None = None,
    ) -> GenerationOutput:
        """Greedy (deterministic) reports for a batch of volumes, with the KV cache.

        Repetition settings default to the configuration's. ``min_new_tokens`` suppresses the stop
        tokens until that many tokens exist (benchmarks set it to ``max_new_tokens``).
        ``static_cache`` preallocates the cache (for ``torch.compile``); ``decode_step`` replaces
        :meth:`decode_step`, e.g. by a compiled copy of it.
        """
        start = time.perf_counter()
        visual = self.encode(volumes)
        _synchronize(self.device)
        encode_s = time.perf_counter() - start
        output = self.generate_from_visual(
            visual,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            static_cache=static_cache,
            decode_step=decode_step,
        )
        output.timings["encode_s"] = encode_s
        return output

    def decode_step(self, token_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decoding step: next-token logits ``(B, vocab)`` for ``token_ids`` ``(B, 1)``."""
        return self.causal_lm(
            input_ids=token_ids, position_ids=position_ids, cache=cache, use_cache=True
        ).logits[:, -1]

    @torch.inference_mode()
    def generate_from_visual(
        self,
        visual: torch.Tensor,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        *,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        static_cache: bool = False,
        decode_step: Callable[..., torch.Tensor] | None = None,
    ) -> GenerationOutput:
        """:meth:`generate` from visual tokens already in the decoder's space, ``(B, G, width)``.

        Exposed so that a benchmark can put another encoder's tokens through the same decoder.
        """
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        penalty = self.config.repetition_penalty if repetition_penalty is None else repetition_penalty
        ngram = self.config.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
        processors = LogitsProcessorList()
        if penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        if ngram > 0:
            processors.append(NoRepeatNGramLogitsProcessor(ngram))
        decode_step = decode_step or self.decode_step
        stop_ids = torch.tensor(self.layout.stop_ids, device=self.device)
        batch = visual.shape[0]

        start = time.perf_counter()
        prefix = self.layout.prefix_embeddings(
            self.causal_lm.get_input_embeddings(), self.soft_prompts, visual
        )
        prefix_length = prefix.shape[1]
        text_config = self.causal_lm.config
        if static_cache:
            cache: Any = StaticCache(config=text_config, max_cache_len=prefix_length + max_new_tokens)
        else:
            cache = DynamicCache(config=text_config)
        positions = torch.arange(prefix_length, device=self.device).unsqueeze(0)
        logits = self.causal_lm(
            inputs_embeds=prefix, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        if cache.get_seq_length() != prefix_length:  # a decoder that ignored `cache=` would decode blind
            raise RuntimeError("the decoder did not fill its KV cache: an unsupported transformers version")
        _synchronize(self.device)
        prefill_done = time.perf_counter()

        generated = torch.empty((batch, 0), dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            scores = processors(generated, logits.float()) if step > 0 else logits.float()
            if step < min_new_tokens:
                scores[:, stop_ids] = -torch.inf
            next_ids = scores.argmax(dim=-1)
            next_ids = torch.where(finished, self.tokenizer.pad_token_id, next_ids)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            finished |= torch.isin(next_ids, stop_ids)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            position = torch.full((batch, 1), prefix_length + step, device=self.device)
            logits = decode_step(next_ids[:, None], position, cache)
        _synchronize(self.device)
        decode_done = time.perf_counter()

        token_ids: list[list[int]] = []
        for row in generated.tolist():
            stops = [i for i, token in enumerate(row) if token in self.layout.stop_ids]
            token_ids.append(row[: stops[0]] if stops else row)
        reports = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
        timings = {
            "prefill_s": prefill_done - start,
            "decode_s": decode_done - prefill_done,
            "new_tokens": float(generated.shape[1]),
        }
        return GenerationOutput(reports=reports, token_ids=token_ids, timings=timings)

    # ---- saving and loading ---------------------------------------------------------------------

    def _trained_here_state(self) -> dict[str, torch.Tensor]:
        """Weights that do not come from the 2D checkpoints: saved beside a ``base_weights`` reference."""
        keep = {
            "tubelet_embedding",
            "depth_position",
            "plane_position",
            "compressor",
            "projector",
            "soft_prompts",
        }
        if not self.config.pretrained_vision:
            keep.add("encoder_blocks")
        return {
            name: parameter.detach().contiguous()
            for group, members in self.parameter_groups().items()
            if group in keep
            for name, parameter in members
        }

    def _merged_state(self) -> dict[str, torch.Tensor]:
        """Every weight, the adapter folded into the decoder, under a plain decoder's names.

        The adapted layers' base weights are copied first and put back afterwards, so this model
        is left exactly as it was (unmerging by subtraction would not restore the bits).
        """
        adapter_model = self.language_model
        assert isinstance(adapter_model, PeftModel)
        originals = {
            n: p.detach().clone() for n, p in self.causal_lm.named_parameters() if ".base_layer." in n
        }
        adapter_model.merge_adapter(safe_merge=True)
        try:
            decoder_state = {
                "language_model." + name.replace(".base_layer.", "."): tensor.detach().clone()
                for name, tensor in self.causal_lm.state_dict().items()
                if ".lora_" not in name
            }
        finally:
            adapter_model.unmerge_adapter()
            with torch.no_grad():
                for name, parameter in self.causal_lm.named_parameters():
                    if name in originals:
                        parameter.copy_(originals[name])
        if self.config.text_config.tie_word_embeddings:
            decoder_state.pop("language_model.lm_head.weight", None)
        state = {
            n: t.detach().contiguous()
            for n, t in self.state_dict().items()
            if not n.startswith("language_model.")
        }
        return state | decoder_state

    def save_pretrained(self, directory: str | Path, merge: bool = False) -> Path:
        """Write ``config.json``, the tokenizer and the weights to ``directory``.

        Without ``base_weights`` (``tiny``, ``demo``) ``model.safetensors`` holds every weight. With
        them it holds only what was trained here and the LoRA adapter goes to ``adapter/`` (peft's
        format); the 2D weights stay where ``config.base_weights`` points (path and SHA-256).
        ``merge=True`` folds the adapter into the decoder and writes one self-contained export.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = Brain3DConfig(**self.config.to_dict())
        if merge and isinstance(self.language_model, PeftModel):
            config.lora_merged = True
            config.base_weights = None
            save_file(self._merged_state(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        elif config.base_weights:
            save_file(self._trained_here_state(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
            if isinstance(self.language_model, PeftModel):
                self.language_model.save_pretrained(directory / ADAPTER_DIR)
        else:
            save_file(_state_without_ties(self), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Brain3D:
        """Load what :meth:`save_pretrained` wrote (base weights re-read and hash-checked when
        referenced), every weight in one ``dtype``: base weights published in bfloat16 beside
        projector and soft prompts trained in float32 would meet in one matrix product."""
        directory = Path(directory)
        config = Brain3DConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        state = load_file(directory / WEIGHTS_NAME)
        if config.base_weights:
            model = cls.from_2d(
                vision=config.base_weights["vision"]["path"],
                language_model=config.base_weights["language_model"]["path"],
                config=config,
                tokenizer=tokenizer,
                expected_sha256={part: ref["sha256"] for part, ref in config.base_weights.items()},
                dtype=dtype,
            )
            unexpected = set(state) - set(dict(model.named_parameters()))
            if unexpected:
                raise ValueError(f"unexpected weights in {directory}: {sorted(unexpected)[:5]}")
            missing = set(model._trained_here_state()) - set(state)
            if missing:  # a truncated file would leave these at their random initialisation
                raise ValueError(f"weights missing from {directory / WEIGHTS_NAME}: {sorted(missing)[:5]}")
            model.load_state_dict(state, strict=False)
            adapter = directory / ADAPTER_DIR / "adapter_model.safetensors"
            if adapter.exists() and isinstance(model.language_model, PeftModel):
                set_peft_model_state_dict(model.language_model, load_file(adapter))
        else:
            with init_empty_weights(include_buffers=False):
                model = cls(config, tokenizer)
            _assign_state(model, state, model.causal_lm)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_2d(
        cls,
        vision: str | Path,
        language_model: str | Path,
        config: Brain3DConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        expected_sha256: dict[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Brain3D:
        """Build from local Hugging Face checkpoints: a SigLIP (vision-only, full SigLIP such as
        MedSigLIP, or a multimodal Gemma 3) and a Gemma 3 (text-only ``Gemma3ForCausalLM`` or a
        multimodal ``Gemma3ForConditionalGeneration`` such as MedGemma, of which only the language
        model's tensors are read). Nothing is downloaded. ``config`` supplies everything but the two
        sub-configurations, which are read from the checkpoints; default: the ``medgemma-4b`` preset.
        Every weight, read or new, is in ``dtype``.
        """
        vision, language_model = Path(vision), Path(language_model)
        vision_root = AutoConfig.from_pretrained(vision)
        vision_config = getattr(vision_root, "vision_config", vision_root).to_dict()
        vision_config.update(model_type="siglip_vision_model", vision_use_head=False)
        text_root = AutoConfig.from_pretrained(language_model)
        text_config = getattr(text_root, "text_config", text_root).to_dict()
        text_config["model_type"] = "gemma3_text"

        hashes = {"vision": weights_sha256(vision), "language_model": weights_sha256(language_model)}
        for part, expected in (expected_sha256 or {}).items():
            if hashes[part] != expected:
                raise ValueError(f"{part} weights changed since the checkpoint was saved (SHA-256 mismatch)")
        fields = (config or Brain3DConfig.from_preset("medgemma-4b")).to_dict()
        fields.update(
            vision_config=vision_config,
            text_config=text_config,
            pretrained_vision=True,
            pretrained_language_model=True,
            lora_merged=False,
            base_weights={
                "vision": {"path": str(vision.resolve()), "sha256": hashes["vision"]},
                "language_model": {"path": str(language_model.resolve()), "sha256": hashes["language_model"]},
            },
        )
        config = Brain3DConfig(**fields)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(language_model)

        with init_empty_weights(include_buffers=False):
            siglip = SiglipVisionModel(config.vision_config)
            decoder = Gemma3ForCausalLM(config.text_config)
        vision_state = read_safetensors(vision, _siglip_vision_key)
        siglip.load_state_dict(_cast(vision_state, dtype), strict=True, assign=True)
        decoder_state = read_safetensors(language_model, _language_model_key_function(text_root.model_type))
        _assign_state(decoder, _cast(decoder_state, dtype), decoder)
        return cls(config, tokenizer, siglip=siglip, language_model=decoder).to(dtype)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _tied_names(module: nn.Module) -> dict[str, str]:
    """Parameters that share storage with an earlier one: ``{duplicate name: first name}``."""
    seen: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            ties[name] = seen[id(parameter)]
        else:
            seen[id(parameter)] = name
    return ties


def _state_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates (Gemma's output head = its embedding) written once."""
    ties = _tied_names(model)
    return {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in ties}


def _assign_state(model: nn.Module, state: dict[str, torch.Tensor], decoder: Gemma3ForCausalLM) -> None:
    """Assign ``state`` to a meta-initialised model, then tie ``decoder``'s output head to its embedding.

    Building on the meta device breaks parameter sharing, so the tie (which the checkpoint stores
    once) is restored here from the configuration rather than from the module structure.
    """
    tied = decoder.config.tie_word_embeddings
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in result.missing_keys if not (tied and name.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not match: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
