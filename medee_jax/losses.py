"""Losses for SFT and the DPO family, as small pure JAX functions.

Conventions (see shared/reference/dpo_and_sft.md):

* `labels[b, t]` is the token that `logits[b, t]` (or `hidden[b, t]`) predicts; the caller shifts. Labels may hold
  ignore values such as -100: they are clamped to a valid index and the mask zeroes their contribution.
* All math runs in at least float32 (bf16 inputs are upcast before any reduction); float64 inputs stay float64.
* Every reduction has a `(sum, count)` form so the trainer can divide once by the *global* count across
  gradient-accumulation steps and hosts instead of averaging means.

Two ways to get per-token log-probs:

* `token_logps(logits, labels)` from materialised logits `[B, L, V]` (the direct path; tests, small models).
* `chunked_token_logps(hidden, lm_head_kernel, labels)` from final hidden states `[B, L, D]` and the LM-head
  kernel `[D, V]`, in sequence x vocab tiles with an online logsumexp and a hand-written backward pass, so neither
  the forward nor the backward program ever holds `[B, L, V]` logits (the training path).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
)
_NEEDS_LENGTHS = ("ipo", "sigmoid_norm")
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair")

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_SEQ_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _compute_dtype(*dtypes) -> jnp.dtype:
    """At least float32; float64 when an input is float64 (and x64 is on)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match"
        )


def _check_logits_labels(logits: Array, labels: Array) -> None:
    if logits.ndim < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} and labels has shape {tuple(labels.shape)}; "
            "expected logits [..., V] with labels [...] (logits.shape[:-1] == labels.shape)"
        )


def _clamp_labels(labels: Array, vocab_size: int) -> Array:
    """Ignore values (e.g. -100) and anything out of range become a valid index; the mask drops them."""
    return jnp.clip(labels, 0, vocab_size - 1).astype(jnp.int32)


def masked_sum_and_count(values: Array, mask: Array) -> tuple[Array, Array]:
    """(Σ values·mask, Σ mask) over all elements, in at least float32. For exact global means: add the pairs
    across accumulation steps and hosts, then divide once."""
    _check_same_shape("values", values, "mask", mask)
    dtype = _compute_dtype(values.dtype)
    mask = mask.astype(dtype)
    return jnp.sum(jnp.where(mask != 0, values.astype(dtype) * mask, 0)), jnp.sum(mask)


def safe_mean(total: Array, count: Array) -> Array:
    """total / count, and 0 when count is 0 (an all-padding batch)."""
    return total / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------------------------------------------
# Direct path: from logits [B, L, V]


def token_logps(logits: Array, labels: Array) -> Array:
    """[B, L] log p(labels[b, t] | logits[b, t]) in float32 (float64 for float64 logits)."""
    _check_logits_labels(logits, labels)
    dtype = _compute_dtype(logits.dtype)
    logits = logits.astype(dtype)  # [B, L, V]
    labels = _clamp_labels(labels, logits.shape[-1])  # [B, L]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # [B, L]
    return target - lse


def sequence_logps(logits: Array, labels: Array, mask: Array) -> Array:
    """[B] Σ_t mask[b, t] · log p(labels[b, t]) — the summed completion log-prob used by DPO."""
    _check_same_shape("labels", labels, "mask", mask)
    logps = token_logps(logits, labels)  # [B, L]
    mask = mask.astype(logps.dtype)
    return jnp.sum(jnp.where(mask != 0, logps * mask, 0), axis=-1)


