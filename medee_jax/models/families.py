"""The model-family registry: one explicit record per vision-language family, keyed by config.json's ``model_type``.

Everything outside ``models/<family>/`` asks the family through this module (the input pipeline, batch assembly,
the train steps, checkpoint import/export, the Orbax layout, the tools); none of it names a family. Importing this
module imports neither jax nor flax: a record names its modules by import path and loads them on first use.

A family record (``Family``):
  name             the family's name (its folder ``medee_jax/models/<name>/``; also ``family`` on its configs)
  model_types      config.json ``model_type`` values it reads (e.g. the "-hf" and the original remote-code layout)
  config_module    jax-free: ``config_from_hf_dict(d, source)``, ``PRESETS``, ``demo_config(tokenizer)``,
                   ``vision_flops_per_unit(cfg, trained=..., units_per_image=...)``; its configs have ``family``,
                   ``model_type``, ``text`` (a ``TextConfig``), ``image_token_id``, ``tie_word_embeddings`` and
                   ``to_hf_dict()``
  model_class      "module:Class", the NNX model (a ``vlm.VisionLanguageModel``): ``encode_images(pixel_values,
                   **vision)`` + the shared decoder, embed/scatter, logits and host call path
  keys_module      ``KEYS``: a ``hf.KeyTable`` (the layout it exports, every layout it imports)
  host_module      jax-free: ``image_inputs(model_config, options, image_token_id)`` -> the family's
                   ``ImageInputs`` (below)
  vision_paths     parameter path prefixes of the vision tower (frozen unless ``model.train_vision``)
  projector_paths  parameter path prefixes of the projector (frozen unless ``model.train_projector``)
  bucket_field     the training config's ``data.<field>`` listing the batch sizes of vision units (buckets)
  demo_tokenizer   the flavour of ``medee_jax.data.demo_tokenizer.build_demo_tokenizer`` the embedded demo uses

``ImageInputs`` (one frozen, picklable dataclass per family, in ``host_module``) is what data workers and batch
assembly know about images. A batch's images are ``units`` (rows of pixel_values: Qwen patches, InternVL tiles):
  info_key, unit_name, position_axes (() for positions [B, L], (3,) for M-RoPE [3, B, L]), unit_multiple,
  chat_tokens (``load_chat_tokenizer`` keywords: image token, prefix/suffix around an expanded image)
  load(paths) -> (pixels, info)        worker side: one example's images, and its per-image info (info_key)
  token_counts(info) -> [int]          LLM image tokens per image
  concat_info(infos) -> array          several examples' info, in order
  num_features(units) -> int           feature rows (= image tokens) of that many units
  pixel_batch(pixels, bucket) / empty_pixels(units)   float32 pixel_values padded to a bucket / all padding
  layout(info, pad_to) -> dict / extend_layout(vision, units) -> dict   the family-specific arrays of the batch's
                                       ``vision`` dict (may be empty), and the same padded to more units
  positions(ids, info, mask, segment_ids) / sequence_positions(ids, info)   rotary position ids

Adding a third family (e.g. Qwen3-VL, Gemma 3):
  1. a folder ``medee_jax/models/<name>/`` with ``config.py`` (frozen dataclasses, ``config_from_hf_dict``,
     ``to_hf_dict``, presets, ``demo_config``, ``vision_flops_per_unit``), ``model.py`` (a ``VisionLanguageModel``
     subclass: the vision tower, projector, ``encode_images`` and ``prepare_inputs``; the text decoder is the shared
     one when it fits, else a new decoder module beside ``decoder.py``), ``keys.py`` (a ``KeyTable``, one row per
     tensor family) and ``host.py`` (jax-free: preprocessing entry point, token counts, positions, layout);
  2. one ``Family(...)`` line in ``FAMILIES`` below;
  3. tests beside the others: parity with transformers on a tiny random checkpoint (both directions), real-size
     structure of its presets on the meta device, a trainer test.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """One vision-language model family (see the module docstring for each field)."""

    name: str
    model_types: tuple[str, ...]
    config_module: str
    model_class: str
    keys_module: str
    host_module: str
    vision_paths: tuple[str, ...]
    projector_paths: tuple[str, ...]
    bucket_field: str
    demo_tokenizer: str

    def config(self):
        """Returns the family's (jax-free) config module."""
        return importlib.import_module(self.config_module)

    def model(self):
        """Returns the family's NNX model class (imports jax and flax)."""
        module, _, name = self.model_class.partition(":")
        return getattr(importlib.import_module(module), name)

    def keys(self):
        """Returns the family's ``hf.KeyTable``."""
        return importlib.import_module(self.keys_module).KEYS

    def host(self):
        """Returns the family's (jax-free) host-side module."""
        return importlib.import_module(self.host_module)

    def image_inputs(self, model_config, options=None, image_token_id: int | None = None):
        """Returns the family's ``ImageInputs`` for a model config (or its vision config) and data options."""
        return self.host().image_inputs(model_config, options, image_token_id)


FAMILIES: tuple[Family, ...] = (
    Family(name="qwen2_5_vl", model_types=("qwen2_5_vl",),
           config_module="medee_jax.models.qwen2_5_vl.config",
           model_class="medee_jax.models.qwen2_5_vl.model:Qwen25VL",
           keys_module="medee_jax.models.qwen2_5_vl.keys",
           host_module="medee_jax.models.qwen2_5_vl.host",
           vision_paths=("visual.patch_embed", "visual.blocks"), projector_paths=("visual.merger",),
           bucket_field="patch_buckets", demo_tokenizer="qwen2_5_vl"),
    Family(name="internvl", model_types=("internvl", "internvl_chat"),
           config_module="medee_jax.models.internvl.config",
           model_class="medee_jax.models.internvl.model:InternVL",
           keys_module="medee_jax.models.internvl.keys",
           host_module="medee_jax.models.internvl.host",
           vision_paths=("vision_tower",), projector_paths=("projector",),
           bucket_field="tile_buckets", demo_tokenizer="internvl"),
)

# The family of the embedded demo model when a training config does not choose one (``model.family``).
DEFAULT_FAMILY = "qwen2_5_vl"

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(BY_MODEL_TYPE)


def family_for_model_type(model_type: Any, source: str = "config.json") -> Family:
    """Returns the family reading config.json ``model_type``; raises ValueError naming the supported ones."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(supported_model_types())}")
    return BY_MODEL_TYPE[model_type]


def family_named(name: str) -> Family:
    """Returns the family called ``name`` (e.g. a config's ``model.family``); raises ValueError naming them all."""
    if name not in BY_NAME:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def family_of(config) -> Family:
    """Returns the family of a model config, a vision config, or a model (anything with a ``family`` attribute,
    directly or on its ``config``)."""
    name = getattr(config, "family", None)
    if name is None:
        name = getattr(getattr(config, "config", None), "family", None)
    if name is None:
        raise TypeError(f"{type(config).__name__} is not a model config of a registered family")
    return family_named(name)
