"""blockwise attention: online softmax over key blocks (forward) and the FlashAttention-2 backward, both as XLA
while loops under a custom VJP; O(Lq + Lk) memory on every platform. Called through ``attention.attention``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .attention_masks import MaskInputs, block_allowed, pad_masks


def blockwise_attention(q, k, v, masks: MaskInputs, *, causal: bool, scale: float, block_q: int, block_k: int):
    """Returns the attention output ``[B, Lq, Hq, Dh]`` computed block by block with O(Lq + Lk) memory.

    Query chunks of ``block_q`` rows run one after another; each scans the key blocks it can see (causal bound, and
    the span of valid keys over the batch) with a running max / sum / weighted sum in fp32. The backward pass
    recomputes the scores per (key block, query chunk) from the saved log-sum-exp; nothing ``[Lq, Lk]``-sized is kept.
    Rows with no allowed key return 0.
    """
    b, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, lq), min(block_k, lk)
    lq_pad, lk_pad = -(-lq // bq) * bq, -(-lk // bk) * bk
    qh = q.reshape(b, lq, hkv, hq // hkv, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, Lq, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, Dh]
    if lq_pad != lq:
        qh = jnp.pad(qh, [(0, 0)] * 3 + [(0, lq_pad - lq), (0, 0)])
    if lk_pad != lk:
        kh = jnp.pad(kh, [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
        vh = jnp.pad(vh, [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
    masks = pad_masks(masks, lq_pad - lq, lk_pad - lk)
    out = _flash(qh, kh, vh, masks, causal, scale, bq, bk)  # [B, Hkv, G, Lq_pad, Dh]
    return out[:, :, :, :lq].transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, dh)


def _valid_key_block_range(m: MaskInputs, bk: int):
    """Returns (first, end) key-block indices spanning every valid key of every row (int32 scalars)."""
    lk = m.kv_valid.shape[1]
    index = jnp.arange(lk, dtype=jnp.int32)[None, :]
    first = jnp.min(jnp.where(m.kv_valid, index, lk))
    end = jnp.max(jnp.where(m.kv_valid, index + 1, 0))
    return first // bk, jnp.maximum(-(-end // bk), first // bk)


def _flash_forward(qh, kh, vh, m: MaskInputs, causal, scale, bq, bk):
    """Returns (out [B, Hkv, G, Lq, Dh] in q's dtype, lse [B, Hkv, G, Lq] fp32; +inf on rows with no allowed key)."""
    b, hkv, g, lq, dh = qh.shape
    nq = lq // bq
    k_first, k_end = _valid_key_block_range(m, bk)
    max_offset = jnp.max(m.q_offset)

    def query_chunk(i, carry):
        out, lse = carry
        q_start = i * bq
        qc = lax.dynamic_slice_in_dim(qh, q_start, bq, axis=3)  # [B, Hkv, G, bq, Dh]
        k_stop = k_end
        if causal:  # the last key any row of this chunk may see
            k_stop = jnp.minimum(k_stop, (max_offset + q_start + bq - 1) // bk + 1)

        def key_block(j, state):
            row_max, row_sum, acc = state
            k_start = j * bk
            kb = lax.dynamic_slice_in_dim(kh, k_start, bk, axis=2)  # [B, Hkv, bk, Dh]
            vb = lax.dynamic_slice_in_dim(vh, k_start, bk, axis=2)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qc, kb, preferred_element_type=jnp.float32) * scale
            allowed = block_allowed(m, causal, q_start, bq, k_start, bk)[:, None, None]  # [B, 1, 1, bq, bk]
            s = jnp.where(allowed, s, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            correction = jnp.exp(row_max - safe_max)
            p = jnp.exp(s - safe_max[..., None])  # [B, Hkv, G, bq, bk]
            row_sum = row_sum * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vh.dtype), vb, preferred_element_type=jnp.float32)
            return new_max, row_sum, acc * correction[..., None] + pv

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, dh), jnp.float32))
        row_max, row_sum, acc = lax.fori_loop(k_first, jnp.maximum(k_stop, k_first), key_block, init)
        has_key = row_sum > 0
        o = (acc / jnp.where(has_key, row_sum, 1.0)[..., None]).astype(qh.dtype)
        chunk_lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, row_sum, 1.0)), jnp.inf)
        return (lax.dynamic_update_slice_in_dim(out, o, q_start, axis=3),
                lax.dynamic_update_slice_in_dim(lse, chunk_lse, q_start, axis=3))

    init = (jnp.zeros(qh.shape, qh.dtype), jnp.zeros((b, hkv, g, lq), jnp.float32))
    return lax.fori_loop(0, nq, query_chunk, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(qh, kh, vh, m, causal, scale, bq, bk):
    return _flash_forward(qh, kh, vh, m, causal, scale, bq, bk)[0]


def _flash_fwd(qh, kh, vh, m, causal, scale, bq, bk):
    out, lse = _flash_forward(qh, kh, vh, m, causal, scale, bq, bk)
    return out, (qh, kh, vh, m, out, lse)


def _flash_bwd(causal, scale, bq, bk, residuals, d_out):
    """Returns (dq, dk, dv, None): key blocks outside, query chunks inside, scores recomputed from the lse."""
    qh, kh, vh, m, out, lse = residuals
    b, hkv, g, lq, dh = qh.shape
    nq = lq // bq
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Hkv, G, Lq]
    k_first, k_end = _valid_key_block_range(m, bk)
    max_offset = jnp.max(m.q_offset)

    def key_block(j, carry):
        dq, dk, dv = carry
        k_start = j * bk
        kb = lax.dynamic_slice_in_dim(kh, k_start, bk, axis=2)  # [B, Hkv, bk, Dh]
        vb = lax.dynamic_slice_in_dim(vh, k_start, bk, axis=2)
        q_first = jnp.clip((k_start - max_offset) // bq, 0, nq) if causal else 0  # earlier chunks see no key here

        def query_chunk(i, state):
            dq, dk_j, dv_j = state
            q_start = i * bq
            qc = lax.dynamic_slice_in_dim(qh, q_start, bq, axis=3)  # [B, Hkv, G, bq, Dh]
            doc = lax.dynamic_slice_in_dim(d_out, q_start, bq, axis=3)
            lse_c = lax.dynamic_slice_in_dim(lse, q_start, bq, axis=3)
            delta_c = lax.dynamic_slice_in_dim(delta, q_start, bq, axis=3)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qc, kb, preferred_element_type=jnp.float32) * scale
            allowed = block_allowed(m, causal, q_start, bq, k_start, bk)[:, None, None]
            p = jnp.where(allowed, jnp.exp(s - lse_c[..., None]), 0.0)  # [B, Hkv, G, bq, bk]
            dv_j = dv_j + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(doc.dtype), doc,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", doc, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_c[..., None])
            dq_c = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, q_start, bq, axis=3) + dq_c * scale, q_start, axis=3)
            dk_j = dk_j + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(qc.dtype), qc,
                                     preferred_element_type=jnp.float32) * scale
            return dq, dk_j, dv_j

        zeros = jnp.zeros((b, hkv, bk, dh), jnp.float32)
        dq, dk_j, dv_j = lax.fori_loop(q_first, nq, query_chunk, (dq, zeros, zeros))
        return (dq, lax.dynamic_update_slice_in_dim(dk, dk_j, k_start, axis=2),
                lax.dynamic_update_slice_in_dim(dv, dv_j, k_start, axis=2))

    init = (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(k_first, k_end, key_block, init)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
