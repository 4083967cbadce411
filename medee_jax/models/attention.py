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

Implementations (``implementation=``; the code of blockwise is in attention_blockwise.py, of the kernels in
attention_kernels.py, the mask predicate in attention_masks.py):

| name         | memory     | where                 | supports                                                      |
| ------------ | ---------- | --------------------- | ------------------------------------------------------------- |
| `reference`  | O(Lq·Lk)   | everywhere            | everything; today's dense math (transformers eager)          |
| `blockwise`  | O(Lq + Lk) | everywhere (pure JAX) | everything; online softmax over key blocks, custom VJP        |
| `cudnn`      | O(L)       | NVIDIA GPU, bf16/fp16 | causal (q_offset 0), kv_lengths (right padding), GQA          |
| `splash`     | O(L)       | TPU (Pallas)          | causal (static q_offset), padding and segment ids, GQA        |
| `pallas_gpu` | O(L)       | GPU (Pallas/Triton)   | self-attention (Lq == Lk, q_offset 0): causal, padding and    |
|              |            |                       | segment ids; GQA by repeating K/V heads (G× K/V memory)       |
| `auto`       |            |                       | TPU → splash, GPU → cudnn, when they support the arguments    |
|              |            |                       | (splash: and the mesh's head axis divides the heads), else    |
|              |            |                       | blockwise; CPU → reference below                              |
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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .attention_blockwise import blockwise_attention
from .attention_kernels import heads_divide, jax_nn_attention, pallas_gpu_attention, splash_attention
from .attention_masks import block_allowed, mask_inputs

# Additive mask value of the reference path (finite, as transformers' eager attention: a fully masked row gives a
# uniform distribution instead of NaN).
MASK_VALUE = float(np.finfo(np.float32).min)

# The mesh axes a batch is split over, and the one heads are split over (``training/mesh.py`` builds its mesh
# from them).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

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


def attention(q, k, v, *, causal: bool, kv_mask=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
              q_branch_ids=None, kv_branch_ids=None, q_offset=0, scale: float | None = None,
              implementation: str = "auto", block_q: int | None = None, block_k: int | None = None,
              mesh=None, batch_axes=BATCH_AXES, head_axis=HEAD_AXIS, interpret: bool = False):
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
      the caller's shard_map). ``mesh`` may be a ``jax.sharding.AbstractMesh`` (the train step's context mesh).
      Inside a ``vmap`` with ``spmd_axis_name`` (the train step's map over data shards) pass ``batch_axes=()``: the
      vmap adds its own axes to the shard_map's specs. ``auto`` runs blockwise where the mesh's ``head_axis`` does
      not divide the query and KV heads (splash would repeat every head on each of its devices).
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
    static_offset = isinstance(q_offset, (int, np.integer))
    features = AttentionFeatures(causal=causal, kv_mask=kv_mask is not None, kv_lengths=kv_lengths is not None,
                                 segments=q_segment_ids is not None, branches=q_branch_ids is not None,
                                 static_offset=static_offset, zero_offset=static_offset and int(q_offset) == 0,
                                 same_length=lq == lk, dtype=jnp.dtype(q.dtype), head_dim=dh, num_scores=lq * lk)
    # The platform the code is compiled for: the mesh's devices (ahead-of-time compilation for a TPU topology on a
    # CPU host), else the default backend.
    platform = mesh_platform(mesh)
    default_block = DEFAULT_BLOCK_CPU if platform == "cpu" else DEFAULT_BLOCK_ACCELERATOR
    block_q = block_q or default_block
    block_k = block_k or default_block
    if implementation == "auto":
        implementation = choose_implementation(features, platform)
        if implementation == "splash" and not heads_divide(mesh, head_axis, hq, k.shape[2]):
            implementation = "blockwise"
    else:
        missing = unsupported(implementation, features)
        if missing:
            raise ValueError(f"attention: implementation {implementation!r} does not support {missing}; "
                             "use 'blockwise' (or 'auto')")

    if implementation == "cudnn":
        return jax_nn_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, backend="cudnn")
    masks = mask_inputs(b, lq, lk, kv_mask=kv_mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, q_branch_ids=q_branch_ids, kv_branch_ids=kv_branch_ids,
                         q_offset=q_offset)
    if implementation == "reference":
        return dense_attention(q, k, v, block_allowed(masks, causal, 0, lq, 0, lk), scale=scale)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, masks, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
    if implementation == "splash":
        if platform != "tpu" and not interpret:
            raise ValueError(f"attention: implementation 'splash' needs a TPU (this program is compiled for "
                             f"{platform}); use 'auto' or 'blockwise' (tests: interpret=True)")
        return splash_attention(q, k, v, masks, causal=causal, q_offset=int(q_offset), scale=scale, block_q=block_q,
                       block_k=block_k, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis, interpret=interpret)
    return pallas_gpu_attention(q, k, v, masks, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
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


def implementation_without_mesh(implementation: str) -> str:
    """Returns the implementation to run for a call that is given no mesh: "auto" on a TPU backend with more than one
    device becomes "blockwise" (splash must run under ``shard_map`` over the mesh the program is compiled for, and a
    Pallas kernel cannot be partitioned by the compiler); on a single TPU chip, and anything else, is returned as it
    is."""
    if implementation == "auto" and jax.default_backend() == "tpu" and jax.device_count() > 1:
        return "blockwise"
    return implementation


def mesh_platform(mesh) -> str:
    """Returns the platform ("cpu", "gpu", "tpu") a program for ``mesh`` is compiled for: its devices' (a concrete
    ``Mesh``, or an ``AbstractMesh`` made from one, as the train step's context mesh), else the default backend."""
    if mesh is None:
        return jax.default_backend()
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = mesh.abstract_device
        return jax.default_backend() if device is None else device.platform
    return mesh.devices.flat[0].platform


def dense_mask(batch: int, q_len: int, k_len: int, *, causal: bool, kv_mask=None, kv_lengths=None,
               q_segment_ids=None, kv_segment_ids=None, q_branch_ids=None, kv_branch_ids=None, q_offset=0):
    """Returns the bool ``[B, Lq, Lk]`` mask that ``attention`` applies (for the reference path and tests)."""
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if kv_branch_ids is None:
        kv_branch_ids = q_branch_ids
    m = mask_inputs(batch, q_len, k_len, kv_mask=kv_mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids, q_branch_ids=q_branch_ids, kv_branch_ids=kv_branch_ids,
                     q_offset=q_offset)
    return block_allowed(m, causal, 0, q_len, 0, k_len)


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
