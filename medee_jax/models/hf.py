"""Hugging Face checkpoint <-> Flax NNX model: per-family key tables and safetensors streaming read/write.

Import (``load_weights``) reads only the safetensors headers first, checks every tensor name and shape against the
model (missing, unexpected, mis-shaped and unreadable tensors are reported together in one ``CheckpointError``),
then streams tensor by tensor into parameters allocated once on their sharding. Export (``write_checkpoint``)
computes every header up front and streams tensor by tensor into (optionally sharded) safetensors files, inside a
temporary directory that is renamed into place only when complete (``atomic_directory``).

A key table row maps one transformers tensor family to one of our parameters:
    (hf key pattern, our parameter path, transform)
``{i}`` in a pattern is a layer index; the matching parameter is stacked along its first axis.
Transforms (torch layout -> ours): ``linear`` transposes [out, in] -> [in, out]; ``copy`` keeps the array;
``patch`` maps the Conv3d weight [Dv, C, T, P, P] to a [C*T*P*P, Dv] kernel.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import safetensors_io
from .config import Qwen25VLConfig
from .export_dir import DestinationError, atomic_directory  # noqa: F401  (re-exported: the destination rule)
from .sharding import sharding_for

# (hf key, our path, transform). Text keys use the hub layout; the in-memory layout is normalised to it on read.
QWEN2_5_VL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("visual.patch_embed.proj.weight", "visual.patch_embed", "patch"),
    ("visual.blocks.{i}.norm1.weight", "visual.blocks.norm1", "copy"),
    ("visual.blocks.{i}.norm2.weight", "visual.blocks.norm2", "copy"),
    ("visual.blocks.{i}.attn.qkv.weight", "visual.blocks.qkv_kernel", "linear"),
    ("visual.blocks.{i}.attn.qkv.bias", "visual.blocks.qkv_bias", "copy"),
    ("visual.blocks.{i}.attn.proj.weight", "visual.blocks.proj_kernel", "linear"),
    ("visual.blocks.{i}.attn.proj.bias", "visual.blocks.proj_bias", "copy"),
    ("visual.blocks.{i}.mlp.gate_proj.weight", "visual.blocks.gate_proj_kernel", "linear"),
    ("visual.blocks.{i}.mlp.gate_proj.bias", "visual.blocks.gate_proj_bias", "copy"),
    ("visual.blocks.{i}.mlp.up_proj.weight", "visual.blocks.up_proj_kernel", "linear"),
    ("visual.blocks.{i}.mlp.up_proj.bias", "visual.blocks.up_proj_bias", "copy"),
    ("visual.blocks.{i}.mlp.down_proj.weight", "visual.blocks.down_proj_kernel", "linear"),
    ("visual.blocks.{i}.mlp.down_proj.bias", "visual.blocks.down_proj_bias", "copy"),
    ("visual.merger.ln_q.weight", "visual.merger.ln_q", "copy"),
    ("visual.merger.mlp.0.weight", "visual.merger.mlp0_kernel", "linear"),
    ("visual.merger.mlp.0.bias", "visual.merger.mlp0_bias", "copy"),
    ("visual.merger.mlp.2.weight", "visual.merger.mlp2_kernel", "linear"),
    ("visual.merger.mlp.2.bias", "visual.merger.mlp2_bias", "copy"),
    ("model.embed_tokens.weight", "language_model.embed_tokens", "copy"),
    ("model.layers.{i}.input_layernorm.weight", "language_model.layers.input_layernorm", "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", "language_model.layers.q_proj_kernel", "linear"),
    ("model.layers.{i}.self_attn.q_proj.bias", "language_model.layers.q_proj_bias", "copy"),
    ("model.layers.{i}.self_attn.k_proj.weight", "language_model.layers.k_proj_kernel", "linear"),
    ("model.layers.{i}.self_attn.k_proj.bias", "language_model.layers.k_proj_bias", "copy"),
    ("model.layers.{i}.self_attn.v_proj.weight", "language_model.layers.v_proj_kernel", "linear"),
    ("model.layers.{i}.self_attn.v_proj.bias", "language_model.layers.v_proj_bias", "copy"),
    ("model.layers.{i}.self_attn.o_proj.weight", "language_model.layers.o_proj_kernel", "linear"),
    ("model.layers.{i}.post_attention_layernorm.weight", "language_model.layers.post_attention_layernorm", "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", "language_model.layers.gate_proj_kernel", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "language_model.layers.up_proj_kernel", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "language_model.layers.down_proj_kernel", "linear"),
    ("model.norm.weight", "language_model.norm", "copy"),
    ("lm_head.weight", "lm_head", "linear"),
)

# transformers' in-memory layout (what save_pretrained of a transformers-5 model may write) -> hub layout.
_IN_MEMORY_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def normalise_key(key: str) -> str:
    """Returns ``key`` in the hub layout (``visual.*``, ``model.layers.*``, ``lm_head.*``)."""
    for old, new in _IN_MEMORY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_COMPILED = tuple((_compile(k), path, tf) for k, path, tf in QWEN2_5_VL_KEYS)


def match_key(hf_key: str) -> tuple[str, int | None, str] | None:
    """Returns (our path, layer index or None, transform) for a hub-layout key, or None if no row matches."""
    for pattern, path, tf in _COMPILED:
        m = pattern.match(hf_key)
        if m:
            return path, (int(m.group(1)) if m.groups() else None), tf
    return None


def expected_keys(cfg: Qwen25VLConfig) -> list[str]:
    """Returns every hub-layout tensor name a checkpoint of ``cfg`` holds (lm_head omitted when tied)."""
    out = []
    for pattern, path, _ in QWEN2_5_VL_KEYS:
        if path == "lm_head" and cfg.tie_word_embeddings:
            continue
        if "{i}" in pattern:
            n = cfg.vision.depth if pattern.startswith("visual.") else cfg.text.num_hidden_layers
            out.extend(pattern.format(i=i) for i in range(n))
        else:
            out.append(pattern)
    return out


def to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    """Returns a transformers-layout tensor in our layout."""
    if transform == "copy":
        return array
    if transform == "linear":
        return array.T
    if transform == "patch":
        return array.reshape(array.shape[0], -1).T
    raise ValueError(f"unknown transform {transform!r}")


def to_hf(array: np.ndarray, transform: str, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Returns one of our tensors in transformers' layout (``patch`` needs the Conv3d shape)."""
    if transform == "copy":
        return array
    if transform == "linear":
        return array.T
    if transform == "patch":
        return array.T.reshape(hf_shape)
    raise ValueError(f"unknown transform {transform!r}")


