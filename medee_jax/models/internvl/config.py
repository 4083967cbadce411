"""Frozen config dataclasses for InternVL3 (InternViT + pixel shuffle + MLP projector + the Qwen2 decoder), read
from a checkpoint's config.json, and size presets.

Two config.json layouts are read:
  * transformers' "-hf" layout (``model_type: internvl``: ``text_config`` (qwen2), ``vision_config``
    (internvl_vision), ``image_token_id``, ``downsample_ratio``, ...), which is what ``save_pretrained`` writes;
  * the original remote-code layout (``model_type: internvl_chat``: ``llm_config``, ``vision_config``
    (intern_vit_6b: ``qkv_bias``, ``qk_normalization``), ``select_layer``, ``ps_version``, ``force_image_size``),
    read without executing any code from the checkpoint.
Keys a file leaves out take transformers' class defaults (``InternVLConfig``, ``InternVLVisionConfig``,
``Qwen2Config``). InternVL3-9B (an InternLM3 decoder) is refused: only the Qwen2 decoder is implemented.

Jax-free (data workers and batch assembly read these configs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..text_config import TextConfig, pick, rope_fields

MODEL_TYPES = ("internvl", "internvl_chat")
IMG_CONTEXT_ID = 151667  # <IMG_CONTEXT> in InternVL3's Qwen2.5-based tokenizer

VISION_DEFAULTS: dict[str, Any] = {  # transformers' InternVLVisionConfig
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "attention_bias": False,
    "use_qk_norm": False,
    "hidden_act": "gelu",
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "layer_scale_init_value": 0.1,
}
TEXT_DEFAULTS: dict[str, Any] = {  # transformers' Qwen2Config
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
NORM_TYPES = ("layer_norm", "rms_norm")
UNSUPPORTED_TEXT = ("InternVL3-9B's language model is InternLM3 (a Llama-style decoder); medee_jax implements "
                    "InternVL3 with the Qwen2 decoder only (InternVL3-1B, 2B, 8B, 14B, 38B, 78B)")


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
    """InternViT: 300M-style (LayerNorm, q/k/v bias, no qk-norm) or 6B-style (RMSNorm, qk-norm over the full
    width, no q/k/v bias); learned layer scales; a CLS token and absolute position embeddings."""

    family: ClassVar[str] = "internvl"

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    use_qk_norm: bool = False
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_scale_init_value: float = 0.1

    def __post_init__(self):
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type {self.norm_type!r} is not supported; supported: {NORM_TYPES}")
        if self.hidden_act != "gelu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (InternViT uses gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile at the native image size (32 for 448 px / 14 px)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * P * P."""
        return self.num_channels * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """A whole InternVL3 model: vision tower + pixel shuffle + projector + Qwen2 text decoder + image token id."""

    family: ClassVar[str] = "internvl"

    text: TextConfig
    vision: InternVisionConfig
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    image_token_id: int = IMG_CONTEXT_ID
    tie_word_embeddings: bool = False
    model_type: str = "internvl"

    def __post_init__(self):
        t = self.text
        if t.mrope_section is not None:
            raise ValueError("InternVL's decoder uses 1-D RoPE: its TextConfig must have mrope_section=None")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text heads do not divide: hidden {t.hidden_size}, heads {t.num_attention_heads}, "
                             f"kv heads {t.num_key_value_heads}")
        k = round(1 / self.downsample_ratio)
        if abs(1 / self.downsample_ratio - k) > 1e-6 or self.vision.grid % k:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the patch grid "
                             f"side {self.vision.grid}")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported (gelu)")

    @property
    def shuffle(self) -> int:
        """k of the pixel shuffle: k x k neighbouring patches become one token (2 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """LLM image tokens per tile at the native image size (256 for 448 px tiles)."""
        return (self.vision.grid // self.shuffle) ** 2

    def to_hf_dict(self) -> dict:
        """Returns a config.json dict in transformers' "-hf" layout (what `save_pretrained` writes)."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            **t.hf_fields(),
            "rope_parameters": t.rope_parameters(),
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        vision = {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "attention_bias": v.attention_bias,
            "use_qk_norm": v.use_qk_norm,
            "hidden_act": v.hidden_act,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "layer_scale_init_value": v.layer_scale_init_value,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
        }
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.tokens_per_tile,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def _text_config(src: dict, source: str, where: str) -> TextConfig:
    """Returns the Qwen2 TextConfig of a text_config / llm_config dict, refusing other decoders."""
    kind = src.get("model_type")
    architectures = src.get("architectures") or []
    if kind in ("internlm3", "internlm2", "llama") or any("InternLM" in a or "Llama" in a for a in architectures):
        raise ValueError(f"{source}: {where} is {kind or architectures[0]!r}: {UNSUPPORTED_TEXT}")
    if kind not in (None, "qwen2"):
        raise ValueError(f"{source}: {where} model_type {kind!r} is not supported; InternVL3 uses 'qwen2'")
    kw = pick(src, TEXT_DEFAULTS)
    if src.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    kw.update(rope_theta=10000.0)  # Qwen2Config's default rope_theta
    kw.update(rope_fields(src))
    if "mrope_section" in kw:
        raise ValueError(f"{source}: {where} has an M-RoPE mrope_section; InternVL3 uses 1-D RoPE")
    names = {f.name for f in dataclasses.fields(TextConfig)}
    return TextConfig(**{k: v for k, v in kw.items() if k in names}, mrope_section=None)


