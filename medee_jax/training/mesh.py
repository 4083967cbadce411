"""Device mesh (axes data, fsdp, tensor), multi-process start-up, and shardings for batches.

Batches are laid out per data shard: every key of a host batch gets a leading axis S (the number of data shards of
this process, data x fsdp devices it owns), and the global array stacks all processes' shards along that axis. Each
shard is a complete collated batch with its own images and host-computed indices, so vision encoding and the
image-token scatter stay local to the devices that hold the rows (no cross-shard index arithmetic).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..models.attention import BATCH_AXES, HEAD_AXIS

MESH_AXES = (*BATCH_AXES, HEAD_AXIS)  # ("data", "fsdp", "tensor")

log = logging.getLogger(__name__)


def maybe_initialize_distributed(enabled: bool | str = "auto") -> None:
    """Starts ``jax.distributed`` when several processes run (TPU pods: automatic; elsewhere by env/flag).

    ``enabled``: "auto" initialises when JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID) is set or
    on a multi-host TPU; True forces it (cluster auto-detection); False never.
    """
    if enabled is False or enabled == "false":
        return
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif enabled is True or enabled == "true" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> dict[str, int]:
    """Returns {axis: size} with at most one -1 filled so the product equals ``num_devices``."""
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(f'mesh.{a}' for a in unknown)}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[unknown[0]] = num_devices // known
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"mesh: mesh.data x mesh.fsdp x mesh.tensor = {sizes} does not use the {num_devices} devices")
    return sizes


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """Returns a Mesh over ``devices`` (default: all) with axes data, fsdp, tensor (tensor fastest-varying)."""
    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh_shape(shape, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def num_data_shards(mesh: Mesh) -> int:
    """Returns the number of data shards (data x fsdp) of the whole mesh."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def local_data_shards(mesh: Mesh) -> int:
    """Returns how many data shards this process feeds."""
    total = num_data_shards(mesh)
    if total % jax.process_count():
        raise ValueError(f"mesh: {total} data shards cannot be split over {jax.process_count()} processes")
    return total // jax.process_count()


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Returns the sharding of a stacked batch array [S, ...] (axis 0 over data x fsdp, the rest replicated)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def stack_shards(batches: list[dict]) -> dict:
    """Returns one host batch with a leading shard axis from equally shaped per-shard batches (nested dicts ok)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def to_global(mesh: Mesh, local_batch: dict) -> dict:
    """Returns global jax arrays from this process's stacked shards [S_local, ...] (axis 0 over data x fsdp)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x), local_batch)
