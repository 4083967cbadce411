"""Rotary position embeddings on the device: M-RoPE and plain 1-D RoPE (with dynamic NTK scaling) for the text
decoder, 2-D axial RoPE for the Qwen2.5-VL vision tower.

Position ids are computed on the host by each family (``models/<family>/host.py``); this module only turns them
into (cos, sin) tables.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .text_config import TextConfig


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


def dynamic_ntk_inv_frequencies(position_ids, head_dim: int, theta: float, factor: float, max_positions: int):
    """Returns the inverse frequencies [Dh/2] of transformers' "dynamic" RoPE for a call whose largest position is
    max(position_ids): with seq_len = max(max position + 1, max_positions), the base becomes
    theta * (factor * seq_len / max_positions - (factor - 1)) ^ (dim / (dim - 2)), which is theta itself (default
    RoPE) up to ``max_positions`` tokens. transformers recomputes this per forward call (and keeps the grown
    frequencies until a call is shorter than ``max_positions``); here each call uses its own length."""
    seq_len = jnp.max(position_ids).astype(jnp.float32) + 1.0
    base = theta * ((factor * seq_len / max_positions) - (factor - 1.0)) ** (head_dim / (head_dim - 2))
    exponents = jnp.asarray(np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # [Dh/2]
    default = jnp.asarray(inv_frequencies(head_dim, theta))  # what transformers keeps up to max_positions
    return jnp.where(seq_len > max_positions, 1.0 / (base ** exponents), default)


def rope_cos_sin(position_ids, cfg: TextConfig):
    """Returns (cos, sin) [B, L, head_dim] fp32 for 1-D positions ``position_ids`` [B, L] (RoPE as Qwen2)."""
    if cfg.rope_type == "dynamic":
        inv_freq = dynamic_ntk_inv_frequencies(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_factor,
                                               cfg.max_position_embeddings)  # [Dh/2]
    else:
        inv_freq = jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta))  # [Dh/2]
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def text_cos_sin(positions, cfg: TextConfig):
    """Returns (cos, sin) [B, L, head_dim] for the decoder: M-RoPE from positions [3, B, L] when the config has an
    ``mrope_section``, else 1-D RoPE from positions [B, L]."""
    if cfg.mrope_section is not None:
        if positions.ndim != 3:
            raise ValueError(f"M-RoPE needs positions [3, B, L], got shape {positions.shape}")
        return mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    if positions.ndim != 2:
        raise ValueError(f"1-D RoPE needs positions [B, L], got shape {positions.shape}")
    return rope_cos_sin(positions, cfg)


def vision_cos_sin(rot_pos_ids, head_dim: int, theta: float):
    """Returns (cos, sin) [P, head_dim] fp32 for vision patch (h, w) positions ``rot_pos_ids`` [P, 2]."""
    inv_freq = jnp.asarray(inv_frequencies(head_dim // 2, theta))  # [Dh/4]
    freqs = rot_pos_ids.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, Dh/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [P, Dh/2] = concat(h freqs, w freqs)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [P, Dh]
    return jnp.cos(emb), jnp.sin(emb)