def sft_loss_sum_count(logits: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
    """(Σ masked token NLL, Σ mask): the pieces of the token-mean cross-entropy."""
    _check_same_shape("labels", labels, "mask", mask)
    return masked_sum_and_count(-token_logps(logits, labels), mask)


def sft_loss(logits: Array, labels: Array, mask: Array) -> Array:
    """Scalar token-mean cross-entropy over the masked (assistant) tokens; 0 when the mask is empty."""
    return safe_mean(*sft_loss_sum_count(logits, labels, mask))


# ----------------------------------------------------------------------------------------------------------------
# Chunked path: from hidden states [B, L, D] and the LM-head kernel [D, V]
#
# The sequence is cut into tiles of `seq_chunk` tokens and the vocabulary into tiles of `vocab_chunk` columns; only
# one [B, seq_chunk, vocab_chunk] block of logits exists at a time. When a chunk size does not divide its axis, the
# last tile starts early (at n - chunk) so it stays in bounds without copying or padding the kernel; the entries it
# shares with the previous tile are masked out (logits -> -inf for vocab columns, cotangent -> 0 for tokens), which
# is the same as padding with masked entries. The backward pass is written by hand (custom_vjp): it keeps only the
# per-token logsumexp [B, L] from the forward pass and recomputes each logits tile.


def _num_chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def _chunk_start(i: Array, n: int, chunk: int) -> Array:
    """Start of tile i: i·chunk, pulled back to n - chunk for the last tile when chunk does not divide n."""
    return jnp.minimum(i * chunk, n - chunk)


def _slice_tile(x: Array, start, sizes) -> Array:
    """x[start : start + sizes] by dynamic slice, in x's dtype.

    XLA:CPU cannot slice bf16: it rewrites a bf16 dynamic-slice as a slice of `convert(x)` and then hoists that
    float32 copy of the whole [D, V] kernel out of the loop, the very buffer this path exists to avoid. So bf16 is
    sliced as its raw 16 bits, with x tied to the (loop-varying) start by an optimization barrier so that nothing
    computed from the whole of x can be hoisted. On GPU/TPU this is a free reinterpretation."""
    if x.dtype == jnp.bfloat16:
        x, _ = jax.lax.optimization_barrier((x, start))
        bits = jax.lax.dynamic_slice(jax.lax.bitcast_convert_type(x, jnp.uint16), start, sizes)
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    return jax.lax.dynamic_slice(x, start, sizes)


def _matmul(spec: str, a: Array, b: Array, dtype, operand_dtype) -> Array:
    """einsum with both operands in ``operand_dtype`` (bf16 for the MXU / tensor cores) and products accumulated
    and returned in the compute dtype ``dtype`` (float32)."""
    a, b = a.astype(operand_dtype), b.astype(operand_dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=dtype).astype(dtype)


def _operand_dtype(hidden, kernel, matmul_dtype):
    """The LM head's matmul operand dtype: ``matmul_dtype`` when given, else the operands' common dtype."""
    return jnp.dtype(matmul_dtype) if matmul_dtype is not None else jnp.result_type(hidden.dtype, kernel.dtype)


def _chunked_forward(hidden, kernel, labels, vocab_chunk, seq_chunk, matmul_dtype=None):
    """Returns (token log-probs [B, L], logsumexp [B, L]) in the compute dtype."""
    B, L, D = hidden.shape
    V = kernel.shape[1]
    dtype = _compute_dtype(hidden.dtype, kernel.dtype)
    operand_dtype = _operand_dtype(hidden, kernel, matmul_dtype)
    labels = _clamp_labels(labels, V)  # [B, L]

    def seq_tile(i, out):
        logps, lses = out  # [B, L], [B, L]
        s0 = _chunk_start(i, L, seq_chunk)
        h = _slice_tile(hidden, (0, s0, 0), (B, seq_chunk, D))  # [B, S, D]
        y = jax.lax.dynamic_slice(labels, (0, s0), (B, seq_chunk))  # [B, S]

        def vocab_tile(j, carry):
            run_max, run_sum, target = carry  # [B, S] each
            v0 = _chunk_start(j, V, vocab_chunk)
            w = _slice_tile(kernel, (0, v0), (D, vocab_chunk))  # [D, C]
            cols = v0 + jnp.arange(vocab_chunk)  # [C]
            is_new = cols >= j * vocab_chunk  # [C] False on columns the previous tile already covered
            logits = jnp.where(is_new, _matmul("bsd,dc->bsc", h, w, dtype, operand_dtype), -jnp.inf)  # [B, S, C]
            hit = is_new & (cols == y[..., None])  # [B, S, C]
            target = target + jnp.sum(jnp.where(hit, logits, 0), axis=-1)
            new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))  # finite: tile 0 has no masked columns
            run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1)
            return new_max, run_sum, target

        zeros = jnp.zeros((B, seq_chunk), dtype)
        init = (jnp.full((B, seq_chunk), -jnp.inf, dtype), zeros, zeros)
        run_max, run_sum, target = jax.lax.fori_loop(0, _num_chunks(V, vocab_chunk), vocab_tile, init)
        lse = run_max + jnp.log(run_sum)  # [B, S]
        # Overlapping tokens of a pulled-back last tile are recomputed with identical values: plain overwrite.
        logps = jax.lax.dynamic_update_slice(logps, target - lse, (0, s0))
        lses = jax.lax.dynamic_update_slice(lses, lse, (0, s0))
        return logps, lses

    init = (jnp.zeros((B, L), dtype), jnp.zeros((B, L), dtype))
    return jax.lax.fori_loop(0, _num_chunks(L, seq_chunk), seq_tile, init)


