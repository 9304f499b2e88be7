"""The inflated encoder and the spatial compressor (issue 3, tests 4a, 4b and 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import tiny_config, tiny_tokenizer
from transformers import SiglipVisionModel

from inference.configuration_brain3d import Brain3DConfig
from inference.convention import LEFT_RIGHT_AXIS
from inference.modeling_brain3d import Brain3D, LesionStem, SliceEncoder, SpatialCompressor


def _model_with_2d_twin(config: Brain3DConfig) -> tuple[Brain3D, SiglipVisionModel]:
    torch.manual_seed(0)
    siglip = SiglipVisionModel(config.vision_config).eval()
    # Give the 2D position embeddings structure, so that interpolating them matters.
    with torch.no_grad():
        siglip.embeddings.position_embedding.weight.normal_(std=0.5)
    return Brain3D(config, tiny_tokenizer(), siglip=siglip).eval(), siglip


@pytest.mark.parametrize(
    "input_grid",
    [[8, 16, 16], [8, 24, 24], [8, 24, 32]],
    ids=["native-4x4-grid", "interpolated-6x6", "interpolated-6x8"],
)
def test_4a_volume_of_identical_slices_gives_the_2d_tokens_per_slab(input_grid: list[int]) -> None:
    config = tiny_config(input_grid=input_grid)
    model, siglip = _model_with_2d_twin(config)
    assert torch.count_nonzero(model.vision.embeddings.depth_position) == 0  # zero at initialisation
    image = torch.rand(input_grid[1], input_grid[2], generator=torch.Generator().manual_seed(3))
    volume = image.expand(input_grid[0], -1, -1)[None, None]
    with torch.no_grad():
        tokens_3d = model.encode_tokens(volume)
        rgb = ((image - config.pixel_mean) / config.pixel_std).expand(3, -1, -1)[None]  # SigLIP processor
        tokens_2d = siglip(rgb, interpolate_pos_encoding=True).last_hidden_state
    slabs = tokens_3d.reshape(1, config.token_grid[0], -1, tokens_3d.shape[-1])
    for slab in range(config.token_grid[0]):
        torch.testing.assert_close(slabs[:, slab], tokens_2d, atol=1e-5, rtol=0)


def test_tubelet_kernel_is_the_channel_sum_repeated_over_depth_and_divided_by_it() -> None:
    config = tiny_config()
    model, siglip = _model_with_2d_twin(config)
    kernel_3d = model.vision.embeddings.patch.weight  # (width, 1, t, p, p)
    assert kernel_3d.shape[2] == config.tubelet_depth
    expected = siglip.embeddings.patch_embedding.weight.sum(1, keepdim=True) / config.tubelet_depth
    for depth in range(config.tubelet_depth):
        torch.testing.assert_close(kernel_3d[:, :, depth], expected)
    assert model.vision.embeddings.patch.stride[0] == config.tubelet_depth


@pytest.mark.parametrize("input_grid", [[8, 16, 16], [8, 24, 32]], ids=["square", "wider-than-tall"])
def test_tubelet_tokens_are_the_strided_convolution_in_token_order(input_grid: list[int]) -> None:
    """The matrix product over tubelets equals the convolution it stands for, token for token: a
    random kernel (no symmetry across depth, rows or columns) on a random volume."""
    config = tiny_config(input_grid=input_grid)
    embeddings = _model_with_2d_twin(config)[0].vision.embeddings
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        embeddings.patch.weight.copy_(torch.randn(embeddings.patch.weight.shape, generator=generator))
        volume = torch.rand(2, 1, *input_grid, generator=generator)
        convolved = embeddings.patch(volume).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embeddings.tubelet_tokens(volume), convolved, atol=1e-4, rtol=1e-5)


def test_the_lesion_stem_leaves_the_inflated_encoder_unchanged_at_initialisation() -> None:
    config = tiny_config(stem_channels=4)
    model, _ = _model_with_2d_twin(config)
    volume = torch.rand(2, 1, *config.input_grid, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with_stem = model.encode_tokens(volume)
        model.vision.embeddings.stem = None
        without_stem = model.encode_tokens(volume)
    torch.testing.assert_close(with_stem, without_stem, atol=0, rtol=0)


@pytest.mark.parametrize("column", [1, 4], ids=["patient-left-column", "patient-right-column"])
def test_the_lesion_stem_marks_a_bright_voxel_in_its_own_tubelets_token_only(column: int) -> None:
    """Tubelets of 4x4x4 on an 8x24x24 grid (token grid 2x6x6); W runs from the patient's left."""
    config = tiny_config(stem_channels=4, tubelet_depth=4)
    stem = LesionStem(config)
    with torch.no_grad():
        stem.convolution.weight.fill_(1.0)
        stem.convolution.bias.zero_()
        stem.projection.weight.fill_(1.0)
    volume = torch.zeros(1, 1, *config.input_grid)
    bright = volume.clone()
    # Depth 1 of slab 0; row 1 and the given column of 4-voxel patches, two voxels in: no 3x3x3
    # window sampled by the stride-2 convolution reaches a neighbouring tubelet.
    bright[0, 0, 1, 4 * 1 + 2, 4 * column + 2] = 1.0
    with torch.no_grad():
        change = (stem(bright) - stem(volume)).abs().sum(-1)[0]  # one value per token
    token = (0 * 6 + 1) * 6 + column  # (d, h, w) row-major, as the tubelet embedding orders tokens
    assert change[token] > 0
    assert torch.count_nonzero(change) == 1


