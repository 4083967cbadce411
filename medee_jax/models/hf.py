"""Hugging Face checkpoint <-> Flax NNX model: per-family key tables and safetensors streaming read/write.

A key table row maps one transformers tensor family to one of our parameters:
    (hf key pattern, our parameter path, transform)
``{i}`` in a pattern is a layer index; the matching parameter is stacked along its first axis.
Transforms (torch layout -> ours): ``linear`` transposes [out, in] -> [in, out]; ``copy`` keeps the array;
``patch`` maps the Conv3d weight [Dv, C, T, P, P] to a [C*T*P*P, Dv] kernel.
"""

from __future__ import annotations

import re

import numpy as np

from .config import Qwen25VLConfig

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


# ----------------------------------------------------------------------------------------------------------------
# Reading.

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


def get_param(model: nnx.Module, path: str) -> nnx.Param:
    """Returns the ``nnx.Param`` at dotted ``path`` in ``model``."""
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def checkpoint_files(hf_dir: str) -> list[str]:
    """Returns the safetensors files of a checkpoint (single-file or sharded with an index), refusing pickles."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
    if os.path.isfile(single):
        return [single]
    pickles = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ValueError(f"{hf_dir}: only pickled weights found ({', '.join(sorted(pickles))}); medee_jax reads "
                         "safetensors only and never unpickles. Convert them with transformers first.")
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _set_layer(stacked, value, index):
    return stacked.at[index].set(value)


def iter_tensors(hf_dir: str):
    """Yields (hub-layout key, numpy array) one tensor at a time from a checkpoint's safetensors files."""
    from safetensors import safe_open

    for path in checkpoint_files(hf_dir):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                yield normalise_key(key), f.get_tensor(key)


def load_weights(model: nnx.Module, hf_dir: str) -> None:
    """Fills ``model``'s parameters from the checkpoint in ``hf_dir``, tensor by tensor."""
    cfg = model.config
    seen = set()
    for key, array in iter_tensors(hf_dir):
        hit = match_key(key)
        if hit is None:
            continue
        path, layer, tf = hit
        p = get_param(model, path)
        value = jnp.asarray(to_ours(array, tf), dtype=p.dtype)
        if layer is None:
            p.value = value
        else:
            p.value = _set_layer(p.value, value, layer)
        seen.add(key)
    if cfg.tie_word_embeddings:
        seen.add("lm_head.weight")
