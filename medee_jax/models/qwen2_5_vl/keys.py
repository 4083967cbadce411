"""Qwen2.5-VL checkpoint keys: every Hugging Face layout we read <-> our parameter tree.

One row per tensor family: (hf key pattern, our parameter path, transform); ``{i}`` is a layer index and the
parameter is stacked along its first axis. Transforms are defined in ``medee_jax.models.hf`` (``linear``:
torch [out, in] -> our [in, out]; ``copy``; ``patch``: the Conv3d weight [Dv, C, T, P, P] -> a [C*T*P*P, Dv]
kernel). Two spellings of the same layout are read: the hub's (``visual.*``, ``model.layers.*``, ``lm_head.*``,
what transformers writes and what we export) and transformers-5's in-memory one (``model.visual.*``,
``model.language_model.*``), normalised to the hub's on read.
"""

from __future__ import annotations

import re

from ..decoder import decoder_key_rows
from ..hf import KeyLayout, KeyTable

# (hf key, our path, transform): the hub layout (the decoder's rows: decoder.decoder_key_rows); the in-memory layout is
# normalised to it on read.
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
    *decoder_key_rows("model."),
    ("lm_head.weight", "lm_head", "linear"),
)

# transformers' in-memory layout (what save_pretrained of a transformers-5 model may write) -> hub layout.
IN_MEMORY_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))

HUB = KeyLayout("hub (visual.*, model.layers.*; also model.visual.*, model.language_model.*)", QWEN2_5_VL_KEYS,
                aliases=IN_MEMORY_PREFIXES, optional=("lm_head",))


def patch_shape(cfg) -> tuple[int, ...]:
    """Returns the Conv3d patch-embedding weight's shape [Dv, C, T, P, P]."""
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


KEYS = KeyTable(export=HUB, imports=(HUB,), patch_shape=patch_shape,
                # Non-persistent buffers some older exports carry; they are recomputed, never loaded.
                ignored=re.compile(r"^(.*\.)?(rotary_emb|rotary_pos_emb)\.inv_freq$"))


def normalise_key(key: str) -> str:
    """Returns ``key`` in the hub layout (``visual.*``, ``model.layers.*``, ``lm_head.*``)."""
    return HUB.normalise(key)


def match_key(hf_key: str) -> tuple[str, int | None, str] | None:
    """Returns (our path, layer index or None, transform) for a hub-layout key, or None if no row matches."""
    hits = HUB.match(hf_key)
    return hits[0] if hits else None
