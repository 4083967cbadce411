"""Generation: ``generate(model, input_ids, attention_mask, ...)`` -> new tokens [B, max_new_tokens], and
``generate_with_info`` with each row's finish reason and length.

Host side (numpy, this module): each row's real tokens are moved to the left (the cache layout of ``kv_cache.py``,
whatever padding the caller used), the prompt block is padded to a length bucket (``PROMPT_BUCKETS``) and the images'
vision units (Qwen patches, InternVL tiles) to a unit bucket, so a run compiles a handful of programs; the family
computes rotary positions (``ImageInputs.positions``: M-RoPE for Qwen2.5-VL, 1-D for InternVL); each row continues
at its max prompt position + 1 (transformers' ``rope_deltas``: decode position = prompt length + t + (max prompt
position + 1 - prompt length)). Device side: ``decoding.prefill`` and ``decoding.decode`` (one while loop).

Importing this module imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Prompt-block lengths: 16 * 2^k * (1, 1.25, 1.5, 1.75) (at most a fifth of a block is bucket padding; four
# buckets per doubling of the prompt length).
PROMPT_BUCKET_MIN = 16
FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What ``generate_with_info`` returns."""

    tokens: np.ndarray  # int [B, max_new_tokens]: new tokens, pad_token_id after a row's first eos
    lengths: np.ndarray  # int [B]: new tokens of each row up to and including its eos
    finish_reasons: list[str]  # per row: "stop" (an eos) or "length" (max_new_tokens without one)
    logits: np.ndarray | None = None  # fp32 [B, max_new_tokens, V] with output_logits=True (steps after done: junk)