def test_a_lesion_stem_needs_a_positive_width_and_an_even_patch() -> None:
    with pytest.raises(ValueError, match="stem_channels"):
        tiny_config(stem_channels=-1)
    odd_patch = {**tiny_config().vision_config.to_dict(), "patch_size": 3, "image_size": 12}
    tiny_config(vision_config=odd_patch)  # an odd patch is fine without a stem
    with pytest.raises(ValueError, match="even patch size"):
        tiny_config(vision_config=odd_patch, stem_channels=4)


def test_4b_changing_one_slice_changes_the_tokens_of_other_slabs() -> None:
    config = tiny_config()
    model, _ = _model_with_2d_twin(config)
    volume = torch.rand(1, 1, *config.input_grid, generator=torch.Generator().manual_seed(4))
    changed = volume.clone()
    changed[:, :, 0] += 1.0  # first slice: inside slab 0 only
    with torch.no_grad():
        before = model.encode_tokens(volume).reshape(
            config.token_grid[0], -1, config.vision_config.hidden_size
        )
        after = model.encode_tokens(changed).reshape(
            config.token_grid[0], -1, config.vision_config.hidden_size
        )
    for slab in range(1, config.token_grid[0]):
        assert (after[slab] - before[slab]).abs().max() > 1e-3, f"slab {slab} did not see slice 0"


def _zero_positions(model: Brain3D) -> None:
    with torch.no_grad():
        model.vision.embeddings.plane_position.zero_()
        model.vision.embeddings.depth_position.zero_()
        model.compressor.position.zero_()


def _grid(model: Brain3D, tokens: torch.Tensor) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], *model.config.compressor_grid, tokens.shape[-1])


