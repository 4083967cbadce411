"""Qwen2.5-VL logits and M-RoPE positions against transformers on tiny random checkpoints (fp32, eager)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from medee_jax.models import from_pretrained
from medee_jax.models.qwen2_5_vl.host import mrope_position_ids
from medee_jax.models.qwen2_5_vl.vision_layout import cu_window_seqlens, vision_layout
from tests.qwen_reference import (IMAGE_TOKEN, TEXT_VOCAB, assert_logits_close, hf_logits_and_positions, image_span,
                                  pad_rows, random_hf_model, tiny_hf_config)

# Grids in patches. Merged (h/2, w/2): (4, 6) width not a multiple of the 4-token window; (8, 8) both multiples;
# (6, 10) neither; (2, 2) smaller than one window.
GRID_A, GRID_B, GRID_C, GRID_D = (1, 8, 12), (1, 16, 16), (1, 12, 20), (1, 4, 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Returns (transformers model, our fp32 model) for one tiny random checkpoint."""
    path = tmp_path_factory.mktemp("qwen_tiny")
    hf_model = random_hf_model(tiny_hf_config(), seed=0)
    hf_model.save_pretrained(path)
    ours = from_pretrained(str(path), dtype=jnp.float32)
    return hf_model, ours


def text(rng, n):
    return list(rng.integers(2, TEXT_VOCAB, n))


def multimodal_batch(rng, side):
    """Row 0: two images of different sizes; row 1: text only; row 2: one image. Padded on ``side``."""
    grids = np.array([GRID_A, GRID_B, GRID_C])
    rows = [
        text(rng, 5) + image_span(GRID_A) + text(rng, 7) + image_span(GRID_B) + text(rng, 4),
        text(rng, 23),
        text(rng, 3) + image_span(GRID_C) + text(rng, 9),
    ]
    ids, mask = pad_rows(rows, side)
    pixel_values = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    return ids, mask, pixel_values, grids




@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_and_positions_match_transformers(checkpoint, side):
    hf_model, ours = checkpoint
    ids, mask, pixel_values, grids = multimodal_batch(np.random.default_rng(1), side)
    ref, ref_pos = hf_logits_and_positions(hf_model, ids, mask, pixel_values, grids)
    pos = mrope_position_ids(ids, grids, mask, image_token_id=IMAGE_TOKEN)
    np.testing.assert_array_equal(pos, ref_pos)
    assert_logits_close(ours(ids, mask, pixel_values, grids), ref, mask)


def test_long_row_with_image(checkpoint):
    """~500 tokens: RoPE mistakes (frequencies, sections, offsets after an image) hide in short prompts."""
    hf_model, ours = checkpoint
    rng = np.random.default_rng(2)
    grids = np.array([GRID_D, GRID_A])
    row = text(rng, 150) + image_span(GRID_D) + text(rng, 200) + image_span(GRID_A) + text(rng, 120)
    ids, mask = pad_rows([row], "right")
    assert ids.shape[1] >= 490
    pixel_values = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    ref, ref_pos = hf_logits_and_positions(hf_model, ids, mask, pixel_values, grids)
    np.testing.assert_array_equal(mrope_position_ids(ids, grids, mask, image_token_id=IMAGE_TOKEN), ref_pos)
    assert_logits_close(ours(ids, mask, pixel_values, grids), ref, mask)


def test_text_only_batch(checkpoint):
    """No images: plain 1-D RoPE, all three axes equal; transformers counts positions over all columns here."""
    hf_model, ours = checkpoint
    rng = np.random.default_rng(3)
    ids, mask = pad_rows([text(rng, 40), text(rng, 31)], "right")
    ref, _ = hf_logits_and_positions(hf_model, ids, mask)
    assert_logits_close(ours(ids, mask), ref, mask)


def test_padded_vision_bucket_does_not_change_logits(checkpoint):
    """Patches padded up to a bucket (shape-static batches) leave every real logit unchanged."""
    _, ours = checkpoint
    ids, mask, pixel_values, grids = multimodal_batch(np.random.default_rng(4), "right")
    padded = np.concatenate([pixel_values, np.ones((64, 1176), np.float32)])
    a = np.asarray(ours(ids, mask, pixel_values, grids))
    b = np.asarray(ours(ids, mask, padded, grids))
    valid = mask.astype(bool)
    np.testing.assert_allclose(b[valid], a[valid], atol=1e-5, rtol=0)