def _chunked_backward(hidden, kernel, labels, lse, g, vocab_chunk, seq_chunk, matmul_dtype=None):
    """Cotangents (d hidden [B, L, D], d kernel [D, V]) of Σ g · token_logps.

    d logit[b, t, v] = g[b, t] · (1[v = label] − softmax[b, t, v]); vocab tiles outside, sequence tiles inside, so
    each kernel tile's gradient is finished in one pass and written once. The pulled-back last vocab tile goes
    first: its shared columns hold zeros (masked) and are then overwritten by the tile that owns them."""
    B, L, D = hidden.shape
    V = kernel.shape[1]
    dtype = lse.dtype
    operand_dtype = _operand_dtype(hidden, kernel, matmul_dtype)
    labels = _clamp_labels(labels, V)  # [B, L]
    g = g.astype(dtype)  # [B, L]

    num_vocab_tiles = _num_chunks(V, vocab_chunk)

    def vocab_tile(k, carry):
        d_hidden, d_kernel = carry  # [B, L, D] compute dtype, [D, V] kernel dtype
        j = (k + num_vocab_tiles - 1) % num_vocab_tiles  # last tile first
        v0 = _chunk_start(j, V, vocab_chunk)
        w = _slice_tile(kernel, (0, v0), (D, vocab_chunk))  # [D, C]
        cols = v0 + jnp.arange(vocab_chunk)  # [C]
        is_new = cols >= j * vocab_chunk  # [C]

        def seq_tile(i, inner):
            d_hidden, d_w = inner  # [B, L, D], [D, C]
            s0 = _chunk_start(i, L, seq_chunk)
            rows_new = (s0 + jnp.arange(seq_chunk)) >= i * seq_chunk  # [S]
            h = _slice_tile(hidden, (0, s0, 0), (B, seq_chunk, D))  # [B, S, D]
            y = jax.lax.dynamic_slice(labels, (0, s0), (B, seq_chunk))  # [B, S]
            gt = jnp.where(rows_new, jax.lax.dynamic_slice(g, (0, s0), (B, seq_chunk)), 0)  # [B, S]
            lse_t = jax.lax.dynamic_slice(lse, (0, s0), (B, seq_chunk))  # [B, S]
            logits = jnp.where(is_new, _matmul("bsd,dc->bsc", h, w, dtype, operand_dtype), -jnp.inf)  # [B, S, C]
            probs = jnp.exp(logits - lse_t[..., None])  # [B, S, C]; 0 on masked columns
            onehot = (is_new & (cols == y[..., None])).astype(dtype)  # [B, S, C]
            # In the inputs' dtype for the two matmuls, like the cotangent autodiff passes to a bf16 matmul.
            d_logits = (gt[..., None] * (onehot - probs)).astype(operand_dtype)  # [B, S, C]
            d_w = d_w + _matmul("bsd,bsc->dc", h, d_logits, dtype, operand_dtype)  # [D, C] accumulated in fp32
            d_h = _matmul("bsc,dc->bsd", d_logits, w, dtype, operand_dtype)  # [B, S, D]
            prev = jax.lax.dynamic_slice(d_hidden, (0, s0, 0), (B, seq_chunk, D))
            d_hidden = jax.lax.dynamic_update_slice(d_hidden, prev + d_h, (0, s0, 0))
            return d_hidden, d_w

        d_w0 = jnp.zeros((D, vocab_chunk), dtype)
        d_hidden, d_w = jax.lax.fori_loop(0, _num_chunks(L, seq_chunk), seq_tile, (d_hidden, d_w0))
        d_kernel = jax.lax.dynamic_update_slice(d_kernel, d_w.astype(kernel.dtype), (0, v0))
        return d_hidden, d_kernel

    init = (jnp.zeros((B, L, D), dtype), jnp.zeros((D, V), kernel.dtype))
    d_hidden, d_kernel = jax.lax.fori_loop(0, num_vocab_tiles, vocab_tile, init)
    return d_hidden.astype(hidden.dtype), d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_token_logps(hidden, kernel, labels, vocab_chunk, seq_chunk, matmul_dtype):
    return _chunked_forward(hidden, kernel, labels, vocab_chunk, seq_chunk, matmul_dtype)[0]


