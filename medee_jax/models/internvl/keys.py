"""InternVL3 checkpoint keys: every Hugging Face layout we read <-> our parameter tree.

One row per tensor family: (hf key pattern, our parameter path, transform); ``{i}`` is a layer index and the
parameter is stacked along its first axis; transforms are defined in ``medee_jax.models.hf``. Rows of tensors a
variant lacks (q/k/v biases and LayerNorm biases in the 6B style, qk-norm weights in the 300M style, a tied
lm_head) are skipped because the model has no such parameter.

Layouts read:
  * "-hf" (transformers' InternVLForConditionalGeneration, what we export): ``vision_tower.*``,
    ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``; also its in-memory
    spelling (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``,
    ``lm_head.weight``);
  * original (OpenGVLab's remote code): ``vision_model.*`` with ``class_embedding``, ``position_embedding``,
    ``patch_embedding``, ``encoder.layers``, fused ``attn.qkv`` (rows q | k | v), ``attn.proj``, ``norm1``/``norm2``,
    ``ls1``/``ls2``; projector ``mlp1.{0,1,3}``; the LLM under ``language_model.model.*`` — read without running any
    code from the checkpoint.
"""

from __future__ import annotations

import re

from ..decoder import decoder_key_rows
from ..hf import KeyLayout, KeyTable

_V, _L = "vision_tower.", "vision_tower.layers."  # our paths

HF_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vision_tower.embeddings.cls_token", _V + "cls_token", "unbatch"),  # [1, 1, D] -> [1, D]
    ("vision_tower.embeddings.position_embeddings", _V + "position_embeddings", "unbatch"),  # [1, N+1, D]
    ("vision_tower.embeddings.patch_embeddings.projection.weight", _V + "patch_kernel", "patch"),
    ("vision_tower.embeddings.patch_embeddings.projection.bias", _V + "patch_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.layernorm_before.weight", _L + "norm1", "copy"),
    ("vision_tower.encoder.layer.{i}.layernorm_before.bias", _L + "norm1_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.q_proj.weight", _L + "q_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.attention.q_proj.bias", _L + "q_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.k_proj.weight", _L + "k_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.attention.k_proj.bias", _L + "k_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.v_proj.weight", _L + "v_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.attention.v_proj.bias", _L + "v_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.q_norm.weight", _L + "q_norm", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.k_norm.weight", _L + "k_norm", "copy"),
    ("vision_tower.encoder.layer.{i}.attention.projection_layer.weight", _L + "proj_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.attention.projection_layer.bias", _L + "proj_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.lambda_1", _L + "lambda_1", "copy"),
    ("vision_tower.encoder.layer.{i}.layernorm_after.weight", _L + "norm2", "copy"),
    ("vision_tower.encoder.layer.{i}.layernorm_after.bias", _L + "norm2_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.mlp.fc1.weight", _L + "fc1_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.mlp.fc1.bias", _L + "fc1_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.mlp.fc2.weight", _L + "fc2_kernel", "linear"),
    ("vision_tower.encoder.layer.{i}.mlp.fc2.bias", _L + "fc2_bias", "copy"),
    ("vision_tower.encoder.layer.{i}.lambda_2", _L + "lambda_2", "copy"),
    ("multi_modal_projector.layer_norm.weight", "projector.norm", "copy"),
    ("multi_modal_projector.layer_norm.bias", "projector.norm_bias", "copy"),
    ("multi_modal_projector.linear_1.weight", "projector.linear1_kernel", "linear"),
    ("multi_modal_projector.linear_1.bias", "projector.linear1_bias", "copy"),
    ("multi_modal_projector.linear_2.weight", "projector.linear2_kernel", "linear"),
    ("multi_modal_projector.linear_2.bias", "projector.linear2_bias", "copy"),
    *decoder_key_rows("language_model.model."),
    ("language_model.lm_head.weight", "lm_head", "linear"),
)

ORIGINAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vision_model.embeddings.class_embedding", _V + "cls_token", "unbatch"),
    ("vision_model.embeddings.position_embedding", _V + "position_embeddings", "unbatch"),
    ("vision_model.embeddings.patch_embedding.weight", _V + "patch_kernel", "patch"),
    ("vision_model.embeddings.patch_embedding.bias", _V + "patch_bias", "copy"),
    ("vision_model.encoder.layers.{i}.norm1.weight", _L + "norm1", "copy"),
    ("vision_model.encoder.layers.{i}.norm1.bias", _L + "norm1_bias", "copy"),
    ("vision_model.encoder.layers.{i}.attn.qkv.weight", _L + "q_kernel", "linear_part:0/3"),
    ("vision_model.encoder.layers.{i}.attn.qkv.weight", _L + "k_kernel", "linear_part:1/3"),
    ("vision_model.encoder.layers.{i}.attn.qkv.weight", _L + "v_kernel", "linear_part:2/3"),
    ("vision_model.encoder.layers.{i}.attn.qkv.bias", _L + "q_bias", "copy_part:0/3"),
    ("vision_model.encoder.layers.{i}.attn.qkv.bias", _L + "k_bias", "copy_part:1/3"),
    ("vision_model.encoder.layers.{i}.attn.qkv.bias", _L + "v_bias", "copy_part:2/3"),
    ("vision_model.encoder.layers.{i}.attn.q_norm.weight", _L + "q_norm", "copy"),
    ("vision_model.encoder.layers.{i}.attn.k_norm.weight", _L + "k_norm", "copy"),
    ("vision_model.encoder.layers.{i}.attn.proj.weight", _L + "proj_kernel", "linear"),
    ("vision_model.encoder.layers.{i}.attn.proj.bias", _L + "proj_bias", "copy"),
    ("vision_model.encoder.layers.{i}.ls1", _L + "lambda_1", "copy"),
    ("vision_model.encoder.layers.{i}.norm2.weight", _L + "norm2", "copy"),
    ("vision_model.encoder.layers.{i}.norm2.bias", _L + "norm2_bias", "copy"),
    ("vision_model.encoder.layers.{i}.mlp.fc1.weight", _L + "fc1_kernel", "linear"),
    ("vision_model.encoder.layers.{i}.mlp.fc1.bias", _L + "fc1_bias", "copy"),
    ("vision_model.encoder.layers.{i}.mlp.fc2.weight", _L + "fc2_kernel", "linear"),
    ("vision_model.encoder.layers.{i}.mlp.fc2.bias", _L + "fc2_bias", "copy"),
    ("vision_model.encoder.layers.{i}.ls2", _L + "lambda_2", "copy"),
    ("mlp1.0.weight", "projector.norm", "copy"),
    ("mlp1.0.bias", "projector.norm_bias", "copy"),
    ("mlp1.1.weight", "projector.linear1_kernel", "linear"),
    ("mlp1.1.bias", "projector.linear1_bias", "copy"),
    ("mlp1.3.weight", "projector.linear2_kernel", "linear"),
    ("mlp1.3.bias", "projector.linear2_bias", "copy"),
    *decoder_key_rows("language_model.model."),
    ("language_model.lm_head.weight", "lm_head", "linear"),
)

# transformers' in-memory names -> the "-hf" hub names.
IN_MEMORY_PREFIXES = (("model.vision_tower.", "vision_tower."),
                      ("model.multi_modal_projector.", "multi_modal_projector."),
                      ("model.language_model.", "language_model.model."),
                      ("lm_head.", "language_model.lm_head."))

HF = KeyLayout('"-hf" (vision_tower.*, multi_modal_projector.*, language_model.model.*; also model.vision_tower.*, '
               'model.language_model.*)', HF_KEYS, aliases=IN_MEMORY_PREFIXES, optional=("lm_head",))
ORIGINAL = KeyLayout("original remote-code (vision_model.*, mlp1.*, language_model.model.*)", ORIGINAL_KEYS,
                     optional=("lm_head",))


def patch_shape(cfg) -> tuple[int, ...]:
    """Returns the Conv2d patch-embedding weight's shape [D, C, P, P]."""
    v = cfg.vision
    return (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)


KEYS = KeyTable(export=HF, imports=(HF, ORIGINAL), patch_shape=patch_shape,
                # Non-persistent buffers some older exports carry; they are recomputed, never loaded.
                ignored=re.compile(r"^(.*\.)?rotary_emb\.inv_freq$"))
