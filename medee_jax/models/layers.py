"""Pure building blocks shared by the text decoder and the vision tower.

Parameters live in NNX modules (decoder.py, the families' model.py); the math here is plain functions of arrays so the
layer stacks can be scanned with ``jax.lax.scan`` and rematerialised with ``jax.checkpoint``.
Kernels are stored ``[in, out]`` (the transpose of torch's ``Linear.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Additive mask value for disallowed attention (finite, like transformers' eager path, so that a fully masked
# row of a padding query gives a uniform distribution instead of NaN).
MASK_VALUE = float(np.finfo(np.float32).min)


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str, ...], dtype, init: str = "normal", std: float = 0.02):
    """Returns an ``nnx.Param`` of ``shape`` tagged with logical ``axes`` ("normal", "zeros" or "ones" init).

    With ``rngs=None`` only "zeros"/"ones" are allowed (used under ``nnx.eval_shape`` for checkpoint loading).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def rms_norm(x, weight, eps: float):
    """Returns RMSNorm(x) * weight, normalising in fp32 and casting back before the weight (as transformers does)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def layer_norm(x, weight, bias, eps: float):
    """Returns LayerNorm(x) * weight + bias (biased variance over the last axis), computed in fp32 and cast back to
    x's dtype, as torch's layer_norm computes it."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def linear(x, kernel, bias=None, dtype=None):
    """Returns x @ kernel (+ bias) computed in ``dtype`` (default: x's dtype)."""
    dtype = dtype or x.dtype
    y = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def swiglu(x, gate_kernel, up_kernel, down_kernel, gate_bias=None, up_bias=None, down_bias=None):
    """Returns down(silu(gate(x)) * up(x))."""
    gate = linear(x, gate_kernel, gate_bias)
    up = linear(x, up_kernel, up_bias)
    return linear(jax.nn.silu(gate) * up, down_kernel, down_bias)


def rotate_half(x):
    """Returns concat(-x2, x1) for x = concat(x1, x2) along the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Returns x rotated by (cos, sin) in fp32, cast back to x's dtype. x: [..., S, H, Dh], cos/sin: [..., S, Dh]."""
    x32 = x.astype(jnp.float32)
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def dot_product_attention(q, k, v, allowed):
    """Returns softmax(q k^T / sqrt(Dh) + mask) v with grouped KV heads.

    q: [B, Lq, Hq, Dh]; k, v: [B, Lk, Hkv, Dh]; allowed: bool broadcastable to [B, Lq, Lk].
    Softmax in fp32; output [B, Lq, Hq, Dh] in q's dtype. The matmuls run heads-first ([B, Hkv, G*Lq, Dh] against
    [B, Hkv, Lk, Dh]): one batched matmul per KV head with the G query heads of its group stacked along the rows
    (measured ~16% faster for the decoder forward on XLA:CPU than contracting in the [B, L, H, Dh] layout).
    """
    b, lq, hq, dh = q.shape
    hkv, lk = k.shape[2], k.shape[1]
    groups = hq // hkv
    qh = q.reshape(b, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * lq, dh)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, Dh]
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh).astype(jnp.float32) * (dh**-0.5)  # [B, Hkv, G*Lq, Lk]
    scores = jnp.where(allowed[:, None, None, :, :], scores.reshape(b, hkv, groups, lq, lk), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, groups * lq, lk)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, vh)  # [B, Hkv, G*Lq, Dh]
    return out.reshape(b, hkv, groups, lq, dh).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, dh)


# Names the decoder layer gives its intermediate tensors (``jax.ad_checkpoint.checkpoint_name``, see
# models/decoder.py) so remat policies can choose what to keep for the backward pass:
#   q_proj, k_proj, v_proj  the q/k/v projection outputs [B, L, H*Dh] (before rotary)
#   attention               the attention output [B, L, Hq, Dh] (before o_proj)
#   attention_out           the o_proj output [B, L, D]
#   mlp_in                  the MLP's gate and up projection outputs [B, L, I] (two tensors)
#   mlp_out                 the MLP's down projection output [B, L, D]
REMAT_NAMES = ("q_proj", "k_proj", "v_proj", "attention", "attention_out", "mlp_in", "mlp_out")

# Named tensors each policy keeps (besides every layer's input, the scan carry, which is always kept; never the
# decoder's per-layer weight casts, "layer_weights", which would stack into a compute-dtype copy of the stack).
_SAVED_NAMES = {
    "minimal": ("q_proj", "k_proj", "v_proj", "attention_out", "mlp_in"),
    "save_attention": ("q_proj", "k_proj", "v_proj", "attention", "attention_out"),
    "save_qkv_proj": ("q_proj", "k_proj", "v_proj"),
}

# Remat policies of the decoder layer (and the vision towers' blocks, which name nothing: there every policy but
# "none" recomputes the whole block). In every policy but "none" the attention's forward runs again in the backward
# pass: its own residuals (probabilities, or the online softmax's log-sum-exp) are never kept, which keeps activation
# memory O(L) whatever the attention implementation. What each keeps, and what the backward pass recomputes
# (training/metrics.REMAT_RECOMPUTE counts the recomputed matmuls for HFU):
#   none            every activation kept; nothing recomputed.
#   full            only each layer's input kept; the layer's forward runs again (the down projection excepted:
#                   its output is never needed by the backward pass).
#   minimal         the outputs of the weight matmuls the backward pass needs (q/k/v, o_proj, MLP gate/up): only
#                   norms, rotary, SwiGLU's elementwise work and the attention are recomputed. The successor of
#                   "dots_no_batch"; the most memory of the named policies.
#   save_attention  the attention half of the layer (q/k/v, the attention output, o_proj's output); the MLP's
#                   gate/up projections and the attention are recomputed.
#   save_qkv_proj   the q/k/v projections only; o_proj, the MLP's gate/up and the attention are recomputed.
#   <policy>_offload (minimal, save_attention, save_qkv_proj) the same tensors, moved to pinned host memory after
#                   the forward and back for the backward pass (jax.checkpoint_policies
#                   .save_and_offload_only_these_names): device memory of "full" with the recompute of <policy>, on
#                   platforms whose compiler supports host offload (TPU, GPU); elsewhere compiling fails with
#                   XLA's error.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    **{name: jax.checkpoint_policies.save_only_these_names(*saved) for name, saved in _SAVED_NAMES.items()},
    **{f"{name}_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(saved), offload_src="device",
        offload_dst="pinned_host") for name, saved in _SAVED_NAMES.items()},
}

# Retired policies -> what replaces them. "dots" kept every matmul output, the [B, H, L, L] attention scores included.
RETIRED_REMAT_POLICIES = {
    "dots": "minimal (the weight matmuls' outputs; the O(L^2) attention scores are no longer kept) or save_attention",
    "dots_no_batch": "minimal (the same tensors, kept by name)",
}


def check_remat_policy(policy: str) -> None:
    """Raises ValueError naming the valid policies (and the replacement of a retired one) for an unknown policy."""
    if policy in RETIRED_REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} was retired; use {RETIRED_REMAT_POLICIES[policy]}")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}")


def maybe_remat(fn, policy: str):
    """Returns ``fn`` wrapped in ``jax.checkpoint`` with the named policy (see REMAT_POLICIES), or ``fn`` for "none"."""
    check_remat_policy(policy)
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
