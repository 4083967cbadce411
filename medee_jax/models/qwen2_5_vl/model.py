"""Qwen2.5-VL in Flax NNX: the vision tower (window attention + patch merger) around the shared Qwen2 decoder.

``encode_images(pixel_values, **vision_layout)`` -> image features [P/4, D] in image order (shape-static, the
layout computed on the host by ``vision_layout.py``); the decoder, feature scatter and logits are the shared
``vlm.VisionLanguageModel``'s. ``__call__`` is the convenience path outside jit: it takes transformers-processor-
shaped inputs, computes the host arrays (M-RoPE positions, vision layout, scatter indices) and runs the jitted
forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import attention
from ..layers import apply_rotary, linear, maybe_remat, param, rms_norm, swiglu
from ..rope import vision_cos_sin
from ..vlm import VisionLanguageModel, check_token_batch, scatter_index, vision_attention_implementation
from .config import Qwen25VLConfig, VisionConfig
from .host import mrope_position_ids
from .vision_layout import vision_layout

VISION_NORM_EPS = 1e-6


def vision_block_table(cfg: VisionConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Returns {param name: (shape, logical axes, init)} of one vision block."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "norm1": ((d,), ("norm",), "ones"),
        "norm2": ((d,), ("norm",), "ones"),
        "qkv_kernel": ((d, 3 * d), ("vision_embed", "vision_heads"), "normal"),
        "qkv_bias": ((3 * d,), ("vision_heads",), "zeros"),
        "proj_kernel": ((d, d), ("vision_heads", "vision_embed"), "normal"),
        "proj_bias": ((d,), ("vision_embed",), "zeros"),
        "gate_proj_kernel": ((d, i), ("vision_embed", "vision_mlp"), "normal"),
        "gate_proj_bias": ((i,), ("vision_mlp",), "zeros"),
        "up_proj_kernel": ((d, i), ("vision_embed", "vision_mlp"), "normal"),
        "up_proj_bias": ((i,), ("vision_mlp",), "zeros"),
        "down_proj_kernel": ((i, d), ("vision_mlp", "vision_embed"), "normal"),
        "down_proj_bias": ((d,), ("vision_embed",), "zeros"),
    }


def merger_table(cfg: VisionConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Returns {param name: (shape, logical axes, init)} of the patch merger."""
    d, m = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
    return {
        "ln_q": ((d,), ("norm",), "ones"),
        "mlp0_kernel": ((m, m), ("vision_merge", "vision_mlp"), "normal"),
        "mlp0_bias": ((m,), ("vision_mlp",), "zeros"),
        "mlp2_kernel": ((m, cfg.out_hidden_size), ("vision_mlp", "embed"), "normal"),
        "mlp2_bias": ((cfg.out_hidden_size,), ("embed",), "zeros"),
    }


class VisionBlocks(nnx.Module):
    """All vision blocks' parameters, each stacked to [depth, ...]."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        for name, (shape, axes, init) in vision_block_table(cfg).items():
            setattr(self, name, param(rngs, (cfg.depth, *shape), ("layers", *axes), param_dtype,
                                      "zeros" if rngs is None else init))

    def stacked(self) -> dict[str, jax.Array]:
        """Returns {param name: [depth, ...] array}."""
        return {name: getattr(self, name)[...] for name in vision_block_table(self.cfg)}


class PatchMerger(nnx.Module):
    """RMSNorm, concat the patches of each 2x2 cell, Linear -> GELU -> Linear to the LLM width."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        for name, (shape, axes, init) in merger_table(cfg).items():
            setattr(self, name, param(rngs, shape, axes, param_dtype, "zeros" if rngs is None else init))

    def __call__(self, x, dtype):
        m = self.cfg.hidden_size * self.cfg.merge_unit
        x = rms_norm(x, self.ln_q[...], VISION_NORM_EPS).reshape(-1, m)  # [P/4, 4*Dv]
        x = jax.nn.gelu(linear(x, self.mlp0_kernel[...], self.mlp0_bias[...], dtype), approximate=False)
        return linear(x, self.mlp2_kernel[...], self.mlp2_bias[...], dtype)  # [P/4, D]


def window_attention(q, k, v, gather, block_segments, scatter, implementation: str):
    """Returns attention within windows, [P, H, Dh], for q, k, v [P, H, Dh] in window order: the patches are gathered
    into window blocks [NB, W] (``vision_layout``: empty slots read an appended zero row, windows sharing a block are
    kept apart by ``block_segments``), attended as a batch of NB short sequences and scattered back (patches in no
    block, the bucket's padding, get 0)."""
    _, heads, dh = q.shape

    def with_zero_row(a):
        return jnp.concatenate([a, jnp.zeros_like(a[:1])])

    qb, kb, vb = (with_zero_row(a)[gather] for a in (q, k, v))  # [NB, W, H, Dh]
    out = attention(qb, kb, vb, causal=False, q_segment_ids=block_segments, implementation=implementation)
    return with_zero_row(out.reshape(-1, heads, dh))[scatter]  # [P, H, Dh]


def image_attention(q, k, v, image_segments, implementation: str):
    """Returns attention within each image (frame), [P, H, Dh], for q, k, v [P, H, Dh] and image_segments [P]."""
    return attention(q[None], k[None], v[None], causal=False, q_segment_ids=image_segments[None],
                     implementation=implementation)[0]


