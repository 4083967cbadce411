"""Models: one folder per vision-language family (``qwen2_5_vl/``, ``internvl/``), the shared Qwen2 decoder, and
Hugging Face checkpoint import/export through the family registry (``families.py``).

Importing this package imports neither jax nor flax (data workers import the families' host modules); the
functions below load them when called.
"""

from __future__ import annotations

import json
import os

from .families import FAMILIES, family_for_model_type, family_of
from .generate import GenerationOutput, generate, generate_with_info

# Attribute ``from_pretrained`` sets on a model: the checkpoint directory it came from (for tokenizer files).
SOURCE_DIR_ATTR = "hf_source_dir"


def config_from_hf_dict(d: dict, source: str = "config.json"):
    """Returns the model config of a parsed config.json, read by the family its ``model_type`` names."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    return family_for_model_type(d.get("model_type"), source).config().config_from_hf_dict(d, source=source)


def load_config(hf_dir: str):
    """Returns the model config read from ``hf_dir/config.json`` (any registered family)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return config_from_hf_dict(d, source=path)


def presets() -> dict:
    """Returns {preset name: config} of every family (e.g. ``qwen2_5_vl_7b``, ``internvl3_8b``)."""
    out = {}
    for family in FAMILIES:
        out.update(family.config().PRESETS)
    return out


def abstract_model(cfg, dtype=None, *, param_dtype=None, remat="none"):
    """Returns the model for ``cfg`` built abstractly (``nnx.eval_shape``: parameters are ShapeDtypeStructs)."""
    import jax.numpy as jnp
    from flax import nnx

    dtype = jnp.bfloat16 if dtype is None else dtype
    param_dtype = dtype if param_dtype is None else param_dtype
    model_class = family_of(cfg).model()
    return nnx.eval_shape(lambda: model_class(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=None))


def from_pretrained(hf_dir, dtype=None, mesh=None, *, param_dtype=None, remat="none", rules=None):
    """Returns a Flax NNX model for the transformers checkpoint in the local directory ``hf_dir``.

    The family comes from config.json's ``model_type`` (``families.py``). ``dtype`` is the compute dtype (default
    bfloat16), ``param_dtype`` the storage dtype (default: ``dtype``). With a ``jax.sharding.Mesh``, each parameter
    is placed directly on the NamedSharding its logical axes map to (``rules``: see
    ``medee_jax.models.sharding.DEFAULT_RULES``). Reads ``model.safetensors`` or a sharded checkpoint with
    ``model.safetensors.index.json``, in any key layout the family reads, one tensor at a time. Never unpickles
    and never runs code from the checkpoint. Raises ``hf.CheckpointError`` listing every missing, unexpected or
    mis-shaped tensor at once.
    """
    from . import hf

    hf_dir = hf.local_checkpoint_dir(hf_dir)
    cfg = load_config(hf_dir)
    hf.checkpoint_files(hf_dir)  # refuse pickles / empty dirs before building anything
    model = abstract_model(cfg, dtype, param_dtype=param_dtype, remat=remat)
    hf.load_weights(model, hf_dir, mesh=mesh, rules=rules)
    setattr(model, SOURCE_DIR_ATTR, os.path.abspath(hf_dir))
    return model


def save_pretrained(model, out_dir, *, dtype=None, max_shard_size="5GB", source_dir=None, overwrite=False):
    """Writes ``model`` as a transformers checkpoint: safetensors in the family's export key layout (sharded with
    ``model.safetensors.index.json`` above ``max_shard_size``), ``config.json``, and the tokenizer/processor files
    of ``source_dir`` (default: the directory ``from_pretrained`` loaded the model from).

    ``dtype`` is the stored dtype (default: each parameter's own). The export is written beside ``out_dir`` and
    renamed into place when complete; on failure nothing is left behind and an existing ``out_dir`` is untouched.
    An existing ``out_dir`` is replaced only if medee_jax wrote it and nothing was added since; anything else needs
    ``overwrite=True`` (the files that were not ours are then named in a warning); never a directory that is or
    contains ``source_dir`` (``medee_jax.models.export_dir``). Returns {"files": [...], "total_size": bytes}.
    """
    from . import hf

    source_dir = source_dir if source_dir is not None else getattr(model, SOURCE_DIR_ATTR, None)
    return hf.save_weights(model, out_dir, dtype=dtype, max_shard_size=max_shard_size, source_dir=source_dir,
                           overwrite=overwrite)
