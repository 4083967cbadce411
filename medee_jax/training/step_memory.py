"""The train step compiled ahead of time, without weights: the trainer's state and a batch as abstract arrays
(`jax.ShapeDtypeStruct` with the run's shardings), the real jitted step pieces (`steps.jit_step`, what the trainer
runs) lowered and compiled on them for the mesh's devices, and XLA's analysis of each compiled piece. The mesh may
be the current backend's devices (the pre-flight, ``--check``) or another platform's described devices (a TPU
topology: tools/aot_compile.py).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import abstract_model
from ..models.families import family_of
from ..models.sharding import param_shardings
from . import steps
from .batches import DEVICE_KEYS, add_target_arrays, pad_shard_batch
from .mesh import batch_sharding, num_data_shards, replicated, stack_shards
from .setup import DTYPES, step_options, target_buckets
from .state import TrainState, abstract_train_state, shardings_of, split_model


def abstract_state(c, model, mesh) -> tuple[Any, TrainState, Any, Any]:
    """Returns (graphdef, abstract TrainState with shardings, optimizer, schedule) exactly as the trainer builds
    them (`state.split_model`, `state.abstract_train_state`), for an abstract ``model`` (`abstract_model`)."""
    graphdef, params, frozen = split_model(model, c)
    shardings = nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh, dict(c.sharding_rules)))

    def with_shardings(tree):
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), tree,
                            _subtree(shardings, tree))

    state, optimizer, schedule = abstract_train_state(c, with_shardings(params), with_shardings(frozen), mesh)
    return graphdef, state, optimizer, schedule


def _subtree(full: dict, like: dict) -> dict:
    """The part of the nested dict ``full`` with the keys of ``like``."""
    return {k: _subtree(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


def synthetic_batch(c, spec, model_cfg) -> dict:
    """Returns a host batch of ``data.batch_size`` tiny text-only examples (pairs for DPO) built by ``spec``
    (`pipeline.batch_spec`): the input of `abstract_batch` with ``with_images=True`` when no data is at hand (its
    shapes come from the largest buckets, not from these examples)."""
    ids = np.arange(100, 108, dtype=np.int32)  # 8 ordinary tokens
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
    if c.mode == "sft":
        items = [[{"input_ids": ids, "target_mask": targets, "source": "synthetic:1"}]] * c.data.batch_size
    else:
        items = [{"chosen_input_ids": ids, "chosen_target_mask": targets, "rejected_input_ids": ids[::-1].copy(),
                  "rejected_target_mask": targets, "source": "synthetic:1"}] * c.data.batch_size
    return spec.build(items)


def abstract_batch(c, batch: dict, spec, mesh, model_cfg, *, with_images: bool | None = None) -> dict:
    """Returns the stacked [S, ...] batch of the largest buckets as ShapeDtypeStructs, from one built host batch.

    ``with_images``: pad the vision inputs to the largest vision-unit bucket (default: when ``batch`` has images);
    a text-only batch then gets all-padding vision inputs of that size, as a text-only shard does in a step whose
    other shards have images: the same program as a batch full of images."""
    length = spec.row_buckets[-1]
    if with_images is None:
        with_images = "pixel_values" in batch
    patches = spec.patch_buckets[-1] if with_images else None
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


@dataclasses.dataclass
class CompiledStep:
    """The train step's pieces compiled on abstract inputs (`compile_step`).

    pieces        {name: (compiled executable, bytes per device of its inputs that are not the state)}, in the
                  order one optimizer step runs them: accumulate_first, [accumulate,] clip, update
    state         the abstract TrainState (with shardings)
    batch         the abstract stacked batch
    """

    pieces: dict[str, tuple[Any, int]]
    state: TrainState
    batch: dict

    @property
    def batch_shape(self) -> dict:
        """{"rows", "length", "patches"} of one data shard's batch."""
        b = self.batch
        return {"rows": int(b["input_ids"].shape[1]), "length": int(b["input_ids"].shape[2]),
                "patches": int(b["pixel_values"].shape[1]) if "pixel_values" in b else 0}