def vision_block(p: dict, x, cos, sin, attend, cfg: VisionConfig):
    """Returns one vision block applied to x [P, Dv]; ``attend(q, k, v)`` [P, H, Dh] -> [P, H, Dh] is the block's
    attention (window or full)."""
    n, d = x.shape
    h = rms_norm(x, p["norm1"], VISION_NORM_EPS)
    qkv = linear(h, p["qkv_kernel"], p["qkv_bias"]).reshape(n, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [P, H, Dh]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = attend(q, k, v).reshape(n, d)
    x = x + linear(attn, p["proj_kernel"], p["proj_bias"])
    h = rms_norm(x, p["norm2"], VISION_NORM_EPS)
    return x + swiglu(h, p["gate_proj_kernel"], p["up_proj_kernel"], p["down_proj_kernel"],
                      p["gate_proj_bias"], p["up_proj_bias"], p["down_proj_bias"])


class VisionTower(nnx.Module):
    """Patch embedding (a linear map of each flattened patch), window/full-attention blocks, patch merger.

    ``attention_implementation`` (see ``attention.attention``; default "auto", resolved by
    ``vlm.vision_attention_implementation``) runs the full-attention blocks, per image through segment ids. Window
    blocks are NB sequences of W = one window's patches (64), several windows per block apart by segment ids: they
    run "blockwise" (one key block per window; its backward keeps q, k, v, out and the log-sum-exp, not the
    [NB, H, W, W] probabilities the dense math keeps: compiled peak 2.66 vs 3.79 GiB for the forward+backward of a
    2016 px image through a 32-block tower of width 32 without remat; forward time within 5% on CPU), or the dense
    math when the implementation is "reference".
    Kernels are not used for windows: cudnn takes no segment ids, and a 64-key block is below their tiles.
    """

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_implementation: str = "auto", rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention_implementation = attention_implementation
        self.patch_embed = param(rngs, (cfg.patch_dim, cfg.hidden_size), ("vision_patch", "vision_embed"),
                                 param_dtype, "zeros" if rngs is None else "normal")
        self.blocks = VisionBlocks(cfg, param_dtype=param_dtype, rngs=rngs)
        self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values, rot_pos, window_index, reverse_index, window_gather, window_block_segments,
                 window_scatter, image_segments, *, implementation: str | None = None):
        """Returns merged image features [P/4, out_hidden] in image order (see vision_layout.py for the inputs;
        ``implementation`` overrides ``attention_implementation``)."""
        cfg = self.cfg
        unit = cfg.merge_unit
        full_impl = vision_attention_implementation(implementation or self.attention_implementation)
        window_impl = "reference" if full_impl == "reference" else "blockwise"
        x = linear(pixel_values.astype(self.dtype), self.patch_embed[...])  # [P, Dv]
        x = x.reshape(-1, unit, cfg.hidden_size)[window_index].reshape(-1, cfg.hidden_size)  # window order
        cos, sin = vision_cos_sin(rot_pos, cfg.head_dim, cfg.rope_theta)  # [P, Dh]
        is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))  # [depth]

        def full(q, k, v):
            return image_attention(q, k, v, image_segments, full_impl)

        def windowed(q, k, v):
            return window_attention(q, k, v, window_gather, window_block_segments, window_scatter, window_impl)

        def body(h, inputs):
            p, is_full_block = inputs
            p = jax.tree.map(lambda a: a.astype(self.dtype), p)  # per layer: no cast copy of the whole stack

            def attend(q, k, v):
                return jax.lax.cond(is_full_block, full, windowed, q, k, v)

            return vision_block(p, h, cos, sin, attend, cfg), None

        x, _ = jax.lax.scan(maybe_remat(body, self.remat), x, (self.blocks.stacked(), is_full))
        merged = self.merger(x, self.dtype)  # [P/4, D] in window order
        return merged[reverse_index]


class Qwen25VL(VisionLanguageModel):
    """Qwen2.5-VL for conditional generation: ``visual``, ``language_model`` and ``lm_head`` (absent when tied)."""

    def __init__(self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 rngs: nnx.Rngs | None):
        self.visual = VisionTower(cfg.vision, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self._init_language_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)

    def encode_images(self, pixel_values, rot_pos, window_index, reverse_index, window_gather, window_block_segments,
                      window_scatter, image_segments, *, implementation: str | None = None):
        """Returns image features [P/4, D] for pixel_values [P, patch_dim] laid out by ``vision_layout``
        (``implementation``: the vision attention's, default the tower's ``attention_implementation``)."""
        return self.visual(pixel_values, rot_pos, window_index, reverse_index, window_gather, window_block_segments,
                           window_scatter, image_segments, implementation=implementation)

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       position_ids=None, segment_ids=None) -> dict:
        """Returns the numpy arrays ``forward`` takes, computed on the host from processor-shaped inputs."""
        cfg = self.config
        input_ids, mask = check_token_batch(input_ids, attention_mask)
        if position_ids is None:
            position_ids = mrope_position_ids(input_ids, image_grid_thw, mask, segment_ids,
                                              image_token_id=cfg.image_token_id,
                                              spatial_merge_size=cfg.vision.spatial_merge_size)
        position_ids = np.asarray(position_ids, dtype=np.int32)
        if position_ids.ndim == 2:
            position_ids = np.broadcast_to(position_ids[None], (3, *position_ids.shape))
        out = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
        if segment_ids is not None:
            out["segment_ids"] = np.asarray(segment_ids, dtype=np.int32)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            layout = vision_layout(image_grid_thw, cfg.vision, pad_to=pixel_values.shape[0])
            # One scatter target per merged feature row; rows of padding patches point past the end and are dropped.
            index = scatter_index(input_ids, mask, cfg.image_token_id, pixel_values.shape[0] // cfg.vision.merge_unit,
                                  layout.num_valid_patches // cfg.vision.merge_unit)
            out.update(pixel_values=pixel_values, vision=layout.arrays(), image_token_index=index)
        return out
