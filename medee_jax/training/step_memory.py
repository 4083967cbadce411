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
from ..models.sharding import param_shardings
from . import steps
from .batches import DEVICE_KEYS, add_target_arrays, pad_shard_batch
from .mesh import batch_sharding, num_data_shards, replicated, stack_shards
from .setup import DTYPES, step_options, target_buckets


def abstract_state(c, model, mesh):
    """(graphdef, abstract state with shardings, optimizer, schedule) exactly as the trainer builds them."""
    filt = steps.trainable_filter(c.model.train_vision, c.model.train_projector)
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
    shard = pad_shard_batch({k: v for k, v in batch.items() if k != "_key"}, length, patches, model_cfg.vision)
    if c.mode == "dpo" and c.dpo.reference == "precomputed" and "ref_logps" not in shard:
        shard["ref_logps"] = np.zeros(shard["input_ids"].shape[0], np.float32)
    shard = add_target_arrays(shard, min(max(target_buckets(c)), length))
    stacked = stack_shards([{k: v for k, v in shard.items() if k in DEVICE_KEYS}])
    shards = num_data_shards(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((shards,) + x.shape[1:], x.dtype,
                                                       sharding=batch_sharding(mesh, x.ndim)), stacked)


def step_memory(c, model_cfg, mesh, batch: dict, spec) -> dict:
    """Per-device bytes of each compiled piece of the train step at the largest buckets (XLA memory analysis) and
    the peak: the largest arguments + outputs - aliased + temporaries of any piece."""
    model = abstract_model(model_cfg, DTYPES[c.model.dtype], param_dtype=DTYPES[c.model.param_dtype],
                           remat=c.model.remat)
    graphdef, state, optimizer, schedule = abstract_state(c, model, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    fns = steps.jit_step(graphdef, step_options(c), optimizer, schedule, shardings, c.optimizer.max_grad_norm)
    abstract = abstract_batch(c, batch, spec, mesh, model_cfg)
    rep = replicated(mesh)
    names = ("tokens",) if c.mode == "sft" else ("pairs", "chosen_tokens")
    norms = {n: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for n in names}
    pieces = {"accumulate_first": fns.accumulate_first.lower(state, abstract, norms).compile()}
    acc = jax.eval_shape(fns.accumulate_first, state, abstract, norms)
    if c.data.grad_accum_steps > 1:
        pieces["accumulate"] = fns.accumulate.lower(acc, state, abstract, norms).compile()
    pieces["clip"] = fns.clip.lower(acc).compile()
    clipped = jax.eval_shape(fns.clip, acc)
    pieces["update"] = fns.update.lower(state, clipped).compile()
    out = {}
    for name, compiled in pieces.items():
        m = compiled.memory_analysis()
        if m is None:
            continue
        out[name] = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                     "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
                     "peak": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes}
    out["peak_bytes_per_device"] = max((p["peak"] for p in out.values()), default=None)
    out["batch_shape"] = {"rows": int(abstract["input_ids"].shape[1]), "length": int(abstract["input_ids"].shape[2]),
                          "patches": int(abstract["pixel_values"].shape[1]) if "pixel_values" in abstract else 0}
    return out
