"""Vision towers with memory linear in patches: Qwen2.5-VL window blocks (host-packed windows, batched attention)
and full-attention blocks through ``attention.attention``; InternViT tiles through the same function.

Checks: parity with transformers at a large image in a mixed, bucket-padded batch; every attention implementation
available on CPU gives the same features; the host layout (window packing, static block count, bucket extension);
XLA's compiled temporary memory grows linearly with patches (and the dense reference's quadratically, so the
measure can tell).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medee_jax.models import from_pretrained
from medee_jax.models.qwen2_5_vl.config import VisionConfig
from medee_jax.models.qwen2_5_vl.host import QwenImageInputs
from medee_jax.models.qwen2_5_vl.model import VisionTower
from medee_jax.models.qwen2_5_vl.vision_layout import (num_window_blocks, pack_windows, vision_layout,
                                                       window_patches)
from tests.qwen_reference import random_hf_model, tiny_hf_config

# Patches of a 1344 x 1344 image (96 x 96 patches of 14 px), an image whose merged width (10) and height (6) are not
# multiples of the 4-cell window (edge windows of 2 and 3 columns), and a smaller one (4 x 6 merged).
GRID_LARGE, GRID_EDGES, GRID_SMALL = (1, 96, 96), (1, 12, 20), (1, 8, 12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Returns (transformers model, our fp32 model) for one tiny random checkpoint."""
    path = tmp_path_factory.mktemp("qwen_tiny_vision")
    hf_model = random_hf_model(tiny_hf_config(), seed=3)
    hf_model.save_pretrained(path)
    return hf_model, from_pretrained(str(path), dtype=jnp.float32)


def hf_features(hf_model, pixel_values, grids) -> np.ndarray:
    """Returns transformers' merged image features [P/4, D] (eager attention, fp32)."""
    import torch

    with torch.no_grad():
        out = hf_model.model.visual(torch.tensor(pixel_values), grid_thw=torch.tensor(grids))
    return out.pooler_output.float().numpy()


def our_features(model, pixel_values, grids, pad_to, implementation=None) -> np.ndarray:
    layout = vision_layout(grids, model.config.vision, pad_to=pad_to).arrays()
    return np.asarray(model.encode_images(jnp.asarray(pixel_values), **{k: jnp.asarray(v) for k, v in layout.items()},
                                          implementation=implementation))