def _chunked_token_logps_fwd(hidden, kernel, labels, vocab_chunk, seq_chunk, matmul_dtype):
    logps, lse = _chunked_forward(hidden, kernel, labels, vocab_chunk, seq_chunk, matmul_dtype)
    return logps, (hidden, kernel, labels, lse)


def _chunked_token_logps_bwd(vocab_chunk, seq_chunk, matmul_dtype, residuals, g):
    hidden, kernel, labels, lse = residuals
    d_hidden, d_kernel = _chunked_backward(hidden, kernel, labels, lse, g, vocab_chunk, seq_chunk, matmul_dtype)
    return d_hidden, d_kernel, None


_chunked_token_logps.defvjp(_chunked_token_logps_fwd, _chunked_token_logps_bwd)


def chunked_token_logps(
    hidden: Array,
    lm_head_kernel: Array,
    labels: Array,
    *,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    seq_chunk: int = DEFAULT_SEQ_CHUNK,
    matmul_dtype: Any = None,
) -> Array:
    """[B, L] log p(labels[b, t] | hidden[b, t] @ lm_head_kernel), equal to `token_logps(hidden @ kernel, labels)`
    in values and gradients, computed in float32 (float64 for float64 inputs) without ever holding [B, L, V] logits.

    hidden: [B, L, D] final (normed) hidden states; lm_head_kernel: [D, V] ([in, out] layout); labels: [B, L] int.
    Chunks larger than the axis are clamped to it; chunks that do not divide it are fine.

    ``matmul_dtype``: the dtype both matmul operands are cast to, one tile at a time (e.g. bfloat16 for the MXU /
    tensor cores with fp32 master weights: no bf16 copy of the whole kernel is made); products are accumulated in
    float32 (``preferred_element_type``), and so are the logsumexp, the softmax and the kernel's gradient, which
    is returned in the kernel's own dtype. None: the operands' common dtype (fp32 for a bf16 hidden state and an
    fp32 kernel)."""
    if hidden.ndim != 3 or lm_head_kernel.ndim != 2 or hidden.shape[-1] != lm_head_kernel.shape[0]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} and lm_head_kernel has shape {tuple(lm_head_kernel.shape)}; "
            "expected hidden [B, L, D] and lm_head_kernel [D, V]"
        )
    if tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} and labels has shape {tuple(labels.shape)}; expected labels [B, L]"
        )
    if int(vocab_chunk) < 1 or int(seq_chunk) < 1:
        raise ValueError(f"vocab_chunk and seq_chunk must be positive, got {vocab_chunk} and {seq_chunk}")
    L, V = hidden.shape[1], lm_head_kernel.shape[1]
    matmul_dtype = None if matmul_dtype is None else jnp.dtype(matmul_dtype).name  # hashable: a static argument
    return _chunked_token_logps(hidden, lm_head_kernel, labels, min(int(vocab_chunk), V), min(int(seq_chunk), L),
                                matmul_dtype)


