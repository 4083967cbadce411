"""One attention function for the text decoder and the vision tower, with several implementations.

``attention(q, k, v, causal=..., kv_mask=..., q_segment_ids=..., ...)`` returns softmax(q kᵀ / √Dh) v under the mask

    allowed[b, i, j] = (not causal or j <= q_offset[b] + i)          # key position ≤ query position
                       and key j is valid (kv_mask, kv_lengths)      # key padding, any placement
                       and q_segment_ids[b, i] == kv_segment_ids[b, j]   # packed rows
                       and (kv_branch_ids[b, j] == 0                  # DPO share_prompt: the prompt,
                            or q_branch_ids[b, i] == kv_branch_ids[b, j])  # or the query's own completion

which is ``models/decoder.py::text_attention_mask`` written as a predicate on (query, key) pairs, so that no
implementation except ``reference`` needs the dense ``[B, Lq, Lk]`` mask. ``q_offset`` places the query block inside a
longer key sequence (a KV cache: one new token at position ``q_offset`` against ``S`` cached keys).

Implementations (``implementation=``):

| name         | memory     | where                 | supports                                                      |
| ------------ | ---------- | --------------------- | ------------------------------------------------------------- |
| `reference`  | O(Lq·Lk)   | everywhere            | everything; today's dense math (transformers eager)          |
| `blockwise`  | O(Lq + Lk) | everywhere (pure JAX) | everything; online softmax over key blocks, custom VJP        |
| `cudnn`      | O(L)       | NVIDIA GPU, bf16/fp16 | causal (q_offset 0), kv_lengths (right padding), GQA          |
| `splash`     | O(L)       | TPU (Pallas)          | causal (static q_offset), padding and segment ids, GQA        |
| `pallas_gpu` | O(L)       | GPU (Pallas/Triton)   | self-attention (Lq == Lk, q_offset 0): causal, padding and    |
|              |            |                       | segment ids; GQA by repeating K/V heads (G× K/V memory)       |
| `auto`       |            |                       | TPU → splash, GPU → cudnn, when they support the arguments,   |
|              |            |                       | else blockwise; CPU → reference below                         |
|              |            |                       | ``CPU_BLOCKWISE_MIN_SCORES`` (Lq·Lk), blockwise from there on |

An explicit implementation that cannot express the arguments raises ``ValueError`` naming what it lacks (branch ids
are only on ``reference`` and ``blockwise``); ``auto`` never picks one that cannot.

Rows that matter and rows that do not. For every query row whose own token is valid (a real token: it has at least
itself as an allowed key in self-attention, or the new token of a decode step) all implementations compute the same
masked softmax (to float rounding; cudnn/splash/pallas_gpu run in their own precision). Rows of padding queries are
never read by real tokens (their keys are masked for everyone) nor by the loss; they are finite but differ:
``reference`` gives the masked softmax, and where a row has no allowed key at all a uniform average of v over all
``Lk`` keys (the finite ``MASK_VALUE``, as transformers' eager path); ``blockwise`` gives the masked softmax and exactly
0 where no key is allowed; ``splash``, ``cudnn`` and ``pallas_gpu`` give whatever their kernels compute for such rows
(finite; for ``pallas_gpu`` a padding query attends the other padding keys). Gradients of a loss that ignores padding
rows are equal across implementations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Additive mask value of the reference path (finite, as transformers' eager attention: a fully masked row gives a
# uniform distribution instead of NaN).
MASK_VALUE = float(np.finfo(np.float32).min)

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "cudnn", "splash", "pallas_gpu")

# ``auto`` on CPU: the dense reference while a head's score matrix has fewer than this many entries (Lq·Lk), blockwise
# from there on. Measured on the 2-core development CPU (shared with other jobs; `python tools/device_check.py --only
# attention_crossover`), causal forward + backward, fp32, B=2, 8 query / 2 KV heads, Dh 64, best of 2×7 runs, ms:
#   L=128: reference 5.5, blockwise(256) 5.9 | 256: 9.9 vs 13.5 | 512: 57.2 vs 33.8 | 1024: 211 vs 110
#   2048: 1641 vs 976 | 4096: 13016 vs 5294 (median of 5)
# so the crossover lies between 256 and 512 keys for self-attention; a decode step (Lq = 1) stays dense.
CPU_BLOCKWISE_MIN_SCORES = 512 * 512

# Default blockwise tiles: 256 on CPU (256 and 128 measured equal there, 512 slower), 512 on accelerators.
DEFAULT_BLOCK_CPU = 256
DEFAULT_BLOCK_ACCELERATOR = 512
# Triton tiles of the Pallas GPU kernel (its own defaults: 128 forward, 32 backward; larger tiles exceed shared memory).
_PALLAS_GPU_MAX_BLOCK = 128
_PALLAS_GPU_MAX_BLOCK_BWD = 64


class _MaskInputs(NamedTuple):
    """The mask as O(L) arrays (every field [B, L] or [B]); None where absent."""

    q_offset: jax.Array  # int32 [B]: position of query 0 among the keys
    kv_valid: jax.Array  # bool [B, Lk]
    q_segment_ids: jax.Array | None  # int32 [B, Lq]
    kv_segment_ids: jax.Array | None  # int32 [B, Lk]
    q_branch_ids: jax.Array | None  # int32 [B, Lq]
    kv_branch_ids: jax.Array | None  # int32 [B, Lk]


def attention(q, k, v, *, causal: bool, kv_mask=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
              q_branch_ids=None, kv_branch_ids=None, q_offset=0, scale: float | None = None,
              implementation: str = "auto", block_q: int | None = None, block_k: int | None = None,
              mesh=None, batch_axes=("data", "fsdp"), head_axis="tensor", interpret: bool = False):
    """Returns softmax(q kᵀ · scale, masked) v, ``[B, Lq, Hq, Dh]`` in q's dtype (softmax statistics in fp32).

    q ``[B, Lq, Hq, Dh]``; k, v ``[B, Lk, Hkv, Dh]`` with Hq a multiple of Hkv (grouped-query attention).
    causal: key j is allowed for query i only if ``j <= q_offset + i``.
    kv_mask: bool ``[B, Lk]``, False = padding key (left or right). kv_lengths: int ``[B]``, keys at index ≥ length
      are padding (right padding, a filled KV cache); both may be given (keys must pass both).
    q_segment_ids / kv_segment_ids: int ``[B, Lq]`` / ``[B, Lk]`` (≥ 0), attention only within a segment (packed
      rows). kv_segment_ids defaults to q_segment_ids (self-attention).
    q_branch_ids / kv_branch_ids: int, DPO ``share_prompt``: 0 on the shared prompt, 1, 2, … on the completions; a key
      is allowed if it is on the prompt or on the query's own completion. kv_branch_ids defaults to q_branch_ids.
    q_offset: int or int ``[B]``, position of query 0 among the keys (decode against a cache). splash needs a Python
      int; cudnn and pallas_gpu need 0.
    scale: default ``Dh ** -0.5``. implementation: see the module docstring.
    block_q, block_k: query/key block sizes of blockwise, splash and pallas_gpu (rounded to their tile rules);
      default ``DEFAULT_BLOCK_CPU`` on CPU, ``DEFAULT_BLOCK_ACCELERATOR`` elsewhere.
    mesh, batch_axes, head_axis: the device mesh the call is compiled for; ``auto`` chooses by its devices' platform
      (so an ahead-of-time compile for a TPU topology on a CPU host picks splash). splash runs under ``shard_map``
      with the batch split over ``batch_axes`` and the heads over ``head_axis`` (None: heads whole) of ``mesh`` (a
      Pallas TPU kernel cannot be partitioned automatically); without a mesh it runs as is (one device, or inside
      the caller's shard_map).
    interpret: run Pallas kernels in interpret mode (CPU tests).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    b, lq, hq, dh = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [B, Lk, Hkv, Dh] with q {q.shape}")
    if hq % k.shape[2]:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {k.shape[2]} KV heads")
    lk = k.shape[1]
    if kv_segment_ids is None and q_segment_ids is not None:
        if lq != lk:
            raise ValueError("attention: kv_segment_ids is required when Lq != Lk")
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: give q_segment_ids with kv_segment_ids")
    if kv_branch_ids is None and q_branch_ids is not None:
        if lq != lk:
            raise ValueError("attention: kv_branch_ids is required when Lq != Lk")
        kv_branch_ids = q_branch_ids
    if (q_branch_ids is None) != (kv_branch_ids is None):
        raise ValueError("attention: give q_branch_ids with kv_branch_ids")
    scale = float(dh ** -0.5 if scale is None else scale)
    features = AttentionFeatures(causal=causal, kv_mask=kv_mask is not None, kv_lengths=kv_lengths is not None,
                         segments=q_segment_ids is not None, branches=q_branch_ids is not None,
                         static_offset=isinstance(q_offset, (int, np.integer)),
                         zero_offset=isinstance(q_offset, (int, np.integer)) and int(q_offset) == 0,
                         same_length=lq == lk, dtype=jnp.dtype(q.dtype), head_dim=dh, num_scores=lq * lk)
    # The platform the code is compiled for: the mesh's devices (ahead-of-time compilation for a TPU topology on a
    # CPU host), else the default backend.
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    default_block = DEFAULT_BLOCK_CPU if platform == "cpu" else DEFAULT_BLOCK_ACCELERATOR
    block_q = block_q or default_block
    block_k = block_k or default_block
    if implementation == "auto":
        implementation = choose_implementation(features, platform)
    else:
        missing = unsupported(implementation, features)
        if missing:
            raise ValueError(f"attention: implementation {implementation!r} does not support {missing}; "
                             "use 'blockwise' (or 'auto')")

    if implementation == "cudnn":
        return _jax_nn_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, backend="cudnn")
    masks = _mask_inputs(b, lq, lk, kv_mask=kv_mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, q_branch_ids=q_branch_ids, kv_branch_ids=kv_branch_ids,
                         q_offset=q_offset)
    if implementation == "reference":
        return dense_attention(q, k, v, _block_allowed(masks, causal, 0, lq, 0, lk), scale=scale)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, masks, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
    if implementation == "splash":
        return _splash(q, k, v, masks, causal=causal, q_offset=int(q_offset), scale=scale, block_q=block_q,
                       block_k=block_k, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis, interpret=interpret)
    return _pallas_gpu(q, k, v, masks, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                       interpret=interpret)


