"""InternVL3 in Flax NNX: InternViT (300M- or 6B-style), pixel shuffle and the MLP projector, around the shared
Qwen2 decoder (``vlm.VisionLanguageModel``).

``encode_images(pixel_values)`` -> image features [T * tokens_per_tile, D] for tiles [T, 3, S, S]: every tile is
encoded on its own (a CLS token + S/14 x S/14 patch tokens with absolute position embeddings, bicubically
interpolated when the tile's patch grid differs from the checkpoint's), the CLS token is dropped, k x k neighbouring
patches are concatenated (pixel shuffle, k = 1/downsample_ratio) and projected to the LLM width. As in
transformers, vision attention runs over each tile without masks (``attention.attention`` with the tiles as its
batch; padding tiles are encoded too, and their features dropped by the scatter). Softmax is computed in fp32
(transformers' eager InternViT keeps the input dtype; identical in fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import attention
from ..layers import layer_norm, linear, maybe_remat, param, rms_norm
from ..vlm import VisionLanguageModel, check_token_batch, scatter_index, vision_attention_implementation
from .config import InternVisionConfig, InternVLConfig
from .host import text_position_ids

QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm's default (transformers does not pass layer_norm_eps to it)
PROJECTOR_NORM_EPS = 1e-5  # nn.LayerNorm's default


def vision_layer_table(cfg: InternVisionConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Returns {param name: (shape, logical axes, init)} of one InternViT layer (only the tensors the variant has:
    q/k/v biases for the 300M style, qk-norm weights for the 6B style, norm biases for LayerNorm)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    table = {
        "norm1": ((d,), ("norm",), "ones"),
        "q_kernel": ((d, d), ("vision_embed", "vision_heads"), "normal"),
        "k_kernel": ((d, d), ("vision_embed", "vision_heads"), "normal"),
        "v_kernel": ((d, d), ("vision_embed", "vision_heads"), "normal"),
        "proj_kernel": ((d, d), ("vision_heads", "vision_embed"), "normal"),
        "proj_bias": ((d,), ("vision_embed",), "zeros"),
        "lambda_1": ((d,), ("norm",), "layer_scale"),
        "norm2": ((d,), ("norm",), "ones"),
        "fc1_kernel": ((d, i), ("vision_embed", "vision_mlp"), "normal"),
        "fc1_bias": ((i,), ("vision_mlp",), "zeros"),
        "fc2_kernel": ((i, d), ("vision_mlp", "vision_embed"), "normal"),
        "fc2_bias": ((d,), ("vision_embed",), "zeros"),
        "lambda_2": ((d,), ("norm",), "layer_scale"),
    }
    if cfg.norm_type == "layer_norm":
        table.update(norm1_bias=((d,), ("norm",), "zeros"), norm2_bias=((d,), ("norm",), "zeros"))
    if cfg.attention_bias:
        table.update({f"{x}_bias": ((d,), ("vision_heads",), "zeros") for x in "qkv"})
    if cfg.use_qk_norm:
        table.update(q_norm=((d,), ("vision_heads",), "ones"), k_norm=((d,), ("vision_heads",), "ones"))
    return table


def projector_table(cfg: InternVLConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Returns {param name: (shape, logical axes, init)} of the projector: LayerNorm -> Linear -> GELU -> Linear."""
    m, d = cfg.vision.hidden_size * cfg.shuffle**2, cfg.text.hidden_size
    return {
        "norm": ((m,), ("norm",), "ones"),
        "norm_bias": ((m,), ("norm",), "zeros"),
        "linear1_kernel": ((m, d), ("vision_merge", "vision_mlp"), "normal"),
        "linear1_bias": ((d,), ("vision_mlp",), "zeros"),
        "linear2_kernel": ((d, d), ("vision_mlp", "embed"), "normal"),
        "linear2_bias": ((d,), ("embed",), "zeros"),
    }


def _param(rngs, shape, axes, dtype, init: str, layer_scale: float):
    if rngs is None:
        return param(None, shape, axes, dtype, "zeros")
    if init == "layer_scale":
        p = param(rngs, shape, axes, dtype, "ones")
        p.set_value(p.get_value() * layer_scale)
        return p
    return param(rngs, shape, axes, dtype, init)