def chunked_sequence_logps(
    hidden: Array,
    lm_head_kernel: Array,
    labels: Array,
    mask: Array,
    *,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    seq_chunk: int = DEFAULT_SEQ_CHUNK,
    matmul_dtype: Any = None,
) -> Array:
    """[B] Σ_t mask[b, t] · log p(labels[b, t]) from hidden states; `sequence_logps` without [B, L, V] logits
    (``matmul_dtype``: see `chunked_token_logps`)."""
    _check_same_shape("labels", labels, "mask", mask)
    logps = chunked_token_logps(hidden, lm_head_kernel, labels, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                                matmul_dtype=matmul_dtype)
    mask = mask.astype(logps.dtype)
    return jnp.sum(jnp.where(mask != 0, logps * mask, 0), axis=-1)


def chunked_sft_loss_sum_count(
    hidden: Array,
    lm_head_kernel: Array,
    labels: Array,
    mask: Array,
    *,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    seq_chunk: int = DEFAULT_SEQ_CHUNK,
    matmul_dtype: Any = None,
) -> tuple[Array, Array]:
    """(Σ masked token NLL, Σ mask) from hidden states; `sft_loss_sum_count` without [B, L, V] logits
    (``matmul_dtype``: see `chunked_token_logps`)."""
    _check_same_shape("labels", labels, "mask", mask)
    logps = chunked_token_logps(hidden, lm_head_kernel, labels, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                                matmul_dtype=matmul_dtype)
    return masked_sum_and_count(-logps, mask)


# ----------------------------------------------------------------------------------------------------------------
# DPO family


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def dpo_settings_problems(loss_type: str, beta: Any, label_smoothing: Any, *, prefix: str = "") -> list[str]:
    """Returns what is wrong with a DPO loss setting, one message per problem ([] when valid). The one place these
    rules live: `dpo_loss` raises the first problem, the trainer's config validation lists them all (``prefix``
    "dpo." names the config fields). Non-numeric (traced) beta / label_smoothing are not checked."""
    if loss_type not in DPO_LOSS_TYPES:
        return [f"unknown {prefix}loss_type {loss_type!r}; valid loss types are: {', '.join(DPO_LOSS_TYPES)}"]
    problems = []
    if _is_number(beta) and not beta > 0:
        problems.append(f"{prefix}beta must be > 0, got {beta}")
    if _is_number(label_smoothing):
        eps = float(label_smoothing)
        ls = f"{prefix}label_smoothing"
        if not 0.0 <= eps <= 1.0:
            problems.append(f"{ls} must be in [0, 1], got {eps}")
        elif loss_type == "exo_pair" and not 0.0 < eps < 1.0:
            problems.append(f"{prefix}loss_type 'exo_pair' needs 0 < {ls} < 1 (it takes log ε and log(1 − ε)), "
                            f"got {eps}")
        elif eps > 0 and loss_type not in _USES_LABEL_SMOOTHING:
            problems.append(f"{prefix}loss_type {loss_type!r} has no label smoothing, got {ls}={eps}; it is used "
                            f"only by {', '.join(_USES_LABEL_SMOOTHING)}")
        elif loss_type == "robust" and not eps < 0.5:
            problems.append(f"{prefix}loss_type 'robust' needs {ls} < 0.5 (it divides by 1 − 2ε), got {eps}")
    return problems


def _validate_dpo_args(loss_type, beta, label_smoothing, chosen_lengths, rejected_lengths) -> None:
    if loss_type in DPO_LOSS_TYPES and loss_type in _NEEDS_LENGTHS and (chosen_lengths is None
                                                                        or rejected_lengths is None):
        raise ValueError(
            f"loss_type {loss_type!r} normalises by completion length: pass chosen_lengths and rejected_lengths "
            "(completion token counts per pair)"
        )
    problems = dpo_settings_problems(loss_type, beta, label_smoothing)
    if problems:
        raise ValueError(problems[0])


