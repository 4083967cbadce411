"""Model weights as an Orbax checkpoint (the trainer's format), and streaming conversion from/to transformers.

Layout of an Orbax model directory ``DST`` (an orbax-checkpoint composite checkpoint, as one step directory of a
``CheckpointManager`` holds, plus the files needed to rebuild the model):

    DST/_CHECKPOINT_METADATA, DST/commit_success.txt   Orbax bookkeeping
    DST/params/                                        one PyTree item named "params": the model's ``nnx.State``
                                                       of parameters as a pure nested dict of arrays
                                                       (``nnx.to_pure_dict``), stacked exactly as in the model,
                                                       e.g. params["language_model"]["layers"]["q_proj_kernel"]
                                                       is [num_layers, hidden, heads*head_dim]; no lm_head when tied
    DST/config.json                                    the model config (transformers-5 nested layout), so the
                                                       model can be rebuilt with ``load_config(DST)``
    DST/tokenizer.json, ...                            tokenizer/processor files carried over from the HF source

Restore "params" with any Orbax PyTree restore (``ocp.PyTreeCheckpointer().restore(DST/"params", ...)`` or a
``Composite(params=PyTreeRestore(...))``); ``load_model`` does it with each array placed on its sharding.

Memory: ``hf_to_orbax`` never builds the model. It walks the parameters, assembles one parameter at a time on the
host (a stacked parameter is [layers, ...]: its layer tensors are read one by one into it) and appends it to the
checkpoint with Orbax's partial save (``ocp.experimental.v1.partial``, synchronous, without Orbax's defensive
host-array copy; parameters are batched up to ``batch_bytes``), returning freed heap to the OS after each save.
Peak host memory is about the runtime (~0.25 GB) + 2 x max(largest parameter, ``batch_bytes``) (the array and
Tensorstore's write buffers), not the model: for the stacked layout the largest parameter is one whole family of
layers (bench, tools/bench_convert.py: 28 x 1536 x 8960 bf16 = 0.74 GB, measured peak 1.6 GB for a 4.2 GB
checkpoint; 7B: 28 x 3584 x 18944 = 3.8 GB; 72B: 80 x 8192 x 29568 = 38.8 GB). ``orbax_to_hf`` restores one
parameter at a time (``partial_restore``) and streams its tensors into safetensors. Both write into a temporary
directory beside DST renamed into place at the end; an existing DST is replaced only if medee_jax wrote it (or with
``overwrite=True``), never if it is or contains the source (``medee_jax.models.export_dir``).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from . import hf, load_config
from .export_dir import atomic_directory, check_destination

ITEM = "params"
_V0_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


class OrbaxCheckpointError(ValueError):
    """An Orbax model directory that cannot be read; the message names the directory and the problem."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _abstract(cfg):
    from . import abstract_model

    return abstract_model(cfg)


def param_paths(model) -> dict[str, tuple[int, ...]]:
    """Returns {dotted param path: shape} of every parameter of ``model`` (abstract is fine), key-table order."""
    return {path: tuple(hf.get_param(model, path).get_value().shape) for _, path, _ in hf.model_params(model)}


def _nest(path: str, value) -> dict:
    out = value
    for name in reversed(path.split(".")):
        out = {name: out}
    return out


