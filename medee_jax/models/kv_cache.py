"""The decoder's KV cache for generation: keys and values of every layer, ``[layers, B, S, Hkv, Dh]``, and how many
slots of each row are filled.

Rows are right-aligned to the left: row b's tokens occupy slots ``[0, lengths[b])`` in order (the prompt's real
tokens, then one slot per generated token), so a row's valid keys are exactly ``slot < lengths[b]`` (``kv_lengths``
of ``attention.attention``) and its next token goes to slot ``lengths[b]``. The cache is threaded through the scanned
decoder layers in the scan carry; the writes below are in-place updates of that carry (XLA aliases a while-loop
carry with its update), so a decode step never copies the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


class KVCache(NamedTuple):
    """Keys and values of every decoder layer, and the filled slots per row."""

    k: jax.Array  # [layers, B, S, Hkv, Dh]
    v: jax.Array  # [layers, B, S, Hkv, Dh]
    lengths: jax.Array  # int32 [B]: filled slots of each row (the next token's slot)


def empty_cache(cfg, batch: int, size: int, dtype) -> KVCache:
    """Returns a zero cache of ``size`` slots per row for the decoder config ``cfg`` (a ``TextConfig``)."""
    shape = (cfg.num_hidden_layers, batch, size, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write_prefill(k_cache, v_cache, layer, k, v):
    """Returns the caches with a prefill block's keys/values k, v [B, L, Hkv, Dh] in slots [0, L) of ``layer``
    (one dynamic-update-slice each)."""
    start = (layer, 0, 0, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), start)
    return k_cache, v_cache


def append_token(k_cache, v_cache, layer, lengths, k, v):
    """Returns the caches with one new token per row, k, v [B, 1, Hkv, Dh], written to slot ``lengths[b]`` of row b
    in ``layer`` (a scatter of B rows)."""
    rows = jnp.arange(k.shape[0])
    k_cache = k_cache.at[layer, rows, lengths].set(k[:, 0].astype(k_cache.dtype), mode="promise_in_bounds")
    v_cache = v_cache.at[layer, rows, lengths].set(v[:, 0].astype(v_cache.dtype), mode="promise_in_bounds")
    return k_cache, v_cache


def cache_sharding(mesh, num_kv_heads: int, batch_axes=("data", "fsdp"), head_axis="tensor") -> KVCache:
    """Returns the ``NamedSharding``s of a cache on ``mesh``: rows split over ``batch_axes``, KV heads over
    ``head_axis`` when it divides them (else whole), slots and head dims whole."""
    batch = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1) or None
    heads = head_axis if head_axis in mesh.shape and num_kv_heads % mesh.shape[head_axis] == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(None, batch, None, heads, None))
    return KVCache(kv, kv, NamedSharding(mesh, PartitionSpec(batch)))