def _pooled_and_difference(config: Brain3DConfig, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written here from the definition: the pooled grid ``(B, d, h, w, C)`` and the left-half
    mean minus the right-half mean of its columns, broadcastable to it."""
    grid = tokens.reshape(tokens.shape[0], *config.token_grid, tokens.shape[-1])
    pooled = F.adaptive_avg_pool3d(grid.permute(0, 4, 1, 2, 3), config.compressor_grid).permute(0, 2, 3, 4, 1)
    half = config.compressor_grid[2] // 2
    difference = pooled[:, :, :, :half].mean((1, 2, 3)) - pooled[:, :, :, -half:].mean((1, 2, 3))
    return pooled, difference[:, None, None, None, :]


def test_5_mirrored_volume_compresses_to_mirrored_tokens() -> None:
    config = tiny_config(compressor_grid=[2, 3, 3])  # 6 -> 3 along width
    model, _ = _model_with_2d_twin(config)
    _zero_positions(model)
    # Constant within each tubelet, so that mirroring permutes whole tubelets and nothing else.
    coarse = torch.rand(1, 1, *config.token_grid, generator=torch.Generator().manual_seed(5))
    patch = config.vision_config.patch_size
    volume = (
        coarse.repeat_interleave(config.tubelet_depth, 2)
        .repeat_interleave(patch, 3)
        .repeat_interleave(patch, 4)
    )
    with torch.no_grad():
        encoded = model.encode_tokens(volume)
        tokens = _grid(model, model.compressor(encoded))
        mirrored = _grid(model, model.compressor(model.encode_tokens(volume.flip(LEFT_RIGHT_AXIS))))
    pooled, difference = _pooled_and_difference(model.config, encoded)
    difference = difference * model.compressor.difference_gain.detach()
    torch.testing.assert_close(tokens, pooled + difference, atol=1e-5, rtol=0)
    # Mirroring mirrors the pooled tokens and negates the hemispheric difference added to each.
    torch.testing.assert_close(mirrored, pooled.flip(3) - difference, atol=1e-5, rtol=0)
    assert (pooled - pooled.flip(3)).abs().max() > 1e-3  # the test volume is not itself symmetric
    assert difference.abs().max() > 1e-3


@pytest.mark.parametrize("output_grid", [[2, 2, 2], [3, 4, 5], [1, 5, 3]])
def test_5_compressor_commutes_with_left_right_mirroring_for_uneven_windows(output_grid: list[int]) -> None:
    config = tiny_config(input_grid=[12, 24, 28], compressor_grid=output_grid)  # token grid 6x6x7
    compressor = SpatialCompressor(config)  # its position embedding starts at zero
    width = config.vision_config.hidden_size
    tokens = torch.randn(2, *config.token_grid, width, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        compressed = compressor(tokens.flatten(1, 3)).reshape(2, *output_grid, width)
        compressed_mirror = compressor(tokens.flip(3).flatten(1, 3)).reshape(2, *output_grid, width)
    pooled, difference = _pooled_and_difference(config, tokens.flatten(1, 3))
    difference = difference * compressor.difference_gain.detach()
    torch.testing.assert_close(compressed, pooled + difference, atol=1e-5, rtol=0)
    torch.testing.assert_close(compressed_mirror, pooled.flip(3) - difference, atol=1e-5, rtol=0)


def test_a_compressor_without_two_columns_has_no_hemispheres() -> None:
    with pytest.raises(ValueError, match="at least 2 columns"):
        SpatialCompressor(tiny_config(compressor_grid=[2, 3, 1]))


def test_grid_summary_token_reads_the_whole_grid_side_included() -> None:
    config = tiny_config(input_grid=[12, 24, 28], compressor_grid=[3, 3, 4], grid_summary_rank=4)
    compressor = SpatialCompressor(config)
    assert config.num_visual_tokens == 3 * 3 * 4 + 1
    width = config.vision_config.hidden_size
    tokens = torch.randn(2, *config.token_grid, width, generator=torch.Generator().manual_seed(8))
    pooled, difference = _pooled_and_difference(config, tokens.flatten(1, 3))
    difference = difference.flatten(1, 3) * compressor.difference_gain.detach()
    changed = tokens.clone()
    changed[:, 0, 0, 0] += 1.0  # one corner of the grid: pooled into the first grid token only
    with torch.no_grad():
        compressed = compressor(tokens.flatten(1, 3))
        mirrored = compressor(tokens.flip(3).flatten(1, 3))
        after_change = compressor(changed.flatten(1, 3))
    assert compressed.shape == (2, config.num_visual_tokens, width)
    # The grid tokens are as without a summary; the summary token comes last.
    torch.testing.assert_close(compressed[:, :-1], pooled.flatten(1, 3) + difference, atol=1e-5, rtol=0)
    # The summary can tell a volume from its mirror image: the findings loss teaches it the side.
    assert (mirrored[:, -1] - compressed[:, -1]).abs().max() > 1e-3
    # A change in one corner moves the summary token, far from that corner's grid token.
    assert (after_change[:, -1] - compressed[:, -1]).abs().max() > 1e-3


def test_grid_summary_rank_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="grid_summary_rank"):
        tiny_config(grid_summary_rank=-1)


def _head_with_lesion(config: Brain3DConfig, side: str) -> torch.Tensor:
    """A left-right symmetric textured head in [0, 1] (as ``inference.prepare`` delivers it) with one
    bright ellipsoidal lesion in one hemisphere: about 3% of the grid, 7% of the head."""
    depth, height, width = config.input_grid
    z, y, x = torch.meshgrid(
        torch.linspace(-1, 1, depth),
        torch.linspace(-1, 1, height),
        torch.linspace(-1, 1, width),
        indexing="ij",
    )
    texture = torch.rand(depth, height, width, generator=torch.Generator().manual_seed(7))
    texture = (texture + texture.flip(-1)) / 2
    volume = ((z**2 + y**2 + x**2) < 0.9).float() * (0.3 + 0.3 * texture)
    centre = -0.5 if side == "left" else 0.5  # W runs from the patient's left (-1) to right (+1)
    volume[(z / 0.5) ** 2 + (y / 0.5) ** 2 + ((x - centre) / 0.3) ** 2 < 1] = 1.0
    return volume[None, None]


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_5_one_sided_lesion_and_its_mirror_differ_by_at_least_ten_percent(preset: str) -> None:
    config = Brain3DConfig.from_preset(preset, vocab_size=len(tiny_tokenizer()))
    model, _ = _model_with_2d_twin(config)
    _zero_positions(model)
    left, right = _head_with_lesion(config, "left"), _head_with_lesion(config, "right")
    half = config.input_grid[2] // 2
    assert (left[..., :half] == 1.0).sum() > 0 and (left[..., half:] == 1.0).sum() == 0
    torch.testing.assert_close(right, left.flip(LEFT_RIGHT_AXIS))
    with torch.no_grad():
        grid_left, grid_right = model.encode_tokens(left), model.encode_tokens(right)
        ours_left, ours_right = model.compressor(grid_left), model.compressor(grid_right)
        # The published code: the flattened sequence average-pooled along its length.
        published_left = F.adaptive_avg_pool1d(grid_left.transpose(1, 2), 4).transpose(1, 2)
        published_right = F.adaptive_avg_pool1d(grid_right.transpose(1, 2), 4).transpose(1, 2)
    relative = (ours_left - ours_right).norm() / ours_left.norm()
    assert relative >= 0.10, f"left and right lesions differ by only {relative:.1%}"
    published_relative = (published_left - published_right).norm() / published_left.norm()
    # Measured: tiny 13% vs 2.8%, demo 18% vs 4.0%. What the published pooling keeps is only the
    # within-patch asymmetry the random encoder happens to see, not where the lesion is.
    assert relative > 3 * published_relative


def test_slice_baseline_reads_each_slabs_middle_slice_as_the_2d_tower_alone() -> None:
    """The 2D baseline's tokens of slab k are the 2D tower's tokens of that slab's middle slice,
    and a change to any other slice leaves them as they were (no attention across slices)."""
    config = tiny_config(input_grid=[8, 24, 24], vision_encoder="2d-slices")
    model, siglip = _model_with_2d_twin(config)
    assert isinstance(model.vision, SliceEncoder)
    slabs, width = config.token_grid[0], config.vision_config.hidden_size
    volume = torch.rand((1, 1, *config.input_grid), generator=torch.Generator().manual_seed(5))
    middle = [k * config.tubelet_depth + config.tubelet_depth // 2 for k in range(slabs)]
    with torch.no_grad():
        tokens = model.encode_tokens(volume).reshape(1, slabs, -1, width)
        for slab, index in enumerate(middle):
            rgb = ((volume[0, 0, index] - config.pixel_mean) / config.pixel_std).expand(3, -1, -1)[None]
            expected = siglip(rgb, interpolate_pos_encoding=True).last_hidden_state
            torch.testing.assert_close(tokens[:, slab], expected)
        changed = volume.clone()
        changed[0, 0, middle[1]] += 0.5  # slab 1's slice
        changed[0, 0, middle[0] - 1] = 0.0  # a slice no slab reads
        after = model.encode_tokens(changed).reshape(1, slabs, -1, width)
    assert torch.equal(after[:, 0], tokens[:, 0])
    assert torch.equal(after[:, 2:], tokens[:, 2:])
    assert not torch.allclose(after[:, 1], tokens[:, 1])


def test_an_unknown_vision_encoder_is_refused() -> None:
    with pytest.raises(ValueError, match="vision_encoder 'slices'"):
        tiny_config(vision_encoder="slices")
