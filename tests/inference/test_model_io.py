"""Building from 2D checkpoints (``from_2d``) and saving / loading (round trips to identical reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from model_fixtures import perturb_trainable, random_volumes, tiny_config, tiny_model, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

import inference.modeling_brain3d as modeling
from inference.modeling_brain3d import Brain3D

# ---- round trips ----------------------------------------------------------------------------------


def _trained_tiny() -> Brain3D:
    model = tiny_model(seed=2)
    perturb_trainable(model)  # LoRA B starts at zero: an untrained adapter would hide a lost adapter
    return model


def test_save_and_load_round_trip_gives_identical_generations(tmp_path: Path) -> None:
    model = _trained_tiny()
    volumes = random_volumes(model.config, batch=3).clamp(0, 1)
    expected = model.generate(volumes, max_new_tokens=12)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = Brain3D.from_pretrained(tmp_path)
    assert loaded.generate(volumes, max_new_tokens=12).token_ids == expected.token_ids
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_slice_baseline_round_trip_keeps_its_encoder(tmp_path: Path) -> None:
    model = tiny_model(vision_encoder="2d-slices")
    perturb_trainable(model)
    volumes = random_volumes(model.config, batch=2).clamp(0, 1)
    model.save_pretrained(tmp_path)
    loaded = Brain3D.from_pretrained(tmp_path)
    assert isinstance(loaded.vision, modeling.SliceEncoder)
    assert loaded.config.vision_encoder == "2d-slices"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(volumes), model.encode(volumes), atol=0, rtol=0)


def test_merged_export_generates_the_same_reports_and_leaves_the_model_untouched(tmp_path: Path) -> None:
    model = _trained_tiny()
    volumes = random_volumes(model.config, batch=2).clamp(0, 1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = model.generate(volumes, max_new_tokens=12)
    model.save_pretrained(tmp_path, merge=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed by the merged export"
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(".lora_" in name or "base_layer" in name for name in saved)
    merged = Brain3D.from_pretrained(tmp_path)
    assert merged.config.lora_merged
    assert merged.generate(volumes, max_new_tokens=12).token_ids == expected.token_ids
    with pytest.raises(ValueError, match="merged"):
        merged.set_trainable("lora")


def test_static_cache_generates_the_same_reports_as_the_dynamic_cache() -> None:
    model = _trained_tiny()
    volumes = random_volumes(model.config, batch=2).clamp(0, 1)
    dynamic = model.generate(volumes, max_new_tokens=10, min_new_tokens=10)
    static = model.generate(volumes, max_new_tokens=10, min_new_tokens=10, static_cache=True)
    assert static.token_ids == dynamic.token_ids
    assert dynamic.timings["new_tokens"] == 10
    assert set(dynamic.timings) == {"encode_s", "prefill_s", "decode_s", "new_tokens"}


def test_batched_generation_equals_one_study_at_a_time() -> None:
    model = _trained_tiny()
    volumes = random_volumes(model.config, batch=3).clamp(0, 1)
    batched = model.generate(volumes, max_new_tokens=12).token_ids
    single = [model.generate(volumes[i : i + 1], max_new_tokens=12).token_ids[0] for i in range(3)]
    assert batched == single


# ---- 2D checkpoints -------------------------------------------------------------------------------


def _vision_kwargs() -> dict:
    config = tiny_config()
    return config.vision_config.to_dict() | {"model_type": "siglip_vision_model"}


def _text_kwargs() -> dict:
    return tiny_config().text_config.to_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random 2D checkpoints in every layout ``from_2d`` accepts, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    paths: dict[str, Path] = {}
    SiglipVisionModel(tiny_config().vision_config).save_pretrained(
        paths.setdefault("siglip", root / "siglip")
    )
    full = SiglipModel(
        SiglipConfig(
            vision_config=_vision_kwargs(),
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        )
    )
    full.save_pretrained(paths.setdefault("medsiglip-like", root / "medsiglip-like"))

    multimodal_config = Gemma3Config(
        text_config=_text_kwargs(),
        vision_config=_vision_kwargs(),
        mm_tokens_per_image=4,
        boi_token_index=390,
        eoi_token_index=391,
        image_token_index=392,
    )
    multimodal = Gemma3ForConditionalGeneration(multimodal_config)
    # Small shards, so that the index-driven path (read only the shards that hold wanted keys) runs.
    multimodal.save_pretrained(paths.setdefault("multimodal", root / "multimodal"), max_shard_size="40KB")
    Gemma3ForCausalLM(tiny_config().text_config).save_pretrained(
        paths.setdefault("text-only", root / "text-only")
    )

    # The released MedGemma files (transformers 4.5x): language_model.model.*, vision_tower.vision_model.*
    released = paths.setdefault("multimodal-released-layout", root / "multimodal-released-layout")
    released.mkdir()
    state = {}
    for name, tensor in multimodal.state_dict().items():
        name = name.replace("model.language_model.", "language_model.model.")
        name = name.replace("model.vision_tower.", "vision_tower.vision_model.")
        state[name.replace("model.multi_modal_projector.", "multi_modal_projector.")] = tensor.contiguous()
    state.pop("lm_head.weight", None)
    save_file(state, released / "model.safetensors")
    (released / "config.json").write_text((paths["multimodal"] / "config.json").read_text())

    # The multimodal checkpoint with its vision tensors removed.
    stripped = paths.setdefault("multimodal-without-vision", root / "multimodal-without-vision")
    stripped.mkdir()
    text_state = {
        k: v for k, v in state.items() if not k.startswith(("vision_tower.", "multi_modal_projector."))
    }
    save_file(text_state, stripped / "model.safetensors")
    (stripped / "config.json").write_text((paths["multimodal"] / "config.json").read_text())

    for name in ("multimodal", "text-only", "multimodal-released-layout", "multimodal-without-vision"):
        tiny_tokenizer().save_pretrained(paths[name])
    paths["reference-multimodal"] = root / "multimodal"
    return paths


class _RecordingSafeOpen:
    """``safe_open`` that records every tensor read, to prove the vision tower is never read."""

    read: ClassVar[list[str]] = []

    def __init__(self, path: object, framework: str) -> None:
        self._handle = safe_open(path, framework=framework)

    def __enter__(self) -> _RecordingSafeOpen:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, key: str) -> torch.Tensor:
        _RecordingSafeOpen.read.append(key)
        return self._handle.get_tensor(key)


@pytest.mark.parametrize(
    "language_model",
    ["multimodal", "multimodal-released-layout", "multimodal-without-vision", "text-only"],
)
def test_from_2d_materialises_only_the_language_model(
    language_model: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _RecordingSafeOpen.read = []
    monkeypatch.setattr(modeling, "safe_open", _RecordingSafeOpen)
    model = Brain3D.from_2d(
        vision=checkpoints["siglip"], language_model=checkpoints[language_model], config=tiny_config()
    )
    language_reads = [
        k for k in _RecordingSafeOpen.read if "vision_tower" in k or "multi_modal_projector" in k
    ]
    assert language_reads == [], "the multimodal checkpoint's vision tower was read"
    assert not any("vision_tower" in name for name, _ in model.named_parameters())
    assert all(not p.is_meta for p in model.parameters())

    # The decoder is the checkpoint's: same hidden states as the checkpoint's own language model.
    reference_dir = checkpoints["text-only" if language_model == "text-only" else "reference-multimodal"]
    if language_model == "text-only":
        reference = Gemma3ForCausalLM.from_pretrained(reference_dir).model
    else:
        reference = Gemma3ForConditionalGeneration.from_pretrained(reference_dir).model.language_model
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        actual = model.causal_lm.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(actual, expected)
    assert model.causal_lm.lm_head.weight is model.causal_lm.model.embed_tokens.weight
    assert model.config.pretrained_vision and model.config.pretrained_language_model


@pytest.mark.parametrize("vision", ["siglip", "medsiglip-like", "multimodal"])
def test_from_2d_inflates_the_checkpoints_vision_weights(vision: str, checkpoints: dict[str, Path]) -> None:
    model = Brain3D.from_2d(
        vision=checkpoints[vision], language_model=checkpoints["text-only"], config=tiny_config()
    )
    reference = SiglipVisionModel.from_pretrained(checkpoints["siglip" if vision == "siglip" else vision])
    if vision != "siglip":  # a full SigLIP or a Gemma 3: take the vision weights the reference loaded
        source = SiglipVisionModel(model.config.vision_config)
        source.load_state_dict(modeling.read_safetensors(checkpoints[vision], modeling._siglip_vision_key))
        reference = source
    kernel = reference.embeddings.patch_embedding.weight.sum(1, keepdim=True) / model.config.tubelet_depth
    torch.testing.assert_close(model.vision.embeddings.patch.weight[:, :, 0], kernel)
    for (name, ours), (_, theirs) in zip(
        model.vision.encoder.named_parameters(), reference.encoder.named_parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_checkpoint_built_from_2d_saves_only_what_was_trained_here(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model = Brain3D.from_2d(
        vision=checkpoints["medsiglip-like"], language_model=checkpoints["multimodal"], config=tiny_config()
    ).eval()
    model.set_trainable("lora")
    perturb_trainable(model)
    volumes = random_volumes(model.config).clamp(0, 1)
    expected = model.generate(volumes, max_new_tokens=10)
    model.save_pretrained(tmp_path / "brain3d")

    saved = load_file(tmp_path / "brain3d" / "model.safetensors")
    assert all(
        name.startswith(("vision.embeddings.", "compressor.", "projector.", "soft_prompts")) for name in saved
    )
    assert (tmp_path / "brain3d" / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "brain3d" / "config.json").read_text())
    assert config["base_weights"]["language_model"]["path"] == str(checkpoints["multimodal"].resolve())
    assert len(config["base_weights"]["vision"]["sha256"]) == 64

    loaded = Brain3D.from_pretrained(tmp_path / "brain3d")
    assert loaded.generate(volumes, max_new_tokens=10).token_ids == expected.token_ids


def test_a_lesion_stem_trains_in_stage_1_beside_pretrained_blocks_and_is_saved_with_the_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The stem is new to a pretrained encoder: stage 1 trains it with the tubelet embedding while
    the pretrained blocks stay frozen, and the checkpoint keeps it beside them."""
    model = Brain3D.from_2d(
        vision=checkpoints["medsiglip-like"],
        language_model=checkpoints["multimodal"],
        config=tiny_config(stem_channels=4),
    ).eval()
    model.set_trainable("contrastive")
    stem = dict(model.vision.embeddings.stem.named_parameters())
    assert stem and all(p.requires_grad for p in stem.values())
    assert not any(p.requires_grad for p in model.vision.encoder.parameters())
    perturb_trainable(model)  # the stem's projection starts at zero: a lost stem would go unseen
    volumes = random_volumes(model.config).clamp(0, 1)
    model.save_pretrained(tmp_path / "brain3d")
    assert {f"vision.embeddings.stem.{name}" for name in stem} <= set(
        load_file(tmp_path / "brain3d" / "model.safetensors")
    )
    loaded = Brain3D.from_pretrained(tmp_path / "brain3d")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(volumes), model.encode(volumes), atol=0, rtol=0)


