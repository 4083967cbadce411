"""The config of the shared Qwen2 text decoder, and small helpers the families use to read config.json files.

Plain dataclasses and dict handling only: importable without jax (data workers read configs too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROPE_TYPES = ("default", "dynamic")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 text decoder (GQA with q/k/v bias, SwiGLU, RoPE).

    Rotary positions: ``mrope_section`` set -> M-RoPE over (T, H, W) positions [3, B, L] (Qwen2.5-VL); None ->
    plain 1-D RoPE over positions [B, L] (InternVL3), optionally with dynamic NTK scaling (``rope_type="dynamic"``,
    ``rope_factor``), which changes the frequencies only for sequences longer than ``max_position_embeddings``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] | None = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    rope_type: str = "default"
    rope_factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and self.mrope_section is not None:
            raise ValueError(f"rope type {self.rope_type!r} with M-RoPE (mrope_section) is not supported")
        if self.hidden_act != "silu":
            raise ValueError(f"text hidden_act {self.hidden_act!r} is not supported (the Qwen2 decoder uses silu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_fields(self) -> dict:
        """Returns the config.json fields of a transformers Qwen2-style text config (without model_type, RoPE and
        embedding tying, which each family writes its own way)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def rope_parameters(self) -> dict:
        """Returns transformers-5's ``rope_parameters`` dict for this decoder (without M-RoPE keys)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "dynamic":
            out["factor"] = self.rope_factor
        return out


def pick(src: dict, defaults: dict, aliases: dict[str, str] | None = None) -> dict:
    """Returns ``defaults`` updated with the non-null values ``src`` has for its keys (``aliases``: other names)."""
    out = dict(defaults)
    for key in defaults:
        if key in src and src[key] is not None:
            out[key] = src[key]
    for alias, key in (aliases or {}).items():
        if key not in src and alias in src:
            out[key] = src[alias]
    return out


def rope_fields(d: dict) -> dict:
    """Returns {'rope_theta', 'mrope_section', 'rope_type', 'rope_factor'} found in a text config dict, reading
    transformers-5's ``rope_parameters`` and the older ``rope_scaling`` + top-level ``rope_theta``."""
    out: dict[str, Any] = {}
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = float(rope["rope_theta"])
    elif "rope_theta" in d:
        out["rope_theta"] = float(d["rope_theta"])
    if "mrope_section" in rope:
        out["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
    kind = rope.get("rope_type", rope.get("type"))
    if kind in ("dynamic",):
        out["rope_type"] = "dynamic"
        out["rope_factor"] = float(rope.get("factor", 1.0))
    elif kind not in (None, "default", "mrope"):
        out["rope_type"] = str(kind)  # refused by TextConfig with the supported list
    return out