def _pair_losses(loss_type: str, beta, eps, d_chosen: Array, d_rejected: Array, len_chosen, len_rejected) -> Array:
    """[N] per-pair losses; d_chosen = πc − rc, d_rejected = πr − rr (the table of dpo_and_sft.md)."""
    log_sig = jax.nn.log_sigmoid  # stable: −softplus(−x)
    sig = jax.nn.sigmoid
    margin = d_chosen - d_rejected  # [N] d
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sig(beta * margin) - eps * log_sig(-beta * margin)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * margin)
    if loss_type == "ipo":
        return (d_chosen / len_chosen - d_rejected / len_rejected - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * log_sig(beta * margin) + eps * log_sig(-beta * margin)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        z = beta * margin
        return sig(z) * (log_sig(z) - jnp.log1p(-eps)) + sig(-z) * (log_sig(-z) - jnp.log(eps))
    if loss_type == "bco_pair":
        return -log_sig(beta * d_chosen) - log_sig(-beta * d_rejected)
    if loss_type == "sppo_hard":
        return (d_chosen - 1 / (2 * beta)) ** 2 + (d_rejected + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -log_sig(beta * d_chosen) - 0.5 * log_sig(-beta * d_chosen) - 0.5 * log_sig(-beta * d_rejected)
    if loss_type == "apo_zero":
        return (1 - sig(beta * d_chosen)) + sig(beta * d_rejected)
    if loss_type == "apo_down":
        return sig(beta * d_chosen) + (1 - sig(beta * margin))
    if loss_type == "sigmoid_norm":
        return -log_sig(beta * (d_chosen / len_chosen - d_rejected / len_rejected))
    raise AssertionError(loss_type)  # unreachable: validated


def dpo_loss_sums(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    sft_weight: float = 0.0,
    pair_mask: Array | None = None,
) -> dict[str, tuple[Array, Array]]:
    """The (sum, count) behind every mean `dpo_loss` reports, keyed like its metrics (without `loss`).

    Per-pair quantities are summed over the valid pairs (count = number of valid pairs); `loss/sft` is
    (Σ chosen-token NLL, Σ chosen tokens) = (−Σ πc, Σ |yc|). Add these pairs across accumulation steps and hosts,
    then divide once (`safe_mean`) for exact global metrics. Arguments as in `dpo_loss`."""
    inputs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if chosen_lengths is not None:
        inputs["chosen_lengths"] = chosen_lengths
    if rejected_lengths is not None:
        inputs["rejected_lengths"] = rejected_lengths
    if pair_mask is not None:
        inputs["pair_mask"] = pair_mask
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    first = "policy_chosen_logps"
    for name, value in inputs.items():
        if value.ndim != 1:
            raise ValueError(f"{name} must be one value per pair, shape [N]; got shape {tuple(value.shape)}")
        _check_same_shape(first, inputs[first], name, value)
    _validate_dpo_args(loss_type, beta, label_smoothing, chosen_lengths, rejected_lengths)
    if sft_weight and chosen_lengths is None:
        raise ValueError("sft_weight > 0 needs chosen_lengths (the chosen completion token counts) for the token mean")

    dtype = _compute_dtype(*(inputs[k].dtype for k in inputs if k.endswith("logps")))
    pi_c, pi_r, ref_c, ref_r = (inputs[k].astype(dtype) for k in list(inputs)[:4])  # [N] each
    len_c = None if chosen_lengths is None else inputs["chosen_lengths"].astype(dtype)  # [N]
    len_r = None if rejected_lengths is None else inputs["rejected_lengths"].astype(dtype)  # [N]
    valid = jnp.ones(pi_c.shape, bool) if pair_mask is None else inputs["pair_mask"].astype(bool)  # [N]
    chosen_tokens = None if len_c is None else jnp.sum(jnp.where(valid, len_c, 0))
    # Divisors: at least 1, and 1 on padding pairs, so no NaN reaches the sums (or their gradients).
    if len_c is not None:
        len_c = jnp.where(valid, jnp.maximum(len_c, 1), 1)
    if len_r is not None:
        len_r = jnp.where(valid, jnp.maximum(len_r, 1), 1)

    d_c = pi_c - ref_c  # [N] Δc
    d_r = pi_r - ref_r  # [N] Δr
    per_pair = _pair_losses(loss_type, beta, label_smoothing, d_c, d_r, len_c, len_r)  # [N]

    pairs = jnp.sum(valid.astype(dtype))

    def pair_sum(x):
        return jnp.sum(jnp.where(valid, x, 0)), pairs

    sums = {
        "loss/dpo": pair_sum(per_pair),
        "rewards/chosen": pair_sum(beta * d_c),
        "rewards/rejected": pair_sum(beta * d_r),
        "rewards/margins": pair_sum(beta * (d_c - d_r)),
        "rewards/accuracies": pair_sum((d_c > d_r).astype(dtype)),
        "logps/chosen": pair_sum(pi_c),
        "logps/rejected": pair_sum(pi_r),
    }
    if len_c is not None:
        sums["loss/sft"] = (jnp.sum(jnp.where(valid, -pi_c, 0)), chosen_tokens)
    return sums


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    sft_weight: float = 0.0,
    pair_mask: Array | None = None,
    num_pairs: Array | float | None = None,
    num_chosen_tokens: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics): mean per-pair `loss_type` loss (+ sft_weight · token-mean NLL of the chosen completions).

    Inputs are [N] summed completion log-probs (fp32 or wider; bf16 is upcast). `beta` is applied once.
    `label_smoothing` is ε: conservative DPO for `sigmoid`, noise rate for `robust`, required ε > 0 for `exo_pair`.
    `chosen_lengths` / `rejected_lengths` [N] are completion token counts: needed by `ipo` and `sigmoid_norm`
    (length normalisation) and by the SFT term, whose NLL sum is −Σ πc over Σ |yc| tokens (πc is the chosen
    completion's summed log-prob, so no extra forward pass is needed). `pair_mask` [N] drops padding pairs.

    Gradient accumulation / many hosts: pass the global `num_pairs` (valid pairs in the whole optimizer step) and
    `num_chosen_tokens` (Σ |yc| over the whole step); each microbatch's loss is then its sum over those global
    counts, so the sum of microbatch losses (and of their gradients) is exactly the global mean. The other metrics
    are local means (metrics["loss"] is the returned loss); use `dpo_loss_sums` to combine them exactly.

    metrics: `loss`, `loss/dpo`, `rewards/chosen` (mean βΔc), `rewards/rejected` (mean βΔr), `rewards/margins`
    (mean β(Δc − Δr)), `rewards/accuracies` (mean 1[Δc > Δr]), `logps/chosen`, `logps/rejected` (mean summed
    log-probs), and `loss/sft` when chosen_lengths is given."""
    sums = dpo_loss_sums(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        sft_weight=sft_weight,
        pair_mask=pair_mask,
    )
    metrics = {name: safe_mean(total, count) for name, (total, count) in sums.items()}
    dpo_total, local_pairs = sums["loss/dpo"]
    loss = safe_mean(dpo_total, local_pairs if num_pairs is None else num_pairs)
    if sft_weight:
        nll_total, local_tokens = sums["loss/sft"]
        tokens = local_tokens if num_chosen_tokens is None else num_chosen_tokens
        loss = loss + sft_weight * safe_mean(nll_total, tokens)
    metrics["loss"] = loss
    return loss, metrics


__all__ = [
    "DEFAULT_SEQ_CHUNK",
    "DEFAULT_VOCAB_CHUNK",
    "DPO_LOSS_TYPES",
    "chunked_sequence_logps",
    "chunked_sft_loss_sum_count",
    "chunked_token_logps",
    "dpo_loss",
    "dpo_loss_sums",
    "masked_sum_and_count",
    "safe_mean",
    "sequence_logps",
    "sft_loss",
    "sft_loss_sum_count",
    "token_logps",
]
