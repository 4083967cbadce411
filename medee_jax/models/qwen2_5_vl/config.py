"""Frozen config dataclasses for Qwen2.5-VL, read from a checkpoint's config.json, and size presets.

Jax-free (data workers and batch assembly read these configs).

Two on-disk layouts are accepted:
  * the flat hub layout (text keys at the top level, ``rope_scaling`` with ``mrope_section``, a ``vision_config``);
  * transformers-5's nested layout (``text_config`` with ``rope_parameters``, ``vision_config``).
Keys a file leaves out take transformers' class defaults (tables below, from transformers 5.x
``Qwen2_5_VLVisionConfig`` / ``Qwen2_5_VLTextConfig``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..text_config import TextConfig, pick, rope_fields

MODEL_TYPES = ("qwen2_5_vl",)

# transformers' class defaults for keys a config.json may omit.
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 3584,
    "hidden_act": "silu",
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 4,
    "window_size": 112,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": (7, 15, 23, 31),
    "rope_theta": 10000.0,
}
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "mrope_section": (16, 24, 24),
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": None,
}
TOP_DEFAULTS: dict[str, Any] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger)."""

    family: ClassVar[str] = "qwen2_5_vl"

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """A whole Qwen2.5-VL model: vision tower + text decoder + special token ids."""

    family: ClassVar[str] = "qwen2_5_vl"

    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen2_5_vl"

    def __post_init__(self):
        t = self.text
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads {t.num_key_value_heads}")
        if t.mrope_section is None or 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if self.vision.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size {t.hidden_size}")

    def to_hf_dict(self) -> dict:
        """Returns a config.json dict in transformers-5's nested layout (what `save_pretrained` writes)."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen2_5_vl_text",
            **t.hf_fields(),
            "rope_parameters": {
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": list(t.mrope_section),
                "rope_theta": t.rope_theta,
            },
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        vision = {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "hidden_act": v.hidden_act,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "tokens_per_second": v.tokens_per_second,
            "window_size": v.window_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }


def config_from_hf_dict(d: dict, source: str = "config.json") -> Qwen25VLConfig:
    """Returns the model config for a parsed config.json (flat hub or nested transformers-5 layout) whose
    model_type is ``qwen2_5_vl`` (the registry, ``medee_jax.models.families``, dispatches on it)."""
    if d.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not a Qwen2.5-VL config ({MODEL_TYPES})")
    text_src = d.get("text_config") if isinstance(d.get("text_config"), dict) else d
    text_kw = pick(text_src, {k: v for k, v in TEXT_DEFAULTS.items() if k not in ("rope_theta", "mrope_section")})
    text_kw.update({k: TEXT_DEFAULTS[k] for k in ("rope_theta", "mrope_section")})
    text_kw.update(rope_fields(text_src))
    if text_kw["num_key_value_heads"] is None:
        text_kw["num_key_value_heads"] = text_kw["num_attention_heads"]
    text = TextConfig(**{k: text_kw[k] for k in (f.name for f in dataclasses.fields(TextConfig)) if k in text_kw})

    vis_src = d.get("vision_config") or {}
    vis_kw = pick(vis_src, {k: v for k, v in VISION_DEFAULTS.items() if k != "rope_theta"},
                   aliases={"in_chans": "in_channels"})
    vis_rope = vis_src.get("rope_parameters") or {}
    vis_kw["rope_theta"] = float(vis_rope.get("rope_theta", VISION_DEFAULTS["rope_theta"]))
    vis_kw["fullatt_block_indexes"] = tuple(int(i) for i in vis_kw["fullatt_block_indexes"])
    vision = VisionConfig(**vis_kw)

    top = pick(d, TOP_DEFAULTS)
    tie = bool(top["tie_word_embeddings"]) or bool(text_src.get("tie_word_embeddings", False))
    return Qwen25VLConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=tie,
        image_token_id=int(top["image_token_id"]),
        video_token_id=int(top["video_token_id"]),
        vision_start_token_id=int(top["vision_start_token_id"]),
        vision_end_token_id=int(top["vision_end_token_id"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Presets. The vision tower is the same for every released size; only out_hidden_size follows the LLM width.


def _released_vision(out_hidden_size: int) -> VisionConfig:
    return VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                        out_hidden_size=out_hidden_size, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)


def _preset(hidden, layers, heads, kv, inter, vocab, tie) -> Qwen25VLConfig:
    return Qwen25VLConfig(
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6,
                        max_position_embeddings=128000),
        vision=_released_vision(hidden),
        tie_word_embeddings=tie,
    )


PRESETS: dict[str, Qwen25VLConfig] = {
    "qwen2_5_vl_3b": _preset(2048, 36, 16, 2, 11008, 151936, True),
    "qwen2_5_vl_7b": _preset(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2_5_vl_32b": _preset(5120, 64, 40, 8, 27648, 152064, False),
    "qwen2_5_vl_72b": _preset(8192, 80, 64, 8, 29568, 152064, False),
}


def tiny_config(vocab_size: int = 512, *, tie_word_embeddings: bool = False, **special_ids) -> Qwen25VLConfig:
    """Returns a tiny Qwen2.5-VL-shaped config (for tests and the embedded demo); token ids are overridable."""
    return Qwen25VLConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, mrope_section=(2, 3, 3),
                        bos_token_id=None, eos_token_id=None),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
        tie_word_embeddings=tie_word_embeddings,
        **special_ids,
    )


def demo_config(tokenizer) -> Qwen25VLConfig:
    """Returns the embedded demo's tiny model for ``tokenizer`` (a transformers tokenizer, the demo one): its
    vocabulary rounded up to a multiple of 64 (as hub checkpoints pad the embedding) and its special token ids."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, **ids)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs (conventions of medee_jax.training.metrics: a multiply-add is 2 FLOPs, training = 3x forward, matmuls only).


def vision_flops_per_patch(vision_cfg: VisionConfig, *, trained: bool = False, patches_per_image: int = 1024) -> float:
    """Returns the vision tower's FLOPs per input patch: forward only when frozen, 3x forward when ``trained``.

    Counts the patch embedding, each block's qkv/proj/gate/up/down, the merger's two linears (per patch: divided
    by the merge unit) and attention. Window blocks attend within a window of (window_size/patch_size)^2 patches
    and full-attention blocks within the image (``patches_per_image``, 1024 = a 448x448 image); edge windows are
    counted as full windows.
    """
    d, i = vision_cfg.hidden_size, vision_cfg.intermediate_size
    m = d * vision_cfg.merge_unit
    macs = vision_cfg.patch_dim * d
    macs += vision_cfg.depth * (3 * d * d + d * d + 3 * d * i)
    macs += (m * m + m * vision_cfg.out_hidden_size) / vision_cfg.merge_unit
    window = min((vision_cfg.window_size // vision_cfg.patch_size) ** 2, patches_per_image)
    n_full = len(vision_cfg.fullatt_block_indexes)
    macs += 2 * d * (n_full * patches_per_image + (vision_cfg.depth - n_full) * window)  # q·k and p·v
    fwd = 2.0 * macs
    return 3.0 * fwd if trained else fwd


def vision_flops_per_unit(cfg: Qwen25VLConfig, *, trained: bool = False, units_per_image: int = 1024) -> float:
    """The family's FLOPs entry point: FLOPs per vision unit (a patch) for images of ``units_per_image`` patches."""
    return vision_flops_per_patch(cfg.vision, trained=trained, patches_per_image=units_per_image)