def test_image_features_depend_on_their_own_image_only(checkpoint):
    """Images never attend to each other: changing image B leaves image A's features unchanged."""
    _, ours = checkpoint
    grids = np.array([GRID_A, GRID_B])
    rng = np.random.default_rng(5)
    pv = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    pv2 = pv.copy()
    n_a = int(np.prod(GRID_A))
    pv2[n_a:] = rng.standard_normal(pv2[n_a:].shape)
    layout = {k: jnp.asarray(v) for k, v in vision_layout(grids, ours.config.vision).arrays().items()}
    f1 = np.asarray(ours.encode_images(jnp.asarray(pv), **layout))
    f2 = np.asarray(ours.encode_images(jnp.asarray(pv2), **layout))
    np.testing.assert_array_equal(f1[: n_a // 4], f2[: n_a // 4])
    assert np.abs(f1[n_a // 4:] - f2[n_a // 4:]).max() > 1e-2


def test_window_layout_matches_transformers():
    import torch
    from transformers.vision_utils import get_vision_window_index

    from medee_jax.models.qwen2_5_vl.config import tiny_config

    cfg = tiny_config().vision
    np.testing.assert_array_equal(cu_window_seqlens(vision_layout(np.array([GRID_C]), cfg)),
                                  [0, 64, 128, 160, 192, 224, 240])
    grids = np.array([GRID_A, GRID_B, GRID_C, GRID_D, (2, 8, 8)])
    layout = vision_layout(grids, cfg)
    index, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(layout.window_index, index.numpy())
    np.testing.assert_array_equal(cu_window_seqlens(layout), cu.numpy())


def test_image_token_count_mismatch_is_a_clear_error(checkpoint):
    _, ours = checkpoint
    ids, mask, pixel_values, grids = multimodal_batch(np.random.default_rng(6), "right")
    with pytest.raises(ValueError, match="image"):
        ours(ids, mask, pixel_values, grids[:2])


def test_bf16_model_close_to_fp32(checkpoint, tmp_path):
    """bf16 compute and storage vs the fp32 reference: KL of next-token distributions stays small."""
    hf_model, ours = checkpoint
    hf_model.save_pretrained(tmp_path)
    bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    ids, mask, pixel_values, grids = multimodal_batch(np.random.default_rng(7), "right")
    ref = np.asarray(ours(ids, mask, pixel_values, grids), np.float64)
    got = np.asarray(bf16(ids, mask, pixel_values, grids), np.float64)
    logp_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    logp = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(logp_ref) * (logp_ref - logp)).sum(-1)[mask.astype(bool)]
    print(f"bf16 vs fp32: mean KL {kl.mean():.2e}, max KL {kl.max():.2e}")
    assert kl.mean() < 5e-3 and kl.max() < 5e-2
    top1 = (ref.argmax(-1) == got.argmax(-1))[mask.astype(bool)].mean()
    assert top1 > 0.9


def test_shared_image_features_scatter_into_two_rows(checkpoint):
    """DPO layout: one image, encoded once, placed in a chosen and a rejected row via a [2, F] index."""
    _, ours = checkpoint
    rng = np.random.default_rng(8)
    grids = np.array([GRID_A])
    prompt = text(rng, 4) + image_span(GRID_A) + text(rng, 3)
    chosen, rejected = prompt + text(rng, 6), prompt + text(rng, 9)
    pv = rng.standard_normal((int(np.prod(GRID_A)), 1176)).astype(np.float32)
    ids, mask = pad_rows([chosen, rejected], "right")
    positions = np.concatenate(  # each row has its own copy of the image
        [mrope_position_ids(ids[i:i + 1], grids, mask[i:i + 1], image_token_id=IMAGE_TOKEN) for i in range(2)], axis=1)
    arrays = ours.prepare_inputs(ids, mask, position_ids=positions)
    slots = [np.flatnonzero((ids == IMAGE_TOKEN).reshape(-1) & (np.arange(ids.size) // ids.shape[1] == r))
             for r in range(2)]
    layout = {k: jnp.asarray(v) for k, v in vision_layout(grids, ours.config.vision).arrays().items()}
    logits = ours.forward(**{k: jnp.asarray(v) for k, v in arrays.items()}, pixel_values=jnp.asarray(pv),
                          vision=layout, image_token_index=jnp.asarray(np.stack(slots)))
    for r, row in enumerate([chosen, rejected]):
        alone = np.asarray(ours(np.array([row]), None, pv, grids))[0]
        np.testing.assert_allclose(np.asarray(logits)[r, : len(row)], alone, atol=1e-5, rtol=0)
