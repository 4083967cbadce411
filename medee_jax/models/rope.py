"""Rotary position embeddings: M-RoPE for the text decoder, 2-D axial RoPE for the vision tower, and the host-side
(numpy) M-RoPE position ids that transformers' ``Qwen2_5_VLModel.get_rope_index`` computes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
    """Returns the RoPE inverse frequencies theta^(-2i/dim), i < dim/2, as float32 [dim/2]."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section):
    """Returns (cos, sin) [B, L, head_dim] fp32 for M-RoPE positions ``position_ids`` [3, B, L].

    Frequency slot s (of head_dim/2) takes its angle from axis T, H or W according to ``mrope_section``
    (e.g. [16, 24, 24]: slots 0-15 T, 16-39 H, 40-63 W); the layout is repeated for the second half.
    """
    inv_freq = jnp.asarray(inv_frequencies(head_dim, theta))  # [Dh/2]
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, Dh/2]
    axis_of_slot = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])  # [Dh/2]
    one_hot = jnp.asarray(np.eye(3, dtype=np.float32)[:, axis_of_slot])  # [3, Dh/2]
    freqs = jnp.einsum("abls,as->bls", freqs, one_hot)  # [B, L, Dh/2]: exact (one term is nonzero)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rot_pos_ids, head_dim: int, theta: float):
    """Returns (cos, sin) [P, head_dim] fp32 for vision patch (h, w) positions ``rot_pos_ids`` [P, 2]."""
    inv_freq = jnp.asarray(inv_frequencies(head_dim // 2, theta))  # [Dh/4]
    freqs = rot_pos_ids.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, Dh/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [P, Dh/2] = concat(h freqs, w freqs)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [P, Dh]
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------------------------------------------
# Host side.


def _image_positions(start: int, grid_thw, merge: int) -> np.ndarray:
    """Returns [3, t*h'*w'] M-RoPE positions of one image's merged tokens starting at ``start``."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def mrope_positions_for_sequence(token_ids, image_grid_thw, *, image_token_id: int, spatial_merge_size: int = 2):
    """Returns (positions [3, N] int64, images used) for one unpadded token sequence.

    Text tokens advance all three axes together; each run of image tokens consumes images from
    ``image_grid_thw`` in order (t*h*w/merge^2 tokens each) and places them on a (T, H, W) grid starting at the
    current position; text after an image continues at max(previous positions) + 1.
    """
    token_ids = np.asarray(token_ids)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    n = token_ids.shape[0]
    out = np.zeros((3, n), dtype=np.int64)
    is_image = token_ids == image_token_id
    pos, i, img = 0, 0, 0
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            out[:, i:j] = np.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        if img >= len(grids):
            raise ValueError(f"sequence has more image tokens than images in image_grid_thw ({len(grids)})")
        grid = grids[img]
        count = int(np.prod(grid)) // spatial_merge_size**2
        if i + count > n or not is_image[i:i + count].all():
            raise ValueError(f"image {img} with grid {grid.tolist()} needs {count} consecutive image tokens at {i}")
        out[:, i:i + count] = _image_positions(pos, grid, spatial_merge_size)
        pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        img += 1
        i += count
    return out, img


def mrope_position_ids(input_ids, image_grid_thw=None, attention_mask=None, segment_ids=None, *,
                       image_token_id: int, spatial_merge_size: int = 2):
    """Returns M-RoPE position ids [3, B, L] int32 for a padded batch, equal to transformers' ``get_rope_index``.

    Positions are computed over attended tokens only (padding gets 0, left or right); images are taken from
    ``image_grid_thw`` [n, 3] in order across the rows. With ``segment_ids`` [B, L] (packed rows: one id per
    example, 0 for padding), positions restart at 0 for every example.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones((b, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        mask = mask & (segment_ids != 0)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    out = np.zeros((3, b, length), dtype=np.int64)
    used = 0
    for row in range(b):
        cols = np.nonzero(mask[row])[0]
        if segment_ids is None:
            pieces = [cols]
        else:
            seg = segment_ids[row, cols]
            cut = np.nonzero(np.diff(seg))[0] + 1
            pieces = np.split(cols, cut)
        for piece in pieces:
            if piece.size == 0:
                continue
            pos, n_img = mrope_positions_for_sequence(input_ids[row, piece], grids[used:], image_token_id=image_token_id,
                                                      spatial_merge_size=spatial_merge_size)
            out[:, row, piece] = pos
            used += n_img
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the batch's image tokens cover {used}")
    return out.astype(np.int32)
