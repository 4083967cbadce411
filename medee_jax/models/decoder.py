"""The Qwen2 text decoder (shared by Qwen2.5-VL and InternVL3): stacked layers scanned with ``jax.lax.scan``.

Layer parameters are stored stacked along a leading ``layers`` axis so one compiled layer body serves every depth
and the stack can be rematerialised by a configurable policy. Rotary positions come from the family, computed on
the host: M-RoPE positions [3, B, L] (Qwen2.5-VL, ``TextConfig.mrope_section`` set) or 1-D positions [B, L]
(InternVL3, with optional dynamic NTK scaling); see ``rope.text_cos_sin``. Attention is ``attention.attention``
(``implementation``: the decoder's ``attention_implementation``, "reference" — the dense math — unless the
trainer set ``model.attention``).

Generation threads a KV cache (``kv_cache.KVCache``: k, v ``[layers, B, S, Hkv, Dh]`` and per-row lengths) through
the same scanned layer body: the cache rides in the scan's carry and each layer writes its slice with an in-place
update (dynamic-update-slice for a prefill block, a per-row scatter for a decode step), so a step never copies it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .attention import BATCH_AXES, attention, implementation_without_mesh
from .kv_cache import KVCache, append_token, write_prefill
from .layers import apply_rotary, linear, maybe_remat, param, rms_norm
from .rope import text_cos_sin
from .sharding import constrain_residual
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


def attention_inputs(p: dict, x, cos, sin, cfg: TextConfig):
    """Returns one layer's rotated queries [B, L, Hq, Dh] and keys, values [B, L, Hkv, Dh] for x [B, L, D].
    The projections are named "q_proj", "k_proj", "v_proj" for the remat policies (layers.REMAT_NAMES)."""
    b, length, _ = x.shape
    dh = cfg.head_dim
    h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
    q = checkpoint_name(linear(h, p["q_proj_kernel"], p["q_proj_bias"]), "q_proj")
    k = checkpoint_name(linear(h, p["k_proj_kernel"], p["k_proj_bias"]), "k_proj")
    v = checkpoint_name(linear(h, p["v_proj_kernel"], p["v_proj_bias"]), "v_proj")
    q = q.reshape(b, length, cfg.num_attention_heads, dh)
    k = k.reshape(b, length, cfg.num_key_value_heads, dh)
    v = v.reshape(b, length, cfg.num_key_value_heads, dh)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def layer_output(p: dict, x, attn, cfg: TextConfig):
    """Returns the rest of the layer: x + o_proj(attn), then + SwiGLU MLP (attn [B, L, Hq, Dh]). Named for the
    remat policies: "attention" (attn), "attention_out" (o_proj's output), "mlp_in" (gate and up), "mlp_out"."""
    b, length, _ = x.shape
    attn = checkpoint_name(attn, "attention")
    x = x + checkpoint_name(linear(attn.reshape(b, length, -1), p["o_proj_kernel"]), "attention_out")
    h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
    gate = checkpoint_name(linear(h, p["gate_proj_kernel"]), "mlp_in")  # [B, L, I]
    up = checkpoint_name(linear(h, p["up_proj_kernel"]), "mlp_in")
    return x + checkpoint_name(linear(jax.nn.silu(gate) * up, p["down_proj_kernel"]), "mlp_out")


def cast_layer(p: dict, dtype) -> dict:
    """Returns one layer's parameters (a slice of the stacked tree, inside the layer scan) cast to ``dtype``: the
    scan reads the stored (e.g. fp32) stack and casts a layer at a time, so no compute-dtype copy of the whole
    stack is ever materialised. The casts are named "layer_weights", which no remat policy saves (not even "none"):
    kept for the backward pass they would stack into that whole-stack copy again."""
    return jax.tree.map(lambda a: a if a.dtype == dtype else checkpoint_name(a.astype(dtype), "layer_weights"), p)


def decoder_layer(p: dict, x, cos, sin, attend, cfg: TextConfig):
    """Returns one pre-norm decoder layer applied to x [B, L, D] (p: that layer's params, unstacked);
    ``attend(q, k, v)`` -> [B, L, Hq, Dh] is the attention under the batch's mask."""
    q, k, v = attention_inputs(p, x, cos, sin, cfg)
    return layer_output(p, x, attend(q, k, v), cfg)


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
        # the train step's attention (config model.attention, set through VisionLanguageModel.set_text_attention);
        # "reference" is the dense math every parity test compares against
        self.attention_implementation = "reference"
        self.attention_interpret = False  # Pallas kernels (splash) in interpret mode: CPU tests of the TPU path
        init = "zeros" if rngs is None else "normal"
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, init)
        self.layers = DecoderLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        self.norm = param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "zeros" if rngs is None else "ones")

    def embed(self, input_ids):
        """Returns token embeddings [B, L, D] in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def __call__(self, embeds, positions, attention_mask, segment_ids=None, branch_ids=None, *, cache=None,
                 implementation: str | None = None, mesh=None, batch_axes=BATCH_AXES):
        """Returns final (normed) hidden states [B, L, D]; with ``cache``, (hidden states, updated cache).

        embeds [B, L, D]; positions: the family's rotary positions, [3, B, L] (M-RoPE) or [B, L] (1-D);
        attention_mask [B, L] (1 = token, 0 = padding); segment_ids [B, L] optional, for packed rows (no attention
        across examples); branch_ids [B, L] optional, for a prompt shared by several completions (see
        text_attention_mask). ``implementation`` / ``mesh`` / ``batch_axes``: see ``attention.attention``; the
        default is the decoder's ``attention_implementation``; without a mesh, "auto" on a multi-chip TPU runs
        blockwise (``attention.implementation_without_mesh``). The train step passes its context mesh and
        ``batch_axes=()`` (it maps over data shards with ``vmap(spmd_axis_name=...)``).

        ``cache`` (a ``kv_cache.KVCache``; no segment or branch ids): with L > 1 a prefill, the first block of an
        empty cache, rows right-padded (real tokens first): attention within the block, keys/values written to
        slots [0, L), lengths = tokens per row; with L == 1 a decode step: the token goes to slot ``lengths[b]`` of
        its row and attends the row's filled slots, lengths + 1.
        """
        cfg = self.cfg
        implementation = implementation or self.attention_implementation
        if mesh is None:
            implementation = implementation_without_mesh(implementation)
        cos, sin = text_cos_sin(positions, cfg)  # [B, L, Dh]
        layer_params = self.layers.stacked()  # stored dtype; each layer is cast in the scan body (cast_layer)
        if self.remat == "none":
            # Without remat the backward pass keeps per-layer activations anyway, and XLA's buffers come out
            # smaller with the stack cast once up front (measured: fp32 stack, bf16 compute, 4 layers of 256/1024:
            # temporaries 14.0 MB cast up front, 21.7 MB cast per layer; under every remat policy the per-layer
            # cast saves the whole bf16 stack, e.g. 12.0 -> 4.4 MB with "full": tests/test_decoder_scan.py).
            layer_params = jax.tree.map(lambda a: a.astype(self.dtype), layer_params)
        x = embeds.astype(self.dtype)
        if cache is not None:
            if segment_ids is not None or branch_ids is not None:
                raise ValueError("the KV-cache path takes no segment_ids or branch_ids")
            x, cache = self._scan_with_cache(x, cos, sin, attention_mask, cache, layer_params, implementation, mesh,
                                             batch_axes)
            return rms_norm(x, self.norm[...], cfg.rms_norm_eps), cache

        def attend(q, k, v):
            return attention(q, k, v, causal=True, kv_mask=attention_mask, q_segment_ids=segment_ids,
                             q_branch_ids=branch_ids, implementation=implementation, mesh=mesh,
                             batch_axes=batch_axes, interpret=self.attention_interpret)

        def body(h, p):
            h = constrain_residual(h, mesh)  # [B, L, D] split along the batch only, at every layer boundary
            return decoder_layer(cast_layer(p, self.dtype), h, cos, sin, attend, cfg), None

        x, _ = jax.lax.scan(maybe_remat(body, self.remat), x, layer_params)
        return rms_norm(x, self.norm[...], cfg.rms_norm_eps)

    def _scan_with_cache(self, x, cos, sin, attention_mask, cache: KVCache, layer_params, implementation, mesh,
                         batch_axes):
        """Returns (x after every layer [B, L, D], the cache with this block's keys and values)."""
        cfg = self.cfg
        prefill = x.shape[1] > 1

        def body(carry, inputs):
            h, k_cache, v_cache = carry  # caches [layers, B, S, Hkv, Dh]
            p, layer = inputs
            p = cast_layer(p, self.dtype)
            h = constrain_residual(h, mesh)
            q, k, v = attention_inputs(p, h, cos, sin, cfg)
            if prefill:
                k_cache, v_cache = write_prefill(k_cache, v_cache, layer, k, v)
                attn = attention(q, k, v, causal=True, kv_mask=attention_mask, implementation=implementation,
                                 mesh=mesh, batch_axes=batch_axes, interpret=self.attention_interpret)
            else:
                k_cache, v_cache = append_token(k_cache, v_cache, layer, cache.lengths, k, v)
                attn = attention(q, k_cache[layer], v_cache[layer], causal=True, q_offset=cache.lengths,
                                 kv_lengths=cache.lengths + 1, implementation=implementation, mesh=mesh,
                                 batch_axes=batch_axes, interpret=self.attention_interpret)
            return (layer_output(p, h, attn, cfg), k_cache, v_cache), None

        layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        (x, k_cache, v_cache), _ = jax.lax.scan(body, (x, cache.k, cache.v), (layer_params, layers))
        if prefill:
            lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=1)
        else:
            lengths = cache.lengths + 1
        return x, KVCache(k_cache, v_cache, lengths)