def bucket_length(n: int, minimum: int = PROMPT_BUCKET_MIN, multiple: int = 1) -> int:
    """Returns the smallest bucket >= n among minimum * 2^k * (1, 1.25, 1.5, 1.75), rounded up to ``multiple``."""
    size = minimum
    while True:
        for quarters in (4, 5, 6, 7):
            candidate = -(-(size * quarters // 4) // multiple) * multiple
            if candidate >= n:
                return candidate
        size *= 2


def _eos_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(x) for x in eos_token_id)


def _check_sampling(max_new_tokens, temperature, top_p, top_k, thinking_budget, think_start_ids, think_end_ids):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if thinking_budget is not None:
        if thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0 tokens, got {thinking_budget}")
        if not think_start_ids or not think_end_ids:
            raise ValueError("thinking_budget needs think_start_ids and think_end_ids (the token ids of <think> and "
                             "</think> in this tokenizer)")


def left_aligned(input_ids, attention_mask, length: int, pad_token_id: int):
    """Returns (ids [B, length], mask [B, length], lengths [B]): each row's real tokens first, in order, then pad."""
    ids = np.full((input_ids.shape[0], length), pad_token_id, np.int32)
    mask = np.zeros((input_ids.shape[0], length), np.int32)
    lengths = attention_mask.astype(bool).sum(axis=1)
    for b in range(input_ids.shape[0]):
        ids[b, :lengths[b]] = input_ids[b, attention_mask[b].astype(bool)]
        mask[b, :lengths[b]] = 1
    return ids, mask, lengths


def _think_state(ids, lengths, budget, start: tuple[int, ...], end: tuple[int, ...]):
    """Returns (think_count [B], window [B, W]) for prompts ending inside an open <think> block (count = tokens after
    the marker) or not (-1), and the prompts' last W tokens."""
    width = max(len(start), len(end), 1)
    window = np.full((ids.shape[0], width), -1, np.int32)
    count = np.full((ids.shape[0],), -1, np.int32)
    for b, n in enumerate(lengths):
        row = ids[b, :n].tolist()
        tail = row[-width:]
        window[b, width - len(tail):] = tail
        if budget is None:
            continue

        def last(marker):
            hits = [i for i in range(len(row) - len(marker) + 1) if tuple(row[i:i + len(marker)]) == marker]
            return hits[-1] + len(marker) if hits else -1

        opened, closed = last(start), last(end)
        if opened >= 0 and opened > closed:
            count[b] = n - opened
    return count, window


def _image_arrays(model, family, ids, mask, pixel_values, image_grid_thw):
    """Returns the prefill's image arrays (pixel_values padded to a unit bucket, the family's layout, the scatter
    index) and the rotary positions of the left-aligned batch."""
    from .vlm import scatter_index

    cfg = model.config
    images = family.image_inputs(cfg)
    if pixel_values is None:
        if np.any((ids == cfg.image_token_id) & (mask != 0)):
            raise ValueError("the prompts hold image tokens but no pixel_values were given")
        return {}, images.positions(ids, np.zeros((0, 3), np.int64) if image_grid_thw is None else image_grid_thw,
                                    mask)
    pixel_values = np.asarray(pixel_values, np.float32)
    units = pixel_values.shape[0]
    bucket = bucket_length(units, minimum=4 * images.unit_multiple, multiple=images.unit_multiple)
    if images.position_axes and image_grid_thw is None:
        raise ValueError(f"{family.name}: pixel_values given without image_grid_thw")
    if not images.position_axes and image_grid_thw is not None:
        raise ValueError(f"{family.name} takes no image_grid_thw: pixel_values [tiles, 3, H, W] are enough")
    info = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    padded = np.concatenate([pixel_values, images.empty_pixels(bucket - units)]) if bucket > units else pixel_values
    index = scatter_index(ids, mask, cfg.image_token_id, images.num_features(bucket), images.num_features(units))
    arrays = {"pixel_values": padded, "vision": images.layout(info, bucket) if info is not None else {},
              "image_token_index": index}
    return arrays, images.positions(ids, info, mask)


def generate_with_info(model, input_ids, attention_mask, *, pixel_values=None, image_grid_thw=None,
                       max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       eos_token_id=None, pad_token_id: int = 0, seed: int = 0, row_seeds=None,
                       thinking_budget: int | None = None, think_start_ids: Sequence[int] | None = None,
                       think_end_ids: Sequence[int] | None = None, max_cache_length: int | None = None,
                       mesh=None, attention_implementation: str = "auto",
                       output_logits: bool = False) -> GenerationOutput:
    """Returns a ``GenerationOutput``: new tokens [B, max_new_tokens], lengths and finish reasons per row.

    ``generate``'s arguments, and: row_seeds [B] (ints < 2^32): row b samples with its own seed, whatever the rest
    of the batch (default: row b of ``seed``); thinking_budget: after that many tokens inside an open <think> block
    (``think_start_ids`` ... ``think_end_ids``, token id sequences) the ``think_end_ids`` are forced; a prompt ending
    inside an open block counts the tokens after its marker; max_cache_length: the longest row (prompt +
    max_new_tokens) allowed (default: the decoder's max_position_embeddings), checked before any compute; mesh: the
    device mesh (default: the mesh of the model's parameters when they are sharded), rows split over data x fsdp;
    attention_implementation: see ``attention.attention``; output_logits: also return every step's fp32 logits.
    """
    from .families import family_of
    from .vlm import check_token_batch

    _check_sampling(max_new_tokens, temperature, top_p, top_k, thinking_budget, think_start_ids, think_end_ids)
    family = family_of(model)
    cfg = model.config
    input_ids, attention_mask = check_token_batch(input_ids, attention_mask)
    batch = input_ids.shape[0]
    lengths = attention_mask.astype(bool).sum(axis=1)
    if batch == 0:
        raise ValueError("generate: empty batch")
    if np.any(lengths == 0):
        raise ValueError(f"generate: rows {np.flatnonzero(lengths == 0).tolist()} have no tokens (attention_mask 0)")
    limit = cfg.text.max_position_embeddings if max_cache_length is None else int(max_cache_length)
    too_long = np.flatnonzero(lengths + max_new_tokens > limit)
    if too_long.size:
        b = int(too_long[0])
        raise ValueError(f"generate: row {b} has {int(lengths[b])} prompt tokens + max_new_tokens {max_new_tokens} = "
                         f"{int(lengths[b]) + max_new_tokens} > the cache limit {limit} ({too_long.size} row(s) too "
                         "long; shorten the prompt, lower max_new_tokens or raise max_cache_length)")
    if row_seeds is not None:
        row_seeds = np.asarray(row_seeds, np.int64).reshape(-1)
        if row_seeds.shape != (batch,) or np.any(row_seeds < 0) or np.any(row_seeds >= 2**32):
            raise ValueError(f"row_seeds must be {batch} integers in [0, 2^32), got {row_seeds.tolist()}")
    mesh = _model_mesh(model) if mesh is None else mesh
    shards = 1 if mesh is None else int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))
    padded_batch = -(-batch // shards) * shards

    length = bucket_length(int(lengths.max()))
    ids, mask, _ = left_aligned(input_ids, attention_mask, length, pad_token_id)
    image_arrays, positions = _image_arrays(model, family, ids, mask, pixel_values, image_grid_thw)
    positions = np.asarray(positions, np.int32)  # [3, B, Lp] or [B, Lp]
    real = mask.astype(bool)
    max_position = np.where(real[None] if positions.ndim == 3 else real, positions, -1)
    max_position = max_position.max(axis=tuple(range(positions.ndim - 2)) + (-1,))  # [B]
    start, end = tuple(think_start_ids or ()), tuple(think_end_ids or ())
    think_count, window = _think_state(ids, lengths, thinking_budget, start, end)

    extra = padded_batch - batch  # batch padding for the data shards: one-token rows, done from the start
    def pad_rows(x, axis=0, value=0):
        if not extra:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return np.pad(x, widths, constant_values=value)

    arrays = {"input_ids": pad_rows(ids, value=pad_token_id), "attention_mask": pad_rows(mask, value=1),
              "positions": pad_rows(positions, axis=positions.ndim - 2),
              "last_index": pad_rows(lengths.astype(np.int32) - 1), **image_arrays}
    if "image_token_index" in arrays and extra:  # flat indices into [B*L]: shift past the new rows' end
        index = arrays["image_token_index"]
        arrays["image_token_index"] = np.where(index >= batch * length, padded_batch * length, index).astype(np.int32)
    initial = {"next_position": pad_rows((max_position + 1).astype(np.int32)),
               "done": pad_rows(np.zeros(batch, bool), value=True),
               "think_count": pad_rows(think_count, value=-1), "window": pad_rows(window, value=-1)}
    settings_kw = dict(max_new_tokens=int(max_new_tokens), eos_ids=_eos_ids(eos_token_id), pad_id=int(pad_token_id),
                       greedy=temperature == 0, top_k=int(top_k), use_top_p=top_p < 1.0,
                       thinking_budget=-1 if thinking_budget is None else int(thinking_budget),
                       think_start=start, think_end=end, mrope=positions.ndim == 3,
                       implementation=attention_implementation, mesh=mesh, output_logits=bool(output_logits))
    seeds = None if row_seeds is None else pad_rows(row_seeds)
    out = _run(model, arrays, initial, settings_kw, seed, seeds, padded_batch, temperature, top_p,
               cache_size=length + int(max_new_tokens))
    tokens, num_tokens, done = out["tokens"][:batch], out["num_tokens"][:batch], out["done"][:batch]
    reasons = ["stop" if d else "length" for d in done]
    logits = out["logits"][:batch] if output_logits else None
    return GenerationOutput(tokens=tokens, lengths=num_tokens, finish_reasons=reasons, logits=logits)


def _model_mesh(model):
    """Returns the mesh the model's parameters are sharded on, or None (one device, or not NamedSharding)."""
    import jax
    from flax import nnx

    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _run(model, arrays, initial, settings_kw, seed, row_seeds, batch, temperature, top_p, *, cache_size):
    """Places the host arrays (split over the mesh's data x fsdp axes when there is one) and runs prefill + decode;
    returns the final state's fields as numpy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from . import decoding
    from .sampling import row_keys

    settings = decoding.DecodeSettings(**settings_kw)
    graphdef, params = nnx.split(model)
    mesh = settings.mesh
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1) or None

        def place(x, batch_axis):
            if batch_axis is None:
                return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
            spec = [None] * np.ndim(x)
            spec[batch_axis] = axes
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        image_keys = ("pixel_values", "vision", "image_token_index")
        arrays = {k: (jax.tree.map(lambda x: place(x, None), v) if k in image_keys else
                      place(v, v.ndim - 2 if k == "positions" else 0)) for k, v in arrays.items()}
        initial = {k: place(v, 0) for k, v in initial.items()}
    initial["keys"] = row_keys(seed, row_seeds, batch)
    temperature = jnp.float32(temperature if temperature > 0 else 1.0)
    top_p = jnp.float32(top_p)
    cache, state = decoding.prefill(graphdef, params, arrays, initial, temperature, top_p, settings=settings,
                                    cache_size=cache_size)
    cache, state = decoding.decode(graphdef, params, cache, state, temperature, top_p, settings=settings)
    del cache
    out = {"tokens": np.asarray(state.tokens), "num_tokens": np.asarray(state.num_tokens),
           "done": np.asarray(state.done)}
    if state.logits is not None:
        out["logits"] = np.asarray(state.logits)
    return out


def generate(model, input_ids, attention_mask, *, pixel_values=None, image_grid_thw=None, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id: int = 0,
             seed: int = 0, **options) -> np.ndarray:
    """Returns numpy int32 [B, max_new_tokens]: each row's new tokens, ``pad_token_id`` after its first eos.

    input_ids, attention_mask [B, L]: prompts, left- or right-padded (the mask marks real tokens); pixel_values and
    image_grid_thw as the model's forward takes them (Qwen2.5-VL patches [P, 1176] + grids [n, 3]; InternVL tiles
    [T, 3, S, S]). Greedy when temperature == 0, else sampling in fp32 with temperature, top_k (0 = off) and top_p
    as transformers' logits warpers; ``seed`` fixes the draws. eos_token_id: an int, a list, or None. Keyword
    ``options``: see ``generate_with_info`` (row_seeds, thinking_budget, max_cache_length, mesh, ...).
    """
    return generate_with_info(model, input_ids, attention_mask, pixel_values=pixel_values,
                              image_grid_thw=image_grid_thw, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              seed=seed, **options).tokens
