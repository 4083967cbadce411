"""The trainer's state (`TrainState`) and how a run builds it: the model split into trainable and frozen parts, the
optimizer and schedule from the run config, and the initial state placed on the mesh (or described abstractly).

A run's state lives on the devices for the whole run; the jitted step pieces (steps.py) take it and return the next
one (``update`` donates it). Everything here is also what the tools use (bench_step.py, aot_compile.py,
step_memory.py): the trainer's own construction, not a copy of it.

Bytes per trainable parameter with the recipe's defaults (fp32 master weights, bf16 compute): 4 (params) + 4
(fp32 gradients, during the step) + 4 + 4 (AdamW moments; 4 + 2 with ``optimizer.mu_dtype=bfloat16``) + 2 (the
frozen reference copy, DPO with ``dpo.reference=frozen``; 0 with ``precomputed``). Frozen parameters (vision tower
and projector unless trained) are stored once, in the compute dtype (``model.frozen_dtype``).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from . import steps
from .mesh import replicated
from .setup import DTYPES

PyTree = Any



# The Orbax item of a checkpoint holds these fields as a dict (the on-disk layout of every checkpoint so far);
# ``ref`` is not saved: it is rebuilt from the initial weights (a frozen reference never changes).
CHECKPOINT_FIELDS = ("params", "frozen", "opt_state", "step", "nonfinite_in_a_row", "nonfinite_total")


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and updates; a pytree (every field is a child).

    params              trainable parameters (pure nested dict, ``nnx.to_pure_dict`` layout), in
                        ``model.param_dtype`` (fp32 master weights); updated by AdamW.
    frozen              the parameters that never get gradients (by default the family's vision tower and
                        projector), stored in ``model.frozen_dtype`` (the compute dtype by default).
    ref                 DPO with ``dpo.reference=frozen``: the reference policy's copy of ``params`` in the compute
                        dtype; None otherwise (SFT, precomputed or no reference). Not checkpointed.
    opt_state           optax state of the optimizer (AdamW's count, moments mu / nu on the parameters' shardings).
    step                int32 []: optimizer steps done (the learning-rate schedule's input).
    nonfinite_in_a_row  int32 []: consecutive steps skipped because the loss or gradient norm was not finite.
    nonfinite_total     int32 []: all steps skipped so far for that reason.
    """

    params: PyTree
    frozen: PyTree
    ref: PyTree | None
    opt_state: PyTree
    step: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array

    def checkpoint_items(self) -> dict:
        """Returns the dict an Orbax checkpoint stores (``CHECKPOINT_FIELDS``: everything but ``ref``)."""
        return {name: getattr(self, name) for name in CHECKPOINT_FIELDS}

    def with_checkpoint_items(self, items: dict) -> "TrainState":
        """Returns this state with the fields of a restored checkpoint dict (``checkpoint_items``' layout)."""
        return self.replace(**{name: items[name] for name in CHECKPOINT_FIELDS})


def compute_dtype(config):
    """Returns the run's compute dtype (``model.dtype``)."""
    return DTYPES[config.model.dtype]


def frozen_dtype(config):
    """Returns the dtype frozen parameters are stored in: the compute dtype (``model.frozen_dtype="compute"``) or
    the master weights' (``"param"``)."""
    choice = config.model.get("frozen_dtype", "compute")
    if choice not in ("compute", "param"):
        raise ValueError(f"model.frozen_dtype={choice!r}: 'compute' or 'param'")
    return DTYPES[config.model.dtype if choice == "compute" else config.model.param_dtype]


def split_model(model: nnx.Module, config) -> tuple[Any, dict, dict]:
    """Returns (graphdef, trainable params, frozen params) of ``model`` as the trainer splits it
    (``steps.trainable_filter`` with model.train_vision / train_projector); the frozen part is cast to
    `frozen_dtype` (a no-op when it already is)."""
    from ..models.families import family_of

    filt = steps.trainable_filter(family_of(model.config), config.model.train_vision, config.model.train_projector)
    graphdef, params, frozen = nnx.split(model, filt, nnx.Param)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    return graphdef, params, cast_frozen(frozen, frozen_dtype(config))


