"""Tiny random InternVL checkpoints saved by transformers itself, their original remote-code layout, and batches to
compare against them."""

from __future__ import annotations

import json
import os

import numpy as np

IMG_CONTEXT, IMG_START, IMG_END = 300, 301, 302
TEXT_VOCAB = 300  # ids below this are ordinary text
TILE = 56  # tile side in pixels: a 4 x 4 patch grid, 4 image tokens per tile after the 2x2 pixel shuffle
TOKENS_PER_TILE = 4
VARIANTS = ("300m", "6b")  # InternViT styles: LayerNorm + q/k/v bias, or RMSNorm + qk-norm without q/k/v bias


def tiny_hf_config(variant: str = "300m", tie_word_embeddings: bool = False, text=None, **overrides):
    """Returns a transformers InternVLConfig for a tiny model (eager attention)."""
    from transformers import InternVLConfig

    six_b = variant == "6b"
    text_cfg = dict(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
                    tie_word_embeddings=tie_word_embeddings)
    text_cfg.update(text or {})
    vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=TILE,
                  patch_size=14, attention_bias=not six_b, use_qk_norm=six_b,
                  norm_type="rms_norm" if six_b else "layer_norm", layer_norm_eps=1e-6)
    cfg = InternVLConfig(text_config=text_cfg, vision_config=vision, image_token_id=IMG_CONTEXT,
                         tie_word_embeddings=tie_word_embeddings, **overrides)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return cfg


def random_hf_model(cfg, seed: int = 0):
    """Returns a transformers InternVLForConditionalGeneration with every tensor random: matrices std
    1/sqrt(fan_in), norms 1 + noise, biases, layer scales (lambda), CLS token and position embeddings non-trivial."""
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "lambda" in name:
                p.copy_(0.5 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "cls_token" in name or "position_embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
    return model


def image_span(tiles: int) -> list[int]:
    """Returns the token ids of one image of ``tiles`` tiles: <img>, <IMG_CONTEXT> x 4·tiles, </img>."""
    return [IMG_START] + [IMG_CONTEXT] * (TOKENS_PER_TILE * tiles) + [IMG_END]


def hf_logits(model, ids, mask, pixel_values=None):
    """Returns fp32 logits [B, L, V] from transformers for one batch."""
    import torch

    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.tensor(pixel_values)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


ORIGINAL_VISION = (("vision_tower.", "vision_model."), ("encoder.layer.", "encoder.layers."),
                   ("embeddings.cls_token", "embeddings.class_embedding"),
                   ("embeddings.position_embeddings", "embeddings.position_embedding"),
                   ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
                   ("lambda_1", "ls1"), ("lambda_2", "ls2"), ("attention.projection_layer", "attn.proj"),
                   ("attention.q_norm", "attn.q_norm"), ("attention.k_norm", "attn.k_norm"),
                   ("layernorm_before", "norm1"), ("layernorm_after", "norm2"))
ORIGINAL_PROJECTOR = (("multi_modal_projector.layer_norm", "mlp1.0"), ("multi_modal_projector.linear_1", "mlp1.1"),
                      ("multi_modal_projector.linear_2", "mlp1.3"))


def write_original_layout(hf_dir: str, out_dir: str) -> str:
    """Writes the "-hf" checkpoint ``hf_dir`` in OpenGVLab's original remote-code layout (what transformers'
    conversion script reads): fused attn.qkv rows q | k | v, vision_model.*, mlp1.*, and an internvl_chat
    config.json with llm_config / vision_config (qkv_bias, qk_normalization). Tensors are copied bit for bit."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        new = key
        for old, repl in ORIGINAL_VISION + ORIGINAL_PROJECTOR:
            new = new.replace(old, repl)
        for part in ("q", "k", "v"):
            marker = f"attention.{part}_proj."
            if marker in new:
                stem, kind = new.split(marker)
                fused.setdefault(f"{stem}attn.qkv.{kind}", {})[part] = value
                break
        else:
            out[new] = value
    for key, parts in fused.items():
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    text, vision = dict(hf["text_config"]), dict(hf["vision_config"])
    vision["qkv_bias"] = vision.pop("attention_bias")
    vision["qk_normalization"] = vision.pop("use_qk_norm")
    vision.update(model_type="intern_vit_6b", image_size=vision["image_size"][0], patch_size=vision["patch_size"][0])
    for gone in ("use_mean_pooling", "use_mask_token", "use_absolute_position_embeddings"):
        vision.pop(gone, None)
    text["architectures"] = ["Qwen2ForCausalLM"]
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        text["rope_scaling"] = {"type": rope["rope_type"], "rope_type": rope["rope_type"], "factor": rope["factor"]}
    original = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": text,
                "vision_config": vision, "downsample_ratio": hf["downsample_ratio"], "select_layer": -1,
                "ps_version": "v2", "force_image_size": vision["image_size"], "template": "internvl2_5",
                "tie_word_embeddings": hf["tie_word_embeddings"], "dynamic_image_size": True, "use_thumbnail": True,
                "min_dynamic_patch": 1, "max_dynamic_patch": 12}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(original, f, indent=2)
    return out_dir


def hf_processor(tokenizer_dir, tile: int = TILE, tokens_per_tile: int = TOKENS_PER_TILE):
    """Returns transformers' InternVLProcessor over ``tokenizer_dir`` (a tokenizer with InternVL's named image
    tokens) and a GotOcr2ImageProcessorPil configured as InternVL3's "-hf" processor on ``tile`` px tiles.

    Built without ``__init__``, which insists on a video processor (it needs torchvision); images and text go
    through transformers' own ``InternVLProcessor.__call__`` and image processor unchanged.
    """
    import re

    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    proc = object.__new__(InternVLProcessor)
    proc.image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=12,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc.tokenizer, proc.chat_template, proc.image_seq_length = tok, tok.chat_template, tokens_per_tile
    proc.start_image_token, proc.end_image_token = tok.start_image_token, tok.end_image_token
    proc.image_token, proc.video_token = tok.context_image_token, tok.video_token
    proc.start_image_token_id, proc.end_image_token_id = tok.start_image_token_id, tok.end_image_token_id
    proc.image_token_id = tok.context_image_token_id
    proc.multimodal_pattern = re.compile(f"(?P<image>{re.escape(proc.image_token)})|(?P<video>"
                                         f"{re.escape(proc.video_token)})")
    return proc