class AttentionFeatures(NamedTuple):
    """What a call asks for, to choose or check an implementation (all static)."""

    causal: bool
    kv_mask: bool
    kv_lengths: bool
    segments: bool
    branches: bool
    static_offset: bool
    zero_offset: bool
    same_length: bool
    dtype: np.dtype
    head_dim: int
    num_scores: int  # Lq * Lk


def unsupported(implementation: str, f: AttentionFeatures) -> str:
    """Returns what ``implementation`` cannot express among the features ``f`` ("" when it can)."""
    if implementation in ("reference", "blockwise"):
        return ""
    missing = []
    if f.branches:
        missing.append("branch ids (DPO share_prompt)")
    if implementation == "cudnn":
        if f.segments:
            missing.append("segment ids")
        if f.kv_mask:
            missing.append("kv_mask (give kv_lengths for right padding)")
        if not f.zero_offset:
            missing.append("q_offset != 0")
        if f.causal and not f.same_length:
            missing.append("causal with Lq != Lk")
        if f.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            missing.append(f"dtype {f.dtype} (bf16/fp16 only)")
        if f.head_dim > 128 or f.head_dim % 8:
            missing.append(f"head dim {f.head_dim}")
    elif implementation == "splash":
        if not f.static_offset:
            missing.append("a per-row q_offset array (give a Python int)")
    elif implementation == "pallas_gpu":
        if not f.same_length or not f.zero_offset:
            missing.append("cross-attention or q_offset != 0 (self-attention only)")
    return ", ".join(missing)


