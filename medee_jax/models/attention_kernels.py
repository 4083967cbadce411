"""Attention through fused kernels: cuDNN (``jax.nn.dot_product_attention``), Pallas splash (TPU) and the Pallas
GPU (Triton) flash-attention kernel. Called through ``attention.attention``, which checks what each supports."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .attention_masks import MaskInputs, kernel_segment_ids, pad_masks

# Triton tiles of the Pallas GPU kernel (its own defaults: 128 forward, 32 backward; larger tiles exceed shared memory).
_PALLAS_GPU_MAX_BLOCK = 128
_PALLAS_GPU_MAX_BLOCK_BWD = 64


def jax_nn_attention(q, k, v, *, causal: bool, kv_lengths, scale: float, backend: str):
    """Returns ``jax.nn.dot_product_attention`` with ``is_causal`` and key lengths only (no mask argument: under vmap
    and with GQA, masks are where jax 0.10's cuDNN path has known problems, and a mask would be O(L²) anyway)."""
    if backend == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
        raise ValueError(f"attention: implementation 'cudnn' needs an NVIDIA GPU (backend: {jax.default_backend()})")
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation=backend)


def _round_up(x: int, multiple: int) -> int:
    """Returns the smallest multiple of ``multiple`` that is >= x."""
    return -(-x // multiple) * multiple


def heads_divide(mesh, head_axis, q_heads: int, kv_heads: int) -> bool:
    """Returns whether ``mesh``'s ``head_axis`` splits ``q_heads`` and ``kv_heads`` evenly (True without a mesh, an
    axis, or when the axis has one device)."""
    if mesh is None or head_axis is None or head_axis not in mesh.axis_names:
        return True
    shards = mesh.shape[head_axis]
    return q_heads % shards == 0 and kv_heads % shards == 0


def splash_attention(q, k, v, m: MaskInputs, *, causal, q_offset, scale, block_q, block_k, mesh, batch_axes,
                     head_axis, interpret):
    """Returns attention through the Pallas TPU splash kernel: causal as a static mask, padding and packing as
    segment ids, GQA natively; vmapped over the batch, under ``shard_map`` when ``mesh`` is given."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq = min(block_q, _round_up(lq, 128))
    bk = min(block_k, _round_up(lk, 128))
    lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bk)
    m = pad_masks(m, lq_pad - lq, lk_pad - lk)
    q_ids, kv_ids = kernel_segment_ids(m)
    if q_ids is None:
        q_ids = jnp.zeros((b, lq_pad), jnp.int32)
    qt = jnp.pad((q * scale).astype(q.dtype).transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lq_pad - lq), (0, 0)])
    kt = jnp.pad(k.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
    vt = jnp.pad(v.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, lk_pad - lk), (0, 0)])
    heads = hq
    if mesh is not None and head_axis not in mesh.axis_names:
        head_axis = None  # heads whole
    if mesh is not None and head_axis is not None:
        shards = mesh.shape[head_axis]
        if not heads_divide(mesh, head_axis, hq, hkv):
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

        batch = tuple(a for a in (batch_axes or ()) if a in mesh.axis_names) or None
        heads_spec = P(batch, head_axis, None, None)
        ids_spec = P(batch, None)
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


def pallas_gpu_attention(q, k, v, m: MaskInputs, *, causal, scale, block_q, block_k, interpret):
    """Returns attention through the Pallas GPU (Triton) flash-attention kernel: self-attention only; one segment-id
    array for queries and keys (the kv_segment_ids, padding = segment -1, so q_segment_ids must equal them); K/V heads
    repeated to the query heads (no native GQA)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, lq, hq, dh = q.shape
    hkv = k.shape[2]
    block = max(16, min(_PALLAS_GPU_MAX_BLOCK, block_q, block_k, 1 << (lq - 1).bit_length()))  # a power of 2
    block_bwd = min(block, _PALLAS_GPU_MAX_BLOCK_BWD)
    length = _round_up(lq, block)
    m = pad_masks(m, length - lq, length - lq)
    _, seg = kernel_segment_ids(m)  # one array for queries and keys: padding queries get segment -1 too
    pad = [(0, 0), (0, length - lq), (0, 0), (0, 0)]
    groups = hq // hkv
    k = jnp.pad(jnp.repeat(k, groups, axis=2), pad)
    v = jnp.pad(jnp.repeat(v, groups, axis=2), pad)
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block_bwd, block_kv_dkv=block_bwd,
                                        block_q_dq=block_bwd, block_kv_dq=block_bwd)
    out = pallas_attention.mha(jnp.pad(q, pad), k, v, seg, sm_scale=scale, causal=causal, block_sizes=sizes,
                               interpret=interpret)
    return out[:, :lq]
