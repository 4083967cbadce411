"""Choosing the next token from fp32 logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow transformers' logits warpers, applied in its order (``GenerationMixin._get_logits_processor``):
``TemperatureLogitsWarper`` (logits / T), ``TopKLogitsWarper`` (drop logits below the k-th largest; ties kept),
``TopPLogitsWarper`` (sort ascending, drop the tokens whose cumulative probability is ≤ 1 - p, always keep the most
likely). Dropped tokens get -inf, then one token is drawn from the softmax of what is left.

Every row draws with its own key (``row_keys`` [B] typed PRNG keys, folded with the step), so a row's samples depend
on its seed and its own logits, not on the other rows of the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """What ``next_tokens`` needs. ``greedy`` and ``top_k`` are static (they shape the program); temperature and
    top_p are arrays, so changing them does not recompile."""

    greedy: bool
    top_k: int  # 0 = no top-k filter
    use_top_p: bool  # False when top_p >= 1
    temperature: jax.Array | float  # fp32 scalar, > 0 when sampling
    top_p: jax.Array | float  # fp32 scalar in (0, 1]


def filter_logits(logits, temperature, top_k: int, top_p, use_top_p: bool):
    """Returns fp32 logits [B, V] scaled by 1/temperature, with the tokens top-k and top-p remove set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        order = jnp.argsort(logits, axis=-1)  # ascending, as torch.sort(descending=False)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1.0 - top_p).at[:, -1].set(False)  # keep at least the most likely token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def next_tokens(logits, params: SamplingParams, row_keys, step):
    """Returns int32 [B]: the argmax of ``logits`` [B, V] when greedy, else one draw per row from the filtered
    softmax with key ``fold_in(row_keys[b], step)``."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.use_top_p)
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def row_keys(seed: int, row_seeds, batch: int):
    """Returns typed PRNG keys [B]: ``key(row_seeds[b])`` when per-row seeds are given, else ``fold_in(key(seed),
    b)`` (row b of a call with ``seed``)."""
    if row_seeds is not None:
        return jax.vmap(jax.random.key)(jnp.asarray(row_seeds, jnp.uint32))
    base = jax.random.key(seed)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch, dtype=jnp.uint32))