def choose_implementation(f: AttentionFeatures, platform: str) -> str:
    """Returns the implementation ``auto`` uses on ``platform`` ("cpu", "gpu"/"cuda", "tpu") for the features ``f``."""
    if platform == "tpu" and not unsupported("splash", f):
        return "splash"
    if platform in ("gpu", "cuda") and not unsupported("cudnn", f):
        return "cudnn"
    if platform == "cpu" and f.num_scores < CPU_BLOCKWISE_MIN_SCORES:
        return "reference"
    return "blockwise"


def _mask_inputs(b, lq, lk, *, kv_mask, kv_lengths, q_segment_ids, kv_segment_ids, q_branch_ids, kv_branch_ids,
                 q_offset) -> _MaskInputs:
    """Returns the mask arguments as a ``_MaskInputs`` of int32/bool arrays with checked shapes."""

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
    return _MaskInputs(offset, kv_valid, ids(q_segment_ids, lq, "q_segment_ids"),
                       ids(kv_segment_ids, lk, "kv_segment_ids"), ids(q_branch_ids, lq, "q_branch_ids"),
                       ids(kv_branch_ids, lk, "kv_branch_ids"))


def _block_allowed(m: _MaskInputs, causal: bool, q_start, bq: int, k_start, bk: int):
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