def test_changed_base_weights_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    language_model = tmp_path / "lm"
    shutil.copytree(checkpoints["text-only"], language_model)
    model = Brain3D.from_2d(vision=checkpoints["siglip"], language_model=language_model, config=tiny_config())
    model.save_pretrained(tmp_path / "brain3d")
    state = load_file(language_model / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, language_model / "model.safetensors")
    with pytest.raises(ValueError, match="SHA-256"):
        Brain3D.from_pretrained(tmp_path / "brain3d")


def test_a_checkpoint_missing_weights_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A truncated checkpoint beside base weights must not load with random projector weights."""
    model = Brain3D.from_2d(
        vision=checkpoints["siglip"], language_model=checkpoints["text-only"], config=tiny_config()
    )
    model.save_pretrained(tmp_path / "brain3d")
    weights = tmp_path / "brain3d" / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(name for name in state if name.startswith("projector."))
    assert dropped
    save_file({name: tensor for name, tensor in state.items() if name not in dropped}, weights)
    with pytest.raises(ValueError, match=r"weights missing from .*projector"):
        Brain3D.from_pretrained(tmp_path / "brain3d")


def test_base_weights_published_in_bfloat16_load_into_one_dtype_and_generate(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """MedGemma ships in bfloat16; the projector and soft prompts are made in float32. A checkpoint
    built on such weights must read reports in either dtype, not meet both in one product."""
    import shutil

    bf16 = {}
    for part in ("medsiglip-like", "multimodal"):
        bf16[part] = shutil.copytree(checkpoints[part], tmp_path / part)
        for shard in bf16[part].glob("*.safetensors"):
            state = load_file(shard)
            save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, shard, metadata={"format": "pt"})
    built = Brain3D.from_2d(
        vision=bf16["medsiglip-like"], language_model=bf16["multimodal"], config=tiny_config()
    )
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    built.save_pretrained(tmp_path / "brain3d")
    volumes = random_volumes(built.config).clamp(0, 1)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = Brain3D.from_pretrained(tmp_path / "brain3d", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert len(loaded.generate(volumes, max_new_tokens=4).reports) == 2


def test_a_training_run_starts_from_local_pretrained_folders(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from inference import training

    language_model = shutil.copytree(checkpoints["text-only"], tmp_path / "lm")
    tiny_tokenizer().save_pretrained(language_model)  # a released model ships its tokenizer
    data = training.synthetic_data(24, seed=5, grid=tiny_config().input_grid)
    quick = training.StageSettings(max_steps=2, micro_batch=2, validate_every=1)
    model = training.train_pipeline(
        "tiny", ["projector"], data, tmp_path / "run", pretrained=(checkpoints["siglip"], language_model),
        schedule={"projector": quick},
    )  # fmt: skip
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["base_weights"]["language_model"]["path"] == str(language_model.resolve())
    assert saved["base_weights"]["vision"]["path"] == str(checkpoints["siglip"].resolve())
    assert len(model.generate(data.volumes[:2], max_new_tokens=3).reports) == 2