def cast_frozen(frozen: dict, dtype) -> dict:
    """Returns ``frozen`` with every floating leaf in ``dtype``, keeping each leaf's sharding: arrays are cast in one
    jitted program, ``jax.ShapeDtypeStruct`` leaves get the new dtype. Nothing to cast: ``frozen`` itself."""
    def target(x):
        return dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    leaves = jax.tree.leaves(frozen)
    if all(x.dtype == target(x) for x in leaves):
        return frozen
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, target(x), sharding=x.sharding), frozen)
    return jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(target(x)), tree),
                   out_shardings=jax.tree.map(lambda x: x.sharding, frozen))(frozen)


def optimizer_for(config, params: dict, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """Returns (optimizer, learning-rate schedule) of the run config for ``total_steps`` optimizer steps: AdamW
    (``steps.make_optimizer``, moments mu in ``optimizer.mu_dtype``) after a warmup-cosine schedule."""
    o = config.optimizer
    schedule = steps.warmup_cosine(o.lr, total_steps, o.warmup_ratio, o.final_lr_ratio)
    optimizer = steps.make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                     params=params, mu_dtype=DTYPES[o.get("mu_dtype", "float32")])
    return optimizer, schedule


def uses_frozen_reference(config) -> bool:
    """True when the state carries a reference copy (DPO with ``dpo.reference=frozen``)."""
    return config.mode == "dpo" and config.dpo.reference == "frozen"


def init_train_state(config, params: dict, frozen: dict, mesh, total_steps: int
                     ) -> tuple[TrainState, optax.GradientTransformation, Any]:
    """Returns (the initial TrainState, optimizer, schedule) of a run: ``params`` and ``frozen`` as given (placed on
    ``mesh`` by the caller, e.g. `split_model` of a placed model), the reference copy in the compute dtype, AdamW's
    state on the parameters' shardings and replicated scalars."""
    optimizer, schedule = optimizer_for(config, params, total_steps)
    ref = None
    if uses_frozen_reference(config):
        compute = compute_dtype(config)
        ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))(params)
    rep = replicated(mesh)

    def zero():  # one buffer per counter: the update program donates each
        return jax.device_put(jnp.int32(0), rep)

    state = TrainState(params=params, frozen=frozen, ref=ref,
                       opt_state=steps.init_optimizer_state(optimizer, params, rep), step=zero(),
                       nonfinite_in_a_row=zero(), nonfinite_total=zero())
    # Leaves created inside jit without inputs (optimizer counts) land on one device: replicate them.
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), state)
    return state, optimizer, schedule


def abstract_train_state(config, params: dict, frozen: dict, mesh, total_steps: int = 1000
                         ) -> tuple[TrainState, optax.GradientTransformation, Any]:
    """Returns (TrainState of ``jax.ShapeDtypeStruct`` leaves with the run's shardings, optimizer, schedule): what
    `init_train_state` would build from ``params`` / ``frozen`` (abstract, with shardings), without any array."""
    optimizer, schedule = optimizer_for(config, params, total_steps)
    rep = replicated(mesh)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, p: p.sharding, opt_shapes, params,
                                          transform_non_params=lambda _: rep)
    opt_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), opt_shapes,
                             opt_shardings)
    ref = None
    if uses_frozen_reference(config):
        compute = compute_dtype(config)
        ref = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, compute, sharding=p.sharding), params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    state = TrainState(params=params, frozen=cast_frozen(frozen, frozen_dtype(config)), ref=ref,
                       opt_state=opt_state, step=scalar, nonfinite_in_a_row=scalar, nonfinite_total=scalar)
    return state, optimizer, schedule


def shardings_of(state: TrainState) -> TrainState:
    """Returns the TrainState of each leaf's sharding (the ``update`` program's output shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