def dense_mask(batch: int, q_len: int, k_len: int, *, causal: bool, kv_mask=None, kv_lengths=None,
               q_segment_ids=None, kv_segment_ids=None, q_branch_ids=None, kv_branch_ids=None, q_offset=0):
    """Returns the bool ``[B, Lq, Lk]`` mask that ``attention`` applies (for the reference path and tests)."""
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if kv_branch_ids is None:
        kv_branch_ids = q_branch_ids
    m = _mask_inputs(batch, q_len, k_len, kv_mask=kv_mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids, q_branch_ids=q_branch_ids, kv_branch_ids=kv_branch_ids,
                     q_offset=q_offset)
    return _block_allowed(m, causal, 0, q_len, 0, k_len)


def dense_attention(q, k, v, allowed, scale: float | None = None):
    """Returns softmax(q kᵀ · scale + mask) v with grouped KV heads: the reference math, O(Lq·Lk) memory.

    q ``[B, Lq, Hq, Dh]``; k, v ``[B, Lk, Hkv, Dh]``; allowed: bool broadcastable to ``[B, Lq, Lk]``. Softmax in fp32;
    output ``[B, Lq, Hq, Dh]`` in q's dtype. Heads-first matmuls (one batched matmul per KV head with the G query
    heads of its group stacked along the rows), the same operations as ``layers.dot_product_attention``.
    """
    b, lq, hq, dh = q.shape
    hkv, lk = k.shape[2], k.shape[1]
    groups = hq // hkv
    scale = dh**-0.5 if scale is None else scale
    qh = q.reshape(b, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * lq, dh)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, Dh]
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh).astype(jnp.float32) * scale  # [B, Hkv, G*Lq, Lk]
    scores = jnp.where(allowed[:, None, None, :, :], scores.reshape(b, hkv, groups, lq, lk), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, groups * lq, lk)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, vh)  # [B, Hkv, G*Lq, Dh]
    return out.reshape(b, hkv, groups, lq, dh).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, dh)


# ----------------------------------------------------------------------------------------------------------------
# blockwise: online softmax over key blocks (forward) and the FlashAttention-2 backward, both as XLA while loops.


def blockwise_attention(q, k, v, masks: _MaskInputs, *, causal: bool, scale: float, block_q: int, block_k: int):
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
    masks = _pad_masks(masks, lq_pad - lq, lk_pad - lk)
    out = _flash(qh, kh, vh, masks, causal, scale, bq, bk)  # [B, Hkv, G, Lq_pad, Dh]
    return out[:, :, :, :lq].transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, dh)


def _pad_masks(m: _MaskInputs, q_pad: int, k_pad: int) -> _MaskInputs:
    """Returns ``m`` with padded queries (segment/branch 0) and padded keys marked invalid."""

    def pad(x, n, value=0):
        return x if x is None or n == 0 else jnp.pad(x, [(0, 0), (0, n)], constant_values=value)

    return _MaskInputs(m.q_offset, pad(m.kv_valid, k_pad, False), pad(m.q_segment_ids, q_pad),
                       pad(m.kv_segment_ids, k_pad), pad(m.q_branch_ids, q_pad), pad(m.kv_branch_ids, k_pad))


def _valid_key_block_range(m: _MaskInputs, bk: int):
    """Returns (first, end) key-block indices spanning every valid key of every row (int32 scalars)."""
    lk = m.kv_valid.shape[1]
    index = jnp.arange(lk, dtype=jnp.int32)[None, :]
    first = jnp.min(jnp.where(m.kv_valid, index, lk))
    end = jnp.max(jnp.where(m.kv_valid, index + 1, 0))
    return first // bk, jnp.maximum(-(-end // bk), first // bk)


def _flash_forward(qh, kh, vh, m: _MaskInputs, causal, scale, bq, bk):
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
            allowed = _block_allowed(m, causal, q_start, bq, k_start, bk)[:, None, None]  # [B, 1, 1, bq, bk]
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
            allowed = _block_allowed(m, causal, q_start, bq, k_start, bk)[:, None, None]
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


# ----------------------------------------------------------------------------------------------------------------
# Kernels: cuDNN through jax.nn, Pallas splash (TPU), Pallas flash attention (GPU/Triton).


def _jax_nn_attention(q, k, v, *, causal: bool, kv_lengths, scale: float, backend: str):
    """Returns ``jax.nn.dot_product_attention`` with ``is_causal`` and key lengths only (no mask argument: under vmap
    and with GQA, masks are where jax 0.10's cuDNN path has known problems, and a mask would be O(L²) anyway)."""
    if backend == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
        raise ValueError(f"attention: implementation 'cudnn' needs an NVIDIA GPU (backend: {jax.default_backend()})")
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation=backend)


