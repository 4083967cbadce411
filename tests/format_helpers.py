"""Shared helpers of the data-format tests: the committed reference fixtures, pipeline configs, batch comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medee_jax.data.pipeline import DataConfig
from medee_jax.models.qwen2_5_vl.config import tiny_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRL_FIXTURES = FIXTURES / "trl"
HF_FIXTURES = FIXTURES / "hf_datasets"
# The image processor bounds the fixtures were made with (make_reference_fixtures.py).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, records) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return Path(path)


def demo_model_config(chat_tokenizer):
    """The tiny Qwen2.5-VL config matching the demo tokenizer's special ids."""
    tok = chat_tokenizer.tokenizer
    ids = {name: tok.convert_tokens_to_ids(text) for name, text in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tiny_config(len(tok), **ids)


def data_config(paths, tokenizer_dir, mode, **kw) -> DataConfig:
    base = dict(paths=paths, tokenizer_dir=str(tokenizer_dir), mode=mode, batch_size=2, max_length=512,
                length_buckets=(128, 256, 512), patch_buckets=(64, 128, 256), min_pixels=MIN_PIXELS,
                max_pixels=MAX_PIXELS, seed=3, shuffle=False, shard_index=0, shard_count=1, read_threads=0,
                packing=False)
    base.update(kw)
    return DataConfig(**base)


def assert_batches_equal(a: list[dict], b: list[dict], skip=("sources",)) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert set(x) - set(skip) == set(y) - set(skip)
        for key in set(x) - set(skip):
            if key == "vision":
                for k in x[key]:
                    np.testing.assert_array_equal(x[key][k], y[key][k], err_msg=k)
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
