"""The train step's memory per device without weights: the trainer's state and a batch as abstract arrays
(`jax.ShapeDtypeStruct` with the run's shardings), the real jitted step pieces lowered and compiled on them for
the current backend, and XLA's memory analysis of each piece. Used by the pre-flight (`--check`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..models import abstract_model
from ..models.families import family_of
from ..models.sharding import param_shardings
from . import steps
from .batches import DEVICE_KEYS, add_target_arrays, pad_shard_batch
from .mesh import batch_sharding, num_data_shards, replicated, stack_shards
from .setup import DTYPES, step_options, target_buckets


def abstract_state(c, model, mesh):
    """(graphdef, abstract state with shardings, optimizer, schedule) exactly as the trainer builds them."""
    filt = steps.trainable_filter(family_of(model.config), c.model.train_vision, c.model.train_projector)
    graphdef, params, frozen = nnx.split(model, filt, nnx.Param)
    rules = dict(c.sharding_rules)

    def placed(state):
        values, shardings = nnx.to_pure_dict(state), nnx.to_pure_dict(param_shardings(state, mesh, rules))
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)

    params, frozen = placed(params), placed(frozen)
    rep = replicated(mesh)
    schedule = steps.warmup_cosine(c.optimizer.lr, 1000, c.optimizer.warmup_ratio, c.optimizer.final_lr_ratio)
    optimizer = steps.make_optimizer(schedule, weight_decay=c.optimizer.weight_decay, b1=c.optimizer.b1,
                                     b2=c.optimizer.b2, eps=c.optimizer.eps, params=params)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, p: p.sharding, opt_shapes, params,
                                          transform_non_params=lambda _: rep)
    opt_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), opt_shapes,
                             opt_shardings)
    ref = None
    if c.mode == "dpo" and c.dpo.reference == "frozen":
        compute = DTYPES[c.model.dtype]
        ref = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, compute, sharding=p.sharding), params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    state = {"params": params, "frozen": frozen, "ref": ref, "opt_state": opt_state, "step": scalar,
             "nonfinite_in_a_row": scalar, "nonfinite_total": scalar}
    return graphdef, state, optimizer, schedule


def abstract_batch(c, batch: dict, spec, mesh, model_cfg) -> dict:
    """The stacked [S, ...] batch of the largest buckets as ShapeDtypeStructs, from one built host batch."""
    length = spec.row_buckets[-1]
    patches = spec.patch_buckets[-1] if "pixel_values" in batch else None
    shard = pad_shard_batch({k: v for k, v in batch.items() if k != "_key"}, length, patches,
                            family_of(model_cfg).image_inputs(model_cfg))
    if c.mode == "dpo" and c.dpo.reference == "precomputed" and "ref_logps" not in shard:
        shard["ref_logps"] = np.zeros(shard["input_ids"].shape[0], np.float32)
    shard = add_target_arrays(shard, min(max(target_buckets(c)), length))
    stacked = stack_shards([{k: v for k, v in shard.items() if k in DEVICE_KEYS}])
    shards = num_data_shards(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((shards,) + x.shape[1:], x.dtype,
                                                       sharding=batch_sharding(mesh, x.ndim)), stacked)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
    leaves = [x for x in jax.tree.leaves(tree) if x is not None]
    return int(sum(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in leaves))


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def step_memory(c, model_cfg, mesh, batch: dict, spec) -> dict:
    """Per-device bytes of the train step at the largest buckets, from XLA's memory analysis of each compiled piece.

    The state (parameters, frozen parts, reference, AdamW moments) stays resident through the step, also while a
    piece that does not read all of it runs, so the peak is the state's bytes plus the largest transient of any
    piece: its non-state inputs (batch, accumulator) + outputs not aliased to inputs + temporaries."""
    model = abstract_model(model_cfg, DTYPES[c.model.dtype], param_dtype=DTYPES[c.model.param_dtype],
                           remat=c.model.remat)
    graphdef, state, optimizer, schedule = abstract_state(c, model, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    fns = steps.jit_step(graphdef, step_options(c), optimizer, schedule, shardings, c.optimizer.max_grad_norm)
    abstract = abstract_batch(c, batch, spec, mesh, model_cfg)
    rep = replicated(mesh)
    names = ("tokens",) if c.mode == "sft" else ("pairs", "chosen_tokens")
    norms = {n: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for n in names}
    first = fns.accumulate_first.lower(state, abstract, norms).compile()
    acc = _with_shardings(jax.eval_shape(fns.accumulate_first, state, abstract, norms), first.output_shardings)
    pieces = {"accumulate_first": (first, bytes_per_device(abstract))}
    if c.data.grad_accum_steps > 1:
        pieces["accumulate"] = (fns.accumulate.lower(acc, state, abstract, norms).compile(),
                                bytes_per_device(abstract) + bytes_per_device(acc))
    clip = fns.clip.lower(acc).compile()
    clipped = _with_shardings(jax.eval_shape(fns.clip, acc), clip.output_shardings)
    pieces["clip"] = (clip, bytes_per_device(acc))
    pieces["update"] = (fns.update.lower(state, clipped).compile(), bytes_per_device(clipped))
    out = {"state": bytes_per_device({k: v for k, v in state.items()})}
    for name, (compiled, inputs) in pieces.items():
        m = compiled.memory_analysis()
        if m is None:
            continue
        transient = inputs + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        out[name] = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                     "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes, "transient": transient}
    transients = [p["transient"] for name, p in out.items() if name in pieces]
    out["peak_bytes_per_device"] = out["state"] + max(transients) if transients else None
    out["batch_shape"] = {"rows": int(abstract["input_ids"].shape[1]), "length": int(abstract["input_ids"].shape[2]),
                          "patches": int(abstract["pixel_values"].shape[1]) if "pixel_values" in abstract else 0}
    return out