def hf_shape(cfg: Qwen25VLConfig, hf_key: str, our_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Returns the transformers shape of one tensor given our (unstacked) shape."""
    if transform == "copy":
        return tuple(our_shape)
    if transform == "linear":
        return tuple(reversed(our_shape))
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


# Non-persistent buffers some older exports carry; they are recomputed, never loaded.
IGNORED_KEYS = re.compile(r"^(.*\.)?(rotary_emb|rotary_pos_emb)\.inv_freq$")

# Tokenizer / processor / generation files copied from the source checkpoint on export.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ----------------------------------------------------------------------------------------------------------------
# Reading.

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the directory and every offending tensor."""


def get_param(model: nnx.Module, path: str) -> nnx.Param:
    """Returns the ``nnx.Param`` at dotted ``path`` in ``model``."""
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def model_params(model: nnx.Module) -> list[tuple[str, str, str]]:
    """Returns (hf key pattern, our path, transform) for every parameter ``model`` has, in key-table order."""
    return [(k, path, tf) for k, path, tf in QWEN2_5_VL_KEYS
            if not (path == "lm_head" and model.config.tie_word_embeddings)]


def num_layers(cfg: Qwen25VLConfig, pattern: str) -> int:
    return cfg.vision.depth if pattern.startswith("visual.") else cfg.text.num_hidden_layers


def local_checkpoint_dir(hf_dir) -> str:
    """Returns ``hf_dir`` as a path, refusing anything that is not a local directory (no hub ids, no remote code)."""
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        hint = (" It looks like a hub id: medee_jax never downloads or runs remote code; fetch the checkpoint first "
                "(e.g. `huggingface-cli download`) and pass the local directory." if "/" in hf_dir and
                not os.path.exists(os.path.dirname(hf_dir) or ".") else "")
        raise FileNotFoundError(f"{hf_dir}: not a local checkpoint directory.{hint}")
    return hf_dir


def checkpoint_files(hf_dir: str) -> list[str]:
    """Returns the safetensors files of a checkpoint (single-file or sharded with an index), refusing pickles."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = dict(json.load(f)["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        try:
            files = [safetensors_io.shard_path(hf_dir, name) for name in sorted(set(weight_map.values()), key=str)]
        except ValueError as e:
            raise CheckpointError(f"{index}: {e}") from e
        absent = [os.path.basename(p) for p in files if not os.path.isfile(p)]
        if absent:
            raise CheckpointError(f"{index}: names shard files that do not exist: {', '.join(absent)}")
        return files
    if os.path.isfile(single):
        return [single]
    pickles = sorted(n for n in os.listdir(hf_dir) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{hf_dir}: only pickled weights found ({', '.join(pickles)}); medee_jax reads "
                              "safetensors only and never unpickles. Convert them to safetensors with transformers "
                              "(`model.save_pretrained(dir, safe_serialization=True)`) in a trusted environment.")
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def read_headers(hf_dir: str) -> dict[str, safetensors_io.TensorInfo]:
    """Returns {hub-layout key: TensorInfo} over all safetensors files of ``hf_dir`` (headers only)."""
    infos: dict[str, safetensors_io.TensorInfo] = {}
    duplicates = []
    for path in checkpoint_files(hf_dir):
        try:
            file_infos, _ = safetensors_io.read_header(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        for key, info in file_infos.items():
            hub = normalise_key(key)
            if hub in infos:
                duplicates.append(f"{key} ({os.path.basename(path)}; also {infos[hub].name} in "
                                  f"{os.path.basename(infos[hub].path)})")
                continue
            infos[hub] = info
    if duplicates:
        raise CheckpointError(f"{hf_dir}: tensors stored twice: {'; '.join(duplicates)}")
    return infos


def plan_import(model: nnx.Module, hf_dir: str):
    """Checks every tensor of ``hf_dir`` against ``model`` (abstract is fine) from the headers alone.

    Returns ({hub-layout key: (our path, layer or None, transform)} of the tensors to load, {key: TensorInfo});
    raises one CheckpointError listing every missing, unexpected, mis-shaped or unreadable tensor.
    """
    cfg = model.config
    infos = read_headers(hf_dir)
    wanted = {key: (path, layer, tf, shape) for key, path, layer, tf, shape, _ in expected_tensors(model)}
    missing = [k for k in wanted if k not in infos]
    unexpected, misshaped, bad_dtype, plan = [], [], [], {}
    for key, info in infos.items():
        if key not in wanted:
            tied_head = key == "lm_head.weight" and cfg.tie_word_embeddings
            if not tied_head and not IGNORED_KEYS.match(key):
                unexpected.append(info.name)
            continue
        path, layer, tf, shape = wanted[key]
        if info.shape != shape:
            misshaped.append(f"{info.name} {list(info.shape)} (expected {list(shape)})")
        elif info.dtype not in safetensors_io.DTYPES or not _is_float(info.dtype):
            bad_dtype.append(f"{info.name} ({info.dtype})")
        else:
            plan[key] = (path, layer, tf)
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {_first_few(sorted(unexpected))}")
    if misshaped:
        problems.append(f"wrong shape ({len(misshaped)}): {_first_few(misshaped)}")
    if bad_dtype:
        problems.append(f"unsupported dtype ({len(bad_dtype)}): {_first_few(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{hf_dir}: checkpoint does not match the {cfg.model_type} config "
                              f"(config.json) —\n  " + "\n  ".join(problems))
    return plan, infos


def _first_few(names: list[str], limit: int = 20) -> str:
    """Returns the first ``limit`` names joined, then "... and N more": an error stays readable (a config.json
    with a million layers used to produce a 528 MB message)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


def _is_float(name: str) -> bool:
    return name.startswith(("F", "BF"))


@functools.lru_cache(maxsize=None)
def _zeros_on(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    """Returns a jitted ``(stacked, value, index) -> stacked`` that overwrites one layer in place (donated)."""
    return jax.jit(lambda stacked, value, i: jax.lax.dynamic_update_index_in_dim(stacked, value, i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _slice_sharding(sharding):
    """Returns the sharding of one layer of a stacked array on ``sharding`` (drops the leading axis)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return sharding


def place(array: np.ndarray, sharding) -> jax.Array:
    """Returns ``array`` as a jax.Array on ``sharding``, each device taking only its own slice."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.ascontiguousarray(array[index]))


def load_weights(model: nnx.Module, hf_dir: str, mesh=None, rules=None) -> None:
    """Fills ``model``'s parameters (an abstract ``nnx.eval_shape`` model is fine) from ``hf_dir``.

    Each parameter is allocated once on its sharding (``mesh`` + ``rules``, see sharding.py; one device when
    ``mesh`` is None). Tensors are read one at a time in file order; stacked parameters are allocated as zeros and
    each layer slice is written with a donated jitted update, so host memory holds one tensor beyond the model.
    """
    plan, infos = plan_import(model, hf_dir)
    order = sorted(plan, key=lambda k: (infos[k].path, infos[k].start))
    shardings = {}
    with safetensors_io.Reader(infos) as reader:
        for key in order:
            path, layer, tf = plan[key]
            p = get_param(model, path)
            if path not in shardings:
                shardings[path] = sharding_for(p, mesh, rules)
                if layer is not None:  # allocate the whole stack once, on its sharding
                    abstract = p.get_value()
                    p.set_value(_zeros_on(tuple(abstract.shape), jnp.dtype(abstract.dtype), shardings[path])())
            sharding = shardings[path]
            shape = p.get_value().shape if layer is None else p.get_value().shape[1:]
            array = np.empty(shape, p.get_value().dtype)  # the one tensor on the host, in our layout
            read_into(array, reader, key, tf)
            if layer is None:
                p.set_value(place(array, sharding))
            else:
                value = place(array, _slice_sharding(sharding))
                p.set_value(_layer_writer(sharding)(p.get_value(), value, np.int32(layer)))
            del array


def read_into(out: np.ndarray, reader: safetensors_io.Reader, key: str, transform: str,
              block_bytes: int = 32 * 2**20) -> None:
    """Reads transformers tensor ``key`` into ``out`` (our layout and dtype) a block of rows at a time, so only
    ``block_bytes`` of extra host memory is used whatever the tensor's size (also for transposed kernels)."""
    info = reader.infos[key]
    if transform == "patch" or not info.shape:
        out[...] = to_ours(reader.read(key), transform)
        return
    rows = info.shape[0]
    row_bytes = max(1, info.nbytes // max(rows, 1))
    step = max(1, block_bytes // row_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = reader.read(key, (start, stop))
        if transform == "copy":
            out[start:stop] = block
        elif transform == "linear":  # torch [out, in] rows -> our [in, out] columns
            out[:, start:stop] = block.T
        else:
            raise ValueError(f"unknown transform {transform!r}")
        del block


# ----------------------------------------------------------------------------------------------------------------
# Writing.

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Returns a byte count for an int or a string such as "5GB" (10^9) or "500MiB" (2^20)."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {size!r} (use bytes or e.g. '5GB', '500MB', '2GiB')")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def export_entries(cfg: Qwen25VLConfig, our_shapes: dict[str, tuple[int, ...]],
                   dtypes: dict[str, np.dtype] | None = None
                   ) -> list[tuple[str, str, int | None, str, tuple[int, ...], np.dtype]]:
    """Returns (hub key, our path, layer or None, transform, hf shape, dtype) for every tensor of a checkpoint.

    ``our_shapes``/``dtypes``: {our path: shape/dtype} (stacked shapes for per-layer families; dtype default fp32).
    lm_head is left out when the config ties it to the embedding. Entries are ordered parameter by parameter (all
    layers of one stacked family together), so a writer fetching one stacked parameter at a time holds one at a time.
    """
    out = []
    for pattern, path, tf in QWEN2_5_VL_KEYS:
        if path == "lm_head" and cfg.tie_word_embeddings:
            continue
        shape = tuple(our_shapes[path])
        dtype = np.dtype(np.float32) if dtypes is None else np.dtype(dtypes[path])
        if "{i}" in pattern:
            for i in range(num_layers(cfg, pattern)):
                out.append((pattern.format(i=i), path, i, tf, hf_shape(cfg, pattern, shape[1:], tf), dtype))
        else:
            out.append((pattern, path, None, tf, hf_shape(cfg, pattern, shape, tf), dtype))
    return out


def expected_tensors(model: nnx.Module):
    """Returns ``export_entries`` for ``model`` (abstract is fine): every hub tensor its checkpoint must hold."""
    shapes = {path: tuple(get_param(model, path).get_value().shape) for _, path, _ in model_params(model)}
    dtypes = {path: get_param(model, path).get_value().dtype for _, path, _ in model_params(model)}
    return export_entries(model.config, shapes, dtypes)


def _dtype_label(dtype) -> str:
    return {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16",
            np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}.get(np.dtype(dtype), str(np.dtype(dtype)))


def hf_config_dict(cfg: Qwen25VLConfig, dtype) -> dict:
    """Returns the config.json written beside exported weights (nested transformers-5 layout + dtype)."""
    d = cfg.to_hf_dict()
    label = _dtype_label(dtype)
    d["dtype"] = label  # transformers >= 4.56
    d["torch_dtype"] = label  # older readers (transformers 4.x, vLLM)
    return d


def copy_sidecar_files(source_dir: str | None, out_dir: str) -> list[str]:
    """Copies tokenizer/processor/generation files from ``source_dir`` into ``out_dir``; returns their names."""
    if not source_dir or not os.path.isdir(source_dir):
        return []
    copied = []
    for name in SIDECAR_FILES:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def write_checkpoint(out_dir: str, cfg: Qwen25VLConfig, entries, fetch, *, max_shard_size="5GB",
                     source_dir: str | None = None, overwrite: bool = False, sources=()) -> dict:
    """Writes a transformers checkpoint atomically: safetensors (sharded with an index above ``max_shard_size``),
    config.json and the source's tokenizer/processor files. ``entries`` come from ``export_entries``;
    ``fetch(entry)`` returns that tensor in transformers' layout. Returns {"files": [...], "total_size": bytes}.
    An existing ``out_dir`` is replaced only under ``export_dir``'s rule (``overwrite``; never a directory that is
    or contains ``source_dir`` or one of ``sources``).
    """
    limit = parse_size(max_shard_size)
    shards, current, current_bytes = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[4], dtype=np.int64)) * np.dtype(e[5]).itemsize
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(e)
        current_bytes += nbytes
    if current:
        shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    float_dtypes = [np.dtype(e[5]) for e in entries]
    with atomic_directory(out_dir, kind="hf", overwrite=overwrite, sources=(source_dir, *sources)) as stage:
        os.makedirs(stage)
        total, weight_map = 0, {}
        for fname, shard in zip(names, shards):
            by_key = {e[0]: e for e in shard}
            total += safetensors_io.write_file(os.path.join(stage, fname), [(e[0], e[4], e[5]) for e in shard],
                                               lambda key: fetch(by_key[key]), metadata={"format": "pt"})
            weight_map.update({e[0]: fname for e in shard})
        if len(shards) > 1:
            with open(os.path.join(stage, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)
        with open(os.path.join(stage, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_dict(cfg, float_dtypes[0]), f, indent=2)
        copy_sidecar_files(source_dir, stage)
    return {"files": names, "total_size": total}


def save_weights(model: nnx.Module, out_dir: str, *, dtype=None, max_shard_size="5GB",
                 source_dir: str | None = None, overwrite: bool = False) -> dict:
    """Exports ``model`` to a transformers checkpoint in ``out_dir`` (see ``write_checkpoint``), one tensor at a
    time from the device arrays (``dtype``: the stored dtype, default each parameter's own)."""
    cfg = model.config
    params = {path: get_param(model, path) for _, path, _ in model_params(model)}
    for path, p in params.items():
        if not getattr(p.get_value(), "is_fully_addressable", True):
            raise NotImplementedError(f"{path} is sharded across processes; gather it to one host before exporting")
    shapes = {path: tuple(p.get_value().shape) for path, p in params.items()}
    dtypes = {path: np.dtype(dtype if dtype is not None else p.get_value().dtype) for path, p in params.items()}
    entries = export_entries(cfg, shapes, dtypes)

    def fetch(entry):
        _, path, layer, tf, shape, dt = entry
        value = params[path].get_value()
        host = np.asarray(value if layer is None else value[layer])
        return to_hf(host, tf, shape).astype(dt, copy=False)

    return write_checkpoint(out_dir, cfg, entries, fetch, max_shard_size=max_shard_size, source_dir=source_dir,
                            overwrite=overwrite)