def _kernel_segment_ids(m: _MaskInputs):
    """Returns (q_ids [B, Lq], kv_ids [B, Lk]) int32 for kernels that only know segment equality: padding keys get
    segment -1, which no query has (segment ids are ≥ 0); without segment ids every token is in segment 0."""
    kv_ids = m.kv_segment_ids if m.kv_segment_ids is not None else jnp.zeros(m.kv_valid.shape, jnp.int32)
    return m.q_segment_ids, jnp.where(m.kv_valid, kv_ids, -1)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _splash(q, k, v, m: _MaskInputs, *, causal, q_offset, scale, block_q, block_k, mesh, batch_axes, head_axis,
            interpret):
    """Returns attention through the Pallas TPU splash kernel: causal as a static mask, padding and packing as
    segment ids, GQA natively; vmapped over the batch, under ``shard_map`` when ``mesh`` is given."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq = min(block_q, _round_up(lq, 128))
    bk = min(block_k, _round_up(lk, 128))
    lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bk)
    m = _pad_masks(m, lq_pad - lq, lk_pad - lk)
    q_ids, kv_ids = _kernel_segment_ids(m)
    if q_ids is None:
        q_ids = jnp.zeros((b, lq_pad), jnp.int32)
    qt = jnp.pad((q * scale).astype(q.dtype).transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lq_pad - lq), (0, 0)])
    kt = jnp.pad(k.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
    vt = jnp.pad(v.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
    heads = hq
    if mesh is not None and head_axis is not None:
        shards = mesh.shape[head_axis]
        if hq % shards or hkv % shards:
            raise ValueError(f"attention: splash splits heads over mesh axis {head_axis!r} of size {shards}, which "
                             f"must divide {hq} query and {hkv} KV heads (pass head_axis=None to keep heads whole)")
        heads = hq // shards
    kernel = _splash_kernel(heads, lq_pad, lk_pad, causal, q_offset, bq, bk, interpret)

    def run(qt, kt, vt, q_ids, kv_ids):
        def one(qi, ki, vi, qs, ks):
            return kernel(qi, ki, vi, segment_ids=splash.SegmentIds(q=qs, kv=ks))

        return jax.vmap(one)(qt, kt, vt, q_ids, kv_ids)

    if mesh is not None:
        from jax.sharding import PartitionSpec as P

        heads_spec = P(batch_axes, head_axis, None, None)
        ids_spec = P(batch_axes, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, ids_spec, ids_spec),
                            out_specs=heads_spec, check_vma=False)
    out = run(qt, kt, vt, q_ids, kv_ids)  # [B, Hq, Lq_pad, Dh]
    return out[:, :, :lq].transpose(0, 2, 1, 3).astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, q_offset: int, bq: int, bk: int, interpret: bool):
    """Returns a cached splash MHA kernel for one example ``q [H, Lq, Dh]``, ``k, v [Hkv, Lk, Dh]``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if causal:
        head_mask = splash.CausalMask((lq, lk), offset=q_offset)
    else:
        head_mask = splash.FullMask((lq, lk))
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, never tracers of the caller's jit
        return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _pallas_gpu(q, k, v, m: _MaskInputs, *, causal, scale, block_q, block_k, interpret):
    """Returns attention through the Pallas GPU (Triton) flash-attention kernel: self-attention only; one segment-id
    array for queries and keys (the kv_segment_ids, padding = segment -1, so q_segment_ids must equal them); K/V heads
    repeated to the query heads (no native GQA)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, lq, hq, dh = q.shape
    hkv = k.shape[2]
    block = max(16, min(_PALLAS_GPU_MAX_BLOCK, block_q, block_k, 1 << (lq - 1).bit_length()))  # a power of 2
    block_bwd = min(block, _PALLAS_GPU_MAX_BLOCK_BWD)
    length = _round_up(lq, block)
    m = _pad_masks(m, length - lq, length - lq)
    _, seg = _kernel_segment_ids(m)  # one array for queries and keys: padding queries get segment -1 too
    pad = [(0, 0), (0, length - lq), (0, 0), (0, 0)]
    groups = hq // hkv
    k = jnp.pad(jnp.repeat(k, groups, axis=2), pad)
    v = jnp.pad(jnp.repeat(v, groups, axis=2), pad)
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block_bwd, block_kv_dkv=block_bwd,
                                        block_q_dq=block_bwd, block_kv_dq=block_bwd)
    out = pallas_attention.mha(jnp.pad(q, pad), k, v, seg, sm_scale=scale, causal=causal, block_sizes=sizes,
                               interpret=interpret)
    return out[:, :lq]