def _merge_into(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _merge_into(dst.setdefault(k, {}), v)
        else:
            dst[k] = v


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _write_config_and_sidecars(cfg, stage: str, source_dir: str | None) -> None:
    with open(os.path.join(stage, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    hf.copy_sidecar_files(source_dir, stage)


def _rename_item(stage: str, old: str) -> None:
    """Renames a finalized Orbax-v1 checkpoint's item ``old`` to "params" and records its v0 PyTree handler."""
    os.rename(os.path.join(stage, old), os.path.join(stage, ITEM))
    meta_path = os.path.join(stage, "_CHECKPOINT_METADATA")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["item_handlers"] = {ITEM: _V0_PYTREE_HANDLER}
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    indicator = os.path.join(stage, "orbax.checkpoint")  # v1 layout marker; the result is a plain v0 composite
    if os.path.isfile(indicator):
        os.remove(indicator)


def hf_to_orbax(src: str, dst: str, *, dtype=None, batch_bytes: int = 64 * 2**20,
                overwrite: bool = False) -> dict:
    """Converts the transformers checkpoint ``src`` to an Orbax model directory ``dst`` (layout above).

    ``dtype``: stored dtype (e.g. ``jnp.bfloat16``/``np.float32``); default each source tensor's own. An existing
    ``dst`` is replaced only under ``export_dir``'s rule (a directory medee_jax wrote, or ``overwrite``; never one
    that is or contains ``src``). Returns {"params": count, "bytes": stored bytes}.
    """
    ocp = _ocp()
    src = hf.local_checkpoint_dir(src)
    check_destination(dst, overwrite=overwrite, sources=(src,))  # before reading anything
    cfg = load_config(src)
    model = _abstract(cfg)
    plan, infos = hf.plan_import(model, src)
    by_param: dict[str, list[tuple[str, int | None, str]]] = {}
    for key, targets in plan.items():
        for path, layer, tf in targets:
            by_param.setdefault(path, []).append((key, layer, tf))
    shapes = param_paths(model)
    try:
        from orbax.checkpoint.experimental import v1 as ocp_v1
        from orbax.checkpoint.experimental.v1 import partial

        # Saves are synchronous here, so Orbax need not deep-copy each host array first (it would double memory).
        save_context = ocp_v1.Context()
        save_context.memory.deepcopy_host_arrays = False
    except (ImportError, AttributeError, TypeError):  # older Orbax: one whole-tree save (holds the whole model)
        partial = None

    n_params = total = 0
    with atomic_directory(dst, kind="orbax", overwrite=overwrite, sources=(src,)) as stage, \
            hf.safetensors_io.Reader(infos) as reader:
        batch, batch_size, whole = {}, 0, {}

        def flush():
            nonlocal batch, batch_size
            if batch:
                if partial is not None:
                    with save_context:
                        partial.save(stage, batch)
                    batch.clear()
                    _release_freed_memory()
                else:
                    _merge_into(whole, batch)
                batch, batch_size = {}, 0

        for path, shape in shapes.items():
            rows = by_param[path]
            first = infos[rows[0][0]]
            out_dtype = np.dtype(dtype) if dtype is not None else hf.safetensors_io.DTYPES[first.dtype]
            array = np.empty(shape, out_dtype)  # the one parameter held on the host
            for key, layer, tf in rows:
                hf.read_into(array if layer is None else array[layer], reader, key, tf)
            _merge_into(batch, _nest(path, array))
            batch_size += array.nbytes
            total += array.nbytes
            n_params += 1
            del array
            if batch_size >= batch_bytes:
                flush()
        flush()
        if partial is not None:
            partial.finalize(stage)
            _rename_item(stage, _state_item_name(stage))
        else:
            ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
                stage, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(whole)}))
        _write_config_and_sidecars(cfg, stage, src)
    return {"params": n_params, "bytes": total}


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them per thread arena otherwise; RSS would only grow)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _state_item_name(stage: str) -> str:
    items = [n for n in os.listdir(stage) if os.path.isdir(os.path.join(stage, n))]
    if len(items) != 1:
        raise RuntimeError(f"{stage}: expected one Orbax item after partial save, found {items}")
    return items[0]


def save_model(model, dst: str, *, source_dir: str | None = None, overwrite: bool = False) -> None:
    """Saves ``model``'s parameters (as they are, sharded or not) as an Orbax model directory in one save
    (``dst`` replaced only under ``export_dir``'s rule, as in ``hf_to_orbax``)."""
    from flax import nnx

    from . import SOURCE_DIR_ATTR

    ocp = _ocp()
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    source_dir = source_dir if source_dir is not None else getattr(model, SOURCE_DIR_ATTR, None)
    with atomic_directory(dst, kind="orbax", overwrite=overwrite, sources=(source_dir,)) as stage:
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
            stage, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(pure)}))
        _write_config_and_sidecars(model.config, stage, source_dir)


