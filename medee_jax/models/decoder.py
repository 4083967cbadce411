"""The Qwen2 text decoder (shared by Qwen2.5-VL and InternVL3): stacked layers scanned with ``jax.lax.scan``.

Layer parameters are stored stacked along a leading ``layers`` axis so one compiled layer body serves every depth
and the stack can be rematerialised by a configurable policy. Rotary positions come from the family, computed on
the host: M-RoPE positions [3, B, L] (Qwen2.5-VL, ``TextConfig.mrope_section`` set) or 1-D positions [B, L]
(InternVL3, with optional dynamic NTK scaling); see ``rope.text_cos_sin``. Attention takes keys/values as separate
arguments from queries so a KV cache can be threaded through for generation (``cache``, not implemented yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import apply_rotary, dot_product_attention, linear, maybe_remat, param, rms_norm, swiglu
from .rope import text_cos_sin
from .text_config import TextConfig

# Per-layer tensor families of the decoder: name -> (shape builder, logical axes without 'layers', init).
# Names mirror transformers' module paths so the families' key tables (keys.py) read one-to-one.
def decoder_layer_table(cfg: TextConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Returns {param name: (shape, logical axes, init)} of one decoder layer."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "input_layernorm": ((d,), ("norm",), "ones"),
        "q_proj_kernel": ((d, q), ("embed", "q_heads"), "normal"),
        "q_proj_bias": ((q,), ("q_heads",), "zeros"),
        "k_proj_kernel": ((d, kv), ("embed", "kv_heads"), "normal"),
        "k_proj_bias": ((kv,), ("kv_heads",), "zeros"),
        "v_proj_kernel": ((d, kv), ("embed", "kv_heads"), "normal"),
        "v_proj_bias": ((kv,), ("kv_heads",), "zeros"),
        "o_proj_kernel": ((q, d), ("q_heads", "embed"), "normal"),
        "post_attention_layernorm": ((d,), ("norm",), "ones"),
        "gate_proj_kernel": ((d, i), ("embed", "mlp"), "normal"),
        "up_proj_kernel": ((d, i), ("embed", "mlp"), "normal"),
        "down_proj_kernel": ((i, d), ("mlp", "embed"), "normal"),
    }


def decoder_key_rows(prefix: str) -> tuple[tuple[str, str, str], ...]:
    """Returns the checkpoint key-table rows (hf key pattern, our path, transform) of the decoder whose transformers
    tensor names start with ``prefix`` (Qwen2.5-VL's hub layout: "model."; InternVL's: "language_model.model.");
    our parameters live under ``language_model``. The LM head's row is the family's."""
    layer = f"{prefix}layers.{{i}}."
    ours = "language_model.layers."
    return (
        (f"{prefix}embed_tokens.weight", "language_model.embed_tokens", "copy"),
        (layer + "input_layernorm.weight", ours + "input_layernorm", "copy"),
        (layer + "self_attn.q_proj.weight", ours + "q_proj_kernel", "linear"),
        (layer + "self_attn.q_proj.bias", ours + "q_proj_bias", "copy"),
        (layer + "self_attn.k_proj.weight", ours + "k_proj_kernel", "linear"),
        (layer + "self_attn.k_proj.bias", ours + "k_proj_bias", "copy"),
        (layer + "self_attn.v_proj.weight", ours + "v_proj_kernel", "linear"),
        (layer + "self_attn.v_proj.bias", ours + "v_proj_bias", "copy"),
        (layer + "self_attn.o_proj.weight", ours + "o_proj_kernel", "linear"),
        (layer + "post_attention_layernorm.weight", ours + "post_attention_layernorm", "copy"),
        (layer + "mlp.gate_proj.weight", ours + "gate_proj_kernel", "linear"),
        (layer + "mlp.up_proj.weight", ours + "up_proj_kernel", "linear"),
        (layer + "mlp.down_proj.weight", ours + "down_proj_kernel", "linear"),
        (f"{prefix}norm.weight", "language_model.norm", "copy"),
    )


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, each stacked to [num_layers, ...]."""

    def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        n = cfg.num_hidden_layers
        for name, (shape, axes, init) in decoder_layer_table(cfg).items():
            if rngs is None:
                init = "zeros"
            setattr(self, name, param(rngs, (n, *shape), ("layers", *axes), param_dtype, init))

    def stacked(self) -> dict[str, jax.Array]:
        """Returns {param name: [num_layers, ...] array}."""
        return {name: getattr(self, name)[...] for name in decoder_layer_table(self.cfg)}


def decoder_layer(p: dict, x, cos, sin, allowed, cfg: TextConfig):
    """Returns one pre-norm decoder layer applied to x [B, L, D] (p: that layer's params, unstacked)."""
    b, length, _ = x.shape
    dh = cfg.head_dim
    h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
    q = linear(h, p["q_proj_kernel"], p["q_proj_bias"]).reshape(b, length, cfg.num_attention_heads, dh)
    k = linear(h, p["k_proj_kernel"], p["k_proj_bias"]).reshape(b, length, cfg.num_key_value_heads, dh)
    v = linear(h, p["v_proj_kernel"], p["v_proj_bias"]).reshape(b, length, cfg.num_key_value_heads, dh)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = dot_product_attention(q, k, v, allowed).reshape(b, length, -1)  # [B, L, Hq*Dh]
    x = x + linear(attn, p["o_proj_kernel"])
    h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
    return x + swiglu(h, p["gate_proj_kernel"], p["up_proj_kernel"], p["down_proj_kernel"])


def text_attention_mask(attention_mask, segment_ids=None, branch_ids=None):
    """Returns bool [B, L, L]: causal, keys must be attended tokens, (if packed) of the query's segment, and (with
    ``branch_ids``, a shared prompt: 0 on the prompt, 1, 2, ... on the completions that follow it in the row) on
    the prompt or on the query's own completion."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None] & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if branch_ids is not None:
        allowed = allowed & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
    return allowed


class Qwen2Decoder(nnx.Module):
    """Token embedding + stacked decoder layers + final norm. ``__call__`` maps embeddings to final hidden states."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        init = "zeros" if rngs is None else "normal"
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, init)
        self.layers = DecoderLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        self.norm = param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "zeros" if rngs is None else "ones")

    def embed(self, input_ids):
        """Returns token embeddings [B, L, D] in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def __call__(self, embeds, positions, attention_mask, segment_ids=None, branch_ids=None, *, cache=None):
        """Returns final (normed) hidden states [B, L, D].

        embeds [B, L, D]; positions: the family's rotary positions, [3, B, L] (M-RoPE) or [B, L] (1-D);
        attention_mask [B, L] (1 = token, 0 = padding); segment_ids [B, L] optional, for packed rows (no attention
        across examples); branch_ids [B, L] optional, for a prompt shared by several completions (see
        text_attention_mask). ``cache``: reserved for a KV cache (generation); must be None for now.
        """
        if cache is not None:
            raise NotImplementedError("the decoder has no KV cache yet")
        cfg = self.cfg
        cos, sin = text_cos_sin(positions, cfg)  # [B, L, Dh]
        allowed = text_attention_mask(attention_mask, segment_ids, branch_ids)  # [B, L, L]
        layer_params = jax.tree.map(lambda a: a.astype(self.dtype), self.layers.stacked())

        def body(x, p):
            return decoder_layer(p, x, cos, sin, allowed, cfg), None

        x, _ = jax.lax.scan(maybe_remat(body, self.remat), embeds.astype(self.dtype), layer_params)
        return rms_norm(x, self.norm[...], cfg.rms_norm_eps)