def _side(value) -> int:
    """Returns one side of an image_size / patch_size that may be an int or a square [h, w]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square sizes are supported, got {list(value)}")
        return int(value[0])
    return int(value)


def _vision_config(src: dict, source: str) -> InternVisionConfig:
    kw = pick(src, VISION_DEFAULTS, aliases={"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"})
    for flag, ok in (("use_mean_pooling", True), ("use_mask_token", False), ("use_absolute_position_embeddings", True)):
        if src.get(flag, ok) != ok:
            raise ValueError(f"{source}: vision_config.{flag}={src[flag]!r} is not supported (InternVL3 has {ok})")
    kw["image_size"], kw["patch_size"] = _side(kw["image_size"]), _side(kw["patch_size"])
    try:
        return InternVisionConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def config_from_hf_dict(d: dict, source: str = "config.json") -> InternVLConfig:
    """Returns the model config for a parsed config.json in the "-hf" (``internvl``) or original
    (``internvl_chat``) layout."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not an InternVL config ({MODEL_TYPES})")
    if model_type == "internvl":
        text = _text_config(d.get("text_config") or {}, source, "text_config")
        vision = _vision_config(d.get("vision_config") or {}, source)
        for key, ok in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "default")):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (InternVL3 uses {ok!r})")
        tie = bool(d.get("tie_word_embeddings", True))  # InternVLConfig's default, as transformers reads it
        image_token_id = int(d.get("image_token_id", IMG_CONTEXT_ID))
    else:
        llm = d.get("llm_config") or {}
        text = _text_config(llm, source, "llm_config")
        vis_src = dict(d.get("vision_config") or {})
        if d.get("force_image_size"):
            vis_src["image_size"] = d["force_image_size"]
        vision = _vision_config(vis_src, source)
        for key, ok in (("select_layer", -1), ("ps_version", "v2")):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (InternVL3 uses {ok!r})")
        tie = bool(llm.get("tie_word_embeddings", False))  # the remote code builds the LLM from llm_config
        image_token_id = int(d.get("image_token_id", IMG_CONTEXT_ID))
    try:
        return InternVLConfig(text=text, vision=vision, downsample_ratio=float(d.get("downsample_ratio", 0.5)),
                              projector_hidden_act=d.get("projector_hidden_act", "gelu"), image_token_id=image_token_id,
                              tie_word_embeddings=tie)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Presets: InternViT-300M (1B-14B) or InternViT-6B (38B, 78B) with the Qwen2.5 decoders of the released models.

VIT_300M = InternVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              norm_type="layer_norm", attention_bias=True, use_qk_norm=False)
VIT_6B = InternVisionConfig(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                            norm_type="rms_norm", attention_bias=False, use_qk_norm=True)


def _preset(vision, hidden, layers, heads, kv, inter, **rope) -> InternVLConfig:
    return InternVLConfig(
        text=TextConfig(vocab_size=151674, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, rope_theta=1e6,
                        mrope_section=None, max_position_embeddings=32768, **rope),
        vision=vision, tie_word_embeddings=False)


PRESETS: dict[str, InternVLConfig] = {
    "internvl3_1b": _preset(VIT_300M, 896, 24, 14, 2, 4864, rope_type="dynamic", rope_factor=2.0),
    "internvl3_2b": _preset(VIT_300M, 1536, 28, 12, 2, 8960),
    "internvl3_8b": _preset(VIT_300M, 3584, 28, 28, 4, 18944),
    "internvl3_14b": _preset(VIT_300M, 5120, 48, 40, 8, 13824),
    "internvl3_38b": _preset(VIT_6B, 5120, 64, 40, 8, 27648),
    "internvl3_78b": _preset(VIT_6B, 8192, 80, 64, 8, 29568),
}


def tiny_config(vocab_size: int = 512, *, image_size: int = 56, qk_norm: bool = False,
                tie_word_embeddings: bool = False, **kw) -> InternVLConfig:
    """Returns a tiny InternVL-shaped config (tests, the embedded demo): a 2-layer InternViT (300M-style, or
    6B-style with ``qk_norm``) on ``image_size`` px tiles of 14 px patches, and a 2-layer Qwen2 decoder."""
    vision = InternVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=image_size, norm_type="rms_norm" if qk_norm else "layer_norm",
                                attention_bias=not qk_norm, use_qk_norm=qk_norm)
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, mrope_section=None,
                      bos_token_id=None, eos_token_id=None)
    return InternVLConfig(text=text, vision=vision, tie_word_embeddings=tie_word_embeddings, **kw)


def demo_config(tokenizer) -> InternVLConfig:
    """Returns the embedded demo's tiny model for ``tokenizer`` (the demo tokenizer, "internvl" flavour): 224 px
    tiles (64 image tokens each), its vocabulary rounded up to a multiple of 64, its <IMG_CONTEXT> id."""
    return tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, image_size=224,
                       image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


def vision_flops_per_unit(cfg: InternVLConfig, *, trained: bool = False, units_per_image: int = 1) -> float:
    """Returns the FLOPs of one tile through the vision tower and projector (forward; 3x when ``trained``):
    patch embedding, per layer q/k/v/proj and fc1/fc2 on N+1 tokens plus attention over them, then the projector on
    the shuffled tokens. Conventions of medee_jax.training.metrics (a multiply-add is 2 FLOPs, matmuls only)."""
    v, k = cfg.vision, cfg.shuffle
    d, n = v.hidden_size, v.grid**2
    macs = n * v.patch_dim * d
    macs += v.num_hidden_layers * ((n + 1) * (4 * d * d + 2 * d * v.intermediate_size) + 2 * (n + 1) ** 2 * d)
    tokens, width = cfg.tokens_per_tile, d * k * k
    macs += tokens * (width * cfg.text.hidden_size + cfg.text.hidden_size**2)
    fwd = 2.0 * macs
    return 3.0 * fwd if trained else fwd