class VisionLayers(nnx.Module):
    """All InternViT layers' parameters, each stacked to [num_layers, ...]."""

    def __init__(self, cfg: InternVisionConfig, *, param_dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        for name, (shape, axes, init) in vision_layer_table(cfg).items():
            setattr(self, name, _param(rngs, (cfg.num_hidden_layers, *shape), ("layers", *axes), param_dtype, init,
                                       cfg.layer_scale_init_value))

    def stacked(self) -> dict[str, jax.Array]:
        """Returns {param name: [num_layers, ...] array}."""
        return {name: getattr(self, name)[...] for name in vision_layer_table(self.cfg)}


def _norm(x, p: dict, name: str, cfg: InternVisionConfig):
    if cfg.norm_type == "layer_norm":
        return layer_norm(x, p[name], p[f"{name}_bias"], cfg.layer_norm_eps)
    return rms_norm(x, p[name], cfg.layer_norm_eps)


def vision_layer(p: dict, x, cfg: InternVisionConfig, implementation: str = "auto"):
    """Returns one InternViT layer applied to tiles x [T, N+1, D]: x + λ1·attn(norm1(x)), then + λ2·mlp(norm2).
    Attention runs over each tile without a mask, the tiles as a batch (``implementation``: ``attention.attention``'s).
    """
    t, n, d = x.shape
    h = _norm(x, p, "norm1", cfg)
    q, k, v = (linear(h, p[f"{c}_kernel"], p.get(f"{c}_bias")) for c in "qkv")  # [T, N+1, D]
    if cfg.use_qk_norm:  # RMSNorm over the full width, before the head split
        q, k = rms_norm(q, p["q_norm"], QK_NORM_EPS), rms_norm(k, p["k_norm"], QK_NORM_EPS)
    heads = (t, n, cfg.num_attention_heads, cfg.head_dim)
    # No mask: every token of a tile sees every token of its tile.
    attn = attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), causal=False,
                     implementation=implementation).reshape(t, n, d)
    x = x + p["lambda_1"].astype(x.dtype) * linear(attn, p["proj_kernel"], p["proj_bias"])
    h = _norm(x, p, "norm2", cfg)
    h = linear(jax.nn.gelu(linear(h, p["fc1_kernel"], p["fc1_bias"]), approximate=False), p["fc2_kernel"],
               p["fc2_bias"])
    return x + p["lambda_2"].astype(x.dtype) * h


def cubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """Returns the [size_out, size_in] matrix of torch's bicubic resize along one axis (``F.interpolate(...,
    mode="bicubic", align_corners=False)``: cubic convolution with A = -0.75, source index clamped at the edges)."""
    a = -0.75
    scale = size_in / size_out
    out = np.zeros((size_out, size_in), np.float64)
    for o in range(size_out):
        src = scale * (o + 0.5) - 0.5
        base = int(np.floor(src))
        t = src - base
        taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k, w in enumerate(taps):
            out[o, min(max(base - 1 + k, 0), size_in - 1)] += w
    return out.astype(np.float32)


