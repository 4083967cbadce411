"""The attention mask as O(L) arrays, evaluated per (query block, key block): shared by every implementation of
``medee_jax.models.attention`` (see its docstring for the predicate)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class MaskInputs(NamedTuple):
    """The mask as O(L) arrays (every field [B, L] or [B]); None where absent."""

    q_offset: jax.Array  # int32 [B]: position of query 0 among the keys
    kv_valid: jax.Array  # bool [B, Lk]
    q_segment_ids: jax.Array | None  # int32 [B, Lq]
    kv_segment_ids: jax.Array | None  # int32 [B, Lk]
    q_branch_ids: jax.Array | None  # int32 [B, Lq]
    kv_branch_ids: jax.Array | None  # int32 [B, Lk]


def mask_inputs(b, lq, lk, *, kv_mask, kv_lengths, q_segment_ids, kv_segment_ids, q_branch_ids, kv_branch_ids,
                 q_offset) -> MaskInputs:
    """Returns the mask arguments as a ``MaskInputs`` of int32/bool arrays with checked shapes."""

    def ids(x, length, name):
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.shape != (b, length):
            raise ValueError(f"attention: {name} has shape {x.shape}, expected {(b, length)}")
        return x.astype(jnp.int32)

    kv_valid = jnp.ones((b, lk), bool)
    if kv_mask is not None:
        kv_mask = jnp.asarray(kv_mask)
        if kv_mask.shape != (b, lk):
            raise ValueError(f"attention: kv_mask has shape {kv_mask.shape}, expected {(b, lk)}")
        kv_valid = kv_mask.astype(bool)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths)
        if kv_lengths.shape != (b,):
            raise ValueError(f"attention: kv_lengths has shape {kv_lengths.shape}, expected {(b,)}")
        kv_valid = kv_valid & (jnp.arange(lk)[None, :] < kv_lengths[:, None])
    offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    return MaskInputs(offset, kv_valid, ids(q_segment_ids, lq, "q_segment_ids"),
                       ids(kv_segment_ids, lk, "kv_segment_ids"), ids(q_branch_ids, lq, "q_branch_ids"),
                       ids(kv_branch_ids, lk, "kv_branch_ids"))


def block_allowed(m: MaskInputs, causal: bool, q_start, bq: int, k_start, bk: int):
    """Returns bool [B, bq, bk]: which keys ``k_start + [0, bk)`` each query ``q_start + [0, bq)`` may attend."""
    allowed = lax.dynamic_slice_in_dim(m.kv_valid, k_start, bk, axis=1)[:, None, :]  # [B, 1, bk]
    if causal:
        q_pos = m.q_offset[:, None] + q_start + jnp.arange(bq)[None, :]  # [B, bq]
        k_pos = k_start + jnp.arange(bk)  # [bk]
        allowed = allowed & (k_pos[None, None, :] <= q_pos[:, :, None])
    if m.q_segment_ids is not None:
        qs = lax.dynamic_slice_in_dim(m.q_segment_ids, q_start, bq, axis=1)
        ks = lax.dynamic_slice_in_dim(m.kv_segment_ids, k_start, bk, axis=1)
        allowed = allowed & (qs[:, :, None] == ks[:, None, :])
    if m.q_branch_ids is not None:
        qb = lax.dynamic_slice_in_dim(m.q_branch_ids, q_start, bq, axis=1)
        kb = lax.dynamic_slice_in_dim(m.kv_branch_ids, k_start, bk, axis=1)
        allowed = allowed & ((kb[:, None, :] == 0) | (qb[:, :, None] == kb[:, None, :]))
    return jnp.broadcast_to(allowed, (allowed.shape[0], bq, bk))


def pad_masks(m: MaskInputs, q_pad: int, k_pad: int) -> MaskInputs:
    """Returns ``m`` with padded queries (segment/branch 0) and padded keys marked invalid."""

    def pad(x, n, value=0):
        return x if x is None or n == 0 else jnp.pad(x, [(0, 0), (0, n)], constant_values=value)

    return MaskInputs(m.q_offset, pad(m.kv_valid, k_pad, False), pad(m.q_segment_ids, q_pad),
                       pad(m.kv_segment_ids, k_pad), pad(m.q_branch_ids, q_pad), pad(m.kv_branch_ids, k_pad))


def kernel_segment_ids(m: MaskInputs):
    """Returns (q_ids [B, Lq], kv_ids [B, Lk]) int32 for kernels that only know segment equality: padding keys get
    segment -1, which no query has (segment ids are ≥ 0); without segment ids every token is in segment 0."""
    kv_ids = m.kv_segment_ids if m.kv_segment_ids is not None else jnp.zeros(m.kv_valid.shape, jnp.int32)
    return m.q_segment_ids, jnp.where(m.kv_valid, kv_ids, -1)