def check_orbax_dir(src: str) -> tuple[object, dict]:
    """Returns (config, {dotted path: ArrayMetadata}) of an Orbax model directory, checked against the config.

    Raises OrbaxCheckpointError naming the directory and, at once, every missing, unexpected or mis-shaped array.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise OrbaxCheckpointError(f"{src}: not a directory (expected an Orbax model directory from hf2orbax)")
    item = os.path.join(src, ITEM)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise OrbaxCheckpointError(f"{src}: no config.json beside the Orbax checkpoint (written by hf2orbax); "
                                   "cannot rebuild the model")
    if not os.path.isdir(item) or not os.path.isfile(os.path.join(item, "_METADATA")):
        hint = (" It looks like a transformers checkpoint; use hf2orbax for that direction."
                if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in os.listdir(src))
                else "")
        raise OrbaxCheckpointError(f"{src}: no Orbax PyTree item {ITEM!r} ({item}/_METADATA missing).{hint}")
    cfg = load_config(src)
    ocp = _ocp()
    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(_epath(item)).tree
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged checkpoint
        raise OrbaxCheckpointError(f"{item}: unreadable Orbax metadata ({type(e).__name__}: {e})") from e
    stored = _flatten(dict(tree))
    expected = param_paths(_abstract(cfg))
    missing = [p for p in expected if p not in stored]
    unexpected = [p for p in stored if p not in expected]
    misshaped = [f"{p} {list(stored[p].shape)} (expected {list(s)})" for p, s in expected.items()
                 if p in stored and tuple(stored[p].shape) != s]
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape ({len(misshaped)}): {', '.join(misshaped)}")
    if problems:
        raise OrbaxCheckpointError(f"{src}: Orbax params do not match config.json —\n  " + "\n  ".join(problems))
    return cfg, stored


def _restore_numpy(item: str, path: str, shape, dtype) -> np.ndarray:
    """Restores the one array at dotted ``path`` of the PyTree item as numpy (partial restore)."""
    ocp = _ocp()
    abstract = _nest(path, jax.ShapeDtypeStruct(tuple(shape), dtype))
    restore_args = _nest(path, ocp.RestoreArgs(restore_type=np.ndarray))
    out = ocp.PyTreeCheckpointer().restore(
        item, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True))
    for name in path.split("."):
        out = out[name]
    return np.asarray(out)


def orbax_to_hf(src: str, dst: str, *, dtype=None, max_shard_size="5GB", overwrite: bool = False) -> dict:
    """Converts an Orbax model directory ``src`` to a transformers checkpoint in ``dst``, one parameter at a time.

    ``dtype``: stored dtype; default each array's stored dtype. ``dst`` is replaced only under ``export_dir``'s
    rule (as in ``hf_to_orbax``). Returns ``write_checkpoint``'s summary.
    """
    check_destination(dst, overwrite=overwrite, sources=(src,))  # before reading anything
    cfg, stored = check_orbax_dir(src)
    item = os.path.join(os.path.abspath(src), ITEM)
    shapes = {p: tuple(m.shape) for p, m in stored.items()}
    dtypes = {p: np.dtype(dtype if dtype is not None else m.dtype) for p, m in stored.items()}
    entries = hf.export_entries(cfg, shapes, dtypes)
    current: dict[str, np.ndarray] = {}  # the one restored parameter

    def fetch(entry):
        _, path, layer, tf, shape, dt = entry
        if path not in current:
            current.clear()
            current[path] = _restore_numpy(item, path, shapes[path], stored[path].dtype)
        value = current[path]
        return hf.to_hf(value if layer is None else value[layer], tf, shape).astype(dt, copy=False)

    try:
        return hf.write_checkpoint(dst, cfg, entries, fetch, max_shard_size=max_shard_size, source_dir=src,
                                   overwrite=overwrite)
    finally:
        current.clear()


def load_model(src: str, dtype=None, mesh=None, *, param_dtype=None, remat: str = "none", rules=None):
    """Returns the model stored in Orbax model directory ``src``, each parameter restored onto its sharding
    (``mesh``/``rules`` as in ``from_pretrained``) and cast to ``param_dtype`` (default ``dtype``, default bf16)."""
    from . import SOURCE_DIR_ATTR, abstract_model
    from .sharding import sharding_for

    ocp = _ocp()
    cfg, _ = check_orbax_dir(src)
    model = abstract_model(cfg, dtype, param_dtype=param_dtype, remat=remat)
    paths = [path for _, path, _ in hf.model_params(model)]
    params = {path: hf.get_param(model, path) for path in paths}
    abstract, restore_args = {}, {}
    for path, p in params.items():
        value = p.get_value()
        sharding = sharding_for(p, mesh, rules)
        _merge_into(abstract, _nest(path, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)))
        _merge_into(restore_args, _nest(path, ocp.ArrayRestoreArgs(sharding=sharding, dtype=value.dtype)))
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(src), ITEM),
        args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    flat = _flatten(restored)
    for path, p in params.items():
        p.set_value(flat[path])
    setattr(model, SOURCE_DIR_ATTR, os.path.abspath(src))
    return model



def _epath(path: str):
    from etils import epath

    return epath.Path(path)
