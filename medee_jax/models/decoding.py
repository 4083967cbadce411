"""The device programs of generation: a prefill, then a decode loop, each jitted once per shape bucket.

``prefill`` encodes the images, runs the prompt block [B, Lp] through the decoder into a fresh KV cache of S slots
(``kv_cache.py``) and picks token 0 from each row's last real position. ``decode`` is one ``lax.while_loop``: feed the
last token of every row at its own cache slot and rotary position, pick the next token (``sampling.py``), apply the
thinking budget and stop tokens, and stop when every row is done or ``max_new_tokens`` tokens are out. The cache is
donated to ``decode`` and threaded through the loop carry and the scanned layers, so each step updates it in place.

Shapes are static per (B, Lp, S, vision units); everything data-dependent (positions, scatter indices, which slot is
whose) comes from the host (``generate.py``).

What the compiled decode program does with the cache (XLA:CPU, jax 0.10; checked on the optimized HLO and its buffer
assignment, ``tests/test_generate.py::test_decode_updates_the_donated_cache_in_place``): the donated K and V inputs
are aliased to the outputs (``input_output_alias``); inside, the per-row token write of every layer is one ``scatter``
whose result shares one buffer with the donated input, the layer scan's carry, the decode loop's carry and the output,
so no step copies the cache. What does move per layer and step is the attention's read of that layer's K/V
``[B, S, Hkv, Dh]``, which XLA materialises transposed to ``[B, Hkv, S, Dh]`` for the heads-first matmuls (one read
of the slice, the same traffic order as the attention itself).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .kv_cache import KVCache, cache_sharding, empty_cache
from .sampling import SamplingParams, next_tokens


class DecodeSettings(NamedTuple):
    """Static settings of one generation program (hashable: part of the jit cache key)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    greedy: bool
    top_k: int
    use_top_p: bool
    thinking_budget: int  # < 0: no budget
    think_start: tuple[int, ...]
    think_end: tuple[int, ...]
    mrope: bool  # positions [3, B, L] (else [B, L])
    implementation: str  # attention implementation (see attention.py)
    mesh: object  # a jax.sharding.Mesh or None
    output_logits: bool  # keep every step's logits [B, T, V] (tests)


class DecodeState(NamedTuple):
    """Per-row progress of the decode loop (every field [B, ...] except ``step``)."""

    tokens: jax.Array  # int32 [B, T]: new tokens, pad after a row's eos
    step: jax.Array  # int32 []: index of the last token written
    done: jax.Array  # bool [B]: the row emitted an eos (or is batch padding)
    num_tokens: jax.Array  # int32 [B]: tokens written before the row was done (its eos included)
    next_position: jax.Array  # int32 [B]: rotary position of new token 0 (max prompt position + 1)
    keys: jax.Array  # PRNG keys [B]
    think_count: jax.Array  # int32 [B]: tokens generated inside an open <think> block, -1 outside
    force_pos: jax.Array  # int32 [B]: index into think_end being forced, -1 when not forcing
    window: jax.Array  # int32 [B, W]: the last W tokens (prompt tail, then generated), to spot the think markers
    logits: jax.Array | None  # fp32 [B, T, V] with ``output_logits``


def _ends_with(window, marker: tuple[int, ...]):
    """Returns bool [B]: whether each row of ``window`` [B, W] ends with the token sequence ``marker``."""
    if not marker:
        return jnp.zeros(window.shape[:1], bool)
    return jnp.all(window[:, -len(marker):] == jnp.asarray(marker, jnp.int32)[None], axis=1)