def pixel_shuffle(x, k: int):
    """Returns patch features x [T, s, s, D] (row-major patch grid) as [T, (s/k)^2, k*k*D]: token (p, q) is the
    concatenation of patches (k*p + i, k*q + j), i outer, j inner (transformers' InternVL pixel_shuffle)."""
    t, s, _, d = x.shape
    x = x.reshape(t, s // k, k, s // k, k, d)  # [T, p, i, q, j, D]
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(t, (s // k) ** 2, k * k * d)


class VisionTower(nnx.Module):
    """InternViT: patch embedding (a 14x14 conv as a linear map of each flattened patch), CLS token, absolute
    position embeddings, stacked layers (no final norm: InternVL3 takes the last layer's output)."""

    def __init__(self, cfg: InternVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_implementation: str = "auto", rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention_implementation = attention_implementation  # see attention.attention and vlm
        init = "zeros" if rngs is None else "normal"
        d = cfg.hidden_size
        self.patch_kernel = param(rngs, (cfg.patch_dim, d), ("vision_patch", "vision_embed"), param_dtype, init)
        self.patch_bias = param(rngs, (d,), ("vision_embed",), param_dtype, "zeros")
        # Rows of the CLS token / position table are replicated like norms.
        self.cls_token = param(rngs, (1, d), ("norm", "vision_embed"), param_dtype, init)
        self.position_embeddings = param(rngs, (cfg.grid**2 + 1, d), ("norm", "vision_embed"), param_dtype, init)
        self.layers = VisionLayers(cfg, param_dtype=param_dtype, rngs=rngs)

    def position_table(self, gh: int, gw: int):
        """Returns the position embeddings [1 + gh*gw, D] (fp32) for a gh x gw patch grid: the stored table, or its
        patch part resized bicubically as transformers does when the grid differs from the checkpoint's."""
        pos = self.position_embeddings[...].astype(jnp.float32)  # [N+1, D]
        grid = self.cfg.grid
        if (gh, gw) == (grid, grid):
            return pos
        table = pos[1:].reshape(grid, grid, -1)
        resized = jnp.einsum("ih,hwd,jw->ijd", cubic_weights(grid, gh), table, cubic_weights(grid, gw),
                             precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:1], resized.reshape(gh * gw, -1)], axis=0)

    def __call__(self, pixel_values, *, implementation: str | None = None):
        """Returns patch features [T, gh, gw, D] (CLS dropped) for tiles pixel_values [T, C, H, W] (``implementation``
        overrides ``attention_implementation``)."""
        cfg = self.cfg
        impl = vision_attention_implementation(implementation or self.attention_implementation)
        t, c, height, width = pixel_values.shape
        ps = cfg.patch_size
        gh, gw = height // ps, width // ps
        x = pixel_values.astype(self.dtype).reshape(t, c, gh, ps, gw, ps)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(t, gh * gw, c * ps * ps)  # row-major patches, (C, ph, pw)
        x = linear(x, self.patch_kernel[...], self.patch_bias[...])  # [T, N, D]
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype)[None], (t, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)  # [T, N+1, D]
        x = (x + self.position_table(gh, gw).astype(self.dtype)[None]).astype(self.dtype)

        def body(h, p):
            p = jax.tree.map(lambda a: a.astype(self.dtype), p)  # per layer: no cast copy of the whole stack
            return vision_layer(p, h, cfg, impl), None

        x, _ = jax.lax.scan(maybe_remat(body, self.remat), x, self.layers.stacked())
        return x[:, 1:].reshape(t, gh, gw, cfg.hidden_size)


class Projector(nnx.Module):
    """LayerNorm (eps 1e-5) -> Linear -> GELU -> Linear from shuffled vision features to the LLM width."""

    def __init__(self, cfg: InternVLConfig, *, param_dtype, rngs: nnx.Rngs | None):
        for name, (shape, axes, init) in projector_table(cfg).items():
            setattr(self, name, param(rngs, shape, axes, param_dtype, "zeros" if rngs is None else init))

    def __call__(self, x, dtype):
        x = layer_norm(x, self.norm[...], self.norm_bias[...], PROJECTOR_NORM_EPS)
        x = jax.nn.gelu(linear(x, self.linear1_kernel[...], self.linear1_bias[...], dtype), approximate=False)
        return linear(x, self.linear2_kernel[...], self.linear2_bias[...], dtype)


class InternVL(VisionLanguageModel):
    """InternVL3 for conditional generation: ``vision_tower``, ``projector``, ``language_model`` and ``lm_head``
    (None when tied)."""

    def __init__(self, cfg: InternVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 rngs: nnx.Rngs | None):
        self.vision_tower = VisionTower(cfg.vision, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.projector = Projector(cfg, param_dtype=param_dtype, rngs=rngs)
        self._init_language_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)

    def encode_images(self, pixel_values, *, implementation: str | None = None):
        """Returns image features [T * tokens_per_tile, D] for tiles [T, 3, S, S] (tile by tile, in order;
        ``implementation``: the vision attention's, default the tower's ``attention_implementation``)."""
        patches = self.vision_tower(pixel_values, implementation=implementation)  # [T, gh, gw, Dv]
        if patches.shape[1] != patches.shape[2]:
            raise ValueError(f"tiles must be square, got a {patches.shape[1]} x {patches.shape[2]} patch grid")
        shuffled = pixel_shuffle(patches, self.config.shuffle)  # [T, tokens, k*k*Dv]
        features = self.projector(shuffled, self.dtype)  # [T, tokens, D]
        return features.reshape(-1, features.shape[-1])

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       position_ids=None, segment_ids=None) -> dict:
        """Returns the numpy arrays ``forward`` takes, computed on the host from processor-shaped inputs
        (pixel_values [tiles, 3, S, S] as transformers' InternVL processor gives them; no image_grid_thw)."""
        cfg = self.config
        if image_grid_thw is not None:
            raise ValueError("InternVL takes no image_grid_thw: pixel_values [tiles, 3, H, W] are enough (the tiles "
                             "of all images, in the order of their <IMG_CONTEXT> runs)")
        input_ids, mask = check_token_batch(input_ids, attention_mask)
        if position_ids is None:
            position_ids = text_position_ids(input_ids, mask, segment_ids)
        out = {"input_ids": input_ids, "position_ids": np.asarray(position_ids, dtype=np.int32),
               "attention_mask": mask}
        if segment_ids is not None:
            out["segment_ids"] = np.asarray(segment_ids, dtype=np.int32)
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values must be tiles [T, 3, H, W], got shape {pixel_values.shape}")
            k, ps = cfg.shuffle, cfg.vision.patch_size
            rows = pixel_values.shape[0] * (pixel_values.shape[2] // ps // k) * (pixel_values.shape[3] // ps // k)
            out.update(pixel_values=pixel_values, vision={},
                       image_token_index=scatter_index(input_ids, mask, cfg.image_token_id, rows, rows))
        return out