def test_large_image_in_a_padded_mixed_batch_matches_transformers(checkpoint):
    hf_model, ours = checkpoint
    grids = np.array([GRID_EDGES, GRID_LARGE, GRID_SMALL])
    total = int(grids.prod(1).sum())
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((total, 1176)).astype(np.float32)
    padded = np.concatenate([pixel_values, np.ones((96, 1176), np.float32)])  # bucket padding, not zeros
    layout = vision_layout(grids, ours.config.vision, pad_to=padded.shape[0])
    # The edge windows share blocks: some block holds more than one window.
    assert (layout.window_block_segments[layout.window_block_segments < window_patches(ours.config.vision)] > 0).any()
    ref = hf_features(hf_model, pixel_values, grids)
    got = our_features(ours, padded, grids, padded.shape[0])  # "auto": blockwise full attention at 9.7k patches
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got[: total // 4], ref, atol=1e-4, rtol=0)


def test_every_cpu_implementation_gives_the_same_features(checkpoint):
    hf_model, ours = checkpoint
    grids = np.array([(1, 24, 32), GRID_EDGES, (1, 4, 4), (2, 8, 8)])
    total = int(grids.prod(1).sum())
    pixel_values = np.random.default_rng(1).standard_normal((total + 64, 1176)).astype(np.float32)
    ref = hf_features(hf_model, pixel_values[:total], grids)
    for impl in ("reference", "blockwise", "auto"):
        got = our_features(ours, pixel_values, grids, total + 64, impl)
        np.testing.assert_allclose(got[: total // 4], ref, atol=1e-4, rtol=0, err_msg=impl)


def test_window_layout_packs_every_patch_once_into_a_static_block_count():
    cfg = VisionConfig(depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=8,
                       fullatt_block_indexes=())
    width = window_patches(cfg)
    rng = np.random.default_rng(2)
    for _ in range(20):
        grids = np.array([(int(rng.integers(1, 3)), 2 * int(rng.integers(1, 20)), 2 * int(rng.integers(1, 20)))
                          for _ in range(int(rng.integers(1, 6)))])
        total = int(grids.prod(1).sum())
        pad_to = total + 4 * int(rng.integers(0, 40))
        lay = vision_layout(grids, cfg, pad_to=pad_to)
        gather, seg, scatter = lay.window_gather, lay.window_block_segments, lay.window_scatter
        assert gather.shape == (num_window_blocks(pad_to, cfg), width) and scatter.shape == (pad_to,)
        real = gather < pad_to
        # Every real patch sits in exactly one slot, and the scatter index is that slot.
        np.testing.assert_array_equal(np.sort(gather[real]), np.arange(total))
        np.testing.assert_array_equal(scatter[gather[real]], np.flatnonzero(real.ravel()))
        assert (scatter[total:] == gather.size).all() and (seg[~real] == width).all()
        # Two slots of a block share a segment exactly when their patches share a window.
        for b in range(gather.shape[0]):
            rows = gather[b][real[b]]
            same_window = lay.window_segments[rows][:, None] == lay.window_segments[rows][None, :]
            np.testing.assert_array_equal(seg[b][real[b]][:, None] == seg[b][real[b]][None, :], same_window)


def test_block_count_bound_is_tight_for_windows_just_over_half_a_block():
    """3 x 3-cell images: one 9-cell window each, no two share a 16-cell block; the bound gives exactly enough."""
    cfg = VisionConfig(depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=8,
                       fullatt_block_indexes=())
    grids = np.array([(1, 6, 6)] * 7)
    lay = vision_layout(grids, cfg)
    assert lay.window_gather.shape[0] == 7 == num_window_blocks(7 * 36, cfg)
    assert pack_windows([9] * 7, 16) == [(b, 0) for b in range(7)]
    # Decreasing sizes, first fit: 16 -> 0, 16 -> 1, 12 -> 2, 9 -> 3 (no room in 2), 4 -> 2 after the 12.
    assert pack_windows([16, 4, 9, 16, 12], 16) == [(0, 0), (2, 12), (3, 0), (1, 0), (2, 0)]


def test_extend_layout_equals_the_layout_of_the_longer_bucket():
    cfg = VisionConfig(depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=8,
                       fullatt_block_indexes=())
    images = QwenImageInputs(vision=cfg)
    grids = np.array([GRID_EDGES, GRID_SMALL, (1, 4, 4)])
    total = int(grids.prod(1).sum())
    extended = images.extend_layout(images.layout(grids, pad_to=total), total + 400)
    direct = images.layout(grids, pad_to=total + 400)
    assert extended.keys() == direct.keys()
    for key in direct:
        if key == "image_segments":  # padding patches: an id of their own, whatever its value
            assert (extended[key][:total] == direct[key][:total]).all() and len(set(extended[key][total:])) == 1
            assert extended[key][total] not in extended[key][:total]
        else:
            np.testing.assert_array_equal(extended[key], direct[key], err_msg=key)


def test_internvit_implementations_agree_on_448px_tiles():
    from medee_jax.models.internvl.config import tiny_config
    from medee_jax.models.internvl.model import InternVL

    model = InternVL(tiny_config(image_size=448), rngs=nnx.Rngs(0))
    tiles = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 448, 448)).astype(np.float32))
    ref = np.asarray(model.encode_images(tiles, implementation="reference"))  # 1025 tokens a tile: auto = blockwise
    for impl in ("blockwise", "auto"):
        np.testing.assert_allclose(np.asarray(model.encode_images(tiles, implementation=impl)), ref, atol=2e-5,
                                   rtol=0, err_msg=impl)


def _temp_bytes(side_patches: int, implementation: str, backward: bool) -> int:
    """Returns XLA's compiled temporary bytes of the tiny vision tower on one side x side-patch image."""
    cfg = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                       fullatt_block_indexes=(1, 3))
    graphdef, state = nnx.split(VisionTower(cfg, rngs=nnx.Rngs(0)))
    grid = np.array([(1, side_patches, side_patches)])
    layout = vision_layout(grid, cfg).arrays()
    pixels = jax.ShapeDtypeStruct((side_patches**2, cfg.patch_dim), jnp.float32)

    def features(state, pixels, layout):
        return nnx.merge(graphdef, state)(pixels, **layout, implementation=implementation)

    fn = jax.grad(lambda s, p, lay: jnp.sum(features(s, p, lay) ** 2)) if backward else features
    return jax.jit(fn).lower(state, pixels, layout).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_compiled_temporary_memory_grows_linearly_with_patches(backward):
    """A 2016² image has 4x the patches of a 1008² one: linear temp grows ~4x, dense attention 16x."""
    small, large = _temp_bytes(72, "auto", backward), _temp_bytes(144, "auto", backward)
    assert large / small <= 5.0, (small, large)
    dense_small, dense_large = _temp_bytes(72, "reference", backward), _temp_bytes(144, "reference", backward)
    assert dense_large / dense_small >= 10.0, (dense_small, dense_large)  # the measure sees quadratic growth
    assert large < dense_large / 4