def choose(logits, state: DecodeState, step, settings: DecodeSettings, temperature, top_p) -> DecodeState:
    """Returns ``state`` with token ``step`` of every row chosen from ``logits`` [B, V] and written."""
    sampling = SamplingParams(settings.greedy, settings.top_k, settings.use_top_p, temperature, top_p)
    token = next_tokens(logits, sampling, state.keys, step)  # [B]
    think_count, force_pos, window = state.think_count, state.force_pos, state.window
    if settings.thinking_budget >= 0:
        end = jnp.asarray(settings.think_end, jnp.int32)
        force = jnp.where((force_pos < 0) & (think_count >= settings.thinking_budget), 0, force_pos)
        token = jnp.where(force >= 0, end[jnp.clip(force, 0, len(settings.think_end) - 1)], token)
        force_pos = jnp.where((force >= 0) & (force + 1 < len(settings.think_end)), force + 1, -1)
        window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
        think_count = jnp.where(think_count >= 0, think_count + 1, -1)
        think_count = jnp.where(_ends_with(window, settings.think_start), 0, think_count)
        think_count = jnp.where(_ends_with(window, settings.think_end), -1, think_count)
    token = jnp.where(state.done, settings.pad_id, token)
    is_eos = jnp.isin(token, jnp.asarray(settings.eos_ids, jnp.int32)) if settings.eos_ids else False
    logits_out = state.logits
    if logits_out is not None:
        logits_out = jax.lax.dynamic_update_slice_in_dim(logits_out, logits[:, None].astype(jnp.float32), step, 1)
    return state._replace(
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], step, axis=1),
        step=jnp.asarray(step, jnp.int32), done=state.done | is_eos,
        num_tokens=state.num_tokens + (~state.done).astype(jnp.int32),
        think_count=think_count, force_pos=force_pos, window=window, logits=logits_out)


def _constrain_cache(cache: KVCache, settings: DecodeSettings, num_kv_heads: int) -> KVCache:
    if settings.mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_sharding(settings.mesh, num_kv_heads))


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "cache_size"))
def prefill(graphdef, params, arrays: dict, initial: dict, temperature, top_p, *, settings: DecodeSettings,
            cache_size: int):
    """Returns (KV cache with the prompts, DecodeState with token 0 chosen).

    arrays: input_ids, attention_mask [B, Lp] (right-padded), positions [3, B, Lp] or [B, Lp], last_index [B]
    (each row's last real token), and with images pixel_values, vision (the family's layout arrays) and
    image_token_index. initial: next_position, keys, done, think_count, window (see DecodeState). temperature,
    top_p: fp32 scalars (used when sampling).
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config.text
    features = None
    if "pixel_values" in arrays:
        features = model.encode_images(arrays["pixel_values"], **arrays["vision"])
    embeds = model.embed(arrays["input_ids"], features, arrays.get("image_token_index"))  # [B, Lp, D]
    b = embeds.shape[0]
    cache = _constrain_cache(empty_cache(cfg, b, cache_size, model.language_model.dtype), settings,
                             cfg.num_key_value_heads)
    hidden, cache = model.language_model(embeds, arrays["positions"], arrays["attention_mask"], cache=cache,
                                         implementation=settings.implementation, mesh=settings.mesh)
    last = hidden[jnp.arange(b), arrays["last_index"]]  # [B, D]
    logits = model.logits(last[:, None])[:, 0]  # [B, V] fp32
    t = settings.max_new_tokens
    state = DecodeState(
        tokens=jnp.full((b, t), settings.pad_id, jnp.int32), step=jnp.zeros((), jnp.int32), done=initial["done"],
        num_tokens=jnp.zeros((b,), jnp.int32), next_position=initial["next_position"], keys=initial["keys"],
        think_count=initial["think_count"], force_pos=jnp.full((b,), -1, jnp.int32), window=initial["window"],
        logits=jnp.zeros((b, t, logits.shape[-1]), jnp.float32) if settings.output_logits else None)
    return _constrain_cache(cache, settings, cfg.num_key_value_heads), choose(logits, state, 0, settings, temperature, top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"), donate_argnames=("cache",))
def decode(graphdef, params, cache: KVCache, state: DecodeState, temperature, top_p, *, settings: DecodeSettings):
    """Returns (the final cache, the final DecodeState): tokens 1.. until every row is done or T tokens are out.
    ``cache`` is donated (updated in place)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config.text

    def cond(carry):
        _, s = carry
        return (s.step + 1 < settings.max_new_tokens) & ~jnp.all(s.done)

    def body(carry):
        cache, s = carry
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.step, axis=1)  # [B, 1]: the token just chosen
        pos = (s.next_position + s.step)[:, None]  # [B, 1]
        positions = jnp.broadcast_to(pos[None], (3, *pos.shape)) if settings.mrope else pos
        hidden, cache = model.language_model(model.embed(last), positions, jnp.ones_like(last), cache=cache,
                                             implementation=settings.implementation, mesh=settings.mesh)
        logits = model.logits(hidden)[:, 0]  # [B, V] fp32
        cache = _constrain_cache(cache, settings, cfg.num_key_value_heads)
        return cache, choose(logits, s, s.step + 1, settings, temperature, top_p)

    return jax.lax.while_loop(cond, body, (cache, state))
