"""Logical axis names -> mesh axes, and the NamedSharding of every parameter of a model.

Every ``nnx.Param`` carries ``logical_axes`` metadata (one name per dimension, e.g. ``('layers', 'embed', 'mlp')``).
A rule table maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated). When a spec is
built for a concrete shape and mesh:
  * mesh axes the mesh does not have are dropped (the same table serves a 1-device CPU run and a pod);
  * a dimension is only sharded when the product of its mesh axis sizes divides it (else it is replicated);
  * a mesh axis is used at most once per parameter (a later dimension asking for a used axis is replicated).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, "str | Sequence[str] | None"]

# FSDP shards the model width; tensor parallelism shards heads, MLP width and vocabulary.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "norm": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_merge": "fsdp",
}


def logical_to_mesh(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules | None = None) -> PartitionSpec:
    """Returns the PartitionSpec for one array of ``shape`` whose dimensions are named ``logical_axes``."""
    rules = DEFAULT_RULES if rules is None else rules
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {', '.join(sorted(rules))}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64)) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(model_or_state, mesh: Mesh, rules: Rules | None = None):
    """Returns an ``nnx.State`` of the model's params whose values are PartitionSpecs (works on abstract models)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)

    def spec(v: nnx.Variable):
        axes = v.get_metadata("logical_axes", None) if hasattr(v, "get_metadata") else None
        shape = np.shape(v.get_value())
        if axes is None:
            return v.replace(PartitionSpec())
        return v.replace(logical_to_mesh(axes, shape, mesh, rules))

    return jax.tree.map(spec, state, is_leaf=_is_variable)


def param_shardings(model_or_state, mesh: Mesh, rules: Rules | None = None):
    """Returns an ``nnx.State`` of the model's params whose values are ``NamedSharding``s on ``mesh``."""
    specs = param_specs(model_or_state, mesh, rules)
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs, is_leaf=_is_variable)


def sharding_for(param: nnx.Variable, mesh: Mesh | None, rules: Rules | None = None):
    """Returns the NamedSharding of one parameter (a single-device sharding when ``mesh`` is None)."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes = param.get_metadata("logical_axes", None)
    shape = np.shape(param.get_value())
    spec = PartitionSpec() if axes is None else logical_to_mesh(axes, shape, mesh, rules)
    return NamedSharding(mesh, spec)


def context_mesh(mesh=None):
    """Returns ``mesh``, else the mesh set by ``jax.set_mesh`` around the trace (the train step's, see
    `training.steps.jit_step`), else None (one device, no mesh)."""
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def constrain_residual(x, mesh=None):
    """Returns the residual stream x [B, L, D] constrained to be whole along L and D on every device (split only
    along the batch: its first axis is left to the batch's sharding, data x fsdp, and inside the train step's vmap
    over data shards the shard axis carries it). At every decoder layer boundary this pins the activations' layout,
    so GSPMD gathers each layer's weights inside the layer scan instead of choosing a layout that gathers whole
    activation batches or whole stacked parameters. No-op without a mesh (``mesh`` or the context's) of more than
    one device."""
    mesh = context_mesh(mesh)
    if mesh is None or mesh.size <= 1:
        return x
    spec = PartitionSpec(PartitionSpec.UNCONSTRAINED, *([None] * (x.ndim - 1)))
    if isinstance(mesh, Mesh):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)
