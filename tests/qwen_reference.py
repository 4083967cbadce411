"""Tiny random Qwen2.5-VL checkpoints saved by transformers itself, and batches to compare against them."""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 300, 301, 302, 303
TEXT_VOCAB = 300  # ids below this are ordinary text


def tiny_hf_config(tie_word_embeddings: bool = False, **overrides):
    """Returns a transformers Qwen2_5_VLConfig for a tiny model (eager attention)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie_word_embeddings)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1])
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings, **overrides)
    cfg._attn_implementation = "eager"
    return cfg


def random_hf_model(cfg, seed: int = 0):
    """Returns a transformers Qwen2_5_VLForConditionalGeneration with every tensor random (biases and norms too).

    Matrices get std 1/sqrt(fan_in) so activations and logits are O(1): a port mistake shows up plainly.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
    return model


def image_span(grid) -> list[int]:
    """Returns the token ids of one image: <|vision_start|>, t*h*w/4 <|image_pad|>, <|vision_end|>."""
    return [VISION_START] + [IMAGE_TOKEN] * (int(np.prod(grid)) // 4) + [VISION_END]


def pad_rows(rows: list[list[int]], side: str, length: int | None = None):
    """Returns (input_ids, attention_mask) [B, L] int64 with rows padded left or right (pad id 0)."""
    length = length or max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        if side == "right":
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        else:
            ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask


def hf_logits_and_positions(model, ids, mask, pixel_values=None, grids=None):
    """Returns (fp32 logits [B, L, V], M-RoPE positions [3, B, L]) from transformers for one batch."""
    import torch

    mm = torch.tensor((ids == IMAGE_TOKEN).astype(np.int64))
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), mm_token_type_ids=mm)
    if pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        logits = model(**kwargs).logits.float().numpy()
        if grids is not None:
            pos, _ = model.model.get_rope_index(kwargs["input_ids"], mm, torch.tensor(grids),
                                                attention_mask=kwargs["attention_mask"])
            pos = pos.numpy()
        else:
            pos = None
    return logits, pos


def assert_logits_close(ours, ref, mask, tol: float = 1e-4):
    """Asserts max |ours - ref| over unpadded positions <= tol, on reference logits large enough to show a mistake."""
    valid = mask.astype(bool)
    err = np.abs(np.asarray(ours) - ref)[valid].max()
    assert np.abs(ref[valid]).max() > 1.0, "reference logits too small to reveal a mistake"
    assert err <= tol, f"max |Δlogit| {err:.3g} > {tol}"