def compile_step(c, model_cfg, mesh, batch: dict, spec, *, with_images: bool | None = None,
                 hlo_dump_dir: str | None = None) -> CompiledStep:
    """Returns the trainer's jitted step pieces lowered and compiled for ``mesh``'s devices on the abstract state
    of config ``c`` and the abstract batch of ``batch`` at the largest buckets (`abstract_batch`). No array is
    allocated; ``mesh`` may hold another platform's devices (``jax.experimental.topologies``).

    ``hlo_dump_dir``: the compiler writes each piece's HLO as text to ``<hlo_dump_dir>/<piece>/`` (XLA's
    ``xla_dump_to``; `optimized_hlo_text` reads it back), for compilers whose optimized HLO jax cannot parse."""
    def compile_options(piece: str):
        if hlo_dump_dir is None:
            return None
        return {"xla_dump_to": os.path.join(hlo_dump_dir, piece), "xla_dump_hlo_as_text": True}

    model = abstract_model(model_cfg, DTYPES[c.model.dtype], param_dtype=DTYPES[c.model.param_dtype],
                           remat=c.model.remat)
    model.set_text_attention(c.model.attention)
    graphdef, state, optimizer, schedule = abstract_state(c, model, mesh)
    fns = steps.jit_step(graphdef, step_options(c), optimizer, schedule, shardings_of(state),
                         c.optimizer.max_grad_norm)
    abstract = abstract_batch(c, batch, spec, mesh, model_cfg, with_images=with_images)
    rep = replicated(mesh)
    names = ("tokens",) if c.mode == "sft" else ("pairs", "chosen_tokens")
    norms = {n: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for n in names}
    first = fns.accumulate_first.lower(state, abstract, norms).compile(compile_options("accumulate_first"))
    acc = _with_shardings(jax.eval_shape(fns.accumulate_first, state, abstract, norms), first.output_shardings)
    pieces = {"accumulate_first": (first, bytes_per_device(abstract))}
    if c.data.grad_accum_steps > 1:
        accumulate = fns.accumulate.lower(acc, state, abstract, norms).compile(compile_options("accumulate"))
        pieces["accumulate"] = (accumulate, bytes_per_device(abstract) + bytes_per_device(acc))
    clip = fns.clip.lower(acc).compile(compile_options("clip"))
    clipped = _with_shardings(jax.eval_shape(fns.clip, acc), clip.output_shardings)
    pieces["clip"] = (clip, bytes_per_device(acc))
    update = fns.update.lower(state, clipped).compile(compile_options("update"))
    pieces["update"] = (update, bytes_per_device(clipped))
    return CompiledStep(pieces, state, abstract)


def optimized_hlo_text(hlo_dump_dir: str, piece: str) -> str | None:
    """Returns the optimized HLO text the compiler dumped for ``piece`` (`compile_step` with ``hlo_dump_dir``), or
    None when there is none."""
    folder = os.path.join(hlo_dump_dir, piece)
    names = sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt"))) if os.path.isdir(folder) else []
    if not names:
        return None
    with open(names[-1]) as f:
        return f.read()


def memory_report(compiled: CompiledStep) -> dict:
    """Returns per-device bytes of a compiled step: "state", per piece {"arguments", "outputs", "aliased",
    "temporaries", "transient"}, "peak_bytes_per_device" and "batch_shape".

    The state (parameters, frozen parts, reference, AdamW moments) stays resident through the step, also while a
    piece that does not read all of it runs, so the peak is the state's bytes plus the largest transient of any
    piece: its non-state inputs (batch, accumulator) + outputs not aliased to inputs + temporaries."""
    out: dict[str, Any] = {"state": bytes_per_device(compiled.state)}
    transients = []
    for name, (executable, inputs) in compiled.pieces.items():
        m = executable.memory_analysis()
        if m is None:
            continue
        transient = inputs + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        out[name] = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                     "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes, "transient": transient}
        transients.append(transient)
    out["peak_bytes_per_device"] = out["state"] + max(transients) if transients else None
    out["batch_shape"] = compiled.batch_shape
    return out


def step_memory(c, model_cfg, mesh, batch: dict, spec) -> dict:
    """Per-device bytes of the train step at the largest buckets, from XLA's memory analysis of each compiled piece
    (`compile_step`, then `memory_report`)."""
    return memory_report(compile_step(c, model_cfg, mesh, batch, spec))
